"""Layer 3: shared writable mmap, kernel caching, and --shared-backing.

mmap goes through the kernel page cache (encfs never sets direct_io), so with the writeback
cache and keep_cache on, a mapping, read() and write() through other handles and other
processes all see one copy of each page.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys

import pytest

from encfs.pytest_plugin import mount_options, short_tempdir, make_mount, running_kms

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def kms():
    with running_kms("kms-") as server:
        yield server


def _mount(kms, workdir: str, *extra: str):
    return make_mount(kms, workdir, extra_args=list(extra))


@pytest.fixture(scope="module", params=["default", "shared-backing"])
def mnt(kms, request):
    workdir = short_tempdir("encfs-mmap-")
    extra = ["--shared-backing"] if request.param == "shared-backing" else []
    m = _mount(kms, workdir, *extra)
    try:
        yield m
    finally:
        m.unmount()
        shutil.rmtree(workdir, ignore_errors=True)


MAP_WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0)
m[5000:5011] = b"from child!"
m.flush()
print(m[100:110].decode())
m.close(); os.close(fd)
"""


def test_shared_writable_mapping_is_coherent(mnt):
    path = f"{mnt.mountpoint}/mapped.bin"
    data = bytearray(os.urandom(3 * 4096 + 123))
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 0)
    try:
        m[10:20] = b"0123456789"  # a write through the mapping, no msync yet ...
        data[10:20] = b"0123456789"
        with open(path, "rb") as other:  # ... is seen by read() on another handle
            assert other.read() == data
        with open(path, "r+b") as other:  # a write() through another handle is seen
            other.seek(100)
            other.write(b"written!!!")
        data[100:110] = b"written!!!"
        assert m[100:110] == b"written!!!"
        out = subprocess.run([sys.executable, "-c", MAP_WRITER, path], check=True,
                             capture_output=True, text=True).stdout
        assert out.strip() == "written!!!"  # another process's mapping shares the pages
        data[5000:5011] = b"from child!"
        assert m[:] == data
        m.flush()
    finally:
        m.close()
        os.close(fd)
    # Growing a file and filling the new part through a mapping.
    with open(path, "r+b") as f:
        f.truncate(5 * 4096)
        m = mmap.mmap(f.fileno(), 0)
        m[4 * 4096:4 * 4096 + 4] = b"tail"
        m.close()
    data += bytes(5 * 4096 - len(data))
    data[4 * 4096:4 * 4096 + 4] = b"tail"
    mnt.remount()  # what reached the backing file is what the mapping wrote
    with open(path, "rb") as f:
        assert f.read() == data


def test_private_mapping_does_not_write_back(mnt):
    path = f"{mnt.mountpoint}/private.bin"
    with open(path, "wb") as f:
        f.write(b"a" * 8192)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
        m[0:4] = b"priv"
        m.close()
    with open(path, "rb") as f:
        assert f.read(4) == b"aaaa"


def test_large_writes_reach_encfs_in_big_requests(mnt):
    path = f"{mnt.mountpoint}/large.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())
    biggest = int(os.getxattr(mnt.mountpoint, "user.encfs.max_write"))
    assert biggest >= 128 * 1024  # 1 MiB on kernels with max_pages (4.20+)


def test_shared_backing_sees_other_writers_at_once(kms):
    """--shared-backing: changes made directly in the backing dir by another writer (here:
    renames, deletions, new directories, a file pair replaced by another) show up in the
    mount at once (no attribute, entry or page caching). A second encfs mount of the same
    backing dir is refused by the mount lock."""
    workdir = short_tempdir("encfs-shared-")
    a = _mount(kms, workdir, "--shared-backing")
    try:
        pa, back = a.mountpoint, a.backing
        S = ".sfskey"
        with open(f"{pa}/f", "wb") as f:
            f.write(b"version 1")
        with open(f"{pa}/other", "wb") as f:
            f.write(b"VERSION 2, longer")
        assert open(f"{pa}/f", "rb").read() == b"version 1"
        # Another writer replaces f's pair with other's (data + sidecar, as a sync tool would).
        for suffix in ("", S):
            shutil.copyfile(f"{back}/other{suffix}", f"{back}/f.tmp{suffix}")
        os.rename(f"{back}/f.tmp{S}", f"{back}/f{S}")
        os.rename(f"{back}/f.tmp", f"{back}/f")
        assert os.path.getsize(f"{pa}/f") == 17
        assert open(f"{pa}/f", "rb").read() == b"VERSION 2, longer"
        for suffix in (S, ""):
            os.rename(f"{back}/f{suffix}", f"{back}/g{suffix}")
        assert not os.path.exists(f"{pa}/f") and os.path.exists(f"{pa}/g")
        os.mkdir(f"{back}/newdir")
        assert os.path.isdir(f"{pa}/newdir")
        for suffix in ("", S):
            os.unlink(f"{back}/other{suffix}")
        assert not os.path.exists(f"{pa}/other")
    finally:
        a.unmount()
        shutil.rmtree(workdir, ignore_errors=True)


