"""`encfs rewrap`: re-wrapping DEKs after rotation or to another CMK, crash-safe, resumable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import temporary_mount
from encfs.keys import key_version

S = fmt.SIDECAR_SUFFIX


def rewrap(m, *args, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "encfs", "rewrap", m.backing, *args,
                          "--kms-socket", m.kms.socket_path, "--project-id", m.kms.project_id],
                         capture_output=True, text=True, timeout=300)
    assert "Traceback" not in res.stderr
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def records(m) -> dict[str, fmt.KeyRecord]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(m.backing):
        dirnames[:] = [d for d in dirnames if d != ".encfs"]
        for n in filenames:
            if n.endswith(S):
                p = os.path.join(dirpath, n)
                out[os.path.relpath(p, m.backing)] = fmt.decode_sidecar(open(p, "rb").read())
    return out


def data_blocks(m) -> dict[str, bytes]:
    return {rel[:-len(S)]: open(os.path.join(m.backing, rel[:-len(S)]), "rb").read()
            for rel in records(m)}


def write_files(m, prefix: str, n: int) -> dict[str, bytes]:
    os.makedirs(f"{m.mountpoint}/{prefix}", exist_ok=True)
    out = {}
    for i in range(n):
        rel = f"{prefix}/f{i}"
        out[rel] = os.urandom(100 + i * 37)
        with open(f"{m.mountpoint}/{rel}", "wb") as f:
            f.write(out[rel])
    return out


def newest_version(m, key_id: str) -> int:
    return m.kms.client.call("get-key-rotation-status", {"key_id": key_id})[
        "number_of_rotations"] + 1


def wait_for_new_files_under(m, version: int) -> None:
    """New files use DEKs the mount prepared ahead; it notices a rotation at its next key
    check (a quarter of the key cache TTL) and drops those wrapped under the old version."""
    deadline = time.monotonic() + 15
    while True:
        open(f"{m.mountpoint}/probe", "wb").close()
        got = key_version(records(m)["probe" + S])
        os.unlink(f"{m.mountpoint}/probe")
        if got == version:
            return
        assert time.monotonic() < deadline, f"new files still use key version {got}"
        time.sleep(0.1)


def test_rotate_rewrap_rotate(encrypted_mount):
    m = encrypted_mount
    m.extra_args = ["--key-cache-ttl", "2"]  # key checks every 0.5 s
    m.remount()
    c = m.kms.client
    files = write_files(m, "old", 5)
    c.call("rotate-on-demand", {"key_id": m.key_id})
    wait_for_new_files_under(m, 2)
    files |= write_files(m, "new", 5)
    recs = records(m)
    assert {key_version(recs[f"old/f{i}{S}"]) for i in range(5)} == {1}
    assert {key_version(recs[f"new/f{i}{S}"]) for i in range(5)} == {2}
    before = data_blocks(m)
    res = rewrap(m)  # while mounted
    # The sidecars record each DEK's key version; the KMS's rotation status tells the newest.
    assert res.stdout.strip() == "5 rewrapped, 5 already current, 0 failed"
    c.call("rotate-on-demand", {"key_id": m.key_id})
    rewrap(m)
    newest = newest_version(m, m.key_id)
    assert newest == 3
    assert {key_version(r) for r in records(m).values()} == {newest}
    assert data_blocks(m) == before  # no data block was re-encrypted
    m.remount()
    for rel, content in files.items():
        assert open(f"{m.mountpoint}/{rel}", "rb").read() == content
    # Running it again changes nothing.
    again = rewrap(m)
    assert again.stdout.strip() == "0 rewrapped, 10 already current, 0 failed"


@pytest.fixture
def tenant_mount(kms_server):
    """A mount whose new files use a customer key (default keys cannot be disabled)."""
    kms_server.client.create_key("tenant-a")
    with temporary_mount(kms_server, key="tenant-a") as m:
        yield m


@pytest.mark.fuse
def test_rewrap_to_another_key_then_disable_old(tenant_mount):
    m = tenant_mount
    c = m.kms.client
    files = write_files(m, "tree", 8)
    other = write_files(m, "elsewhere", 2)
    target = c.create_key("tenant-b")["key_id"]
    rewrap(m, "--to-key", "tenant-b", "--path", f"{m.mountpoint}/tree")  # a mounted path
    recs = records(m)
    assert {recs[f"tree/f{i}{S}"].key_id for i in range(8)} == {target}
    assert {recs[f"elsewhere/f{i}{S}"].key_id for i in range(2)} == {m.key_id}
    m.unmount()
    old_key = m.key_id
    c.call("disable-key", {"key_id": old_key})
    m.key_id = target  # new files now go to tenant-b; a new mount has no cached DEKs
    m.mount()
    for rel, content in files.items():
        assert open(f"{m.mountpoint}/{rel}", "rb").read() == content
    with pytest.raises(OSError) as e:  # the old key is disabled: revoked, not any error
        open(f"{m.mountpoint}/elsewhere/f0", "rb").read()
    assert e.value.errno == errno.EKEYREVOKED, e.value
    c.call("enable-key", {"key_id": old_key})
    assert open(f"{m.mountpoint}/elsewhere/f0", "rb").read() == other["elsewhere/f0"]


def test_rewrap_killed_halfway_then_resumed(encrypted_mount):
    m = encrypted_mount
    files = write_files(m, "many", 400)
    m.unmount()
    m.kms.client.call("rotate-on-demand", {"key_id": m.key_id})
    proc = subprocess.Popen([sys.executable, "-m", "encfs", "rewrap", m.backing,
                             "--kms-socket", m.kms.socket_path,
                             "--project-id", m.kms.project_id],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            done = sum(1 for r in records(m).values() if r.seq > 1)
            if done >= 20 or proc.poll() is not None:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    partly = [r.seq > 1 for r in records(m).values()]
    assert any(partly) and not all(partly), "the kill did not land halfway"
    rewrap(m)
    assert {key_version(r) for r in records(m).values()} == {2}
    m.mount()
    for rel, content in files.items():
        assert open(f"{m.mountpoint}/{rel}", "rb").read() == content


def test_rekey_gives_new_deks_and_keeps_content_and_metadata(encrypted_mount):
    m = encrypted_mount
    files = write_files(m, "tree", 4)
    os.chmod(f"{m.mountpoint}/tree/f0", 0o640)
    os.utime(f"{m.mountpoint}/tree/f0", ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.setxattr(f"{m.mountpoint}/tree/f0", "user.note", b"kept")
    os.link(f"{m.mountpoint}/tree/f3", f"{m.mountpoint}/f3-link")
    before = records(m)
    res = subprocess.run([sys.executable, "-m", "encfs", "rekey", f"{m.mountpoint}/tree"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("3 rekeyed, 1 skipped, 0 failed")
    after = records(m)
    for i in range(3):
        rel = f"tree/f{i}{S}"
        assert after[rel].file_id != before[rel].file_id
        assert after[rel].wrapped_dek != before[rel].wrapped_dek
    assert after[f"tree/f3{S}"] == before[f"tree/f3{S}"]  # hard-linked: skipped
    st = os.stat(f"{m.mountpoint}/tree/f0")
    assert oct(st.st_mode & 0o7777) == oct(0o640)
    assert st.st_mtime_ns == 1_600_000_000_000_000_000
    assert os.getxattr(f"{m.mountpoint}/tree/f0", "user.note") == b"kept"
    m.remount()
    for rel, content in files.items():
        assert open(f"{m.mountpoint}/{rel}", "rb").read() == content
    assert not [n for n in os.listdir(f"{m.mountpoint}/tree") if n.startswith(".encfs-rekey")]
    outside = subprocess.run([sys.executable, "-m", "encfs", "rekey", m.backing],
                             capture_output=True, text=True)
    assert outside.returncode == 2 and "not inside a mounted encfs" in outside.stderr
