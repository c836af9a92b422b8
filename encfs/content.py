"""The content planner: which ciphertext to read and what to write where, as typed steps.

Pure code, no I/O and no keys: given a data file's size, its block size and a request
(read, write or truncate a plaintext range), `plan_read`, `plan_write` and
`plan_truncate` return a plan. The executor (encfs/executor.py) performs it: it reads the
`ReadBlocks`, lets `realize` turn the plan's `EncryptBlocks` into concrete `PWrite`s (with
the cipher it passes in), writes the undo record or the redo intent the plan asks for, and
applies the steps. The journal (encfs/journal_codec.py) stores these same `PWrite` and
`Truncate` types; nothing else interprets steps.

A plan keeps the on-disk invariants of docs/FORMAT.md and docs/CONSISTENCY.md:
- only the last block of a file may be short: before a file grows past a short last
  block, that block is re-encrypted padded with zeros (`pad`), which moves the end of file
  and so needs a redo intent (`journal=True`);
- a write that changes nothing but whole blocks and the end of file is one pwrite of
  consecutive blocks (after the header of a new file), covered by an undo record of the
  ciphertext it overwrites and the old size;
- every backing byte a write will touch is reserved first (`reserve`), so a full disk
  fails the request before anything changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from . import format as fmt

# --- steps the journal stores (absolute: replaying one twice does no harm) ---------------


@dataclass(frozen=True)
class PWrite:
    """Write ``data`` at ``offset`` of the data file."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class Truncate:
    """Set the data file's size to ``size``."""

    size: int


Step = Union[PWrite, Truncate]


# --- what a plan asks of its executor ---------------------------------------------------


@dataclass(frozen=True)
class ReadBlocks:
    """Read the ciphertext of blocks ``first .. first+count-1``: data file bytes
    ``[offset, offset+length)``, already clipped to the end of the file."""

    first: int
    count: int
    offset: int
    length: int


@dataclass(frozen=True)
class Old:
    """Plaintext bytes ``[start, end)`` of old block ``block`` (offsets within the block;
    zeros where the old block is shorter). The block is among the plan's reads."""

    block: int
    start: int
    end: int


@dataclass(frozen=True)
class New:
    """Bytes ``[start, end)`` of the request's data."""

    start: int
    end: int


@dataclass(frozen=True)
class Zeros:
    n: int


Part = Union[Old, New, Zeros]


@dataclass(frozen=True)
class WriteHeader:
    """Write the data file header (the file holds no data yet)."""


@dataclass(frozen=True)
class EncryptBlocks:
    """Encrypt the concatenation of ``parts`` as consecutive blocks from ``first`` and
    write it at that block's offset."""

    first: int
    parts: tuple[Part, ...]


PlannedStep = Union[WriteHeader, EncryptBlocks, Truncate]


@dataclass(frozen=True)
class Undo:
    """Before the plan's one pwrite: record the old ciphertext ``[offset, offset+length)``
    (a prefix of what the plan's last read returned) and the old size ``old_size``."""

    offset: int
    length: int
    old_size: int


@dataclass(frozen=True)
class ContentPlan:
    reserve: tuple[tuple[int, int], ...] = ()
    reads: tuple[ReadBlocks, ...] = ()
    steps: tuple[PlannedStep, ...] = ()
    #: the steps change more than whole blocks: record them as a redo intent first
    journal: bool = False
    #: the steps are one pwrite: record this undo record first
    undo: Undo | None = None


@dataclass(frozen=True)
class ReadPlan:
    """Read ``blocks`` and return plaintext bytes ``[skip, skip+length)`` of them."""

    blocks: ReadBlocks | None
    skip: int = 0
    length: int = 0


# --- planning ----------------------------------------------------------------------------


def _read_blocks(first: int, last: int, bs: int, csize: int) -> ReadBlocks | None:
    off = fmt.block_offset(first, bs)
    end = min(fmt.block_offset(last + 1, bs), csize)
    if end <= off:
        return None
    return ReadBlocks(first, last - first + 1, off, end - off)


