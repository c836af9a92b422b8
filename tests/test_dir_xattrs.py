"""Layer 3: user xattrs on directories (issue 13, item 3), encrypted with a key of the
directory's own; trusted/security attributes on symlinks where ext4 has them."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import both_name_modes, short_tempdir
from encfs.xattrs import DIR_RECORD_XATTR

pytestmark = pytest.mark.fuse
SECRET = b"directory attribute value, never in the clear"


def err(fn, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


@both_name_modes
def test_directory_user_xattrs_set_get_list_remove(encrypted_mount):
    m = encrypted_mount
    d = f"{m.mountpoint}/dir"
    os.mkdir(d)
    assert os.listxattr(d) == []
    os.setxattr(d, "user.one", SECRET)
    os.setxattr(d, "user.two", b"")
    assert os.getxattr(d, "user.one") == SECRET and os.getxattr(d, "user.two") == b""
    assert sorted(os.listxattr(d)) == ["user.one", "user.two"]
    os.setxattr(d, "user.one", b"replaced")
    assert os.getxattr(d, "user.one") == b"replaced"
    assert err(os.setxattr, d, "user.two", b"x", os.XATTR_CREATE) == errno.EEXIST
    os.removexattr(d, "user.two")
    assert err(os.getxattr, d, "user.two") == errno.ENODATA
    assert err(os.removexattr, d, "user.two") == errno.ENODATA
    assert os.listxattr(d) == ["user.one"]
    # the root directory too, and ours stay ours
    os.setxattr(m.mountpoint, "user.at-root", b"r")
    assert os.getxattr(m.mountpoint, "user.at-root") == b"r"
    assert err(os.setxattr, d, DIR_RECORD_XATTR.decode(), b"x") == errno.EINVAL
    assert err(os.getxattr, d, DIR_RECORD_XATTR.decode()) == errno.ENODATA


@both_name_modes
def test_directory_values_encrypted_and_survive_rename_and_remount(encrypted_mount):
    m = encrypted_mount
    os.makedirs(f"{m.mountpoint}/a/sub")
    os.setxattr(f"{m.mountpoint}/a", "user.k", SECRET)
    os.setxattr(f"{m.mountpoint}/a/sub", "user.k", SECRET)
    a, sub = m.backing_path("a"), m.backing_path("a/sub")
    blob = os.getxattr(a, m.backing_xattr("user.k"))
    assert SECRET not in blob and blob[0] == fmt.XATTR_VERSION
    assert len(blob) == len(SECRET) + fmt.XATTR_OVERHEAD
    rec = fmt.decode_sidecar(os.getxattr(a, DIR_RECORD_XATTR))
    sub_rec = fmt.decode_sidecar(os.getxattr(sub, DIR_RECORD_XATTR))
    assert rec.file_id != sub_rec.file_id  # one key per directory
    # a value moved to another directory does not decrypt there (bound to its key)
    os.setxattr(sub, m.backing_xattr("user.moved"), blob)
    assert err(os.getxattr, f"{m.mountpoint}/a/sub", "user.moved") == errno.EIO
    os.removexattr(sub, m.backing_xattr("user.moved"))
    os.rename(f"{m.mountpoint}/a", f"{m.mountpoint}/{'b' * 255}")  # to a long name, too
    m.remount()
    assert os.getxattr(f"{m.mountpoint}/{'b' * 255}", "user.k") == SECRET
    assert os.getxattr(f"{m.mountpoint}/{'b' * 255}/sub", "user.k") == SECRET


@both_name_modes
def test_rewrap_moves_directory_keys_too(encrypted_mount):
    m = encrypted_mount
    os.mkdir(f"{m.mountpoint}/d")
    os.setxattr(f"{m.mountpoint}/d", "user.k", SECRET)
    target = m.kms.client.create_key("dir-tenant")["key_id"]
    res = subprocess.run([sys.executable, "-m", "encfs", "rewrap", m.backing, "--to-key",
                          target, "--json", "--kms-socket", m.kms.socket_path,
                          "--project-id", m.kms.project_id], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # the directory's key (and with encrypted names the name key, .encfs/names.key)
    assert json.loads(res.stdout)["rewrapped"] == 1 + m.encrypted_names
    rec = fmt.decode_sidecar(os.getxattr(m.backing_path("d"), DIR_RECORD_XATTR))
    assert rec.key_id == target
    m.remount()
    assert os.getxattr(f"{m.mountpoint}/d", "user.k") == SECRET


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* needs CAP_SYS_ADMIN")
def test_trusted_xattrs_on_symlinks_as_on_ext4(encrypted_mount):
    m = encrypted_mount
    ref = short_tempdir("ref-")
    try:
        results = []
        for top in (ref, m.mountpoint):
            os.symlink("target", f"{top}/l")
            out = [err(os.setxattr, f"{top}/l", "trusted.t", b"v", 0, follow_symlinks=False),
                   err(os.setxattr, f"{top}/l", "user.u", b"v", 0, follow_symlinks=False)]
            out.append(os.getxattr(f"{top}/l", "trusted.t", follow_symlinks=False)
                       if out[0] == 0 else None)
            out.append(sorted(os.listxattr(f"{top}/l", follow_symlinks=False)))
            results.append(out)
        assert results[0] == results[1] == [0, errno.EPERM, b"v", ["trusted.t"]]
    finally:
        shutil.rmtree(ref, ignore_errors=True)


def _xattrs(root: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for p in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
            rel = os.path.relpath(p, root)
            out[rel] = {a: os.getxattr(p, a) for a in os.listxattr(p) if a.startswith("user.")}
    return out


@both_name_modes
def test_rsync_xattrs_round_trip(encrypted_mount):
    m = encrypted_mount
    src, back = short_tempdir("rsync-src-"), short_tempdir("rsync-back-")
    try:
        os.makedirs(f"{src}/tree/deep/er")
        for i, d in enumerate(["tree", "tree/deep", "tree/deep/er"]):
            os.setxattr(f"{src}/{d}", "user.dir", f"dir {i}".encode())
            os.setxattr(f"{src}/{d}", "user.bin", os.urandom(300))
            with open(f"{src}/{d}/f", "wb") as f:
                f.write(os.urandom(1000 * (i + 1)))
            os.setxattr(f"{src}/{d}/f", "user.file", f"file {i}".encode())
        for a, b in ((f"{src}/tree/", f"{m.mountpoint}/tree"), (f"{m.mountpoint}/tree/",
                                                                 f"{back}/tree")):
            res = subprocess.run(["rsync", "-aX", a, b], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
        want = _xattrs(f"{src}/tree")
        assert want["."]["user.dir"] == b"dir 0" and want["deep/er/f"]["user.file"] == b"file 2"
        assert _xattrs(f"{m.mountpoint}/tree") == want
        assert _xattrs(f"{back}/tree") == want
        # nothing of ours leaks into the copy, and nothing in the backing dir is clear
        assert all(not a.startswith("user.encfs") for v in _xattrs(f"{back}/tree").values()
                   for a in v)
        assert os.getxattr(m.backing_path("tree/deep"), m.backing_xattr("user.dir")) \
            != b"dir 1"
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(back, ignore_errors=True)
