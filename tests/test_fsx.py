"""Layer 3: an fsx-style randomized comparison of the mount with a plain ext4 directory.

The same seeded random sequence of open/close/write/append/read/truncate/fallocate/mmap/
fsync/rename/link/unlink operations is applied to a plain directory and to the mount; every
operation must give the same result (data or errno), and after every step the two trees
must hold the same names, types, sizes, link counts, modes and contents, as must the files
still open (also those already unlinked).

Knobs (environment):
  ENCFS_FSX_OPS   operations per run (default 2000; the long run is 200000:
                  ENCFS_FSX_OPS=200000 .venv/bin/pytest tests/test_fsx.py)
  ENCFS_FSX_SEED  the random seed (default 20261129); a failure prints the seed and the
                  last operations, so it can be replayed.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import tempfile
import stat
from collections import deque

import pytest

from encfs.pytest_plugin import short_tempdir, make_mount, running_kms

pytestmark = pytest.mark.fuse

OPS = int(os.environ.get("ENCFS_FSX_OPS", "2000"))
SEED = int(os.environ.get("ENCFS_FSX_SEED", "20261129"))
NAMES = ["a", "b", "c", "d", "e", "sub/x", "sub/y"]
MAX_OFF = 300_000
MAX_LEN = 20_000
OPEN_FLAGS = [os.O_RDWR, os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_APPEND,
              os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_TRUNC]


@pytest.fixture(scope="module")
def kms():
    with running_kms("kms-") as server:
        yield server


class Side:
    """One tree (the ext4 reference or the mount) and its open handles."""

    def __init__(self, root: str):
        self.root = root
        self.fds: dict[int, int] = {}

    def p(self, name: str) -> str:
        return os.path.join(self.root, name)

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno, e.errno))


class Fsx:
    def __init__(self, ref: Side, mnt: Side, seed: int, drop_cache_every: int):
        self.sides = (ref, mnt)
        self.rnd = random.Random(seed)
        self.next_handle = 1
        self.handles: dict[int, int] = {}  # handle -> open flags
        self.history: deque[str] = deque(maxlen=25)
        self.drop_cache_every = drop_cache_every

    # Each op: choose arguments once, apply to both sides, compare outcomes.
    def both(self, desc: str, fn) -> None:
        self.history.append(desc)
        results = [outcome(fn, side) for side in self.sides]
        assert results[0] == results[1], (f"{desc}: ext4 {results[0]!r:.200} "
                                          f"!= mount {results[1]!r:.200}")

    def op_open(self) -> None:
        name = self.rnd.choice(NAMES)
        flags = self.rnd.choice(OPEN_FLAGS) | (os.O_CREAT if self.rnd.random() < 0.6 else 0)
        h = self.next_handle
        self.next_handle += 1

        def fn(side: Side):
            side.fds[h] = os.open(side.p(name), flags, 0o644)
            return None
        self.both(f"open {name} {flags:#o} -> {h}", fn)
        if h in self.sides[0].fds:
            self.handles[h] = flags

    def pick_handle(self, want: str | None = None) -> int | None:
        hs = [h for h, fl in self.handles.items()
              if want is None or (want == "r" and fl & os.O_ACCMODE != os.O_WRONLY)
              or (want == "w" and fl & os.O_ACCMODE != os.O_RDONLY)]
        return self.rnd.choice(hs) if hs else None

    def op_close(self) -> None:
        h = self.pick_handle()
        if h is None:
            return
        del self.handles[h]
        self.both(f"close {h}", lambda s: os.close(s.fds.pop(h)))

    def op_write(self) -> None:
        h = self.pick_handle("w")
        if h is None:
            return
        off = self.rnd.randrange(MAX_OFF)
        data = self.rnd.randbytes(self.rnd.randrange(1, MAX_LEN))
        if self.handles[h] & os.O_APPEND:
            self.both(f"append {h} {len(data)}", lambda s: os.write(s.fds[h], data))
        else:
            self.both(f"pwrite {h} {off} {len(data)}", lambda s: os.pwrite(s.fds[h], data, off))

    def op_read(self) -> None:
        h = self.pick_handle("r")
        if h is None:
            return
        off = self.rnd.randrange(MAX_OFF + MAX_LEN)
        n = self.rnd.randrange(1, MAX_LEN * 2)
        self.both(f"pread {h} {off} {n}", lambda s: os.pread(s.fds[h], n, off))

    def op_truncate(self) -> None:
        size = self.rnd.choice([0, self.rnd.randrange(MAX_OFF), self.rnd.randrange(8192),
                                4096 * self.rnd.randrange(1, 60)])
        h = self.pick_handle("w")
        if h is not None and self.rnd.random() < 0.5:
            self.both(f"ftruncate {h} {size}", lambda s: os.ftruncate(s.fds[h], size))
        else:
            name = self.rnd.choice(NAMES)
            self.both(f"truncate {name} {size}", lambda s: os.truncate(s.p(name), size))

    def op_fallocate(self) -> None:
        h = self.pick_handle("w")
        if h is None or self.handles[h] & (os.O_APPEND | os.O_ACCMODE) != os.O_RDWR:
            return  # glibc's emulation (used on the mount) must read, and not append
        off, n = self.rnd.randrange(MAX_OFF), self.rnd.randrange(1, MAX_LEN)
        self.both(f"posix_fallocate {h} {off} {n}",
                  lambda s: os.posix_fallocate(s.fds[h], off, n))

    def op_mmap(self) -> None:
        name = self.rnd.choice(NAMES)
        rel_off = self.rnd.random()
        data = self.rnd.randbytes(self.rnd.randrange(1, 9000))
        write = self.rnd.random() < 0.6

        def fn(side: Side):
            fd = os.open(side.p(name), os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    return b""
                with mmap.mmap(fd, size) as m:
                    off = int(rel_off * size)
                    n = min(len(data), size - off)
                    if write:
                        m[off:off + n] = data[:n]
                        m.flush()
                    return m[off:off + n]
            finally:
                os.close(fd)
        self.both(f"mmap {'write' if write else 'read'} {name}", fn)

    def op_fsync(self) -> None:
        h = self.pick_handle()
        if h is not None:
            self.both(f"fsync {h}", lambda s: os.fsync(s.fds[h]))

    def op_rename(self) -> None:
        a, b = self.rnd.choice(NAMES), self.rnd.choice(NAMES)
        self.both(f"rename {a} {b}", lambda s: os.rename(s.p(a), s.p(b)))

    def op_link(self) -> None:
        a, b = self.rnd.choice(NAMES), self.rnd.choice(NAMES)
        self.both(f"link {a} {b}", lambda s: os.link(s.p(a), s.p(b)))

    def op_unlink(self) -> None:
        name = self.rnd.choice(NAMES)
        self.both(f"unlink {name}", lambda s: os.unlink(s.p(name)))

    WEIGHTS = {"op_open": 8, "op_close": 6, "op_write": 20, "op_read": 12, "op_truncate": 8,
               "op_fallocate": 3, "op_mmap": 6, "op_fsync": 2, "op_rename": 5, "op_link": 4,
               "op_unlink": 4}

    # --- comparison after every step ------------------------------------------------------

    def snapshot(self, side: Side) -> tuple:
        tree = []
        for name in sorted(os.listdir(side.root)) + [
                "sub/" + n for n in sorted(os.listdir(side.p("sub")))]:
            st = os.lstat(side.p(name))
            if stat.S_ISDIR(st.st_mode):
                tree.append((name, "dir"))
                continue
            with open(side.p(name), "rb") as f:
                data = f.read()
            tree.append((name, stat.filemode(st.st_mode), st.st_size, st.st_nlink,
                         len(data), hash(data)))
        handles = []
        for h in sorted(self.handles):
            st = os.fstat(side.fds[h])
            handles.append((h, st.st_size, st.st_nlink))
        return tuple(tree), tuple(handles)

    def compare(self, step: int) -> None:
        ref, mnt = (self.snapshot(s) for s in self.sides)
        assert ref == mnt, f"trees differ after step {step}"
        if self.drop_cache_every and step % self.drop_cache_every == 0:
            # Drop the mount's clean cached pages, so that reads go through decryption.
            side = self.sides[1]
            for name in NAMES:
                try:
                    fd = os.open(side.p(name), os.O_RDONLY)
                except OSError:
                    continue
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

    def run(self, ops: int) -> None:
        names, weights = zip(*self.WEIGHTS.items())
        for step in range(ops):
            op = self.rnd.choices(names, weights)[0]
            try:
                getattr(self, op)()
                self.compare(step)
            except AssertionError as e:
                raise AssertionError(f"fsx seed {SEED} step {step}: {e}\nlast operations:\n  "
                                     + "\n  ".join(self.history)) from None


def run_fsx(kms, ref_base: str, ops: int, seed: int, extra: list[str],
            drop_cache_every: int) -> None:
    workdir = short_tempdir("encfs-fsx-")
    ref_root = tempfile.mkdtemp(prefix="fsx-ref-", dir=ref_base)  # on real ext4
    os.makedirs(os.path.join(ref_root, "sub"))
    m = make_mount(kms, workdir, extra_args=extra)
    ref, mnt = Side(ref_root), Side(m.mountpoint)
    try:
        os.mkdir(mnt.p("sub"))
        Fsx(ref, mnt, seed, drop_cache_every).run(ops)
        ref.close_all()
        mnt.close_all()
        # Everything must also survive a cold start: compare after a remount.
        m.remount()
        fsx = Fsx(ref, Side(m.mountpoint), seed, 0)
        fsx.handles.clear()
        fsx.compare(-1)
    finally:
        ref.close_all()
        mnt.close_all()
        m.unmount()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(ref_root, ignore_errors=True)


def test_fsx_against_ext4(kms, ext4_root):
    run_fsx(kms, ext4_root, OPS, SEED, [], drop_cache_every=10)


def test_fsx_against_ext4_shared_backing(kms, ext4_root):
    """No writeback cache and no page cache kept: every request reaches encfs as made."""
    run_fsx(kms, ext4_root, max(OPS // 4, 1), SEED + 1, ["--shared-backing"], drop_cache_every=0)