def cipher_length(plain_len: int, bs: int) -> int:
    """Bytes of ciphertext that ``plain_len`` bytes of consecutive blocks encrypt to."""
    full, rest = divmod(plain_len, bs)
    return full * fmt.cipher_block_size(bs) + (rest + fmt.BLOCK_OVERHEAD if rest else 0)


def plan_read(csize: int, bs: int, off: int, size: int) -> ReadPlan:
    """A read of ``size`` bytes at ``off`` of a file of ``csize`` ciphertext bytes."""
    plain = fmt.plain_size(csize, bs)
    if off >= plain or size <= 0:
        return ReadPlan(None)
    end = min(off + size, plain)
    first, last = off // bs, (end - 1) // bs
    return ReadPlan(_read_blocks(first, last, bs, csize), off - first * bs, end - off)


def _reserve(bs: int, csize: int, old: int, first: int, last: int,
             plain_end: int) -> tuple[tuple[int, int], ...]:
    """Backing ranges that writing plaintext blocks first..last up to plaintext offset
    ``plain_end`` (plus the header, and the old partial tail block that gets re-padded)
    touches. Not a byte beyond ``plain_end``'s ciphertext: space reserved past the end of
    a file stays allocated."""
    ranges = [(fmt.block_offset(first, bs),
               min(fmt.block_offset(last + 1, bs), fmt.cipher_size(plain_end, bs)))]
    if csize < fmt.HEADER_SIZE:
        ranges.append((0, fmt.HEADER_SIZE))
    if old % bs and old // bs < first:
        ranges.append((fmt.block_offset(old // bs, bs), fmt.block_offset(old // bs + 1, bs)))
    return tuple((s, e) for s, e in ranges if e > s)


def _pad(bs: int, csize: int, old: int, upto_block: int
         ) -> tuple[list[ReadBlocks], list[PlannedStep]]:
    """Re-encrypt a partial last block as a full one before the file grows past it."""
    tail_block, used = divmod(old, bs)
    if used and tail_block < upto_block:
        read = _read_blocks(tail_block, tail_block, bs, csize)
        return ([read] if read else []), [
            EncryptBlocks(tail_block, (Old(tail_block, 0, used), Zeros(bs - used)))]
    return [], []


def _header(csize: int) -> list[PlannedStep]:
    return [WriteHeader()] if csize < fmt.HEADER_SIZE else []


def plan_write(csize: int, bs: int, off: int, n: int) -> ContentPlan:
    """A write of ``n`` > 0 bytes at plaintext offset ``off``."""
    if n <= 0:
        return ContentPlan()
    old = fmt.plain_size(csize, bs)
    end = off + n
    first, last = off // bs, (end - 1) // bs
    start = first * bs
    stop = min((last + 1) * bs, max(old, end))
    reserve = _reserve(bs, csize, old, first, last, stop)
    pad_reads, pad = _pad(bs, csize, old, first)
    # The old ciphertext of the blocks this write rewrites, read once: it gives the
    # plaintext around the write in its first and last blocks, and the undo record.
    main_read = _read_blocks(first, last, bs, csize)
    parts: list[Part] = []
    if off > start:
        parts.append(Old(first, 0, off - start) if start < old else Zeros(off - start))
    parts.append(New(0, n))
    if stop > end:  # only when the write ends inside the old data
        parts.append(Old(last, end - last * bs, stop - last * bs))
    main = EncryptBlocks(first, tuple(parts))
    steps = tuple(_header(csize) + pad + [main])
    reads = tuple(pad_reads + ([main_read] if main_read else []))
    if pad:  # padding the old tail block changes the size: a redo intent finishes it
        return ContentPlan(reserve, reads, steps, journal=True)
    # One pwrite of whole blocks (maybe after the header, whose interruption leaves an
    # empty file, its old state). A kill can still cut it between pages: the undo record
    # restores the old ciphertext and size at the next mount.
    c_off = fmt.block_offset(first, bs)
    undo_len = max(0, min(c_off + cipher_length(stop - start, bs), csize) - c_off)
    return ContentPlan(reserve, reads, steps, undo=Undo(c_off, undo_len, csize))


def plan_truncate(csize: int, bs: int, new: int) -> ContentPlan:
    """Set the plaintext size to ``new``."""
    old = fmt.plain_size(csize, bs)
    if new == old and not fmt.torn_tail(csize, bs):
        return ContentPlan()
    if new == 0:
        return ContentPlan(steps=(Truncate(0),))
    nb, rem = divmod(new, bs)
    reserve = _reserve(bs, csize, old, nb, nb, new) if new > old else ()
    steps: list[PlannedStep] = _header(csize)
    reads: list[ReadBlocks] = []
    parts: tuple[Part, ...] = ()
    if new < old:
        if rem:
            parts = (Old(nb, 0, rem),)
            read = _read_blocks(nb, nb, bs, csize)
            reads += [read] if read else []
        steps.append(Truncate(fmt.block_offset(nb, bs)))
    else:
        pad_reads, pad = _pad(bs, csize, old, nb)
        reads += pad_reads
        steps += pad
        if old // bs == nb and old % bs:
            parts = (Old(nb, 0, old - nb * bs), Zeros(new - old))
            read = _read_blocks(nb, nb, bs, csize)
            reads += [read] if read else []
        else:
            parts = (Zeros(rem),) if rem else ()
            steps.append(Truncate(fmt.block_offset(nb, bs)))  # in between: holes
    if parts:
        steps.append(EncryptBlocks(nb, parts))
    return ContentPlan(reserve, tuple(reads), tuple(steps), journal=True)


# --- from a plan and what was read to concrete steps ---------------------------------------


@dataclass
class Realized:
    """A plan made concrete: the steps to apply, and the old ciphertext of the undo."""

    steps: list[Step] = field(default_factory=list)
    undo_old: bytes = b""


def realize(plan: ContentPlan, bs: int, read_data: list[bytes], data: bytes | memoryview,
            decrypt: Callable[[int, bytes], bytes], encrypt: Callable[[int, bytes], bytes],
            header: Callable[[], bytes]) -> Realized:
    """Turn ``plan`` into concrete steps. ``read_data[i]`` is what reading
    ``plan.reads[i]`` returned; ``data`` the request's bytes; ``decrypt(block_no,
    ciphertext)`` and ``encrypt(first_block, plaintext)`` the file's block cipher (may
    raise for a damaged block); ``header()`` the file's header bytes. Pure."""
    cbs = fmt.cipher_block_size(bs)
    where: dict[int, tuple[int, int]] = {}
    for i, r in enumerate(plan.reads):
        for k in range(r.count):
            where.setdefault(r.first + k, (i, k * cbs))
    plain_cache: dict[int, bytes] = {}

    def old_plain(block: int) -> bytes:
        if block not in plain_cache:
            loc = where.get(block)
            if loc is None:
                plain_cache[block] = b""
            else:
                i, at = loc
                chunk = read_data[i][at:at + cbs]
                plain_cache[block] = decrypt(block, chunk) if chunk else b""
        return plain_cache[block]

    out = Realized()
    for step in plan.steps:
        if isinstance(step, WriteHeader):
            out.steps.append(PWrite(0, header()))
        elif isinstance(step, Truncate):
            out.steps.append(step)
        else:
            pieces = []
            for part in step.parts:
                if isinstance(part, New):
                    whole = part.start == 0 and part.end == len(data)
                    pieces.append(data if whole else memoryview(data)[part.start:part.end])
                elif isinstance(part, Zeros):
                    pieces.append(bytes(part.n))
                else:
                    got = old_plain(part.block)[part.start:part.end]
                    pieces.append(got + bytes(part.end - part.start - len(got)))
            # Large sequential writes are one New part: encrypt straight from the buffer.
            plain = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            out.steps.append(PWrite(fmt.block_offset(step.first, bs),
                                    encrypt(step.first, plain)))
    if plan.undo is not None and plan.undo.length:
        out.undo_old = bytes(read_data[-1][:plan.undo.length])
    return out


def read_result(plan: ReadPlan, bs: int, ciphertext: bytes,
                decrypt: Callable[[int, bytes], bytes]) -> bytes:
    """The plaintext a read plan answers, from the ciphertext its blocks read gave."""
    if plan.blocks is None:
        return b""
    plain = decrypt(plan.blocks.first, ciphertext)
    return plain[plan.skip:plan.skip + plan.length]
