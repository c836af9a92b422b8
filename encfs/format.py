"""The on-disk format: data-file header, block layout, size mapping and the sidecar.

Pure code: bytes in, bytes or numbers out, no I/O. docs/FORMAT.md is the specification
this module implements; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass

FORMAT_VERSION = 1

# --- data file -------------------------------------------------------------------------

DATA_MAGIC = b"ENCF"
#: magic(4) | version u16 BE | block_size_log2 u8 | reserved u8 | file_id(16)
HEADER = struct.Struct(">4sHBB16s")
HEADER_SIZE = HEADER.size  # 24
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE
DEFAULT_BLOCK_SIZE = 16384
MIN_BLOCK_SHIFT, MAX_BLOCK_SHIFT = 12, 20  # 4 KiB .. 1 MiB
FILE_ID_SIZE = 16


class FormatError(ValueError):
    """On-disk data that does not follow docs/FORMAT.md."""


@dataclass(frozen=True)
class Header:
    file_id: bytes
    block_size: int = DEFAULT_BLOCK_SIZE
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return HEADER.pack(DATA_MAGIC, self.version, self.block_size.bit_length() - 1, 0,
                           self.file_id)


def encode_header(file_id: bytes, block_size: int = DEFAULT_BLOCK_SIZE) -> bytes:
    check_block_size(block_size)
    if len(file_id) != FILE_ID_SIZE:
        raise FormatError("file id must be 16 bytes")
    return Header(file_id, block_size).encode()


def check_block_size(block_size: int) -> None:
    shift = block_size.bit_length() - 1
    if block_size != 1 << shift or not MIN_BLOCK_SHIFT <= shift <= MAX_BLOCK_SHIFT:
        raise FormatError(f"unsupported block size {block_size}")


def decode_header(data: bytes) -> Header:
    if len(data) < HEADER_SIZE:
        raise FormatError(f"data file header truncated ({len(data)} of {HEADER_SIZE} bytes)")
    magic, version, shift, _reserved, file_id = HEADER.unpack_from(data)
    if magic != DATA_MAGIC:
        raise FormatError("not an encfs data file (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported data file version {version}")
    if not MIN_BLOCK_SHIFT <= shift <= MAX_BLOCK_SHIFT:
        raise FormatError(f"unsupported block size 2**{shift}")
    return Header(file_id=file_id, block_size=1 << shift, version=version)


def cipher_block_size(block_size: int) -> int:
    return block_size + BLOCK_OVERHEAD


def block_offset(block_no: int, block_size: int) -> int:
    """Offset of ciphertext block ``block_no`` in the data file."""
    return HEADER_SIZE + block_no * cipher_block_size(block_size)


def plain_size(cipher_size: int, block_size: int) -> int:
    """Plaintext size of a data file of ``cipher_size`` bytes.

    A file of at most a header holds no data. A trailing fragment too short to hold a
    nonce and tag (1..28 bytes) is a torn block; it counts as one byte, so that reading the
    end of the file fails (EIO) instead of the file silently looking shorter.
    """
    if cipher_size <= HEADER_SIZE:
        return 0
    full, rest = divmod(cipher_size - HEADER_SIZE, cipher_block_size(block_size))
    if 0 < rest <= BLOCK_OVERHEAD:
        return full * block_size + 1
    return full * block_size + max(rest - BLOCK_OVERHEAD, 0)


def torn_tail(cipher_size: int, block_size: int) -> bool:
    """True when the data file ends in a fragment that cannot be a block."""
    if cipher_size <= HEADER_SIZE:
        return 0 < cipher_size < HEADER_SIZE
    rest = (cipher_size - HEADER_SIZE) % cipher_block_size(block_size)
    return 0 < rest <= BLOCK_OVERHEAD


def cipher_size(plain: int, block_size: int) -> int:
    """Size of the data file that holds ``plain`` bytes (0 for an empty file)."""
    if plain == 0:
        return 0
    full, rest = divmod(plain, block_size)
    size = HEADER_SIZE + full * cipher_block_size(block_size)
    return size + (rest + BLOCK_OVERHEAD if rest else 0)


def block_aad(file_id: bytes, block_no: int) -> bytes:
    """AAD of a block: format version, file id, block number. Binds a block to its place."""
    return struct.pack(">H16sQ", FORMAT_VERSION, file_id, block_no)


# --- sidecar ---------------------------------------------------------------------------

SIDECAR_SUFFIX = ".sfskey"
SIDECAR_MAGIC = b"ESFK"
#: 2 since the slots carry the wrap time and the CMK version (bytes 492..503); version 1
#: sidecars (those bytes are padding) stay readable, and are upgraded when rewritten in place.
SIDECAR_VERSION = 2
SIDECAR_VERSIONS = (1, 2)
#: magic(4) | version u16 BE | slot_size u16 BE | reserved(8)
SIDECAR_HEAD = struct.Struct(">4sHH8s")
SIDECAR_VERSION_OFFSET = 4
SLOT_SIZE = 512
SIDECAR_SIZE = SIDECAR_HEAD.size + 2 * SLOT_SIZE  # 1040
#: seq u64 | file_id(16) | created_ns u64 | dek_bytes u16 | key_id_len u8 | wrapped_len u16
SLOT_FIXED = struct.Struct(">Q16sQHBH")
KEY_ID_MAX = 64
#: version 2: wrapped_ns u64 | key_version u32 | reserved u32, just before the CRC
SLOT_TRAILER = struct.Struct(">QII")
TRAILER_OFFSET = SLOT_SIZE - 4 - SLOT_TRAILER.size  # 492
WRAPPED_MAX = TRAILER_OFFSET - SLOT_FIXED.size - KEY_ID_MAX  # 391 (407 in version 1)
WRAPPED_MAX_V1 = SLOT_SIZE - SLOT_FIXED.size - KEY_ID_MAX - 4
#: DEK lengths a slot may name (encfs writes 32); others are a damaged or forged slot.
DEK_BYTES_MIN, DEK_BYTES_MAX = 16, 64
SEQ_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class KeyRecord:
    """What one sidecar slot says: which CMK wrapped this file's DEK, and the wrapped DEK.

    The wrapped DEK is opaque (whatever the KMS returned). What encfs needs to know about it
    is recorded beside it: ``wrapped_ns``, when it was wrapped (create-datakey or
    re-encrypt), and ``key_version``, the CMK's version at that time as the KMS's public
    rotation status told it (number_of_rotations + 1), never more than the true one; 0 when
    not known (a version 1 sidecar, or a KMS that would not say)."""

    file_id: bytes
    key_id: str
    wrapped_dek: bytes
    created_ns: int
    dek_bytes: int = 32
    seq: int = 1
    wrapped_ns: int = 0
    key_version: int = 0

    @property
    def cipher_text(self) -> str:
        """The wrapped DEK as the KMS API spells it (uppercase hex)."""
        return self.wrapped_dek.hex().upper()


def encode_slot(rec: KeyRecord) -> bytes:
    try:
        key_id = rec.key_id.encode("ascii")
    except UnicodeEncodeError:
        raise FormatError("key id must be ASCII") from None
    if not all(0x21 <= c <= 0x7e for c in key_id):
        raise FormatError("key id must be printable ASCII without spaces")
    if not DEK_BYTES_MIN <= rec.dek_bytes <= DEK_BYTES_MAX:
        raise FormatError(f"unsupported DEK length {rec.dek_bytes}")
    if not key_id or len(key_id) > KEY_ID_MAX:
        raise FormatError("key id empty or too long for a sidecar slot")
    if len(rec.wrapped_dek) > WRAPPED_MAX:
        raise FormatError("wrapped DEK too long for a sidecar slot")
    if len(rec.file_id) != FILE_ID_SIZE:
        raise FormatError("file id must be 16 bytes")
    if not rec.wrapped_dek:
        raise FormatError("wrapped DEK is empty")
    try:
        fixed = SLOT_FIXED.pack(rec.seq, rec.file_id, rec.created_ns, rec.dek_bytes,
                                len(key_id), len(rec.wrapped_dek))
        trailer = SLOT_TRAILER.pack(rec.wrapped_ns, rec.key_version, 0)
    except struct.error as e:
        raise FormatError(f"key record field out of range: {e}") from None
    body = (fixed + key_id.ljust(KEY_ID_MAX, b"\0") + rec.wrapped_dek).ljust(TRAILER_OFFSET, b"\0")
    body += trailer
    return body + struct.pack(">I", zlib.crc32(body))


def decode_slot(slot: bytes, version: int = SIDECAR_VERSION) -> KeyRecord | None:
    """The record in one slot of a sidecar of ``version``, or None when the slot is empty or
    torn (bad checksum)."""
    if len(slot) != SLOT_SIZE or not any(slot):
        return None
    (crc,) = struct.unpack_from(">I", slot, SLOT_SIZE - 4)
    if zlib.crc32(slot[:-4]) != crc:
        return None
    seq, file_id, created_ns, dek_bytes, key_len, wrapped_len = SLOT_FIXED.unpack_from(slot)
    wrapped_max, wrapped_ns, key_version = WRAPPED_MAX_V1, 0, 0
    if version >= 2:
        wrapped_max = WRAPPED_MAX
        wrapped_ns, key_version, _ = SLOT_TRAILER.unpack_from(slot, TRAILER_OFFSET)
    if not 0 < key_len <= KEY_ID_MAX or not 0 < wrapped_len <= wrapped_max:
        return None
    if not DEK_BYTES_MIN <= dek_bytes <= DEK_BYTES_MAX:
        return None
    pos = SLOT_FIXED.size
    raw_id = slot[pos:pos + key_len]
    if not all(0x21 <= c <= 0x7e for c in raw_id):  # printable ASCII: it reaches logs
        return None
    key_id = raw_id.decode("ascii")
    pos += KEY_ID_MAX
    return KeyRecord(file_id=file_id, key_id=key_id, wrapped_dek=slot[pos:pos + wrapped_len],
                     created_ns=created_ns, dek_bytes=dek_bytes, seq=seq,
                     wrapped_ns=wrapped_ns, key_version=key_version)


def encode_sidecar(rec: KeyRecord) -> bytes:
    """A new sidecar: the record in slot A, slot B empty."""
    head = SIDECAR_HEAD.pack(SIDECAR_MAGIC, SIDECAR_VERSION, SLOT_SIZE, b"\0" * 8)
    return head + encode_slot(rec) + b"\0" * SLOT_SIZE


def sidecar_version(data: bytes) -> int:
    """The version in a sidecar's head; FormatError for a foreign or unknown one."""
    if len(data) != SIDECAR_SIZE:
        raise FormatError(f"sidecar has {len(data)} bytes, expected {SIDECAR_SIZE}")
    magic, version, slot_size, _ = SIDECAR_HEAD.unpack_from(data)
    if magic != SIDECAR_MAGIC:
        raise FormatError("not an encfs sidecar (bad magic)")
    if version not in SIDECAR_VERSIONS or slot_size != SLOT_SIZE:
        raise FormatError(f"unsupported sidecar version {version}")
    return version