def test_default_mounts_show_what_reads_and_writes_change(kms):
    """A default mount lets the kernel trust entries and attributes for long (nobody else
    writes its backing dir). The one attribute a write changes without the kernel hearing
    of it, st_blocks, the kernel drops at each close under the writeback cache: `du` right
    after a copy sees the data, also when it was asked while the data was still cached.
    And atime, which a read changes, it drops after each READ it sends."""
    workdir = short_tempdir("encfs-cache-")
    m = _mount(kms, workdir)
    try:
        path = f"{m.mountpoint}/f"
        for size in (1 << 20, 2 << 20):
            with open(path, "ab") as f:
                f.write(os.urandom(1 << 20))
                # While the data is in the kernel's page cache, not yet written back: the
                # kernel asks (a write drops st_blocks) and caches what the backing has.
                os.fstat(f.fileno())
            st = os.stat(path)  # after close: the data reached the backing file
            assert st.st_size == size and st.st_blocks * 512 >= size
            assert st.st_blocks == os.stat(os.path.join(m.backing, "f")).st_blocks
        os.utime(path, ns=(10**18, 10**18))  # atime not after mtime: a read updates it
        m.remount()  # the page cache is gone: the next read reaches the daemon
        assert os.stat(path).st_atime_ns == 10**18
        with open(path, "rb") as f:
            f.read(100)
        assert os.stat(path).st_atime_ns == os.stat(os.path.join(m.backing, "f")).st_atime_ns
        assert os.stat(path).st_atime_ns > 10**18
    finally:
        m.unmount()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-only case needs root")
def test_a_mount_only_root_can_reach_leaves_permission_checks_to_the_backing_fs(kms):
    """Without allow_other (and as root, not --user), only root gets in: the kernel's own
    permission checks (default_permissions, implied by POSIX ACLs) are left out, which
    saves a GETATTR of the directory after every create and unlink in it. Root's answers
    stay what ext4 gives root: anything but running a file without an x bit; ACLs are
    still set, read and inherited through the backing files."""
    workdir = short_tempdir("encfs-perm-")
    m = _mount(kms, workdir)
    try:
        assert "default_permissions" not in mount_options(m.mountpoint)
        mp = m.mountpoint
        with open(f"{mp}/script", "w") as f:
            f.write("#!/bin/sh\necho ran\n")
        os.chmod(f"{mp}/script", 0o644)
        assert not os.access(f"{mp}/script", os.X_OK)
        with pytest.raises(PermissionError):
            subprocess.run([f"{mp}/script"])
        os.chmod(f"{mp}/script", 0o700)
        assert os.access(f"{mp}/script", os.X_OK)
        assert subprocess.run([f"{mp}/script"], capture_output=True).stdout == b"ran\n"
        os.chmod(f"{mp}/script", 0o000)  # root reads and writes it anyway, as on ext4
        assert os.access(f"{mp}/script", os.R_OK | os.W_OK)
        assert open(f"{mp}/script").read().startswith("#!")
        # an ACL (user 65534: r--) set, read back, reflected in the mode, and inherited
        acl = (b"\x02\x00\x00\x00" + b"".join(
            tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + uid.to_bytes(4, "little")
            for tag, perm, uid in ((1, 6, 0xFFFFFFFF), (2, 4, 65534), (4, 4, 0xFFFFFFFF),
                                   (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF))))
        os.setxattr(f"{mp}/script", "system.posix_acl_access", acl)
        assert os.getxattr(f"{mp}/script", "system.posix_acl_access") == acl
        assert oct(os.stat(f"{mp}/script").st_mode & 0o777) == "0o640"
        os.mkdir(f"{mp}/d")
        os.setxattr(f"{mp}/d", "system.posix_acl_default", acl)
        open(f"{mp}/d/child", "w").close()
        assert os.getxattr(f"{mp}/d/child", "system.posix_acl_access") == acl
    finally:
        m.unmount()
        shutil.rmtree(workdir, ignore_errors=True)
