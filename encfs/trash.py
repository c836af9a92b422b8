"""Removed files freed off the request path, where freeing blocks waits for the device.

On a backing filesystem mounted with ``discard`` (ext4 on the project's machines), the
`unlink` of a file whose blocks are allocated waits for the device to discard them:
0.2-1.3 ms per file there, against 5 µs for a file without blocks and 12-30 µs for a
`rename` within the filesystem. So the mount renames a removed data file into the control
dir's ``tmp/`` (the name is gone from the user's directory at once, atomically, as with
`unlink`) and one background thread unlinks it there. Nothing else changes: a crash before
the thread got to it leaves a file in ``tmp/``, which the next mount removes (as every
leftover there, `journal_replay.recover`); a clean unmount waits for the thread to finish.

Only for what frees blocks when removed: a regular file with blocks, its last link, not
held open (an open file keeps its blocks until its last close anyway), and empty
directories (their block; `EncFS.rmdir` checks the emptiness first).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import secrets
import threading

log = logging.getLogger(__name__)

TRASH_PREFIX = b"d-"  # names of removed files waiting in tmp/ (never a spare's "s-")


def discards(mountinfo: str, dev: int) -> bool:
    """Whether the filesystem of device number ``dev`` is mounted with ``discard``, from
    the text of /proc/self/mountinfo (pure)."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[2] != want or "-" not in fields:
            continue
        sep = fields.index("-")
        opts = fields[5].split(",") + (fields[sep + 3].split(",") if len(fields) > sep + 3
                                       else [])
        if "discard" in opts:
            return True
    return False


def backing_discards(path: bytes) -> bool:
    """Whether removing files in the backing dir ``path`` waits for discards."""
    try:
        with open("/proc/self/mountinfo") as f:
            text = f.read()
        return discards(text, os.stat(path).st_dev)
    except OSError:
        return False


class Trash:
    """Files renamed into ``directory`` and unlinked there by one background thread."""

    def __init__(self, directory: bytes, enabled: bool = True):
        self.directory = directory
        self.enabled = enabled
        self._queue: collections.deque[bytes] = collections.deque()
        self._wanted = threading.Event()
        self._freeing = threading.Lock()  # held while files are being freed
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.moved = 0  # files handed to the thread (for tests and the log)

    def start(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="encfs-trash", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def pending(self) -> int:
        """Files moved here and not yet freed (or being freed)."""
        return len(self._queue) + self._freeing.locked()

    def put(self, path: bytes) -> bool:
        """Take ``path`` out of its directory now and free it in the background. False
        when the trash is not running, or ``path`` is on another mount inside the backing
        dir (EXDEV): the caller removes it. Other OSError of the rename (the file is then
        where it was) passes through."""
        if self._thread is None:
            return False
        dest = os.path.join(self.directory, TRASH_PREFIX + secrets.token_hex(8).encode())
        try:
            os.rename(path, dest)
        except OSError as e:
            if e.errno == errno.EXDEV:
                return False
            raise
        self._queue.append(dest)
        self.moved += 1
        self._wanted.set()
        return True

    def drain(self) -> None:
        """Free everything waiting, and return when it is freed (also what the thread was
        freeing meanwhile): on the caller's thread when the disk is full."""
        with self._freeing:
            while True:
                try:
                    path = self._queue.popleft()
                except IndexError:
                    return
                _unlink(path)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self.drain()
            if self._stopping:
                return

    def stop(self) -> None:
        """Free what is waiting and stop the thread."""
        self._stopping = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.drain()


def _unlink(path: bytes) -> None:
    try:
        try:
            os.unlink(path)
        except IsADirectoryError:  # an empty directory (`EncFS.rmdir`)
            os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # left for the next mount's cleanup of tmp/
        log.warning("cannot remove %s: %s", path.decode(errors="replace"), e.strerror)