def decode_sidecar(data: bytes) -> KeyRecord:
    """The newest valid record of a sidecar (two slots, so that a torn rewrite keeps the old)."""
    version = sidecar_version(data)
    base = SIDECAR_HEAD.size
    records = [r for r in (decode_slot(data[base:base + SLOT_SIZE], version),
                           decode_slot(data[base + SLOT_SIZE:], version)) if r is not None]
    if not records:
        raise FormatError("sidecar holds no valid key record (both slots damaged)")
    return max(records, key=lambda r: r.seq)


def next_slot_write(data: bytes, rec: KeyRecord) -> tuple[int, bytes, KeyRecord]:
    """Where and what to write to replace a sidecar's record in place.

    The new record gets the next sequence number and goes into the slot that does not hold
    the current record, so a write torn by a crash leaves the current one intact. In-place
    rewrites keep hard-linked sidecars linked. A version 1 sidecar then also needs
    `upgrade_head` (after the slot is durable).
    """
    current = decode_sidecar(data)
    if current.seq >= SEQ_MAX:
        raise FormatError("sidecar record sequence number is exhausted")
    new = dataclasses.replace(rec, seq=current.seq + 1)
    base = SIDECAR_HEAD.size
    slot_a = decode_slot(data[base:base + SLOT_SIZE], sidecar_version(data))
    use_b = slot_a is not None and slot_a.seq == current.seq
    return base + (SLOT_SIZE if use_b else 0), encode_slot(new), new


