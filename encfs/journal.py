"""The journal's I/O: intents of multi-step changes and undo records of writes, written
into ``.encfs/journal/`` before the change and cleared after it. Their format is
encfs/journal_codec.py; finishing them at the next mount after a crash is
encfs/journal_replay.py.

A change that takes more than one backing syscall (rename of a data file and its
sidecar; truncate or a write that re-encrypts a partial block and moves the end of file)
first writes an intent to ``.encfs/journal/``, then performs its steps, then clears the
intent. The mount has at most one change in flight (the executor commits a change's steps
on the trio thread without an await between them), so its intents are written in place into one file, ``inflight-change``, and cleared
by zeroing their magic: creating and removing a file per rename would cost an inode
allocation each, the most expensive thing the backing filesystem does. A second intent
while one is open (never, today) and intents found from older versions are files of their
own, ``PID-SEQ.json``. Every step is absolute (rename to a name, pwrite at an offset, ftruncate to a
size), so replaying an intent after a crash at any point finishes the change: the file
ends in its new state. Intents identify files by inode number, so a replay never touches
a file that is not the one the intent was written for.

Intents are not fsynced: a killed daemon leaves them in the page cache, which survives.
After a machine crash only what an fsync made durable is promised, and every intent is
finished and removed before the handler that wrote it returns, so an fsync never depends
on one.
"""

from __future__ import annotations

import mmap
import os

from .content import Step
# RENAME_EXCHANGE and JournalError are re-exported for the journal's users.
from .journal_codec import (INTENT_MAGIC, RENAME_EXCHANGE, UNDO_MAGIC,  # noqa: F401
                            JournalError, RenameIntent, StepsIntent, UndoRecord,
                            encode_intent_slot, encode_undo, intent_json)
from .journal_replay import INTENT_NAME, JOURNAL_DIR, UNDO_NAME, check_dir, pending, replay_dir
from .mounts import LOCAL_FSTYPES, fs_type_of

UNDO_MAP_MIN = 2 << 20  # the undo file's mapping: a 1 MiB write's record fits


class Intent:
    """An intent written and not yet done: where it is."""

    __slots__ = ("path",)

    def __init__(self, path: bytes):
        self.path = path


