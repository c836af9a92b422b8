"""Intents of multi-step changes, finished at the next mount after a crash.

A change that takes more than one backing syscall (rename of a data file and its
sidecar; truncate or a write that re-encrypts a partial block and moves the end of file)
first writes an intent to ``.encfs/journal/``, then performs its steps, then removes the
intent. Every step is absolute (rename to a name, pwrite at an offset, ftruncate to a
size), so replaying an intent after a crash at any point finishes the change: the file
ends in its new state. Intents identify files by inode number, so a replay never touches
a file that is not the one the intent was written for.

Intents are not fsynced: a killed daemon leaves them in the page cache, which survives.
After a machine crash only what an fsync made durable is promised, and every intent is
finished and removed before the handler that wrote it returns, so an fsync never depends
on one.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from .renameat2 import renameat2

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Intent:
    path: bytes


class JournalError(Exception):
    """An intent that cannot be parsed (damaged journal file)."""


class Journal:
    def __init__(self, control_dir: bytes):
        self.dir = os.path.join(control_dir, JOURNAL_DIR.encode())
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._seq = 0
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self._dir_fd)

    def _write(self, record: dict[str, Any]) -> Intent:
        self._seq += 1
        name = b"%d-%d.json" % (os.getpid(), self._seq)
        data = json.dumps(record).encode()
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=self._dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return Intent(os.path.join(self.dir, name))

    def done(self, intent: Intent) -> None:
        os.unlink(intent.path)

    # --- recording ----------------------------------------------------------------------

    def rename(self, old: bytes, new: bytes, flags: int, old_side: bytes | None,
               new_side: bytes | None) -> Intent:
        """Before renaming a data file and then its sidecar (``*_side``: the sidecar paths
        that exist now, or None)."""
        return self._write({
            "op": "rename", "old": os.fsdecode(old), "new": os.fsdecode(new), "flags": flags,
            "old_ino": _ino(old), "new_ino": _ino(new),
            "old_side_ino": _ino(old_side) if old_side else None,
            "new_side_ino": _ino(new_side) if new_side else None})

    def file_steps(self, path: bytes, ino: int, steps: list[tuple]) -> Intent:
        """Before a sequence of ("pwrite", offset, bytes) / ("truncate", size) steps."""
        return self._write({
            "op": "steps", "path": os.fsdecode(path), "ino": ino,
            "steps": [[s[0], s[1], s[2].hex()] if s[0] == "pwrite" else list(s)
                      for s in steps]})

    # --- replay -------------------------------------------------------------------------

    def pending(self) -> list[bytes]:
        return sorted(os.path.join(self.dir, n) for n in os.listdir(self.dir))

    def replay(self) -> list[str]:
        """Finish every pending intent; returns one line per intent saying what was done."""
        done = []
        for path in self.pending():
            try:
                with open(path, "rb") as f:
                    record = json.loads(f.read())
                what = _replay(record)
            except (ValueError, KeyError, TypeError, JournalError) as e:
                what = f"ignored a damaged intent {os.fsdecode(path)}: {e}"
            except OSError as e:
                what = f"could not finish intent {os.fsdecode(path)}: {e}"
            done.append(what)
            os.unlink(path)
        return done


def _ino(path: bytes | None) -> int | None:
    if path is None:
        return None
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _replay(r: dict[str, Any]) -> str:
    if r["op"] == "rename":
        return _replay_rename(r)
    if r["op"] == "steps":
        return _replay_steps(r)
    raise JournalError(f"unknown op {r['op']!r}")


def _replay_steps(r: dict[str, Any]) -> str:
    path = os.fsencode(r["path"])
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_ino != r["ino"] or not stat.S_ISREG(st.st_mode):
            return f"{r['path']}: no longer the file of the intent; left alone"
        for step in r["steps"]:
            if step[0] == "pwrite":
                os.pwrite(fd, bytes.fromhex(step[2]), step[1])
            elif step[0] == "truncate":
                os.ftruncate(fd, step[1])
            else:
                raise JournalError(f"unknown step {step[0]!r}")
    finally:
        os.close(fd)
    return f"{r['path']}: finished an interrupted write/truncate"


def _replay_rename(r: dict[str, Any]) -> str:
    old, new = os.fsencode(r["old"]), os.fsencode(r["new"])
    from .format import SIDECAR_SUFFIX
    sfx = SIDECAR_SUFFIX.encode()
    old_s, new_s = old + sfx, new + sfx
    exchange = bool(r["flags"] & RENAME_EXCHANGE)
    data_moved = _ino(new) == r["old_ino"]
    if not data_moved:
        return f"{r['old']} -> {r['new']}: rename had not happened; nothing to do"
    if exchange:
        # Data swapped; the sidecars must follow: each name gets the other's sidecar.
        if r["old_side_ino"] is not None and _ino(old_s) == r["old_side_ino"] and \
                r["new_side_ino"] is not None and _ino(new_s) == r["new_side_ino"]:
            renameat2(old_s, new_s, RENAME_EXCHANGE)
        elif r["old_side_ino"] is not None and _ino(old_s) == r["old_side_ino"] and \
                r["new_side_ino"] is None:
            os.rename(old_s, new_s)
        elif r["new_side_ino"] is not None and _ino(new_s) == r["new_side_ino"] and \
                r["old_side_ino"] is None:
            os.rename(new_s, old_s)
        return f"{r['old']} <-> {r['new']}: finished moving the sidecars"
    if r["old_side_ino"] is not None:
        if _ino(old_s) == r["old_side_ino"]:
            os.rename(old_s, new_s)
    elif r["new_side_ino"] is not None and _ino(new_s) == r["new_side_ino"]:
        os.unlink(new_s)  # the moved file had no key; the name must not keep the old one's
    return f"{r['old']} -> {r['new']}: finished moving the sidecar"