def upgrade_head(data: bytes) -> tuple[int, bytes] | None:
    """(offset, bytes) that raise a version 1 sidecar's head to the current version, or None.

    Only the two version bytes change (one write that cannot tear). Written after the new
    slot is on disk: until then a version 1 reader ignores the new slot's trailer, which is
    all that differs, and the slot itself is valid in both versions; the old slot, written by
    version 1 with zero padding there, reads as "wrap time and version unknown"."""
    if sidecar_version(data) == SIDECAR_VERSION:
        return None
    return SIDECAR_VERSION_OFFSET, struct.pack(">H", SIDECAR_VERSION)


def is_sidecar_name(name: bytes | str) -> bool:
    suffix = SIDECAR_SUFFIX.encode() if isinstance(name, bytes) else SIDECAR_SUFFIX
    return name.endswith(suffix)


def sidecar_name(name: bytes) -> bytes:
    return name + SIDECAR_SUFFIX.encode()


# --- extended attributes ---------------------------------------------------------------

#: A ``user.*`` value as stored in the backing file's xattr of the same name:
#: version u8 | nonce(12) | AES-256-GCM ciphertext | tag(16), encrypted with the file's DEK.
XATTR_VERSION = 1
XATTR_OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE  # 29
XATTR_AAD_LABEL = b"encfs-xattr"
#: Names under this prefix belong to encfs (control attributes); hidden and refused.
RESERVED_XATTR_PREFIX = b"user.encfs."


def xattr_aad(file_id: bytes, name: bytes) -> bytes:
    """AAD of an encrypted xattr value: label, format version, file id, full name.

    Binding the name stops a value being moved to another attribute; binding the file id
    stops it being moved to another file (every file has its own DEK anyway).
    """
    if len(file_id) != FILE_ID_SIZE:
        raise FormatError("file id must be 16 bytes")
    return XATTR_AAD_LABEL + struct.pack(">H", FORMAT_VERSION) + file_id + name
