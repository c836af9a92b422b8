"""Grants between real local users: user B serves user A's backing dir only through A's grant.

`encfs mount --user B` mounts as root and then runs as B, so every KMS request carries B's
uid (SO_PEERCRED). Helpers fork and switch uid after import: a non-root process cannot
start this venv's interpreter (it lives under /root).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time

import pytest

from encfs import format as fmt
from encfs.keys import check_period, file_aad
from encfs import namekey
from encfs.namecrypt import NameCipher
from encfs.pytest_plugin import (NAME_MODES, backing_path_of, names_args, run_as_uid,
                                 short_tempdir, start_kms_server)
from kms.client import KmsClient

A, B = 4242, 4243
GRACE = 1.0
#: How long a change of a key's state may take to show: the cached DEKs expire after GRACE
#: and the mount rechecks every check_period(GRACE); a factor of 10 for a loaded machine
#: (time is the subject here, but the load must not be).
WITHIN = 10 * (GRACE + check_period(GRACE))


def as_uid(uid: int, fn):
    """Run fn() as ``uid``; return its result or raise its error (RuntimeError)."""
    kind, value = run_as_uid(uid, fn)
    if kind == "kms":
        raise RuntimeError(f"{value[1]}: {value[2]}")
    if kind != "ok":
        raise RuntimeError(f"{kind}: {value}")
    return value


@pytest.fixture
def shared():
    work = short_tempdir("encfs-grant-")
    os.chmod(work, 0o755)
    kms = start_kms_server(f"{work}/kms", extra_args=["--socket-mode", "0666"])
    os.chmod(f"{work}/kms", 0o755)
    backing, mnt = f"{work}/backing", f"{work}/mnt"
    os.makedirs(backing)
    os.makedirs(mnt)
    os.chmod(backing, 0o777)
    try:
        yield kms, backing, mnt
    finally:
        if any(line.split()[1] == mnt for line in open("/proc/mounts")):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)


def mount(kms, backing, mnt, uid, key_id, names_mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encfs", "mount", backing, mnt,
                           "--kms-socket", kms.socket_path, "--key", key_id, "--user", str(uid),
                           "--key-cache-ttl", str(GRACE), *names_args(names_mode)],
                          capture_output=True, text=True, timeout=60)


def backing_of(kms, backing: str, rel: str, uid: int) -> str:
    """The backing path of plaintext ``rel``; with encrypted names, through the name key
    unwrapped as ``uid`` (it is a data key of A's CMK: root may not use it)."""
    rec = namekey.read_record(os.fsencode(backing))
    cipher = None
    if rec is not None:
        cipher = NameCipher(as_uid(uid, lambda: KmsClient(kms.socket_path).decrypt_datakey(
            rec.key_id, rec.cipher_text, aad=file_aad(rec.file_id), length_bytes=rec.dek_bytes)))
    return backing_path_of(backing, rel, cipher)


def umount(mnt) -> None:
    res = subprocess.run([sys.executable, "-m", "encfs", "umount", mnt], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


def daemon_euid(mnt) -> int:
    pid = int(os.getxattr(mnt, "user.encfs.pid"))
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Uid:"):
            return int(line.split()[2])
    raise AssertionError("no Uid line")


def wait_errno(fn, expected, within):
    deadline = time.monotonic() + within
    while True:
        try:
            fn()
        except OSError as e:
            assert e.errno == expected, e
            return
        assert time.monotonic() < deadline, "still readable"
        time.sleep(0.05)


@pytest.mark.fuse
@pytest.mark.parametrize("names_mode", NAME_MODES)
def test_second_user_needs_a_grant(shared, names_mode):
    """In both name modes: with encrypted names the name key is a data key of A's CMK
    too, so B's grant (or its revocation) decides about the names as about contents."""
    kms, backing, mnt = shared
    sock = kms.socket_path
    key_a = as_uid(A, lambda: KmsClient(sock).create_key("a-data")["key_id"])

    # User A fills the backing dir through its own mount.
    res = mount(kms, backing, mnt, A, key_a, names_mode)
    assert res.returncode == 0, res.stderr
    assert daemon_euid(mnt) == A
    with open(f"{mnt}/a-file", "w") as f:
        f.write("written by A")
    assert os.stat(backing_of(kms, backing, "a-file", A)).st_uid == A
    umount(mnt)

    # Without a grant, B cannot use A's key: the mount is refused with the KMS's word.
    res = mount(kms, backing, mnt, B, key_a, names_mode)
    assert res.returncode == 1 and "KMS.0306" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # Not even with the backing dir world-readable: the wrapped DEK is useless to B.
    rec = fmt.decode_sidecar(open(backing_of(kms, backing, "a-file.sfskey", A), "rb").read())
    with pytest.raises(RuntimeError, match="KMS.0306"):
        as_uid(B, lambda: KmsClient(sock).decrypt_datakey(rec.key_id, rec.cipher_text,
                                                          aad=rec.file_id.hex()))

    grant = as_uid(A, lambda: KmsClient(sock).call("create-grant", {
        "key_id": key_a, "grantee_principal": str(B),
        "operations": ["describe-key", "create-datakey", "decrypt-datakey"]})["grant_id"])
    res = mount(kms, backing, mnt, B, key_a, names_mode)
    assert res.returncode == 0, res.stderr
    assert daemon_euid(mnt) == B
    assert open(f"{mnt}/a-file").read() == "written by A"
    with open(f"{mnt}/b-file", "w") as f:
        f.write("written by B")
    b_rec = fmt.decode_sidecar(open(backing_of(kms, backing, "b-file.sfskey", B), "rb").read())
    assert b_rec.key_id == key_a and os.stat(backing_of(kms, backing, "b-file", B)).st_uid == B

    # A revokes the grant: B's mount loses access within the grace period.
    as_uid(A, lambda: KmsClient(sock).call("revoke-grant",
                                           {"key_id": key_a, "grant_id": grant}))
    wait_errno(lambda: open(f"{mnt}/a-file").read(), errno.EACCES, WITHIN)
    umount(mnt)

    # A decrypt-only grant makes the mount read-only for existing files.
    as_uid(A, lambda: KmsClient(sock).call("create-grant", {
        "key_id": key_a, "grantee_principal": str(B),
        "operations": ["describe-key", "decrypt-datakey"]}))
    res = mount(kms, backing, mnt, B, key_a, names_mode)
    assert res.returncode == 0, res.stderr
    assert open(f"{mnt}/a-file").read() == "written by A"
    assert open(f"{mnt}/b-file").read() == "written by B"
    with pytest.raises(OSError) as e:
        open(f"{mnt}/new-file", "w").write("x")
    assert e.value.errno == errno.EACCES
    log = open(f"{backing}/.encfs/mount.log").read()
    assert "cannot create a data key" in log and "KMS.0306" in log
    umount(mnt)
