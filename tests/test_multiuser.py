"""Multi-user mounts with real uids (issue 8, item 5).

`allow_other` only on request, and then always with `default_permissions` (the kernel
checks modes and owners); without it nobody but the mounting user gets in at all. And the
KMS refuses a uid without a grant even when the backing dir is world-readable: reading the
ciphertext and the wrapped DEK is not enough to get the DEK.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import mount_options, short_tempdir, make_mount, run_as_uid, start_kms_server
from kms.client import KmsClient

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")]

NOBODY = 65534


def as_uid(uid: int, fn) -> tuple[str, object]:
    """fn() as ``uid``: ("ok", value), ("errno", n), ("kms", error_code) or ("exc", repr)."""
    kind, value = run_as_uid(uid, fn)
    return (kind, value[1]) if kind == "kms" else (kind, value)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def env():
    """A KMS whose socket others may connect to, and a work dir others may traverse."""
    work = short_tempdir("encfs-mu-")
    os.chmod(work, 0o711)
    kms_dir = os.path.join(work, "kms")
    os.makedirs(kms_dir)
    os.chmod(kms_dir, 0o711)
    kms = start_kms_server(kms_dir, extra_args=["--socket-mode", "666"])
    mounts = []
    try:
        yield work, kms, mounts
    finally:
        for m in mounts:
            m.unmount()
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_without_allow_other_no_other_uid_gets_in(env):
    work, kms, mounts = env
    m = make_mount(kms, os.path.join(work, "private"))
    mounts.append(m)
    os.chmod(os.path.dirname(m.mountpoint), 0o755)
    with open(f"{m.mountpoint}/public.txt", "wb") as f:
        f.write(b"world-readable mode, private mount")
    os.chmod(f"{m.mountpoint}/public.txt", 0o644)
    os.chmod(m.mountpoint, 0o755)
    opts = mount_options(m.mountpoint)
    assert "allow_other" not in opts  # only on request
    assert as_uid(NOBODY, lambda: read(f"{m.mountpoint}/public.txt")) == ("errno", errno.EACCES)
    assert as_uid(NOBODY, lambda: os.listdir(m.mountpoint)) == ("errno", errno.EACCES)
    assert read(f"{m.mountpoint}/public.txt") == b"world-readable mode, private mount"


def test_allow_other_always_comes_with_default_permissions(env):
    work, kms, mounts = env
    m = make_mount(kms, os.path.join(work, "shared"), extra_args=["-o", "allow_other"])
    mounts.append(m)
    os.chmod(os.path.dirname(m.mountpoint), 0o755)
    os.chmod(m.mountpoint, 0o755)
    assert {"allow_other", "default_permissions"} <= mount_options(m.mountpoint)
    for name, mode in (("private", 0o600), ("public", 0o644), ("group", 0o640)):
        with open(f"{m.mountpoint}/{name}", "wb") as f:
            f.write(name.encode())
        os.chmod(f"{m.mountpoint}/{name}", mode)
    assert as_uid(NOBODY, lambda: read(f"{m.mountpoint}/public")) == ("ok", b"public")
    assert as_uid(NOBODY, lambda: read(f"{m.mountpoint}/private")) == ("errno", errno.EACCES)
    assert as_uid(NOBODY, lambda: read(f"{m.mountpoint}/group")) == ("errno", errno.EACCES)
    # Writing needs write permission too; the mount's root is 0755 root-owned.
    assert as_uid(NOBODY, lambda: open(f"{m.mountpoint}/new", "wb").close()) == \
        ("errno", errno.EACCES)
    assert as_uid(NOBODY, lambda: open(f"{m.mountpoint}/public", "r+b").close()) == \
        ("errno", errno.EACCES)
    # A directory the other user owns: files they create there are theirs.
    os.mkdir(f"{m.mountpoint}/drop", 0o777)
    os.chmod(f"{m.mountpoint}/drop", 0o1777)

    def write_own():
        with open(f"{m.mountpoint}/drop/mine", "wb") as f:
            f.write(b"nobody's")
        os.chmod(f"{m.mountpoint}/drop/mine", 0o600)
        return read(f"{m.mountpoint}/drop/mine")
    assert as_uid(NOBODY, write_own) == ("ok", b"nobody's")
    st = os.stat(f"{m.backing}/drop/mine")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert os.stat(f"{m.backing}/drop/mine{fmt.SIDECAR_SUFFIX}").st_uid == NOBODY


def test_kms_refuses_a_uid_without_grant_even_with_a_world_readable_backing_dir(env):
    work, kms, mounts = env
    m = make_mount(kms, os.path.join(work, "wr"))
    mounts.append(m)
    with open(f"{m.mountpoint}/secret", "wb") as f:
        f.write(b"top secret " * 100)
    m.unmount()
    for dirpath, dirnames, filenames in os.walk(os.path.dirname(m.backing)):
        for n in dirnames + filenames:
            os.chmod(os.path.join(dirpath, n), 0o755 if n in dirnames else 0o644)
    os.chmod(os.path.dirname(m.backing), 0o755)
    os.chmod(m.backing, 0o755)
    sock = kms.socket_path

    def steal():
        rec = fmt.decode_sidecar(read(f"{m.backing}/secret{fmt.SIDECAR_SUFFIX}"))
        assert len(read(f"{m.backing}/secret")) > 1000  # the ciphertext is readable
        with KmsClient(sock, project_id=kms.project_id) as c:
            return c.decrypt_datakey(rec.key_id, rec.cipher_text, aad=rec.file_id.hex())
    assert as_uid(NOBODY, steal) == ("kms", "KMS.0306")
    # ...and the offline tool fails the same way, in one line, for that uid.
    from encfs import recovery
    import contextlib
    import io

    def decrypt_tool():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = recovery.decrypt_main([f"{m.backing}/secret", "--kms-socket", sock,
                                        "--project-id", kms.project_id])
        return rc, err.getvalue()
    rc, err = as_uid(NOBODY, decrypt_tool)[1]
    assert rc == 1 and "KMS.0306" in err and len(err.splitlines()) == 1
    # The owner (root) still can.
    rec = fmt.decode_sidecar(read(f"{m.backing}/secret{fmt.SIDECAR_SUFFIX}"))
    assert len(kms.client.decrypt_datakey(rec.key_id, rec.cipher_text,
                                          aad=rec.file_id.hex())) == 32
