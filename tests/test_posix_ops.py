"""Layer 3: every POSIX operation through a real mount, each with its error cases.

Most tests run the same steps in a plain directory of the backing filesystem (ext4 here) and
in the mount, and require the same outcome (return values and errnos), plus the outcome
POSIX/Linux documents, so that neither side can pass by accident. One mount (with
allow_other, so other uids can use it) serves the whole module; each test gets its own
fresh directory on both sides.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import socket
import stat
import subprocess
import threading
from typing import Callable

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import (NAME_MODES, mount_with_own_kms, names_args,
                                 python_for_other_uids, short_tempdir)

pytestmark = pytest.mark.fuse

SUFFIX = fmt.SIDECAR_SUFFIX
NAME_MAX = 255  # as ext4, whatever the backing's own limit (long names: docs/FORMAT.md)
NOBODY = 65534
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module", params=NAME_MODES)
def mnt(request):
    """Every test once with plaintext names and once with encrypted names (#18)."""
    with mount_with_own_kms("encfs-posix-", ["-o", "allow_other", *names_args(request.param)],
                            shared=True) as m:
        yield m


@pytest.fixture
def both(mnt, ext4_root, request):
    """(plain ext4 dir, mount dir): fresh, empty, world-writable, named after the test."""
    name = request.node.name
    for mode in NAME_MODES:  # the module's mount is per mode: the name need not say it
        name = name.replace(f"[{mode}]", "").replace(f"-{mode}]", "]").replace(f"[{mode}-", "[")
    name = name.replace("[", "_").replace("]", "_")
    ref = tempfile.mkdtemp(prefix="ref-", dir=ext4_root)  # on real ext4
    os.chmod(ref, 0o777)
    mdir = os.path.join(mnt.mountpoint, name)
    os.mkdir(mdir)
    os.chmod(mdir, 0o777)
    try:
        yield ref, mdir
    finally:
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(mdir, ignore_errors=True)


@pytest.fixture
def d(both):
    """Just the mount dir, for tests that look at encfs-only behaviour."""
    return both[1]


def err(fn: Callable, *args, **kw) -> int:
    """0 if the call succeeds, else its errno."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def same(both, scenario: Callable[[str], object]) -> object:
    """Run ``scenario(root)`` on ext4 and on the mount; the outcomes must be equal."""
    ref, mdir = both
    expected = scenario(ref)
    got = scenario(mdir)
    assert got == expected, f"mount gave {got!r}, ext4 gave {expected!r}"
    return got


def as_user(code: str, uid: int = NOBODY, gid: int = NOBODY, cwd: str | None = None) -> str:
    """Run Python code as another uid (never switching our own credentials)."""
    def drop():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    # Ours may live where other uids cannot reach.
    res = subprocess.run([python_for_other_uids(), "-c", code], preexec_fn=drop, cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def write(path: str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- regular files and open flags --------------------------------------------------------

def test_create_open_flags_and_errors(both):
    def scenario(r):
        out = []
        fd = os.open(f"{r}/f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        os.write(fd, b"0123456789")
        os.close(fd)
        out.append(err(os.open, f"{r}/f", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        out.append(err(os.open, f"{r}/missing", os.O_RDONLY))
        os.mkdir(f"{r}/dir")
        out.append(err(os.open, f"{r}/dir", os.O_WRONLY))
        out.append(err(os.open, f"{r}/f/x", os.O_RDONLY))
        out.append(err(os.open, f"{r}/f", os.O_RDONLY | os.O_DIRECTORY))
        out.append(err(os.open, f"{r}/nodir/x", os.O_CREAT | os.O_WRONLY))
        fd = os.open(f"{r}/f", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"ab")
        os.close(fd)
        out.append(read(f"{r}/f"))
        fd = os.open(f"{r}/f", os.O_WRONLY | os.O_APPEND)
        os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the file offset
        os.write(fd, b"cd")
        os.pwrite(fd, b"ef", 0)  # Linux: pwrite on O_APPEND appends too
        os.close(fd)
        out.append(read(f"{r}/f"))
        out.append(oct(stat.S_IMODE(os.stat(f"{r}/f").st_mode)))
        return out
    assert same(both, scenario) == [errno.EEXIST, errno.ENOENT, errno.EISDIR, errno.ENOTDIR,
                                    errno.ENOTDIR, errno.ENOENT, b"ab", b"abcdef", "0o640"]


def test_o_append_with_a_reader_and_writer_open(both):
    def scenario(r):
        w = open(f"{r}/log", "ab", buffering=0)
        rd = open(f"{r}/log", "rb", buffering=0)
        for i in range(50):
            w.write(b"line %d\n" % i * (i % 7 + 1))
        data = rd.read()
        w.close()
        rd.close()
        return data
    assert same(both, scenario).startswith(b"line 0\n")


def test_o_direct_is_handled(both):
    import mmap
    def scenario(r):
        buf = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT wants
        buf.write(os.urandom(8192))
        fd = os.open(f"{r}/direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        try:
            assert os.pwrite(fd, buf, 4096) == 8192
            back = mmap.mmap(-1, 8192)
            assert os.preadv(fd, [back], 4096) == 8192
            assert back[:] == buf[:]
        finally:
            os.close(fd)
        return read(f"{r}/direct") == bytes(4096) + buf[:]
    assert same(both, scenario) is True


def test_read_write_at_unaligned_offsets_and_holes(both):
    def scenario(r):
        with open(f"{r}/h", "w+b") as f:
            f.write(b"a" * 5000)
            f.seek(20000)
            f.write(b"b" * 3)
            f.seek(4090)
            f.write(b"c" * 20)
        data = read(f"{r}/h")
        return len(data), data[4085:4115], data[5000:20000] == bytes(15000), data[-3:]
    same(both, scenario)


# --- sizes, truncate, holes --------------------------------------------------------------

def test_truncate_up_and_down_repeatedly_unaligned(both):
    sizes = [10000, 4095, 4097, 1, 8193, 0, 3, 70001, 12287, 4096, 5, 123457, 4097, 2]
    def scenario(r):
        p = f"{r}/t"
        write(p, os.urandom(1) * 0 + bytes(range(256)) * 40)
        seen = []
        with open(p, "r+b", buffering=0) as f:
            for i, size in enumerate(sizes):
                if i % 2:
                    os.truncate(p, size)
                else:
                    f.truncate(size)
                f.seek(size // 3)
                f.write(bytes([i + 1]) * 4099)  # write again after each truncate (gocryptfs#1024)
                seen.append((os.path.getsize(p), read(p)))
        return seen
    same(both, scenario)
    ref, mdir = both
    assert read(f"{mdir}/t") == read(f"{ref}/t")


def test_truncate_errors(both):
    def scenario(r):
        os.mkdir(f"{r}/dir")
        write(f"{r}/f", b"x")
        return [err(os.truncate, f"{r}/dir", 0), err(os.truncate, f"{r}/missing", 0),
                err(os.truncate, f"{r}/f", -1), err(os.truncate, f"{r}/f/x", 0)]
    assert same(both, scenario) == [errno.EISDIR, errno.ENOENT, errno.EINVAL, errno.ENOTDIR]


def test_file_over_4gib_is_sparse(d, mnt):
    p = f"{d}/big"
    off = 5 * 1024 ** 3 + 12345
    with open(p, "wb") as f:
        f.write(b"head")
        f.seek(off)
        f.write(b"tail" * 1000)
    assert os.path.getsize(p) == off + 4000
    with open(p, "rb") as f:
        f.seek(off - 10)
        assert f.read(14) == bytes(10) + b"tail"
        f.seek(4 * 1024 ** 3 - 2)  # the 32-bit boundary reads as a hole
        assert f.read(4) == bytes(4)
    backing = mnt.backing_path(os.path.join(os.path.basename(d), "big"))
    st = os.stat(backing)
    assert st.st_size == fmt.cipher_size(off + 4000, fmt.DEFAULT_BLOCK_SIZE)
    assert st.st_blocks * 512 < 1024 * 1024
    os.truncate(p, 4 * 1024 ** 3 + 1)
    assert os.path.getsize(p) == 4 * 1024 ** 3 + 1


def test_fallocate(both, d):
    """posix_fallocate works (glibc emulates it with writes when the filesystem has no
    fallocate); fallocate(2) itself, modes 0 and KEEP_SIZE, is EOPNOTSUPP through the mount
    because pyfuse3 has no fallocate handler (README: known differences)."""
    def scenario(r):
        write(f"{r}/f", b"abc")
        fd = os.open(f"{r}/f", os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 10000)
            os.posix_fallocate(fd, 2, 1)  # inside: no change
            return os.fstat(fd).st_size, read(f"{r}/f")
        finally:
            os.close(fd)
    assert same(both, scenario) == (10000, b"abc" + bytes(9997))
    fd = os.open(f"{d}/f", os.O_RDWR)
    try:
        for mode in (0, 1):  # 1 = FALLOC_FL_KEEP_SIZE
            assert _libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(20000)) == -1
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        assert os.fstat(fd).st_size == 10000
    finally:
        os.close(fd)
    # glibc's emulation reads before it writes: a write-only fd gets EBADF (ext4: works).
    fd = os.open(f"{d}/f", os.O_WRONLY)
    try:
        assert err(os.posix_fallocate, fd, 0, 20000) == errno.EBADF
    finally:
        os.close(fd)


def test_seek_data_and_hole(d):
    """Without an lseek handler in pyfuse3 the kernel treats the whole file as data (which
    POSIX allows): SEEK_DATA returns the offset, SEEK_HOLE the size, ENXIO past the end."""
    p = f"{d}/sparse"
    with open(p, "wb") as f:
        f.write(b"x")
        f.seek(1 << 20)
        f.write(b"y")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 4096
        assert os.lseek(fd, 0, os.SEEK_HOLE) == (1 << 20) + 1
        assert err(os.lseek, fd, (1 << 20) + 5, os.SEEK_DATA) == errno.ENXIO
    finally:
        os.close(fd)


# --- directories ----------------------------------------------------------------------------

def test_mkdir_rmdir_unlink_errors(both):
    def scenario(r):
        os.makedirs(f"{r}/d/sub")
        write(f"{r}/f", b"x")
        return [err(os.mkdir, f"{r}/d"), err(os.mkdir, f"{r}/f"), err(os.mkdir, f"{r}/no/x"),
                err(os.mkdir, f"{r}/f/x"), err(os.rmdir, f"{r}/d"), err(os.rmdir, f"{r}/none"),
                err(os.rmdir, f"{r}/f"), err(os.unlink, f"{r}/d"), err(os.unlink, f"{r}/none"),
                err(os.unlink, f"{r}/f/x"), err(os.rmdir, f"{r}/d/sub/."),
                err(os.rmdir, f"{r}/d/sub"), err(os.rmdir, f"{r}/d"),
                os.listdir(r), os.stat(r).st_nlink]
    assert same(both, scenario)[:13] == [
        errno.EEXIST, errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.ENOTEMPTY,
        errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ENOTDIR, errno.EINVAL,
        0, 0]


def test_readdir_lists_all_kinds_with_types(both):
    def scenario(r):
        os.mkdir(f"{r}/dir")
        write(f"{r}/file", b"x")
        os.symlink("file", f"{r}/link")
        os.mkfifo(f"{r}/fifo")
        with os.scandir(r) as it:
            return sorted((e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                           e.is_symlink(), e.inode() == os.lstat(e.path).st_ino) for e in it)
    assert len(same(both, scenario)) == 4


def test_directory_nlink_and_open_removed_dir(both):
    def scenario(r):
        os.makedirs(f"{r}/a/b")
        os.mkdir(f"{r}/a/c")
        nl = os.stat(f"{r}/a").st_nlink
        fd = os.open(f"{r}/a/b", os.O_RDONLY | os.O_DIRECTORY)
        os.rmdir(f"{r}/a/b")
        try:
            left = err(os.listdir, fd)
            created = err(os.open, f"{r}/a/b/x", os.O_CREAT | os.O_WRONLY)
        finally:
            os.close(fd)
        return nl, left, created, os.stat(f"{r}/a").st_nlink
    assert same(both, scenario) == (4, 0, errno.ENOENT, 3)  # glibc: ENOENT reads as EOF


def test_fsync_fdatasync_fsyncdir_flush(d, mnt):
    p = f"{d}/durable"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"z" * 10000)
        os.fsync(fd)
        # After fsync the ciphertext is in the backing file, before any close.
        backing = mnt.backing_path(os.path.join(os.path.basename(d), "durable"))
        assert os.path.getsize(backing) == fmt.cipher_size(10000, fmt.DEFAULT_BLOCK_SIZE)
        os.write(fd, b"y")
        os.fdatasync(fd)
        assert os.path.getsize(backing) == fmt.cipher_size(10001, fmt.DEFAULT_BLOCK_SIZE)
        fd2 = os.dup(fd)
        os.close(fd2)  # a flush without release
        os.write(fd, b"w")
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert read(p) == b"z" * 10000 + b"yw"


# --- rename -----------------------------------------------------------------------------------

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, old.encode(), -100, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_errors(both):
    def scenario(r):
        os.makedirs(f"{r}/full/x")
        os.mkdir(f"{r}/empty")
        write(f"{r}/f", b"f")
        write(f"{r}/g", b"g")
        out = [err(os.rename, f"{r}/none", f"{r}/z"), err(os.rename, f"{r}/f", f"{r}/full"),
               err(os.rename, f"{r}/full", f"{r}/f"), err(os.rename, f"{r}/empty", f"{r}/full"),
               err(os.rename, f"{r}/full", f"{r}/full/x/y"), err(os.rename, f"{r}/f", f"{r}/no/z"),
               err(os.rename, f"{r}/f", f"{r}/g/z")]
        out.append(err(os.rename, f"{r}/full", f"{r}/empty"))  # over an empty dir: fine
        out.append(sorted(os.listdir(r)))
        return out
    assert same(both, scenario) == [
        errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EINVAL,
        errno.ENOENT, errno.ENOTDIR, 0, ["empty", "f", "g"]]


def test_rename_noreplace_and_exchange(both, mnt):
    def scenario(r):
        write(f"{r}/a", b"AAA")
        write(f"{r}/b", b"BBBB")
        os.mkdir(f"{r}/dir")
        write(f"{r}/dir/in", b"inside")
        out = [err(renameat2, f"{r}/a", f"{r}/b", RENAME_NOREPLACE)]
        out.append(err(renameat2, f"{r}/a", f"{r}/c", RENAME_NOREPLACE))
        out.append(err(renameat2, f"{r}/c", f"{r}/b", RENAME_EXCHANGE))
        out.append((read(f"{r}/c"), read(f"{r}/b")))
        out.append(err(renameat2, f"{r}/c", f"{r}/dir", RENAME_EXCHANGE))  # file <-> dir
        out.append((read(f"{r}/c/in"), read(f"{r}/dir")))
        out.append(err(renameat2, f"{r}/c", f"{r}/nothing", RENAME_EXCHANGE))
        out.append(err(renameat2, f"{r}/b", f"{r}/x", RENAME_EXCHANGE | RENAME_NOREPLACE))
        return out
    assert same(both, scenario) == [errno.EEXIST, 0, 0, (b"BBBB", b"AAA"), 0,
                                    (b"inside", b"BBBB"), errno.ENOENT, errno.EINVAL]
    # Each name kept the key that belongs to its content: survives a cold read.
    mdir = both[1]
    mnt.remount()
    assert read(f"{mdir}/b") == b"AAA" and read(f"{mdir}/dir") == b"BBBB"
    assert read(f"{mdir}/c/in") == b"inside"


def test_rename_over_open_file_and_hard_link_to_itself(both):
    def scenario(r):
        write(f"{r}/victim", b"old content")
        write(f"{r}/new", b"new")
        f = open(f"{r}/victim", "r+b", buffering=0)
        os.rename(f"{r}/new", f"{r}/victim")
        f.seek(0, os.SEEK_END)
        f.write(b"+more")
        f.seek(0)
        old = f.read()
        f.close()
        os.link(f"{r}/victim", f"{r}/alias")
        os.rename(f"{r}/victim", f"{r}/alias")  # same inode: nothing happens
        return old, read(f"{r}/victim"), sorted(os.listdir(r)), os.stat(f"{r}/alias").st_nlink
    assert same(both, scenario) == (b"old content+more", b"new", ["alias", "victim"], 2)


def test_rename_across_mounts_is_exdev(d):
    write(f"{d}/f", b"x")
    outside = short_tempdir("ref-")
    try:
        assert err(os.rename, f"{d}/f", f"{outside}/f") == errno.EXDEV
        assert err(os.link, f"{d}/f", f"{outside}/f") == errno.EXDEV
    finally:
        shutil.rmtree(outside)


# --- open, unlink, last close ----------------------------------------------------------------

def test_open_unlink_keeps_working_until_last_close(both, mnt):
    def scenario(r):
        write(f"{r}/tmp", b"data " * 2000)
        f1 = open(f"{r}/tmp", "r+b", buffering=0)
        f2 = open(f"{r}/tmp", "r+b", buffering=0)
        os.unlink(f"{r}/tmp")
        f2.seek(3)
        f2.write(b"XYZ" * 3000)  # through the second handle ...
        f1.truncate(7000)
        f1.seek(0)
        seen = f1.read()  # ... read through the first
        os.fchmod(f1.fileno(), 0o600)
        st = os.fstat(f2.fileno())
        f1.close()
        f2.seek(0)
        seen2 = f2.read(10)
        f2.close()
        return seen, seen2, st.st_nlink, oct(st.st_mode), st.st_size, os.listdir(r)
    assert same(both, scenario)[2:] == (0, "0o100600", 7000, [])
    assert sorted(os.listdir(mnt.backing_path(os.path.basename(both[1])))) == []


# --- symlinks, hard links, special files ---------------------------------------------------

def test_symlinks(both, mnt):
    target = "../some/where/" + "t" * 100
    def scenario(r):
        os.symlink(target, f"{r}/l")
        os.symlink("f", f"{r}/to_f")
        write(f"{r}/f", b"via link")
        st = os.lstat(f"{r}/l")
        return [os.readlink(f"{r}/l"), stat.S_ISLNK(st.st_mode), st.st_size,
                read(f"{r}/to_f"), err(os.symlink, "x", f"{r}/l"), err(os.readlink, f"{r}/f"),
                err(os.stat, f"{r}/l"), err(os.symlink, "x", f"{r}/none/l"),
                os.path.realpath(f"{r}/to_f") == os.path.realpath(f"{r}/f")]
    assert same(both, scenario)[4:8] == [errno.EEXIST, errno.EINVAL, errno.ENOENT,
                                         errno.ENOENT]
    # The target is stored in the clear (docs/FORMAT.md) unless names are encrypted, and
    # symlinks have no sidecar.
    bl = mnt.backing_path(os.path.basename(both[1]) + "/l")
    assert (os.readlink(bl) == target) is not mnt.encrypted_names
    assert not os.path.lexists(f"{bl}{SUFFIX}")


def test_hard_links_both_halves_and_counts(both, mnt):
    def scenario(r):
        write(f"{r}/a", b"shared")
        os.link(f"{r}/a", f"{r}/b")
        os.mkdir(f"{r}/sub")
        os.link(f"{r}/b", f"{r}/sub/c")
        with open(f"{r}/sub/c", "ab") as f:
            f.write(b" content")
        out = [os.stat(f"{r}/a").st_nlink, read(f"{r}/b"),
               os.stat(f"{r}/a").st_ino == os.stat(f"{r}/sub/c").st_ino]
        out += [err(os.link, f"{r}/a", f"{r}/b"), err(os.link, f"{r}/none", f"{r}/z"),
                err(os.link, f"{r}/sub", f"{r}/dirlink"), err(os.link, f"{r}/a", f"{r}/no/z")]
        os.unlink(f"{r}/a")
        os.rename(f"{r}/b", f"{r}/b2")
        out += [os.stat(f"{r}/b2").st_nlink, read(f"{r}/sub/c")]
        os.symlink("b2", f"{r}/sl")
        os.link(f"{r}/sl", f"{r}/sl2", follow_symlinks=False)  # a link to a symlink
        out += [os.readlink(f"{r}/sl2"), os.lstat(f"{r}/sl").st_nlink]
        return out
    assert same(both, scenario) == [3, b"shared content", True, errno.EEXIST, errno.ENOENT,
                                    errno.EPERM, errno.ENOENT, 2, b"shared content", "b2", 2]
    bdir = os.path.basename(both[1])
    b2 = mnt.backing_path(f"{bdir}/b2")
    data, key = os.stat(b2), os.stat(f"{b2}{SUFFIX}")
    assert data.st_nlink == key.st_nlink == 2
    assert os.stat(mnt.backing_path(f"{bdir}/sub/c") + SUFFIX).st_ino == key.st_ino
    mnt.remount()
    assert read(f"{both[1]}/b2") == b"shared content"


def test_fifo_socket_and_device_nodes(both):
    def scenario(r):
        os.mkfifo(f"{r}/fifo", 0o640)
        got = []
        t = threading.Thread(target=lambda: got.append(read(f"{r}/fifo")))
        t.start()
        write(f"{r}/fifo", b"through the pipe")
        t.join(10)
        s = socket.socket(socket.AF_UNIX)
        s.bind(f"{r}/sock")
        s.close()
        os.mknod(f"{r}/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(f"{r}/blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        os.mknod(f"{r}/reg", stat.S_IFREG | 0o600)
        out = [got, stat.S_ISFIFO(os.stat(f"{r}/fifo").st_mode),
               stat.S_ISSOCK(os.stat(f"{r}/sock").st_mode)]
        for n in ("null", "blk"):
            st = os.stat(f"{r}/{n}")
            out.append((stat.S_IFMT(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev)))
        out.append((stat.S_ISREG(os.stat(f"{r}/reg").st_mode), read(f"{r}/reg")))
        out.append(err(os.mkfifo, f"{r}/fifo"))
        os.link(f"{r}/fifo", f"{r}/fifo2")
        out.append(os.stat(f"{r}/fifo").st_nlink)
        return out
    assert same(both, scenario)[0] == [b"through the pipe"]


# --- metadata ------------------------------------------------------------------------------

def test_chmod_chown_utimens(both):
    def scenario(r):
        write(f"{r}/f", b"x")
        os.mkdir(f"{r}/d")
        os.symlink("f", f"{r}/l")
        os.chmod(f"{r}/f", 0o4751)
        os.chmod(f"{r}/d", 0o1777)
        out = [oct(os.stat(f"{r}/f").st_mode), oct(os.stat(f"{r}/d").st_mode)]
        os.chown(f"{r}/f", 1234, 5678)
        os.chown(f"{r}/l", 42, 43, follow_symlinks=False)
        st = os.stat(f"{r}/f")
        out += [(st.st_uid, st.st_gid), oct(st.st_mode)]  # chown clears set-uid
        out.append((os.lstat(f"{r}/l").st_uid, os.stat(f"{r}/l").st_uid))
        os.utime(f"{r}/f", ns=(1_000_000_001_000_000_123, 2_000_000_002_999_999_999))
        os.utime(f"{r}/l", ns=(3, 4_000_000_005), follow_symlinks=False)
        st, lst = os.stat(f"{r}/f"), os.lstat(f"{r}/l")
        out += [(st.st_atime_ns, st.st_mtime_ns), (lst.st_atime_ns, lst.st_mtime_ns)]
        subprocess.run(["touch", "-m", "-d", "@1500000000.5", f"{r}/f"], check=True)  # UTIME_OMIT
        st = os.stat(f"{r}/f")
        out.append((st.st_atime_ns, st.st_mtime_ns))
        out.append(err(os.chmod, f"{r}/none", 0o600))
        out.append(err(os.utime, f"{r}/none"))
        return out
    res = same(both, scenario)
    assert res[0] == "0o104751" and res[2] == (1234, 5678)
    assert res[5] == (1_000_000_001_000_000_123, 2_000_000_002_999_999_999)
    # UTIME_NOW: close to our clock, on both sides
    ref, mdir = both
    os.utime(f"{mdir}/f")
    import time
    assert abs(os.stat(f"{mdir}/f").st_mtime - time.time()) < 5


def test_ctime_and_mtime_follow_changes(d):
    import time
    p = f"{d}/f"
    write(p, b"x")
    os.utime(p, ns=(10**18, 10**18))
    with open(p, "ab") as f:
        f.write(b"y")
    st = os.stat(p)
    assert abs(st.st_mtime - time.time()) < 5 and abs(st.st_ctime - time.time()) < 5


def test_statfs_and_name_limits(both, mnt):
    d = both[1]
    sv = os.statvfs(d)
    assert sv.f_namemax == NAME_MAX == os.statvfs(both[0]).f_namemax
    assert sv.f_blocks > 0 and sv.f_bsize > 0
    ok, long = "n" * NAME_MAX, "n" * (NAME_MAX + 1)
    write(f"{d}/src", b"x")
    os.mkdir(f"{d}/{ok}")
    os.rmdir(f"{d}/{ok}")
    for fn in (lambda n: write(f"{d}/{n}", b"x"), lambda n: os.mkdir(f"{d}/{n}"),
               lambda n: os.symlink("src", f"{d}/{n}"), lambda n: os.mkfifo(f"{d}/{n}"),
               lambda n: os.link(f"{d}/src", f"{d}/{n}"),
               lambda n: os.rename(f"{d}/src", f"{d}/{n}")):
        assert err(fn, long) == errno.ENAMETOOLONG
        assert err(fn, ok) == 0
        p = f"{d}/{ok}"
        if os.path.isdir(p) and not os.path.islink(p):
            os.rmdir(p)
        elif not os.path.exists(f"{d}/src"):
            os.rename(p, f"{d}/src")
        else:
            os.unlink(p)
    # Beyond 255 the kernel refuses, as everywhere.
    assert err(os.stat, f"{d}/{long}") == errno.ENAMETOOLONG


def test_only_the_control_dir_is_reserved(d, mnt):
    """Names ending in the sidecar suffix or looking like the long-name form are stored
    as long names (docs/FORMAT.md), so users may have them; only /.encfs stays ours."""
    write(f"{d}/x", b"1")
    assert err(os.stat, f"{d}/x{SUFFIX}") == errno.ENOENT  # the sidecar stays hidden
    write(f"{d}/x{SUFFIX}", b"mine")
    os.mkdir(f"{d}/y{SUFFIX}")
    os.rename(f"{d}/x", f"{d}/z{SUFFIX}")
    write(f"{d}/encfs.long.abc", b"2")
    assert sorted(os.listdir(d)) == sorted([f"x{SUFFIX}", f"y{SUFFIX}", f"z{SUFFIX}",
                                            "encfs.long.abc"])
    assert open(f"{d}/z{SUFFIX}", "rb").read() == b"1"
    assert open(f"{d}/x{SUFFIX}", "rb").read() == b"mine"
    for n in (f"x{SUFFIX}", f"z{SUFFIX}", "encfs.long.abc"):
        os.unlink(f"{d}/{n}")
    os.rmdir(f"{d}/y{SUFFIX}")
    write(f"{d}/x", b"1")
    assert err(os.stat, f"{mnt.mountpoint}/.encfs") == errno.ENOENT
    assert err(os.mkdir, f"{mnt.mountpoint}/.encfs") == errno.EINVAL
    os.mkdir(f"{d}/.encfs")  # reserved only at the root
    assert os.listdir(d) == [".encfs", "x"] or sorted(os.listdir(d)) == [".encfs", "x"]


# --- permissions and ownership -----------------------------------------------------------

def test_eacces_for_non_owner_under_default_permissions(both):
    def scenario(r):
        write(f"{r}/private", b"secret")
        os.chmod(f"{r}/private", 0o600)
        write(f"{r}/readonly", b"ro")
        os.chmod(f"{r}/readonly", 0o644)
        os.mkdir(f"{r}/closed", 0o755)
        os.mkdir(f"{r}/sticky")
        os.chmod(f"{r}/sticky", 0o1777)
        write(f"{r}/sticky/roots", b"r")
        os.chmod(f"{r}/sticky/roots", 0o666)
        code = f"""
import errno, os
def e(fn, *a):
    try:
        fn(*a)
    except OSError as x:
        return x.errno
    return 0
r = {r!r}
print([e(open, r + "/private"), e(open, r + "/readonly", "r+b"), e(open, r + "/readonly"),
       e(open, r + "/closed/new", "w"), e(os.mkdir, r + "/closed/d"),
       e(os.unlink, r + "/sticky/roots"), e(os.chmod, r + "/readonly", 0o777),
       e(os.chown, r + "/readonly", 65534, 65534), e(os.utime, r + "/readonly", (1, 1)),
       e(os.truncate, r + "/readonly", 0), e(os.access, r + "/private", os.R_OK),
       os.access(r + "/private", os.R_OK), os.access(r + "/readonly", os.R_OK),
       os.access(r + "/readonly", os.W_OK), e(os.listdir, r + "/closed")])
"""
        return as_user(code)
    res = eval(same(both, scenario))
    A, P = errno.EACCES, errno.EPERM
    assert res == [A, A, 0, A, A, P, P, P, P, A, 0, False, True, False, 0]


def test_new_objects_belong_to_the_caller(both):
    def scenario(r):
        code = f"""
import os, socket
r = {r!r}
open(r + "/file", "w").write("x")
os.mkdir(r + "/dir")
os.symlink("file", r + "/link")
os.mkfifo(r + "/fifo")
s = socket.socket(socket.AF_UNIX); s.bind(r + "/sock"); s.close()
os.link(r + "/file", r + "/hard")
"""
        as_user(code, uid=4242, gid=4343)
        return sorted((n, os.lstat(f"{r}/{n}").st_uid, os.lstat(f"{r}/{n}").st_gid)
                      for n in os.listdir(r))
    res = same(both, scenario)
    assert {(uid, gid) for _, uid, gid in res} == {(4242, 4343)} and len(res) == 6


def test_setgid_directory_inheritance(both):
    def scenario(r):
        os.mkdir(f"{r}/g")
        os.chown(f"{r}/g", 0, 777)
        os.chmod(f"{r}/g", 0o2777)
        as_user(f"import os; open({r!r} + '/g/f', 'w'); os.mkdir({r!r} + '/g/sub')",
                uid=4242, gid=4343)
        return [(os.stat(f"{r}/g/f").st_gid, os.stat(f"{r}/g/sub").st_gid,
                 oct(os.stat(f"{r}/g/sub").st_mode))]
    assert same(both, scenario) == [(777, 777, "0o42755")]
