"""`encfs fsck`, `encfs inspect`, `encfs decrypt` on backing dirs made through a real mount."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import both_name_modes

S = fmt.SIDECAR_SUFFIX
BS = fmt.DEFAULT_BLOCK_SIZE


def encfs(m, *args, check_rc=None) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "encfs", *args, "--kms-socket",
                          m.kms.socket_path, "--project-id", m.kms.project_id],
                         capture_output=True, timeout=120)
    assert b"Traceback" not in res.stderr, res.stderr.decode()
    if check_rc is not None:
        assert res.returncode == check_rc, res.stdout.decode() + res.stderr.decode()
    return res


def fsck_json(m, *args, rc=None) -> dict:
    res = encfs(m, "fsck", m.backing, "--json", *args, check_rc=rc)
    return json.loads(res.stdout)


@pytest.fixture
def populated(encrypted_mount):
    m = encrypted_mount
    os.makedirs(f"{m.mountpoint}/dir")
    contents = {"a": os.urandom(10000), "b": os.urandom(BS + 5000), "dir/c": os.urandom(5 * BS),
                "empty": b""}
    for name, data in contents.items():
        with open(f"{m.mountpoint}/{name}", "wb") as f:
            f.write(data)
    os.symlink("a", f"{m.mountpoint}/link")
    m.unmount()
    return m, contents


def kinds(report: dict) -> list[tuple[str, str]]:
    return sorted((p["kind"], p["path"]) for p in report["problems"])


def test_fsck_refuses_while_mounted(encrypted_mount):
    res = encfs(encrypted_mount, "fsck", encrypted_mount.backing, check_rc=8)
    assert b"in use by a running encfs mount" in res.stderr and b"unmount it" in res.stderr


def test_fsck_clean(populated):
    m, _ = populated
    report = fsck_json(m, rc=0)
    assert report["problems"] == [] and report["files"] == 4
    assert fsck_json(m, "--no-kms", rc=0)["problems"] == []


def test_fsck_repairs_swapped_and_orphaned_sidecars(populated):
    m, contents = populated
    b = m.backing
    os.rename(f"{b}/a{S}", f"{b}/tmpname")
    os.rename(f"{b}/b{S}", f"{b}/a{S}")
    os.rename(f"{b}/tmpname", f"{b}/b{S}")
    os.rename(f"{b}/dir/c{S}", f"{b}/dir/stray{S}")  # as a crash between two renames would
    report = fsck_json(m, rc=4)
    assert kinds(report) == [("file-id-mismatch", "a"), ("file-id-mismatch", "b"),
                             ("missing-sidecar", "dir/c")]
    report = fsck_json(m, "--repair", rc=1)
    assert all(p["repaired"] for p in report["problems"])
    assert fsck_json(m, rc=0)["problems"] == []
    m.mount()
    for name, data in contents.items():
        assert open(f"{m.mountpoint}/{name}", "rb").read() == data


@both_name_modes
def test_fsck_moves_unrepairable_to_lost_found_and_keeps_bytes(populated):
    m, contents = populated
    b = m.backing
    raw = bytearray(open(m.backing_path("dir/c"), "rb").read())
    raw[fmt.block_offset(3, BS) + 100] ^= 1
    open(m.backing_path("dir/c"), "wb").write(raw)
    open(f"{b}/.encfs/tmp/t-leftover", "wb").write(b"partial")
    for i in range(300):  # a crashed mount's spare sidecar inodes
        open(f"{b}/.encfs/tmp/s-{i:016x}", "wb").close()
    with open(f"{b}/orphan{S}", "wb") as f:
        f.write(open(m.backing_path(f"a{S}"), "rb").read())  # a copy whose data file is gone
    os.unlink(m.backing_path(f"a{S}"))
    os.rename(f"{b}/orphan{S}", m.backing_path(f"orphan-moved{S}"))
    report = fsck_json(m, rc=4)
    got = kinds(report)
    assert ("bad-block", m.backing_rel("dir/c")) in got
    assert ("temp-file", ".encfs/tmp/t-leftover") in got
    assert ("missing-sidecar", m.backing_rel("a")) in got
    spares = [p for p in report["problems"] if p["kind"] == "spare-files"]
    assert len(spares) == 1 and spares[0]["detail"].startswith("300 spare")  # one line
    bad = next(p for p in report["problems"] if p["kind"] == "bad-block")
    assert "block 3" in bad["detail"]
    report = fsck_json(m, "--repair")
    assert report["exit_code"] == 1, report
    # under its plaintext path flattened, in a lost+found the mount shows (encrypted
    # names: both names encrypted)
    assert open(m.backing_path("lost+found/dir%c"), "rb").read() == bytes(raw)  # every byte
    assert os.path.exists(m.backing_path(f"lost+found/dir%c{S}"))
    assert not os.path.exists(f"{b}/.encfs/tmp/t-leftover")
    assert os.listdir(f"{b}/.encfs/tmp") == []
    assert fsck_json(m, rc=0)["problems"] == []
    m.mount()
    assert open(f"{m.mountpoint}/a", "rb").read() == contents["a"]
    assert "dir%c" in os.listdir(f"{m.mountpoint}/lost+found")
    with open(f"{m.mountpoint}/lost+found/dir%c", "rb") as f:
        assert f.read(BS) == contents["dir/c"][:BS]  # readable up to the bad block


@both_name_modes
def test_fsck_cuts_a_torn_block_and_saves_the_original(populated):
    m, contents = populated
    path = m.backing_path("b")
    original = open(path, "rb").read()
    torn = fmt.block_offset(1, BS) + 10  # the second block's write stopped after 10 bytes
    os.truncate(path, torn)
    report = fsck_json(m, "--repair", rc=1)
    assert kinds(report) == [("torn-block", m.backing_rel("b"))]
    assert open(m.backing_path("lost+found/b.torn"), "rb").read() == original[:torn]
    assert open(path, "rb").read() == original[:fmt.block_offset(1, BS)]
    assert fsck_json(m, rc=0)["problems"] == []
    m.mount()
    assert open(f"{m.mountpoint}/b", "rb").read() == contents["b"][:BS]
    assert os.listdir(f"{m.mountpoint}/lost+found") == ["b.torn"]


def test_fsck_reports_unusable_key(populated):
    m, _ = populated
    c = m.kms.client
    key = c.create_key("tenant")
    c.call("disable-key", {"key_id": key["key_id"]})
    # Point file b at the disabled key by re-wrapping its DEK there (as rewrap would).
    rec = fmt.decode_sidecar(open(f"{m.backing}/b{S}", "rb").read())
    dek = c.decrypt_datakey(rec.key_id, rec.cipher_text, aad=rec.file_id.hex())
    c.call("enable-key", {"key_id": key["key_id"]})
    import hashlib
    wrapped = c.call("encrypt-datakey", {
        "key_id": key["key_id"], "plain_text": (dek + hashlib.sha256(dek).digest()).hex(),
        "datakey_plain_length": "32", "additional_authenticated_data": rec.file_id.hex()})
    c.call("disable-key", {"key_id": key["key_id"]})
    new = fmt.KeyRecord(rec.file_id, key["key_id"], bytes.fromhex(wrapped["cipher_text"]),
                        rec.created_ns)
    open(f"{m.backing}/b{S}", "wb").write(fmt.encode_sidecar(new))
    report = fsck_json(m, rc=4)
    assert kinds(report) == [("key-unusable", "b")]
    assert "KMS.0209" in report["problems"][0]["detail"]


def test_inspect_and_decrypt(populated):
    m, contents = populated
    info = json.loads(encfs(m, "inspect", f"{m.backing}/dir/c", "--json", check_rc=0).stdout)
    rec = fmt.decode_sidecar(open(f"{m.backing}/dir/c{S}", "rb").read())
    assert info["cmk_id"] == m.key_id and info["cmk_alias"] == "sfs/default"
    assert info["file_id"] == rec.file_id.hex() and info["key_version"] is not None
    assert info["plaintext_size"] == 5 * BS and info["format_version"] == 1
    dek = m.kms.client.decrypt_datakey(rec.key_id, rec.cipher_text, aad=rec.file_id.hex())
    text = encfs(m, "inspect", f"{m.backing}/dir/c", check_rc=0).stdout
    assert dek.hex().encode() not in text.lower() and str(5 * BS).encode() in text
    out = encfs(m, "decrypt", f"{m.backing}/dir/c", check_rc=0).stdout
    assert out == contents["dir/c"]
    # Through the mount path too.
    m.mount()
    info2 = json.loads(encfs(m, "inspect", f"{m.mountpoint}/dir/c", "--json", check_rc=0).stdout)
    assert info2["file_id"] == info["file_id"]
    m.unmount()
    found = encfs(m, "inspect", "--file-id", rec.file_id.hex(), m.backing, check_rc=0)
    assert found.stdout.decode().split() == [f"{m.backing}/dir/c"]
    assert encfs(m, "inspect", "--file-id", "00" * 16, m.backing).returncode == 1
    bad = encfs(m, "decrypt", f"{m.backing}/nope")
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
