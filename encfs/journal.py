"""Intents of multi-step changes, finished at the next mount after a crash.

A change that takes more than one backing syscall (rename of a data file and its
sidecar; truncate or a write that re-encrypts a partial block and moves the end of file)
first writes an intent to ``.encfs/journal/``, then performs its steps, then clears the
intent. The mount has at most one change in flight (its handlers do not await between the
steps), so its intents are written in place into one file, ``inflight-change``, and cleared
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

import ctypes
import errno
import json
import logging
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from . import renameat2 as _r2
from .mounts import LOCAL_FSTYPES, fs_type_of

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
UNDO_NAME = b"inflight-write"
UNDO_MAGIC = b"ENCFUNDO"
#: inode u64 | offset u64 | old size u64 | path length u32 | old data length u32
UNDO_BODY = struct.Struct(">QQQII")
UNDO_MAP_MIN = 2 << 20  # the undo file's mapping: a 1 MiB write's record fits
RENAME_EXCHANGE = 2
INTENT_NAME = b"inflight-change"
INTENT_MAGIC = b"ENCFINTN"
#: crc32 of the JSON body u32 | its length u32
INTENT_HEAD = struct.Struct(">II")
#: The largest intent replay reads. An intent holds at most one write request (1 MiB) and
#: one re-padded block (up to 1 MiB), hex encoded; anything far larger was not written by us.
INTENT_MAX = 16 * 1024 * 1024


@dataclass(frozen=True)
class Intent:
    path: bytes


class JournalError(Exception):
    """An intent that cannot be parsed or must not be followed (damaged or planted)."""


class Journal:
    def __init__(self, control_dir: bytes):
        self.dir = os.path.join(control_dir, JOURNAL_DIR.encode())
        #: Intents name files by absolute path; replay touches nothing outside this root.
        self.root = os.path.dirname(control_dir.rstrip(b"/"))
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
        try:
            # Never follow a planted symlink: intents must stay in the backing dir.
            self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                   | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise JournalError(f"{_show(self.dir)} is not a directory (a symlink or "
                                   "file was put in its place)") from None
            raise

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

    def _write(self, record: dict[str, Any]) -> Intent:
        body = json.dumps(record).encode()
        if not self._slot_busy:
            if self._intent_fd is None:
                self._intent_fd = self._slot(INTENT_NAME)
            # One pwrite: a kill can cut it short only after its first page, and the crc
            # then shows a torn intent, written before any of its steps began.
            os.pwrite(self._intent_fd,
                      INTENT_MAGIC + INTENT_HEAD.pack(zlib.crc32(body), len(body)) + body, 0)
            self._slot_busy = True
            return Intent(os.path.join(self.dir, INTENT_NAME))
        return self._write_file(body)

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
        body = UNDO_BODY.pack(ino, offset, old_size, len(path), len(old)) + path + old
        record = UNDO_MAGIC + struct.pack(">I", zlib.crc32(body)) + body
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
        """Map at least ``size`` bytes of the undo file (sparse: only the pages written
        take space). False, and pwrite from then on, where shared mappings fail."""
        if self._undo_map is not None:
            self._undo_map.close()
            self._undo_map = None
        length = max(UNDO_MAP_MIN, 1 << (size - 1).bit_length())
        try:
            if os.fstat(self._undo_fd).st_size < length:
                os.ftruncate(self._undo_fd, length)
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
        """Intent files, and the undo record if it holds one (it is empty between writes)."""
        names = os.listdir(self.dir)
        for slot, magic in ((UNDO_NAME, UNDO_MAGIC), (INTENT_NAME, INTENT_MAGIC)):
            if slot in names:
                try:
                    if not _read_intent(os.path.join(self.dir, slot)).startswith(magic):
                        names.remove(slot)  # cleared (or never written): nothing to do
                except (OSError, JournalError):
                    pass  # replay reports it
        return sorted(os.path.join(self.dir, n) for n in names)

    def replay(self) -> list[str]:
        """Finish every pending intent; returns one line per intent saying what was done.

        The journal dir is writable by whoever can write to the backing dir, so an intent
        is untrusted input: it is read without following links or blocking, parsed
        strictly (parse_intent), and may only touch files beneath the backing dir, reached
        without following any symlink. Nothing in it can make replay raise.
        """
        done = []
        for path in self.pending():
            shown = _show(path)
            try:
                record = parse_intent(_read_intent(path))
                what = _replay(self.root, record)
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


def _show(path: bytes | str) -> str:
    from .backing import printable
    return printable(path)


def _read_intent(path: bytes) -> bytes:
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


_MAX_OFF = (1 << 63) - 1


def _is_int(v: Any, lo: int = 0, hi: int = _MAX_OFF) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_ino(v: Any) -> bool:
    return v is None or _is_int(v, 0, (1 << 64) - 1)


def _is_path(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("/") and "\0" not in v and len(v) < 8192


def parse_intent(data: bytes) -> dict[str, Any]:
    """Parse and validate one intent file. Raises JournalError for anything but the exact
    shapes Journal.rename, Journal.file_steps and Journal.undo_before_write write."""
    if data.startswith(UNDO_MAGIC):
        return _parse_undo(data)
    if data.startswith(INTENT_MAGIC):
        head = data[len(INTENT_MAGIC):len(INTENT_MAGIC) + INTENT_HEAD.size]
        if len(head) < INTENT_HEAD.size:
            raise JournalError("torn intent")
        crc, length = INTENT_HEAD.unpack(head)
        data = data[len(INTENT_MAGIC) + INTENT_HEAD.size:][:length]
        if len(data) != length or zlib.crc32(data) != crc:
            raise JournalError("torn intent (written before its change began)")
    try:
        r = json.loads(data)
    except (ValueError, RecursionError):
        raise JournalError("not valid JSON") from None
    if not isinstance(r, dict):
        raise JournalError("not a JSON object")
    op = r.get("op")
    if op == "rename":
        if not (_is_path(r.get("old")) and _is_path(r.get("new"))
                and _is_int(r.get("flags"), 0, 0xffffffff)
                and all(k in r and _is_ino(r[k]) for k in
                        ("old_ino", "new_ino", "old_side_ino", "new_side_ino"))):
            raise JournalError("malformed rename intent")
        return r
    if op == "steps":
        steps = r.get("steps")
        if not (_is_path(r.get("path")) and _is_int(r.get("ino"), 0, (1 << 64) - 1)
                and isinstance(steps, list)):
            raise JournalError("malformed steps intent")
        parsed = []
        for step in steps:
            if (isinstance(step, list) and len(step) == 3 and step[0] == "pwrite"
                    and _is_int(step[1]) and isinstance(step[2], str)):
                try:
                    data_ = bytes.fromhex(step[2])
                except ValueError:
                    raise JournalError("pwrite data is not hex") from None
                if step[1] + len(data_) > _MAX_OFF:
                    raise JournalError("pwrite beyond the largest file offset")
                parsed.append(("pwrite", step[1], data_))
            elif (isinstance(step, list) and len(step) == 2 and step[0] == "truncate"
                  and _is_int(step[1])):
                parsed.append(("truncate", step[1]))
            else:
                raise JournalError(f"unknown or malformed step {str(step)[:40]!r}")
        return {**r, "steps": parsed}
    raise JournalError(f"unknown op {str(op)[:40]!r}")


def _parse_undo(data: bytes) -> dict[str, Any]:
    """The binary undo record, as the steps that undo the interrupted write."""
    head = len(UNDO_MAGIC) + 4
    if len(data) < head + UNDO_BODY.size:
        raise JournalError("undo record truncated")
    (crc,) = struct.unpack_from(">I", data, len(UNDO_MAGIC))
    ino, offset, old_size, path_len, old_len = UNDO_BODY.unpack_from(data, head)
    # The record is followed by whatever a longer earlier record left (or the zeros of the
    # mapped file): its own lengths delimit it.
    body = data[head:head + UNDO_BODY.size + path_len + old_len]
    if len(body) != UNDO_BODY.size + path_len + old_len:
        raise JournalError("undo record truncated")
    if zlib.crc32(body) != crc:
        raise JournalError("undo record torn (checksum): the write had not started")
    if offset + old_len > _MAX_OFF or old_size > _MAX_OFF:
        raise JournalError("undo record lengths are inconsistent")
    pos = UNDO_BODY.size
    path = os.fsdecode(body[pos:pos + path_len])
    if not _is_path(path):
        raise JournalError("undo record names no valid path")
    old = body[pos + path_len:]
    steps: list[tuple] = [("pwrite", offset, old)] if old else []
    return {"op": "steps", "path": path, "ino": ino, "steps": steps + [("truncate", old_size)]}


def _ino(path: bytes | None) -> int | None:
    if path is None:
        return None
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


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


def _replay(root: bytes, r: dict[str, Any]) -> str:
    if r["op"] == "rename":
        return _replay_rename(root, r)
    return _replay_steps(root, r)


def _replay_steps(root: bytes, r: dict[str, Any]) -> str:
    shown = _show(r["path"])
    with _Beneath(root, r["path"]) as parent:
        try:
            fd = os.open(parent.name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=parent.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                return f"{shown}: no longer the file of the intent; left alone"
            raise
    try:
        st = os.fstat(fd)
        if st.st_ino != r["ino"] or not stat.S_ISREG(st.st_mode):
            return f"{shown}: no longer the file of the intent; left alone"
        for step in r["steps"]:
            if step[0] == "pwrite":
                os.pwrite(fd, step[2], step[1])
            else:
                os.ftruncate(fd, step[1])
    finally:
        os.close(fd)
    return f"{shown}: finished an interrupted write/truncate"


def _rename_at(src: _Beneath, sname: bytes, dst: _Beneath, dname: bytes,
               flags: int = 0) -> None:
    if _r2._renameat2(src.fd, sname, dst.fd, dname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _replay_rename(root: bytes, r: dict[str, Any]) -> str:
    from .names import sidecar_of
    shown_old, shown_new = _show(r["old"]), _show(r["new"])
    with _Beneath(root, r["old"]) as o, _Beneath(root, r["new"]) as n:
        old, new = o.name, n.name
        old_s, new_s = sidecar_of(old), sidecar_of(new)
        exchange = bool(r["flags"] & RENAME_EXCHANGE)
        data_moved = _ino_at(n.fd, new) == r["old_ino"]
        if not data_moved:
            return f"{shown_old} -> {shown_new}: rename had not happened; nothing to do"
        old_side_here = r["old_side_ino"] is not None and _ino_at(o.fd, old_s) == r["old_side_ino"]
        new_side_here = r["new_side_ino"] is not None and _ino_at(n.fd, new_s) == r["new_side_ino"]
        if exchange:
            # Data swapped; the sidecars must follow: each name gets the other's sidecar.
            if old_side_here and new_side_here:
                _rename_at(o, old_s, n, new_s, RENAME_EXCHANGE)
            elif old_side_here and r["new_side_ino"] is None:
                _rename_at(o, old_s, n, new_s)
            elif new_side_here and r["old_side_ino"] is None:
                _rename_at(n, new_s, o, old_s)
            return f"{shown_old} <-> {shown_new}: finished moving the sidecars"
        if r["old_side_ino"] is not None:
            if old_side_here:
                _rename_at(o, old_s, n, new_s)
        elif new_side_here:
            os.unlink(new_s, dir_fd=n.fd)  # the moved file had no key; the name must not keep the old one's
        return f"{shown_old} -> {shown_new}: finished moving the sidecar"
