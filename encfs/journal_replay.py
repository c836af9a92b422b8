"""Crash recovery: finish what a killed mount left in its journal, clear its temp files,
and sweep the leftovers of an interrupted create or unlink (encfs/journal_sweep.py).

`replay_record` applies one decoded journal record (encfs/journal_codec.py) to the
backing dir; `recover` is what a mount runs after an unclean stop. Every record is
untrusted: it may only touch files beneath the backing dir, reached without following any
symlink, and only the inode it names. Nothing in a record can make replay raise anything
but OSError or JournalError, which the caller reports.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import shutil
import stat
from typing import Any

from . import backing as bk
from . import journal_sweep
from . import renameat2 as _r2
from .content import PWrite
from .journal_codec import (INTENT_MAGIC, RENAME_EXCHANGE, UNDO_MAGIC, JournalError,
                            Record, RenameIntent, StepsIntent, UndoRecord, decode)
from .names import sidecar_of
from .text import printable as _show


JOURNAL_DIR = "journal"
UNDO_NAME = b"inflight-write"
INTENT_NAME = b"inflight-change"
#: The largest journal file replay reads. An intent holds at most one write request
#: (1 MiB) and one re-padded block (up to 1 MiB), hex encoded; anything far larger was not
#: written by us.
INTENT_MAX = 16 * 1024 * 1024


def check_dir(jdir: bytes) -> None:
    """The journal dir must be a directory, not a symlink or file planted in its place."""
    try:
        fd = os.open(jdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise JournalError(f"{_show(jdir)} is not a directory (a symlink or "
                               "file was put in its place)") from None
        raise
    os.close(fd)


def pending(jdir: bytes) -> list[bytes]:
    """Journal files with something to replay: intent files, and the two slots if they
    hold a record (their magic is zeroed between changes)."""
    names = os.listdir(jdir)
    for slot, magic in ((UNDO_NAME, UNDO_MAGIC), (INTENT_NAME, INTENT_MAGIC)):
        if slot in names:
            try:
                if not read_record_file(os.path.join(jdir, slot)).startswith(magic):
                    names.remove(slot)  # cleared (or never written): nothing to do
            except (OSError, JournalError):
                pass  # replay reports it
    return sorted(os.path.join(jdir, n) for n in names)


def replay_dir(jdir: bytes, root: bytes, written_under: bytes | None = None) -> list[str]:
    """Finish every pending record of the journal dir ``jdir`` of backing dir ``root``
    and remove it; one line per record saying what was done. ``written_under``: the
    backing dir's path where the records were written, when that is not ``root`` (a
    shared mount on another host, whose client mount of the shared filesystem is
    elsewhere: encfs/sharedmount.py); their paths are moved under ``root``."""
    done = []
    for path in pending(jdir):
        shown = _show(path)
        try:
            record = decode(read_record_file(path))
            if written_under is not None:
                record = _moved(record, written_under, root)
            what = replay_record(root, record)
        except JournalError as e:
            what = f"ignored a damaged intent {shown}: {e}"
        except OSError as e:
            what = f"could not finish intent {shown}: {e.strerror or e}"
        done.append(what)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as e:
            done.append(f"could not remove intent {shown}: {e.strerror}")
    return done


def _moved(r: Record, old_root: bytes, new_root: bytes) -> Record:
    """A record whose paths below ``old_root`` now name the same files below
    ``new_root`` (others stay, and replay refuses them as outside the backing dir)."""
    old_prefix = os.fsdecode(old_root.rstrip(b"/")) + "/"
    new_prefix = os.fsdecode(new_root.rstrip(b"/")) + "/"

    def move(p: str) -> str:
        return new_prefix + p[len(old_prefix):] if p.startswith(old_prefix) else p

    if isinstance(r, RenameIntent):
        return dataclasses.replace(r, old=move(r.old), new=move(r.new))
    return dataclasses.replace(r, path=move(r.path))


def read_record_file(path: bytes) -> bytes:
    """A journal file's bytes, read without following a link or blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise JournalError("a symlink (not followed)") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise JournalError("not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JournalError("not a regular file")
        data = os.read(fd, INTENT_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > INTENT_MAX:
        raise JournalError(f"larger than {INTENT_MAX} bytes")
    return data


def replay_record(root: bytes, r: Record) -> str:
    """Finish (or, for an undo record, undo) one change; returns what was done."""
    if isinstance(r, RenameIntent):
        return _replay_rename(root, r)
    if isinstance(r, UndoRecord):
        return _replay_steps(root, r.as_intent())
    return _replay_steps(root, r)


def recover(backing: bytes) -> list[str]:
    """After an unclean stop: finish interrupted changes (journal) and drop temp files.
    Returns what was done, one line each. Never raises: whatever is in the control dir
    (damaged intents, planted files) is reported and the mount goes ahead."""
    done: list[str] = []
    jdir = bk.control_path(backing, JOURNAL_DIR)
    try:
        check_dir(jdir)
    except (OSError, JournalError) as e:
        done.append(f"could not open the journal: {getattr(e, 'strerror', None) or e}")
    else:
        done += replay_dir(jdir, backing)
    tmp = bk.control_path(backing, bk.TMP_DIR)
    try:
        leftovers = os.listdir(tmp)
    except OSError as e:
        done.append(f"could not list {_show(tmp)}: {e.strerror}")
        leftovers = []
    removed = 0
    for name in leftovers:
        path = os.path.join(tmp, name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)  # never follows symlinks inside
            else:
                os.unlink(path)
            removed += 1
        except OSError as e:
            done.append(f"could not remove {_show(path)}: {e.strerror}")
    if removed:
        done.append(f"removed {removed} temporary file(s) of interrupted writes")
    # Last: only once renames are finished is a sidecar without its data file a leftover.
    done += journal_sweep.sweep(backing)
    return done


def _ino_at(dir_fd: int, name: bytes) -> int | None:
    try:
        return os.lstat(name, dir_fd=dir_fd).st_ino
    except FileNotFoundError:
        return None


class _Beneath:
    """The parent directory of a path that must lie beneath ``root`` (and outside its
    control dir), opened one component at a time without following any symlink."""

    def __init__(self, root: bytes, path: str):
        p = os.fsencode(path)
        if not p.startswith(root.rstrip(b"/") + b"/"):
            raise JournalError(f"path {_show(path)} is outside the backing dir")
        parts = p[len(root.rstrip(b"/")) + 1:].split(b"/")
        if any(part in (b"", b".", b"..") for part in parts) or parts[0] == b".encfs":
            raise JournalError(f"path {_show(path)} is not a plain path in the backing dir")
        self.name = parts[-1]
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, dir_fd=self.fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise JournalError(f"path {_show(path)} leads through a symlink "
                                           "or a file (not followed)") from None
                    raise
                os.close(self.fd)
                self.fd = nfd
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> "_Beneath":
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)



