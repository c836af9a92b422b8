"""The journal's on-disk records, encoded and decoded. Pure: bytes in, typed records out.

Three kinds of record (docs/CONSISTENCY.md is their specification):
- `StepsIntent`: the `content.PWrite` / `content.Truncate` steps of one change of a data
  file, replayed forward (redo);
- `RenameIntent`: a data file's rename and its sidecar's that must follow;
- `UndoRecord`: the old ciphertext and size of the one pwrite in progress, replayed
  backward (undo), in its own binary layout.

A journal file is untrusted input (anyone who can write the backing dir can write it):
`decode` accepts only the exact shapes `encode_*` produce and raises `JournalError` for
anything else. Steps are the content planner's own types; nothing else interprets them.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Union

from .content import PWrite, Step, Truncate

UNDO_MAGIC = b"ENCFUNDO"
#: inode u64 | offset u64 | old size u64 | path length u32 | old data length u32
UNDO_BODY = struct.Struct(">QQQII")
INTENT_MAGIC = b"ENCFINTN"
#: crc32 of the JSON body u32 | its length u32
INTENT_HEAD = struct.Struct(">II")
RENAME_EXCHANGE = 2
_MAX_OFF = (1 << 63) - 1
_MAX_INO = (1 << 64) - 1


class JournalError(Exception):
    """An intent that cannot be parsed or must not be followed (damaged or planted)."""


@dataclass(frozen=True)
class StepsIntent:
    """Redo: apply ``steps`` to the data file ``path`` if it still is inode ``ino``."""

    path: str
    ino: int
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class RenameIntent:
    """A rename of data file ``old`` to ``new`` (with ``flags``) whose sidecars follow."""

    old: str
    new: str
    flags: int
    old_ino: int | None
    new_ino: int | None
    old_side_ino: int | None
    new_side_ino: int | None


@dataclass(frozen=True)
class UndoRecord:
    """Undo: put ``old`` back at ``offset`` of ``path`` (inode ``ino``) and its size back
    to ``old_size``."""

    path: str
    ino: int
    offset: int
    old: bytes
    old_size: int

    def steps(self) -> tuple[Step, ...]:
        return ((PWrite(self.offset, self.old),) if self.old else ()) + \
            (Truncate(self.old_size),)

    def as_intent(self) -> StepsIntent:
        return StepsIntent(self.path, self.ino, self.steps())


Record = Union[StepsIntent, RenameIntent, UndoRecord]


# --- encoding ------------------------------------------------------------------------------


def _step_json(s: Step) -> list[Any]:
    if isinstance(s, PWrite):
        return ["pwrite", s.offset, bytes(s.data).hex()]
    return ["truncate", s.size]


def intent_json(intent: StepsIntent | RenameIntent) -> bytes:
    """The JSON body of an intent (what an intent file of its own holds)."""
    if isinstance(intent, StepsIntent):
        obj: dict[str, Any] = {"op": "steps", "path": intent.path, "ino": intent.ino,
                               "steps": [_step_json(s) for s in intent.steps]}
    else:
        obj = {"op": "rename", "old": intent.old, "new": intent.new, "flags": intent.flags,
               "old_ino": intent.old_ino, "new_ino": intent.new_ino,
               "old_side_ino": intent.old_side_ino, "new_side_ino": intent.new_side_ino}
    return json.dumps(obj).encode()


def encode_intent_slot(intent: StepsIntent | RenameIntent) -> bytes:
    """An intent framed for the in-place slot: magic | crc32 | length | JSON. Written with
    one pwrite; a kill that cuts it short leaves a crc that shows it torn."""
    body = intent_json(intent)
    return INTENT_MAGIC + INTENT_HEAD.pack(zlib.crc32(body), len(body)) + body


def encode_undo(rec: UndoRecord) -> bytes:
    path = os.fsencode(rec.path)
    body = UNDO_BODY.pack(rec.ino, rec.offset, rec.old_size, len(path), len(rec.old)) \
        + path + rec.old
    return UNDO_MAGIC + struct.pack(">I", zlib.crc32(body)) + body


# --- decoding ------------------------------------------------------------------------------


def _is_int(v: Any, lo: int = 0, hi: int = _MAX_OFF) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_ino(v: Any) -> bool:
    return v is None or _is_int(v, 0, _MAX_INO)


def is_path(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("/") and "\0" not in v and len(v) < 8192


def _decode_step(step: Any) -> Step:
    if (isinstance(step, list) and len(step) == 3 and step[0] == "pwrite"
            and _is_int(step[1]) and isinstance(step[2], str)):
        try:
            data = bytes.fromhex(step[2])
        except ValueError:
            raise JournalError("pwrite data is not hex") from None
        if step[1] + len(data) > _MAX_OFF:
            raise JournalError("pwrite beyond the largest file offset")
        return PWrite(step[1], data)
    if isinstance(step, list) and len(step) == 2 and step[0] == "truncate" and _is_int(step[1]):
        return Truncate(step[1])
    raise JournalError(f"unknown or malformed step {str(step)[:40]!r}")


def decode(data: bytes) -> Record:
    """Parse and validate one journal file (a framed slot, a bare JSON intent, or an undo
    record). Raises JournalError for anything but the exact shapes encoded here."""
    if data.startswith(UNDO_MAGIC):
        return decode_undo(data)
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
        keys = ("old_ino", "new_ino", "old_side_ino", "new_side_ino")
        if not (is_path(r.get("old")) and is_path(r.get("new"))
                and _is_int(r.get("flags"), 0, 0xffffffff)
                and all(k in r and _is_ino(r[k]) for k in keys)):
            raise JournalError("malformed rename intent")
        return RenameIntent(r["old"], r["new"], r["flags"], *(r[k] for k in keys))
    if op == "steps":
        steps = r.get("steps")
        if not (is_path(r.get("path")) and _is_int(r.get("ino"), 0, _MAX_INO)
                and isinstance(steps, list)):
            raise JournalError("malformed steps intent")
        return StepsIntent(r["path"], r["ino"], tuple(_decode_step(s) for s in steps))
    raise JournalError(f"unknown op {str(op)[:40]!r}")


def decode_undo(data: bytes) -> UndoRecord:
    """The binary undo record. It may be followed by whatever a longer earlier record left
    (or the zeros of the mapped file): its own lengths delimit it."""
    head = len(UNDO_MAGIC) + 4
    if len(data) < head + UNDO_BODY.size:
        raise JournalError("undo record truncated")
    (crc,) = struct.unpack_from(">I", data, len(UNDO_MAGIC))
    ino, offset, old_size, path_len, old_len = UNDO_BODY.unpack_from(data, head)
    body = data[head:head + UNDO_BODY.size + path_len + old_len]
    if len(body) != UNDO_BODY.size + path_len + old_len:
        raise JournalError("undo record truncated")
    if zlib.crc32(body) != crc:
        raise JournalError("undo record torn (checksum): the write had not started")
    if offset + old_len > _MAX_OFF or old_size > _MAX_OFF:
        raise JournalError("undo record lengths are inconsistent")
    pos = UNDO_BODY.size
    path = os.fsdecode(body[pos:pos + path_len])
    if not is_path(path):
        raise JournalError("undo record names no valid path")
    return UndoRecord(path, ino, offset, bytes(body[pos + path_len:]), old_size)
