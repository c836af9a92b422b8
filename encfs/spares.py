"""Empty files created ahead of need, so that a new file's sidecar costs a rename.

Allocating an inode is the most expensive thing a file creation does on the backing
filesystem: on the project's ext4 machines it takes 50 µs to over 1 ms of kernel time (it
gets slow after many recent deletions, when ext4 skips their inodes). Every encfs file has
two backing inodes, the data file and its sidecar, while the peers have one. This pool lets
a background thread allocate the sidecars' inodes on the second core, while the FUSE thread
only writes the new sidecar's content into a spare and renames it into place (about 20 µs).

The sidecar of a removed file is recycled the same way: `recycle` renames it into the pool
instead of unlinking it (a rename costs about what an unlink does), and the thread
overwrites its old content with zeros before it is handed out again. So a workload that
deletes and creates files (a build, a test suite, sqlite's rollback journal) allocates no
sidecar inodes at all, and frees none for ext4 to skip over later.

Spares are files ``s-<hex>`` in the control dir's ``tmp/``, mode 0600, owned by the daemon,
holding nothing but zeros: the sidecar content is written only when one is taken. A
recycled sidecar waits in ``tmp/`` under its new name, with its old wrapped DEK, until the
thread zeroes it, which it does in batches of `RECYCLE_BATCH` or when spares run low. Leftovers after a crash are removed by the recovery of
``tmp/`` at the next mount (`journal_replay.recover`).
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import stat
import threading

log = logging.getLogger(__name__)

SPARE_PREFIX = b"s-"  # names of spares in the control dir's tmp/ (fsck knows them)
POOL_SIZE = 64  # spares created ahead; a larger burst of creates falls back to direct creation
RECYCLE_MAX = 4096  # spares kept from removed files (a 4 KiB block each: 16 MiB at most)
RECYCLE_BATCH = 64  # recycled sidecars the thread zeroes per wake-up


class SparePool:
    """A pool of open, empty files in ``directory``, refilled by one background thread."""

    def __init__(self, directory: bytes, size: int = POOL_SIZE,
                 recycle_max: int = RECYCLE_MAX):
        self.directory = directory
        self.size = size
        self.recycle_max = recycle_max
        # At most ``size`` spares are held open (the daemon's fd limit is for user files);
        # recycled sidecars wait as paths, first to be zeroed, then to be opened.
        self._ready: collections.deque[tuple[int, bytes]] = collections.deque()
        # not zeroed yet: each with its lstat from `recycle`
        self._recycled: collections.deque[tuple[bytes, os.stat_result]] = collections.deque()
        self._zeroed: collections.deque[bytes] = collections.deque()
        self._wanted = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start filling. Call after the daemon took its final identity (spares are owned by
        whoever creates them)."""
        self._ids = (os.geteuid(), os.getegid())  # the serving identity, final by now
        self._wanted.set()
        self._thread = threading.Thread(target=self._fill, name="encfs-spares", daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, bytes] | None:
        """An open (fd, path) of an empty spare file that the caller now owns, or None when
        the pool is empty (or was stopped)."""
        try:
            spare = self._ready.popleft()
        except IndexError:
            spare = None
        if len(self._ready) < self.size // 2:
            self._wanted.set()
        return spare

    def recycle(self, sidecar: bytes) -> bool:
        """Move the sidecar of a data file that was just unlinked (its only link) into the
        pool. False when the pool is full or not running: the caller removes it."""
        if self._thread is None or (len(self._ready) + len(self._recycled) + len(self._zeroed)
                                    >= self.recycle_max):
            return False
        try:
            st = os.lstat(sidecar)
        except FileNotFoundError:
            return True  # nothing to remove
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        path = self._new_path()
        try:
            os.rename(sidecar, path)
        except FileNotFoundError:
            return True
        self._recycled.append((path, st))
        if len(self._recycled) >= RECYCLE_BATCH:
            self._wanted.set()  # in batches: each wake-up of the thread costs the FUSE thread
        return True

    def _new_path(self) -> bytes:
        return os.path.join(self.directory, SPARE_PREFIX + secrets.token_hex(8).encode())

    def _zero(self, path: bytes, st: os.stat_result) -> bool:
        """Make a recycled sidecar a spare: its old record overwritten with zeros, owned
        by the daemon, mode 0600. ``st`` is its lstat when `recycle` took it (a regular
        file with no other link, since in the daemon's private dir): no fstat again, so
        that a recycled sidecar costs this thread three syscalls, each of which takes the
        GIL back from the request thread. False (and the path removed) when it fails."""
        fd = None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            os.pwrite(fd, bytes(st.st_size), 0)
            if (st.st_uid, st.st_gid) != self._ids:
                os.fchown(fd, *self._ids)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
            return True
        except OSError:
            _remove(path)
            return False
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    def _open_zeroed(path: bytes) -> int | None:
        """Open a zeroed recycled sidecar as a spare (None, and the path removed, if it
        cannot be opened)."""
        try:
            return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            _remove(path)
            return None

    def _next_spare(self) -> tuple[int, bytes] | None:
        """A zeroed recycled sidecar, else a new empty file (an inode allocation)."""
        while self._zeroed:
            path = self._zeroed.popleft()
            fd = self._open_zeroed(path)
            if fd is not None:
                return fd, path
        path = self._new_path()
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600), path
        except OSError as e:
            # Full disk, no inodes, a damaged control dir: the FUSE thread creates
            # sidecars directly, and reports whatever error that gets.
            log.debug("no spare created in %s: %s", self.directory, e.strerror)
            return None

    def _fill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while not self._stopping and self._recycled:
                path, st = self._recycled.popleft()
                if self._zero(path, st):
                    self._zeroed.append(path)
            while not self._stopping and len(self._ready) < self.size:
                spare = self._next_spare()
                if spare is None:
                    break
                self._ready.append(spare)
            if self._stopping:
                return

    def stop(self) -> None:
        """Stop the thread, then close and remove every spare not taken."""
        self._stopping = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while self._ready:
            fd, path = self._ready.popleft()
            os.close(fd)
            self._zeroed.append(path)
        while self._recycled:
            _remove(self._recycled.popleft()[0])
        while self._zeroed:
            _remove(self._zeroed.popleft())


def _remove(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
