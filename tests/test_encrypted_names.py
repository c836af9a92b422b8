"""Encrypted names (#18, docs/FORMAT.md "Encrypted names"): with --encrypt-names the
backing dir shows no file name, symlink target or xattr name; the mode is chosen at first
use and followed afterwards; revoking the name key's CMK hides the names; every tool
follows. Real KMS, real FUSE mounts, real tools."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from encfs.pytest_plugin import EncryptedMount, make_mount, short_tempdir, start_kms_server
from test_key_lifecycle import wait_errno

pytestmark = pytest.mark.fuse

#: every plaintext name, target and xattr name the tree below uses; none may appear in
#: the backing dir, in any name, link target, xattr name or file content
SECRETS = ["patient-4711", "2026-layoffs.xlsx", "customer-acme", "zebrafish-notes",
           "Q" * 200, "lengthy-" + "w" * 247, "targetsecret-path", "hardlinkname",
           "fifoname", "user.diagnosis", "user.folder-label", "renamed-patient",
           "x.sfskey", "encfs.long.fakename"]


def _tools(m: EncryptedMount, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encfs", *args, "--kms-socket",
                           m.kms.socket_path, "--project-id", m.kms.project_id],
                          capture_output=True, text=True, timeout=120)


def _make_tree(mp: str) -> None:
    os.makedirs(f"{mp}/patient-4711/customer-acme")
    with open(f"{mp}/patient-4711/2026-layoffs.xlsx", "wb") as f:
        f.write(b"content")
    for name in ("Q" * 200, "lengthy-" + "w" * 247, "x.sfskey", "encfs.long.fakename"):
        with open(f"{mp}/patient-4711/customer-acme/{name}", "wb") as f:
            f.write(name.encode()[:10])
    os.mkdir(f"{mp}/patient-4711/{'Q' * 200}")  # a long directory name
    os.symlink("../targetsecret-path/zebrafish-notes", f"{mp}/patient-4711/zebrafish-notes")
    os.link(f"{mp}/patient-4711/2026-layoffs.xlsx", f"{mp}/hardlinkname")
    os.mkfifo(f"{mp}/fifoname")
    os.setxattr(f"{mp}/patient-4711/2026-layoffs.xlsx", "user.diagnosis", b"v1")
    os.setxattr(f"{mp}/patient-4711", "user.folder-label", b"v2")


def _everything_in(backing: str) -> list[bytes]:
    """Every name, link target, xattr name and value and regular file's content below
    ``backing`` (its control dir included)."""
    out: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(backing)):
        for name in [b""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            out.append(name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out.append(os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    out.append(f.read())
            if not stat.S_ISLNK(st.st_mode):
                for x in os.listxattr(path, follow_symlinks=False):
                    out.append(os.fsencode(x))
                    out.append(os.getxattr(path, x, follow_symlinks=False))
    return out


@pytest.fixture
def enc_mount(kms_server):
    work = short_tempdir("encfs-encn-")
    m = make_mount(kms_server, work, extra_args=["--encrypt-names"])
    try:
        yield m
    finally:
        m.unmount()
        shutil.rmtree(work, ignore_errors=True)


def test_backing_dir_shows_no_plaintext_name_target_or_xattr_name(enc_mount):
    m = enc_mount
    mp = m.mountpoint
    _make_tree(mp)
    # a renamed directory keeps its children's names valid (their AD is its id)
    os.rename(f"{mp}/patient-4711", f"{mp}/renamed-patient")
    os.mkdir(f"{mp}/patient-4711")  # the old name in use again, by another directory
    expected_tree = sorted(os.listdir(f"{mp}/renamed-patient"))
    assert expected_tree == sorted(["2026-layoffs.xlsx", "customer-acme", "Q" * 200,
                                    "zebrafish-notes"])
    m.remount()
    assert sorted(os.listdir(f"{mp}/renamed-patient")) == expected_tree
    assert sorted(os.listdir(f"{mp}/renamed-patient/customer-acme")) == sorted(
        ["Q" * 200, "lengthy-" + "w" * 247, "x.sfskey", "encfs.long.fakename"])
    assert os.readlink(f"{mp}/renamed-patient/zebrafish-notes") == \
        "../targetsecret-path/zebrafish-notes"
    # a symlink's size is its plaintext target's length, as on ext4
    assert os.lstat(f"{mp}/renamed-patient/zebrafish-notes").st_size == \
        len("../targetsecret-path/zebrafish-notes")
    assert os.listxattr(f"{mp}/renamed-patient/2026-layoffs.xlsx") == ["user.diagnosis"]
    assert os.getxattr(f"{mp}/hardlinkname", "user.diagnosis") == b"v1"
    assert os.getxattr(f"{mp}/renamed-patient", "user.folder-label") == b"v2"
    assert stat.S_ISFIFO(os.lstat(f"{mp}/fifoname").st_mode)
    m.unmount()
    blob = b"\n".join(_everything_in(m.backing))
    # the walk saw the tree (a check that cannot fail is a defect)
    assert blob.count(b"encfs.long.") >= 3 and b"user.encfs.dirid" in blob
    for secret in SECRETS:
        for part in {secret, secret.split(".")[-1]} - {"sfskey", "xlsx"}:
            assert os.fsencode(part) not in blob, f"{part!r} is in the backing dir"
    cfg = json.load(open(f"{m.backing}/.encfs/config.json"))
    assert cfg["encrypt_names"] is True


def test_mode_follows_the_config_and_is_never_switched_silently(kms_server):
    work = short_tempdir("encfs-encn-")
    try:
        m = make_mount(kms_server, work, extra_args=["--encrypt-names"])
        with open(f"{m.mountpoint}/first-file", "w") as f:
            f.write("1")
        m.unmount()
        # mounted again without the flag: the config decides, names stay encrypted
        m.extra_args = []
        m.mount()
        with open(f"{m.mountpoint}/second-file", "w") as f:
            f.write("2")
        assert sorted(os.listdir(m.mountpoint)) == ["first-file", "second-file"]
        m.unmount()
        assert not {"first-file", "second-file"} & set(os.listdir(m.backing))
        # a plaintext-name backing dir with content refuses the flag, unchanged
        plain = make_mount(kms_server, f"{work}/p", extra_args=[])
        open(f"{plain.mountpoint}/kept", "w").close()
        plain.unmount()
        cfg_before = open(f"{plain.backing}/.encfs/config.json", "rb").read()
        r = subprocess.run([sys.executable, "-m", "encfs", "mount", plain.backing,
                            plain.mountpoint, "--encrypt-names", "--foreground",
                            "--kms-socket", kms_server.socket_path, "--project-id",
                            kms_server.project_id], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1
        assert "already holds files with plaintext names" in r.stderr
        assert "Traceback" not in r.stderr
        assert open(f"{plain.backing}/.encfs/config.json", "rb").read() == cfg_before
        assert "kept" in os.listdir(plain.backing)
        assert not os.path.exists(f"{plain.backing}/.encfs/names.key")
        # an empty one that was used with plaintext names may still take the mode
        empty = make_mount(kms_server, f"{work}/e", extra_args=[])
        empty.unmount()
        empty.extra_args = ["--encrypt-names"]
        empty.mount()
        open(f"{empty.mountpoint}/now-encrypted", "w").close()
        empty.unmount()
        assert "now-encrypted" not in os.listdir(empty.backing)
    finally:
        for mp in (f"{work}/mnt", f"{work}/p/mnt", f"{work}/e/mnt"):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


GRACE = 1.0


def test_revoking_the_name_key_hides_names_and_enabling_brings_them_back():
    work = short_tempdir("encfs-encn-rev-")
    kms = start_kms_server(f"{work}/kms")
    m = None
    try:
        kms.client.create_key("names-tenant")
        m = make_mount(kms, work, key="names-tenant",
                       extra_args=["--encrypt-names", "--key-cache-ttl", str(GRACE)])
        os.mkdir(f"{m.mountpoint}/visible-dir")
        assert os.listdir(m.mountpoint) == ["visible-dir"]
        kms.client.call("disable-key", {"key_id": m.key_id})
        wait_errno(lambda: os.listdir(m.mountpoint), errno.EKEYREVOKED, GRACE + 10)
        with pytest.raises(OSError) as e:
            os.stat(f"{m.mountpoint}/another-name")
        assert e.value.errno == errno.EKEYREVOKED
        # offline, the tools cannot read the names either
        r = _tools(m, "ls", m.backing)
        assert r.returncode == 1 and "visible-dir" not in r.stdout
        assert "Traceback" not in r.stderr
        kms.client.call("enable-key", {"key_id": m.key_id})
        deadline = time.monotonic() + GRACE + 10
        while True:
            try:
                assert os.listdir(m.mountpoint) == ["visible-dir"]
                break
            except OSError:
                assert time.monotonic() < deadline, "names still hidden after enable-key"
                time.sleep(0.05)
    finally:
        if m is not None:
            m.unmount()
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_tools_show_plaintext_and_backing_names(enc_mount):
    m = enc_mount
    mp = m.mountpoint
    _make_tree(mp)
    doc = f"{mp}/patient-4711/2026-layoffs.xlsx"
    backing_doc = m.backing_path("patient-4711/2026-layoffs.xlsx")
    assert os.path.exists(backing_doc) and "layoffs" not in backing_doc
    # inspect: both names, from the mount path and from the backing path
    for arg in (doc, backing_doc):
        r = _tools(m, "inspect", "--json", arg)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["name"] == "/patient-4711/2026-layoffs.xlsx"
        assert info["backing_path"] == backing_doc
    # inspect --file-id: the backing path and the plaintext one
    r = _tools(m, "inspect", "--file-id", info["file_id"], "--json", m.backing)
    assert r.returncode == 0, r.stderr
    assert sorted(x["name"] for x in json.loads(r.stdout)) == [
        "/hardlinkname", "/patient-4711/2026-layoffs.xlsx"]
    # rekey works through the mount: a new DEK and file id, the same name and content
    acme = f"{mp}/patient-4711/customer-acme"
    before = json.loads(_tools(m, "inspect", "--json", f"{acme}/x.sfskey").stdout)
    r = subprocess.run([sys.executable, "-m", "encfs", "rekey", acme, "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["rekeyed"] == 4, r.stdout + r.stderr
    after = json.loads(_tools(m, "inspect", "--json", f"{acme}/x.sfskey").stdout)
    assert after["file_id"] != before["file_id"] and after["name"] == before["name"]
    assert sorted(os.listdir(acme)) == sorted(["Q" * 200, "lengthy-" + "w" * 247,
                                               "x.sfskey", "encfs.long.fakename"])
    assert open(f"{acme}/x.sfskey", "rb").read() == b"x.sfskey"
    # decrypt: a mount path, a backing path, or a plaintext path in a backing dir
    for args in ([doc], [backing_doc], ["patient-4711/2026-layoffs.xlsx", "--in", m.backing]):
        r = subprocess.run([sys.executable, "-m", "encfs", "decrypt", *args, "--kms-socket",
                            m.kms.socket_path, "--project-id", m.kms.project_id],
                           capture_output=True, timeout=60)
        assert r.returncode == 0 and r.stdout == b"content", r.stderr
    # ls: plaintext names and targets for recovery, with only the KMS
    r = _tools(m, "ls", "--json", "-R", m.backing)
    assert r.returncode == 0, r.stderr
    rows = {row["path"]: row for row in json.loads(r.stdout)}
    assert "/patient-4711/customer-acme/" + "lengthy-" + "w" * 247 in rows
    assert rows["/patient-4711/zebrafish-notes"]["target"] == \
        "../targetsecret-path/zebrafish-notes"
    assert rows["/patient-4711/2026-layoffs.xlsx"]["backing_path"] == backing_doc
    r = _tools(m, "ls", m.backing, "patient-4711/customer-acme")
    assert r.returncode == 0 and "x.sfskey" in r.stdout, r.stderr
    m.unmount()
    # fsck: clean; a planted entry is reported with its backing name
    r = _tools(m, "fsck", m.backing)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _tools(m, "fsck", "--no-kms", m.backing).returncode == 0
    os.unlink(backing_doc + ".sfskey")
    r = _tools(m, "fsck", "--json", m.backing)
    problems = json.loads(r.stdout)["problems"]
    assert r.returncode == 4 and problems
    assert {p["name"] for p in problems} & {"/patient-4711/2026-layoffs.xlsx",
                                            "/hardlinkname"}
    r = _tools(m, "fsck", "--repair", m.backing)
    assert r.returncode in (1, 4) and "layoffs" in r.stdout, r.stdout  # shown to the user
    saved = "".join(open(os.path.join(d, f), errors="replace").read()
                    for d, _, fs in os.walk(f"{m.backing}/.encfs") for f in fs
                    if "fsck" in d)
    assert saved and "layoffs" not in saved  # the saved report has no plaintext name


def test_rewrap_moves_the_name_key_too(enc_mount):
    m = enc_mount
    os.mkdir(f"{m.mountpoint}/kept-name")
    with open(f"{m.mountpoint}/kept-name/f", "w") as f:
        f.write("x")
    # --path names a subtree by its path in the mount: mapped with the name key
    r = _tools(m, "rewrap", m.backing, "--path", f"{m.mountpoint}/kept-name", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sum(json.loads(r.stdout)[k] for k in ("rewrapped", "current")) == 1
    m.unmount()
    m.kms.client.create_key("names-next")
    r = _tools(m, "rewrap", m.backing, "--to-key", "names-next")
    assert r.returncode == 0, r.stdout + r.stderr
    new_key = m.kms.client.resolve_key("names-next")["key_id"]
    r = _tools(m, "inspect", "--json", f"{m.backing}/.encfs/names.key")
    # the record names the new CMK: the old one may now go without losing the names
    from encfs import namekey
    assert namekey.read_record(os.fsencode(m.backing)).key_id == new_key
    m.mount()
    assert os.listdir(m.mountpoint) == ["kept-name"]


def test_what_leaks_and_what_does_not(enc_mount):
    """docs/SECURITY.md "Encrypted names": lengths show only in 16-byte steps, one name in
    two directories looks different, equal targets look different; an entry moved to
    another backing directory no longer decrypts (hidden, reported by fsck); log lines
    name backing paths, never plaintext names."""
    m = enc_mount
    mp = m.mountpoint
    os.mkdir(f"{mp}/dir-one")
    os.mkdir(f"{mp}/dir-two")
    for d in ("dir-one", "dir-two"):
        open(f"{mp}/{d}/same-name", "w").close()
    for n in ("a", "b" * 15, "c" * 16):
        open(f"{mp}/{n}", "w").close()
    os.symlink("same/target", f"{mp}/link-1")
    os.symlink("same/target", f"{mp}/link-2")
    with open(f"{mp}/dir-one/victim-file", "wb") as f:
        f.write(os.urandom(40000))
    bp = m.backing_path
    assert os.path.basename(bp("dir-one/same-name")) != os.path.basename(bp("dir-two/same-name"))
    assert len(os.path.basename(bp("a"))) == len(os.path.basename(bp("b" * 15)))
    assert len(os.path.basename(bp("c" * 16))) > len(os.path.basename(bp("a")))
    assert os.readlink(bp("link-1")) != os.readlink(bp("link-2"))
    # a block tampered with: EIO, and the log line names no plaintext name
    with open(bp("dir-one/victim-file"), "r+b") as f:
        f.seek(24 + 100)
        b = f.read(1)
        f.seek(24 + 100)
        f.write(bytes([b[0] ^ 1]))
    m.remount()
    with pytest.raises(OSError) as e:
        open(f"{mp}/dir-one/victim-file", "rb").read()
    assert e.value.errno == errno.EIO
    log = m.log()
    assert "authentication failed" in log and "victim" not in log and "dir-one" not in log
    m.unmount()
    # moved to another directory in the backing dir: its name no longer decrypts there
    src = bp("dir-one/same-name")
    dest = os.path.join(os.path.dirname(bp("dir-two/same-name")), os.path.basename(src))
    os.rename(src, dest)  # the same backing name, in another directory
    os.rename(src + ".sfskey", dest + ".sfskey")
    r = _tools(m, "fsck", "--json", m.backing)
    kinds = [p["kind"] for p in json.loads(r.stdout)["problems"]]
    assert "undecryptable-name" in kinds
    m.mount()
    assert sorted(os.listdir(f"{mp}/dir-two")) == ["same-name"]
    assert sorted(os.listdir(f"{mp}/dir-one")) == ["victim-file"]


def test_a_lost_name_key_or_planted_entries_fail_clearly(enc_mount):
    m = enc_mount
    os.mkdir(f"{m.mountpoint}/kept")
    os.symlink("somewhere", f"{m.mountpoint}/link")
    m.unmount()
    # a symlink whose target is not ours reads as EIO, and is logged; a planted plaintext
    # name is not shown
    os.unlink(m.backing_path("link"))
    os.symlink("planted-target", m.backing_path("link"))
    open(f"{m.backing}/planted-plaintext", "w").close()
    m.mount()
    assert sorted(os.listdir(m.mountpoint)) == ["kept", "link"]
    with pytest.raises(OSError) as e:
        os.readlink(f"{m.mountpoint}/link")
    assert e.value.errno == errno.EIO
    m.unmount()
    assert "symlink target does not decrypt" in m.log()
    assert "planted-plaintext" in m.log()  # the planted name itself, not a plaintext one
    # without its name key a backing dir with content is refused in one line
    key = f"{m.backing}/.encfs/names.key"
    os.rename(key, key + ".bak")
    r = subprocess.run([sys.executable, "-m", "encfs", "mount", m.backing, m.mountpoint,
                        "--foreground", "--kms-socket", m.kms.socket_path, "--project-id",
                        m.kms.project_id], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "the name key) is missing" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(key)
    r = _tools(m, "ls", m.backing)
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    os.rename(key + ".bak", key)
