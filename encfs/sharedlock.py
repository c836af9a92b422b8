"""Locks that hold across hosts for `--shared-backing` (docs/SHARED.md).

Two kinds, both open-file-description (OFD) POSIX record locks, which the kernel sends to
network filesystems (GlusterFS, CephFS, NFSv4 carry them between clients) and which,
unlike classic fcntl locks, are not dropped when another fd of the same file is closed:

- **name locks**: one byte per backing name in ``.encfs/names.lock``, at an offset
  hashed from the name's path below the backing dir. Every change of a data/sidecar pair
  under a name (create, unlink, rename, link, giving an empty file a key) holds the lock
  of each name it touches, and an open holds it while it reads the pair, so a host never
  reads half of a pair. A hash collision only makes two names wait for each other.
- **content locks**: byte ranges of the data file itself, one lock byte per block
  (offset = block number), shared for reads and exclusive for writes and truncates, so a
  block's read-modify-write on one host never interleaves with another host's.

OFD locks belong to the open file, and a daemon shares one open file among its tasks, so
its own tasks would neither exclude each other nor keep their locks apart (unlocking one
task's range would unlock the other's). So every lock has an in-process side first: name
locks are trio locks per offset, content locks a per-file reader/writer count in which
readers' blocks are reference-counted and only the last reader of a block unlocks it.
A lock that another host holds is waited for in a worker thread (F_OFD_SETLKW), never on
the trio thread.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

import trio

#: struct flock on Linux (x86_64, aarch64): short l_type, short l_whence, (pad),
#: off_t l_start, off_t l_len, pid_t l_pid (0 for OFD locks), (pad)
FLOCK = "hhxxxxqqixxxx"
#: name lock offsets are below this (2^62): a hash of the name
NAME_SPACE = 1 << 62


def setlk(fd: int, kind: int, start: int, length: int, wait: bool) -> None:
    """One OFD lock call (``length`` 0: to the end of all offsets)."""
    arg = struct.pack(FLOCK, kind, os.SEEK_SET, start, length, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)


async def lock(fd: int, kind: int, start: int, length: int) -> None:
    """Take an OFD lock, waiting in a thread when another holder has it."""
    try:
        setlk(fd, kind, start, length, wait=False)
        return
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
    while True:
        try:
            await trio.to_thread.run_sync(setlk, fd, kind, start, length, True)
            return
        except InterruptedError:
            continue


def unlock(fd: int, start: int, length: int) -> None:
    setlk(fd, fcntl.F_UNLCK, start, length, wait=False)


def name_offset(backing: bytes, path: bytes) -> int:
    """The lock byte of a backing path (its part below the backing dir: the same on
    every host, whatever the mount point of the shared filesystem)."""
    rel = os.path.relpath(path, backing)
    return int.from_bytes(hashlib.sha256(rel).digest()[:8], "big") % NAME_SPACE


class NameLocks:
    """Exclusive locks on backing names, across hosts and across this daemon's tasks."""

    def __init__(self, lock_file: bytes, backing: bytes):
        self.backing = backing
        self.fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
        self._local: dict[int, trio.Lock] = {}
        self._users: collections.Counter[int] = collections.Counter()
        self._owner: dict[int, trio.lowlevel.Task] = {}

    def close(self) -> None:
        os.close(self.fd)

    @contextlib.asynccontextmanager
    async def hold(self, paths: Iterable[bytes]) -> AsyncIterator[None]:
        """Hold the locks of ``paths`` (backing paths); taken in offset order, so two
        holders of overlapping sets never wait for each other in a circle."""
        me = trio.lowlevel.current_task()
        # A task that holds a name already (link, then the open it makes) holds it once.
        offsets = sorted({name_offset(self.backing, p) for p in paths}
                         - {o for o, t in self._owner.items() if t is me})
        taken: list[int] = []
        try:
            for off in offsets:
                self._users[off] += 1
                local = self._local.setdefault(off, trio.Lock())
                try:
                    await local.acquire()
                except BaseException:
                    self._forget(off)
                    raise
                try:
                    await lock(self.fd, fcntl.F_WRLCK, off, 1)
                except BaseException:
                    local.release()
                    self._forget(off)
                    raise
                self._owner[off] = me
                taken.append(off)
            yield
        finally:
            for off in reversed(taken):
                with contextlib.suppress(OSError):
                    unlock(self.fd, off, 1)
                del self._owner[off]
                self._local[off].release()
                self._forget(off)

    def _forget(self, off: int) -> None:
        self._users[off] -= 1
        if not self._users[off]:
            del self._users[off]
            self._local.pop(off, None)


@dataclass
class _FileState:
    readers: collections.Counter = field(default_factory=collections.Counter)
    reading: int = 0  # read requests in progress
    writing: bool = False
    acquiring: trio.Lock = field(default_factory=trio.Lock)
    changed: trio.Condition = field(default_factory=trio.Condition)


class ContentLocks:
    """Block locks of open data files (keyed by node id), across hosts and tasks.

    In this daemon, writes of one file exclude each other and reads (the content
    executor's own lock does too); across hosts, only overlapping blocks do.
    """

    def __init__(self) -> None:
        self._files: dict[int, _FileState] = {}

    def _state(self, key: int) -> _FileState:
        st = self._files.get(key)
        if st is None:
            st = self._files[key] = _FileState()
        return st

    def _drop_if_idle(self, key: int, st: _FileState) -> None:
        if not st.reading and not st.writing and self._files.get(key) is st:
            del self._files[key]

    @contextlib.asynccontextmanager
    async def read(self, key: int, fd: int, first: int, last: int) -> AsyncIterator[None]:
        """Blocks ``first``..``last`` (inclusive) of the data file ``fd``, shared."""
        st = self._state(key)
        async with st.changed:
            while st.writing:
                await st.changed.wait()
            st.reading += 1
        counted = False
        try:
            # One reader at a time takes locks: a block counted here is really locked
            # (another reader may still be waiting for it in a thread).
            async with st.acquiring:
                new = [b for b in range(first, last + 1) if not st.readers[b]]
                for start, length in _runs(new):
                    await lock(fd, fcntl.F_RDLCK, start, length)
                for b in range(first, last + 1):
                    st.readers[b] += 1
            counted = True
            yield
        finally:
            if counted:
                freed = []
                for b in range(first, last + 1):
                    st.readers[b] -= 1
                    if not st.readers[b]:
                        del st.readers[b]
                        freed.append(b)
                for start, length in _runs(freed):
                    with contextlib.suppress(OSError):
                        unlock(fd, start, length)
            async with st.changed:
                st.reading -= 1
                st.changed.notify_all()
            self._drop_if_idle(key, st)

    @contextlib.asynccontextmanager
    async def write(self, key: int, fd: int, first: int,
                    last: int | None) -> AsyncIterator[None]:
        """Blocks ``first``..``last`` exclusive (``last`` None: to the end, and beyond)."""
        st = self._state(key)
        async with st.changed:
            while st.writing or st.reading:
                await st.changed.wait()
            st.writing = True
        length = 0 if last is None else last - first + 1  # 0: to the end of all offsets
        try:
            await lock(fd, fcntl.F_WRLCK, first, length)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    unlock(fd, first, length)
        finally:
            async with st.changed:
                st.writing = False
                st.changed.notify_all()
            self._drop_if_idle(key, st)


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as (start, length) runs."""
    runs: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
