"""Layer 3: extended attributes and POSIX ACLs through a real mount.

``user.*`` values are encrypted with the file's DEK (docs/FORMAT.md, "Extended
attributes"); ``trusted.*``, ``security.*`` and ACLs are passed through; ``user.encfs.*``
is reserved. Where ext4 defines the behaviour, the mount must match a plain ext4 dir.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import struct
import subprocess
from typing import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encfs import format as fmt
from encfs.pytest_plugin import NAME_MODES, mount_with_own_kms, python_for_other_uids

pytestmark = pytest.mark.fuse
SUFFIX = fmt.SIDECAR_SUFFIX


@pytest.fixture(scope="module", params=NAME_MODES)
def mnt(request):
    """One mount per name mode: xattr names are encrypted with encrypted names."""
    with mount_with_own_kms("encfs-xattr-", ["-o", "allow_other"], shared=True,
                            names_mode=request.param) as m:
        yield m


@pytest.fixture
def both(mnt, ext4_root, request):
    ref = tempfile.mkdtemp(prefix="ref-", dir=ext4_root)  # on real ext4
    os.chmod(ref, 0o777)
    mdir = os.path.join(mnt.mountpoint, request.node.name)
    os.mkdir(mdir)
    os.chmod(mdir, 0o777)
    try:
        yield ref, mdir
    finally:
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(mdir, ignore_errors=True)


def err(fn: Callable, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def same(both, scenario):
    ref, mdir = both
    expected = scenario(ref)
    got = scenario(mdir)
    assert got == expected, f"mount gave {got!r}, ext4 gave {expected!r}"
    return got


def touch(path: str, data: bytes = b"content") -> None:
    with open(path, "wb") as f:
        f.write(data)


def backing_of(mnt, path: str) -> str:
    return mnt.backing_path(os.path.relpath(path, mnt.mountpoint))


def test_user_xattrs_like_ext4(both):
    def scenario(r):
        f = f"{r}/f"
        touch(f)
        os.setxattr(f, "user.a", b"alpha")
        os.setxattr(f, "user.empty", b"")
        os.setxattr(f, "user.bin", bytes(range(256)) * 8)
        out = [os.getxattr(f, "user.a"), os.getxattr(f, "user.empty"),
               len(os.getxattr(f, "user.bin")), sorted(os.listxattr(f))]
        out += [err(os.getxattr, f, "user.none"), err(os.removexattr, f, "user.none"),
                err(os.setxattr, f, "user.a", b"x", os.XATTR_CREATE),
                err(os.setxattr, f, "user.new", b"x", os.XATTR_REPLACE),
                err(os.setxattr, f, "user.a", b"replaced", os.XATTR_REPLACE),
                err(os.setxattr, f, "user.c", b"created", os.XATTR_CREATE),
                err(os.setxattr, f, "user.big", b"x" * 65537),
                err(os.getxattr, f"{r}/none", "user.a"),
                err(os.setxattr, f, "bogus.ns", b"x"), err(os.setxattr, f, "system.other", b"x")]
        os.removexattr(f, "user.bin")
        out += [os.getxattr(f, "user.a"), sorted(os.listxattr(f))]
        os.symlink("f", f"{r}/l")
        os.mkfifo(f"{r}/p")
        out += [err(os.setxattr, f"{r}/l", "user.a", b"x", follow_symlinks=False),
                err(os.setxattr, f"{r}/p", "user.a", b"x"),
                err(os.getxattr, f"{r}/l", "user.a", follow_symlinks=False),
                os.getxattr(f"{r}/l", "user.a")]  # follows the link to f
        return out
    res = same(both, scenario)
    assert res[:4] == [b"alpha", b"", 2048, ["user.a", "user.bin", "user.empty"]]
    assert res[4:14] == [errno.ENODATA, errno.ENODATA, errno.EEXIST, errno.ENODATA, 0, 0,
                         errno.E2BIG, errno.ENOENT, errno.EOPNOTSUPP, errno.EOPNOTSUPP]
    assert res[-4:] == [errno.EPERM, errno.EPERM, errno.ENODATA, b"replaced"]


def test_user_values_encrypted_in_backing_by_the_spec(both, mnt):
    f = f"{both[1]}/secret"
    touch(f)
    os.setxattr(f, "user.note", b"PLAINTEXT-XATTR-VALUE")
    raw = os.getxattr(backing_of(mnt, f), mnt.backing_xattr("user.note"))
    assert b"PLAINTEXT" not in raw and len(raw) == 21 + fmt.XATTR_OVERHEAD
    # Decrypt with only docs/FORMAT.md and the KMS: version 1 | nonce | ciphertext+tag,
    # AAD = "encfs-xattr" | u16 version | file id | name.
    rec = fmt.decode_sidecar(open(backing_of(mnt, f) + SUFFIX, "rb").read())
    dek = mnt.kms.client.decrypt_datakey(rec.key_id, rec.cipher_text, aad=rec.file_id.hex())
    aad = b"encfs-xattr" + struct.pack(">H", 1) + rec.file_id + b"user.note"
    assert raw[0] == 1
    assert AESGCM(dek).decrypt(raw[1:13], raw[13:], aad) == b"PLAINTEXT-XATTR-VALUE"


def test_tampered_or_moved_values_fail_with_eio(both, mnt):
    a, b = f"{both[1]}/a", f"{both[1]}/b"
    touch(a)
    touch(b)
    os.setxattr(a, "user.x", b"value of a")
    bx = mnt.backing_xattr
    raw = os.getxattr(backing_of(mnt, a), bx("user.x"))
    os.setxattr(backing_of(mnt, a), bx("user.y"), raw)  # moved to another name
    os.setxattr(backing_of(mnt, b), bx("user.x"), raw)  # moved to another file
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    os.setxattr(backing_of(mnt, a), bx("user.z"), bytes(flipped))
    for path, name in ((a, "user.y"), (b, "user.x"), (a, "user.z")):
        assert err(os.getxattr, path, name) == errno.EIO
    assert os.getxattr(a, "user.x") == b"value of a"
    # logged under its backing name: with encrypted names, not the plaintext one
    assert f"xattr {bx('user.y')}: " in mnt.log()
    assert ("xattr user.y: " in mnt.log()) is not mnt.encrypted_names


def test_xattrs_follow_links_renames_remount_and_unlinked_files(both, mnt):
    d = both[1]
    touch(f"{d}/orig")
    os.setxattr(f"{d}/orig", "user.k", b"v1")
    os.link(f"{d}/orig", f"{d}/hard")
    assert os.getxattr(f"{d}/hard", "user.k") == b"v1"
    os.setxattr(f"{d}/hard", "user.k", b"v2")
    os.rename(f"{d}/orig", f"{d}/renamed")
    assert os.getxattr(f"{d}/renamed", "user.k") == b"v2"
    with open(f"{d}/renamed", "r+b") as f:
        os.unlink(f"{d}/renamed")
        os.unlink(f"{d}/hard")
        os.setxattr(f.fileno(), "user.k", b"v3")  # fsetxattr on a file with no name left
        assert os.getxattr(f.fileno(), "user.k") == b"v3"
        assert os.listxattr(f.fileno()) == ["user.k"]
    touch(f"{d}/keep")
    os.setxattr(f"{d}/keep", "user.persist", b"across remounts")
    os.truncate(f"{d}/keep", 0)  # truncate to 0 keeps the key, so the value stays readable
    mnt.remount()
    assert os.getxattr(f"{d}/keep", "user.persist") == b"across remounts"


def test_empty_file_made_outside_gets_a_key_for_xattrs(both, mnt):
    d = both[1]
    open(backing_of(mnt, f"{d}/outside"), "wb").close()
    os.setxattr(f"{d}/outside", "user.k", b"v")
    assert os.path.exists(backing_of(mnt, f"{d}/outside") + SUFFIX)
    assert os.getxattr(f"{d}/outside", "user.k") == b"v"


def test_reserved_names_hidden_and_refused(both, mnt):
    f = f"{both[1]}/f"
    touch(f)
    os.setxattr(backing_of(mnt, f), "user.encfs.internal", b"ours")
    assert err(os.setxattr, f, "user.encfs.x", b"v") == errno.EINVAL
    assert err(os.removexattr, f, "user.encfs.internal") == errno.EINVAL
    assert err(os.getxattr, f, "user.encfs.internal") == errno.ENODATA
    assert os.listxattr(f) == []
    # The root's control attribute keeps working (encfs umount uses it).
    assert int(os.getxattr(mnt.mountpoint, "user.encfs.pid")) == mnt.process.pid


def test_directories_user_xattrs_as_on_ext4(both):
    """user.* on directories, encrypted with the directory's own key (docs/FORMAT.md),
    behave as on ext4 (more in tests/test_dir_xattrs.py)."""
    def scenario(r):
        os.mkdir(f"{r}/dir")
        out = [err(os.getxattr, f"{r}/dir", "user.a"), err(os.removexattr, f"{r}/dir", "user.a")]
        out.append(err(os.setxattr, f"{r}/dir", "user.a", b"x"))
        out += [os.getxattr(f"{r}/dir", "user.a"), sorted(os.listxattr(f"{r}/dir"))]
        out.append(err(os.setxattr, f"{r}/dir", "user.a", b"y", os.XATTR_CREATE))
        out.append(err(os.setxattr, f"{r}/dir", "user.b", b"y", os.XATTR_REPLACE))
        out.append(err(os.removexattr, f"{r}/dir", "user.a"))
        out.append(sorted(os.listxattr(f"{r}/dir")))
        return out
    assert same(both, scenario) == [errno.ENODATA, errno.ENODATA, 0, b"x", ["user.a"],
                                    errno.EEXIST, errno.ENODATA, 0, []]


def test_trusted_and_security_pass_through(both, mnt):
    def scenario(r):
        touch(f"{r}/f")
        os.mkdir(f"{r}/dir")
        out = []
        for p in (f"{r}/f", f"{r}/dir"):
            os.setxattr(p, "trusted.overlay.opaque", b"y")
            os.setxattr(p, "security.test", b"label")
            out += [os.getxattr(p, "trusted.overlay.opaque"), sorted(os.listxattr(p))]
            os.removexattr(p, "security.test")
            out.append(sorted(os.listxattr(p)))
        # Only root may use trusted.* (the kernel decides, before asking us).
        out.append(subprocess.run(
            [python_for_other_uids(), "-c", f"import os; os.setxattr({r!r} + '/f', 'trusted.x', b'1')"],
            preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),
            capture_output=True).returncode)
        return out
    res = same(both, scenario)
    assert res[0] == b"y" and res[-1] != 0
    assert os.getxattr(backing_of(mnt, f"{both[1]}/f"), "trusted.overlay.opaque") == b"y"


# POSIX ACL xattr blobs (linux/posix_acl_xattr.h): u32 version 2, then (tag u16, perm u16,
# id u32) entries, little-endian. Built by hand: the acl tools are not installed here.
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NOID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_acls_are_enforced_and_inherited(both):
    grant = acl((USER_OBJ, 6, NOID), (USER, 4, 65534), (GROUP_OBJ, 0, NOID), (MASK, 4, NOID),
                (OTHER, 0, NOID))
    default = acl((USER_OBJ, 7, NOID), (USER, 5, 65534), (GROUP_OBJ, 5, NOID), (MASK, 5, NOID),
                  (OTHER, 0, NOID))

    def nobody_reads(path: str) -> int:
        return subprocess.run(["cat", path], capture_output=True,
                              preexec_fn=lambda: (os.setgroups([]), os.setgid(65534),
                                                  os.setuid(65534))).returncode

    def scenario(r):
        f = f"{r}/f"
        touch(f)
        os.chmod(f, 0o600)
        out = [nobody_reads(f)]
        os.setxattr(f, "system.posix_acl_access", grant)
        out += [oct(os.stat(f).st_mode), nobody_reads(f)]
        os.chmod(f, 0o600)  # the mask becomes ---: the grant no longer works
        out += [nobody_reads(f), os.getxattr(f, "system.posix_acl_access")]
        os.mkdir(f"{r}/inherit")
        os.setxattr(f"{r}/inherit", "system.posix_acl_default", default)
        touch(f"{r}/inherit/child")
        out += [os.getxattr(f"{r}/inherit/child", "system.posix_acl_access"),
                nobody_reads(f"{r}/inherit/child"), sorted(os.listxattr(f"{r}/inherit"))]
        os.removexattr(f, "system.posix_acl_access")
        out += [err(os.getxattr, f, "system.posix_acl_access"), oct(os.stat(f).st_mode)]
        return out
    res = same(both, scenario)
    assert res[0] != 0 and res[1] == "0o100640" and res[2] == 0 and res[3] != 0
