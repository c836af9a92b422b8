"""The ciphertext format of data keys (hex) and of encrypt-data (base64). Pure; no I/O.

Layout (all integers big-endian)::

    0   1  format version (1)
    1   1  kind: 1 = data key (create-/encrypt-datakey), 2 = data (encrypt-data)
    2  36  CMK id, ASCII
    38  4  CMK version
    42 12  random nonce
    54  n  AEAD(CMK version material, plaintext) with its 16-byte tag: AES-256-GCM, or SM4-GCM
           for SM4 CMKs (the key id says which)

The GCM associated data is the 42-byte header followed by the caller's
``additional_authenticated_data`` (UTF-8), so neither the key id, the version, the kind nor
the AAD can be changed without decryption failing. Naming the version lets a rotated key
keep decrypting every older ciphertext.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
KIND_DATAKEY = 1
KIND_DATA = 2
HEADER_LEN = 42
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = HEADER_LEN + NONCE_LEN + TAG_LEN


class BlobError(ValueError):
    """Malformed ciphertext (wrong length, version or kind)."""


class BlobAuthError(ValueError):
    """The ciphertext does not authenticate: wrong AAD, wrong key, or tampering."""


@dataclass(frozen=True)
class Header:
    kind: int
    key_id: str
    key_version: int
    raw: bytes


def _header(kind: int, key_id: str, version: int) -> bytes:
    kid = key_id.encode("ascii")
    if len(kid) != 36:
        raise ValueError("key id must be 36 characters")
    return struct.pack(">BB36sI", FORMAT_VERSION, kind, kid, version)


def _aead(cipher):
    """``cipher``: the AES-256 key itself, or an AEAD object (AESGCM's interface, e.g. SM4-GCM)."""
    return AESGCM(cipher) if isinstance(cipher, bytes) else cipher


def seal(kind: int, key_id: str, version: int, cipher, plaintext: bytes, aad: bytes = b"") -> bytes:
    header = _header(kind, key_id, version)
    nonce = secrets.token_bytes(NONCE_LEN)
    return header + nonce + _aead(cipher).encrypt(nonce, plaintext, header + aad)


def parse(blob: bytes, kind: int) -> Header:
    if len(blob) < OVERHEAD + 1:
        raise BlobError("ciphertext is too short")
    fmt, k, kid, version = struct.unpack(">BB36sI", blob[:HEADER_LEN])
    if fmt != FORMAT_VERSION:
        raise BlobError(f"unknown ciphertext format version {fmt}")
    if k != kind:
        raise BlobError("ciphertext is of another kind (data key vs. data)")
    try:
        key_id = kid.decode("ascii")
    except UnicodeDecodeError:
        raise BlobError("ciphertext names no valid key id") from None
    return Header(kind=k, key_id=key_id, key_version=version, raw=blob[:HEADER_LEN])


def open_(header: Header, blob: bytes, cipher, aad: bytes = b"") -> bytes:
    nonce = blob[HEADER_LEN:HEADER_LEN + NONCE_LEN]
    try:
        return _aead(cipher).decrypt(nonce, blob[HEADER_LEN + NONCE_LEN:], header.raw + aad)
    except InvalidTag:
        raise BlobAuthError("ciphertext does not authenticate") from None
