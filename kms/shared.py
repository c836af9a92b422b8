"""What the worker processes of one daemon (``kms serve --workers N``) share about writes.

One file in the data directory, ``generation`` (mode 0600, 8 bytes): its flock serialises the
writes of every worker, and its content counts them. A worker writes only while it holds the
flock, after reloading its in-memory mirror of the store if the counter moved, and bumps the
counter before it releases the lock, i.e. before its reply is sent. Every other worker reads the
counter (one read of a shared mapping) before each request and reloads when it moved, so
anything a worker acknowledged is in force in every worker for the next request: a disabled key
is refused everywhere, a new grant works everywhere.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

GENERATION_FILE = "generation"
_COUNTER = struct.Struct("<Q")


def create_generation_file(data_dir: str) -> None:
    """Make (or keep) the counter file, 0600 and 8 bytes long, before the workers start."""
    path = os.path.join(data_dir, GENERATION_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if os.fstat(fd).st_size < _COUNTER.size:
            os.ftruncate(fd, _COUNTER.size)
    finally:
        os.close(fd)


class SharedWrites:
    """One worker's handle on the write lock and the generation counter."""

    def __init__(self, data_dir: str) -> None:
        self._fd = os.open(os.path.join(data_dir, GENERATION_FILE), os.O_RDWR | os.O_NOFOLLOW)
        self._map = mmap.mmap(self._fd, _COUNTER.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.seen = self.current()

    def current(self) -> int:
        return _COUNTER.unpack_from(self._map)[0]

    def moved(self) -> bool:
        """Did another worker write since this one last loaded the store?"""
        return _COUNTER.unpack_from(self._map)[0] != self.seen

    def acquire(self) -> None:
        """Block until no other worker writes (run in a thread: it may wait for an fsync)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def bump(self) -> None:
        """After a committed write, under the lock: tell the other workers to reload."""
        g = self.current() + 1
        _COUNTER.pack_into(self._map, 0, g)
        self.seen = g

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
