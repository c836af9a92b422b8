"""AES-256-GCM content encryption of whole blocks. Pure: no I/O, no FUSE.

A block on disk is ``nonce(12) | ciphertext | tag(16)`` with AAD from `format.block_aad`.
Nonces are random per block write: every file has its own DEK, so the 2**32 random-nonce
budget of GCM applies per file (docs/SECURITY.md).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .format import BLOCK_OVERHEAD, NONCE_SIZE, block_aad, cipher_block_size


class BlockAuthError(Exception):
    """A block failed authentication: tampered, torn, moved, or from another file."""

    def __init__(self, block_no: int, reason: str = "authentication failed"):
        super().__init__(f"block {block_no}: {reason}")
        self.block_no = block_no
        self.reason = reason


class BlockCipher:
    """Encrypts and decrypts the blocks of one file (one DEK, one file id)."""

    def __init__(self, dek: bytes, file_id: bytes, block_size: int):
        self._aead = AESGCM(dek)
        self.file_id = file_id
        self.block_size = block_size
        self._cbs = cipher_block_size(block_size)
        self._zero_block = bytes(self._cbs)

    def encrypt(self, first_block: int, plain: bytes | memoryview) -> bytes:
        """Encrypt consecutive blocks starting at ``first_block``; only the last may be short."""
        bs = self.block_size
        n = -(-len(plain) // bs)
        nonces = os.urandom(NONCE_SIZE * n)  # one syscall per request, not per block
        out = []
        enc = self._aead.encrypt
        fid = self.file_id
        view = memoryview(plain)
        for i in range(n):
            nonce = nonces[i * NONCE_SIZE:(i + 1) * NONCE_SIZE]
            out.append(nonce)
            out.append(enc(nonce, view[i * bs:(i + 1) * bs], block_aad(fid, first_block + i)))
        return b"".join(out)

    def decrypt(self, first_block: int, data: bytes | memoryview) -> bytes:
        """Decrypt consecutive ciphertext blocks. A full all-zero block is a hole (zeros)."""
        cbs = self._cbs
        view = memoryview(data)
        out = []
        dec = self._aead.decrypt
        fid = self.file_id
        for i in range(0, len(view), cbs):
            block_no = first_block + i // cbs
            chunk = view[i:i + cbs]
            if len(chunk) <= BLOCK_OVERHEAD:
                raise BlockAuthError(block_no, "torn block (shorter than its nonce and tag)")
            if len(chunk) == cbs and chunk == self._zero_block:
                out.append(bytes(self.block_size))
                continue
            nonce = bytes(chunk[:NONCE_SIZE])
            if not any(nonce):
                raise BlockAuthError(block_no, "all-zero nonce")
            try:
                out.append(dec(nonce, chunk[NONCE_SIZE:], block_aad(fid, block_no)))
            except InvalidTag:
                raise BlockAuthError(block_no) from None
        return b"".join(out)