class Journal:
    def __init__(self, control_dir: bytes, root: bytes | None = None):
        """``control_dir``: where ``journal/`` is: the backing dir's control dir, or a
        shared mount's own area in it (encfs/sharedmount.py), given with the backing dir
        ``root`` then."""
        self.dir = os.path.join(control_dir, JOURNAL_DIR.encode())
        self.root = root if root is not None else os.path.dirname(control_dir.rstrip(b"/"))
        #: Intents name files by absolute path; replay touches nothing outside this root.
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._seq = 0
        self._undo_fd: int | None = None
        self._undo_map: mmap.mmap | None = None
        #: Store undo records into a shared mapping of their file instead of pwrite. Only
        #: where nobody but the daemon's uid and root, who could as well kill the daemon,
        #: can truncate the file under the mapping (a store beyond the end of a mapped file
        #: is a SIGBUS): a local filesystem, and a journal dir that is ours alone. On a
        #: network filesystem its server could; there every record is a pwrite.
        self.map_undo = _private_local_dir(self.dir)
        self._intent_fd: int | None = None
        self._slot_busy = False
        # Never follow a planted symlink: intents must stay in the backing dir.
        check_dir(self.dir)
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                               | os.O_CLOEXEC)

    def close(self) -> None:
        if self._undo_map is not None:
            self._undo_map.close()
        for fd in (self._undo_fd, self._intent_fd):
            if fd is not None:
                os.close(fd)
        os.close(self._dir_fd)

    def _slot(self, name: bytes) -> int:
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=self._dir_fd)

    def _write(self, intent: StepsIntent | RenameIntent) -> Intent:
        if not self._slot_busy:
            if self._intent_fd is None:
                self._intent_fd = self._slot(INTENT_NAME)
            # One pwrite: a kill can cut it short only after its first page, and the crc
            # then shows a torn intent, written before any of its steps began.
            os.pwrite(self._intent_fd, encode_intent_slot(intent), 0)
            self._slot_busy = True
            return Intent(os.path.join(self.dir, INTENT_NAME))
        return self._write_file(intent_json(intent))

    def _write_file(self, data: bytes) -> Intent:
        self._seq += 1
        name = b"%d-%d.json" % (os.getpid(), self._seq)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o600, dir_fd=self._dir_fd)
        except FileExistsError:  # a leftover of an earlier process with our pid
            os.unlink(name, dir_fd=self._dir_fd)
            fd = os.open(name, flags, 0o600, dir_fd=self._dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return Intent(os.path.join(self.dir, name))

    def done(self, intent: Intent) -> None:
        if os.path.basename(intent.path) == INTENT_NAME:
            os.pwrite(self._intent_fd, bytes(len(INTENT_MAGIC)), 0)
            self._slot_busy = False
        else:
            os.unlink(intent.path)

    # --- the undo record of the write in progress -----------------------------------------

    def undo_before_write(self, path: bytes, ino: int, offset: int, old: bytes,
                          old_size: int) -> None:
        """Record how to undo the single `pwrite` that follows: a SIGKILL can cut a write
        of several pages short (the kernel checks for fatal signals between pages), which
        would leave a torn block. Replaying the record puts back ``old`` at ``offset`` and
        the size ``old_size``: the file is in its old state. One file, rewritten in place
        for every write (binary; `write_done` clears its magic), because creating a file
        per write would cost more than the write.

        Where it is safe (`map_undo`), the file is mapped (MAP_SHARED), so recording and
        clearing are stores into the page cache, not syscalls: what the daemon stored
        survives its death like a `pwrite` would, and a kill in the middle of the copy
        leaves a prefix, which the CRC shows as torn (the data write had not started).
        """
        record = encode_undo(UndoRecord(os.fsdecode(path), ino, offset, old, old_size))
        if self._undo_fd is None:
            self._undo_fd = self._slot(UNDO_NAME)
        if self.map_undo and (self._undo_map is not None and len(record) <= len(self._undo_map)
                              or self._map(len(record))):
            self._undo_map[:len(record)] = record
        else:
            os.pwrite(self._undo_fd, record, 0)

    def write_done(self) -> None:
        """The write finished: its undo record must never be replayed."""
        if self._undo_map is not None:
            self._undo_map[:len(UNDO_MAGIC)] = bytes(len(UNDO_MAGIC))
        else:
            os.pwrite(self._undo_fd, bytes(len(UNDO_MAGIC)), 0)

    def _map(self, size: int) -> bool:
        """Map at least ``size`` bytes of the undo file. False, and pwrite from then on,
        where shared mappings or the allocation fail.

        The mapped range is allocated first (posix_fallocate): a store into a hole of a
        mapped file is a SIGBUS when the backing filesystem is full, which kills the daemon
        where a pwrite would have answered ENOSPC (tests/test_faults.py)."""
        if self._undo_map is not None:
            self._undo_map.close()
            self._undo_map = None
        length = max(UNDO_MAP_MIN, 1 << (size - 1).bit_length())
        try:
            os.posix_fallocate(self._undo_fd, 0, length)
            self._undo_map = mmap.mmap(self._undo_fd, length)
        except (OSError, ValueError):
            self.map_undo = False
            return False
        return True

    # --- recording ----------------------------------------------------------------------

    def rename(self, old: bytes, new: bytes, flags: int, old_side: bytes | None,
               new_side: bytes | None) -> Intent:
        """Before renaming a data file and then its sidecar (``*_side``: the sidecar paths
        that exist now, or None)."""
        return self._write(RenameIntent(
            os.fsdecode(old), os.fsdecode(new), flags, _ino(old), _ino(new),
            _ino(old_side) if old_side else None, _ino(new_side) if new_side else None))

    def file_steps(self, path: bytes, ino: int, steps: list[Step]) -> Intent:
        """Before a sequence of content.PWrite / content.Truncate steps."""
        return self._write(StepsIntent(os.fsdecode(path), ino, tuple(steps)))

    # --- replay (encfs/journal_replay.py) ------------------------------------------------

    def pending(self) -> list[bytes]:
        """Intent files, and the undo record if it holds one (it is empty between writes)."""
        return pending(self.dir)

    def replay(self) -> list[str]:
        """Finish every pending intent; returns one line per intent saying what was done.

        The journal dir is writable by whoever can write to the backing dir, so an intent
        is untrusted input: it is read without following links or blocking, parsed
        strictly (journal_codec.decode), and may only touch files beneath the backing dir,
        reached without following any symlink. Nothing in it can make replay raise.
        """
        done = replay_dir(self.dir, self.root)
        # The slot files may be gone now: open them afresh on the next write.
        if self._undo_map is not None:
            self._undo_map.close()
            self._undo_map = None
        for fd in (self._undo_fd, self._intent_fd):
            if fd is not None:
                os.close(fd)
        self._undo_fd = self._intent_fd = None
        self._slot_busy = False
        return done


def _private_local_dir(path: bytes) -> bool:
    try:
        st = os.stat(path)
        fstype = fs_type_of(path)
    except OSError:
        return False
    return (st.st_uid == os.geteuid() and not st.st_mode & 0o022
            and fstype in LOCAL_FSTYPES)


def _ino(path: bytes | None) -> int | None:
    if path is None:
        return None
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None
