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
import time

import pytest

from encfs.pytest_plugin import short_tempdir, make_mount, running_kms

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


CACHE_TIMEOUT = 1.0  # the entry and attribute timeouts of a default mount


def test_default_caching_timeouts(kms):
    """Default mounts cache attributes and entries, missing names included, for 1 s: a
    change made in the backing dir behind encfs's back shows within about a second."""
    workdir = short_tempdir("encfs-cache-")
    m = _mount(kms, workdir)
    try:
        assert not os.path.exists(f"{m.mountpoint}/later")
        os.mkdir(os.path.join(m.backing, "later"))  # behind our back
        deadline = time.monotonic() + 10 * CACHE_TIMEOUT  # generous: a loaded machine
        while not os.path.isdir(f"{m.mountpoint}/later"):
            assert time.monotonic() < deadline, "negative entry outlived its timeout"
            time.sleep(0.1)
        os.chmod(f"{m.mountpoint}/later", 0o700)
        os.chmod(os.path.join(m.backing, "later"), 0o755)  # behind our back
        deadline = time.monotonic() + 10 * CACHE_TIMEOUT  # generous: a loaded machine
        while os.stat(f"{m.mountpoint}/later").st_mode & 0o777 != 0o755:
            assert time.monotonic() < deadline, "attribute cache outlived its timeout"
            time.sleep(0.1)
    finally:
        m.unmount()
        shutil.rmtree(workdir, ignore_errors=True)