def _replay_steps(root: bytes, r: StepsIntent) -> str:
    shown = _show(r.path)
    with _Beneath(root, r.path) as parent:
        try:
            fd = os.open(parent.name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=parent.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                return f"{shown}: no longer the file of the intent; left alone"
            raise
    try:
        st = os.fstat(fd)
        if st.st_ino != r.ino or not stat.S_ISREG(st.st_mode):
            return f"{shown}: no longer the file of the intent; left alone"
        for step in r.steps:
            if isinstance(step, PWrite):
                bk.pwrite_all(fd, step.data, step.offset)
            else:
                os.ftruncate(fd, step.size)
    finally:
        os.close(fd)
    return f"{shown}: finished an interrupted write/truncate"


def _rename_at(src: _Beneath, sname: bytes, dst: _Beneath, dname: bytes,
               flags: int = 0) -> None:
    if _r2._renameat2(src.fd, sname, dst.fd, dname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _replay_rename(root: bytes, r: RenameIntent) -> str:
    shown_old, shown_new = _show(r.old), _show(r.new)
    with _Beneath(root, r.old) as o, _Beneath(root, r.new) as n:
        old, new = o.name, n.name
        old_s, new_s = sidecar_of(old), sidecar_of(new)
        exchange = bool(r.flags & RENAME_EXCHANGE)
        data_moved = _ino_at(n.fd, new) == r.old_ino
        if not data_moved:
            return f"{shown_old} -> {shown_new}: rename had not happened; nothing to do"
        old_side_here = r.old_side_ino is not None and _ino_at(o.fd, old_s) == r.old_side_ino
        new_side_here = r.new_side_ino is not None and _ino_at(n.fd, new_s) == r.new_side_ino
        if exchange:
            # Data swapped; the sidecars must follow: each name gets the other's sidecar.
            if old_side_here and new_side_here:
                _rename_at(o, old_s, n, new_s, RENAME_EXCHANGE)
            elif old_side_here and r.new_side_ino is None:
                _rename_at(o, old_s, n, new_s)
            elif new_side_here and r.old_side_ino is None:
                _rename_at(n, new_s, o, old_s)
            return f"{shown_old} <-> {shown_new}: finished moving the sidecars"
        if r.old_side_ino is not None:
            if old_side_here:
                _rename_at(o, old_s, n, new_s)
        elif new_side_here:
            os.unlink(new_s, dir_fd=n.fd)  # the moved file had no key; the name must not keep the old one's
        return f"{shown_old} -> {shown_new}: finished moving the sidecar"
