"""Reading backing files without a mount: shared by fsck, inspect and decrypt."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from kms.client import KmsClient

from . import backing as bk
from . import format as fmt
from .cipher import BlockAuthError, BlockCipher
from .keys import file_aad

CHUNK_BLOCKS = 64  # blocks decrypted per read when streaming a whole file


@dataclass
class Pair:
    """A data file and what its sidecar says; either may be missing or damaged."""

    data_path: bytes
    size: int
    header: fmt.Header | None
    record: fmt.KeyRecord | None


def read_data_header(data_path: bytes) -> tuple[int, fmt.Header | None]:
    """Size and header of a data file (None when it holds no data).

    Raises fmt.FormatError for a damaged header or a path that is not a regular file
    (never followed), OSError for I/O errors.
    """
    fd = bk.open_regular(data_path, what="data file")
    try:
        st = os.fstat(fd)
        if 0 < st.st_size < fmt.HEADER_SIZE:
            raise fmt.FormatError("data file is shorter than its header")
        return st.st_size, bk.read_header(fd) if st.st_size else None
    finally:
        os.close(fd)


def read_record(data_path: bytes) -> fmt.KeyRecord | None:
    """The key record of a data file, None without a sidecar; fmt.FormatError when the
    sidecar is damaged or not a regular file (never followed)."""
    try:
        return bk.read_sidecar(data_path)
    except FileNotFoundError:
        return None


def read_pair(data_path: bytes) -> Pair:
    """Header and sidecar record of a data file (fmt.FormatError if either is damaged)."""
    size, header = read_data_header(data_path)
    return Pair(data_path, size, header, read_record(data_path))


def unwrap(client: KmsClient, record: fmt.KeyRecord) -> bytes:
    return client.decrypt_datakey(record.key_id, record.cipher_text,
                                  aad=file_aad(record.file_id), length_bytes=record.dek_bytes)


def _open_data(pair: Pair):
    """The data file of a pair for streaming: never through a symlink, never a FIFO."""
    return os.fdopen(bk.open_regular(pair.data_path, what="data file"), "rb")


def plaintext_chunks(pair: Pair, dek: bytes) -> Iterator[bytes]:
    """The plaintext of a data file, in chunks; raises BlockAuthError at a bad block."""
    if pair.header is None:
        return
    bs = pair.header.block_size
    cipher = BlockCipher(dek, pair.header.file_id, bs)
    cbs = fmt.cipher_block_size(bs)
    with _open_data(pair) as f:
        f.seek(fmt.HEADER_SIZE)
        block = 0
        while True:
            data = f.read(cbs * CHUNK_BLOCKS)
            if not data:
                return
            yield cipher.decrypt(block, data)
            block += CHUNK_BLOCKS


def bad_blocks(pair: Pair, dek: bytes) -> list[tuple[int, str]]:
    """Every block of a data file that fails authentication, as (block number, reason)."""
    if pair.header is None:
        return []
    bs = pair.header.block_size
    cipher = BlockCipher(dek, pair.header.file_id, bs)
    cbs = fmt.cipher_block_size(bs)
    bad = []
    with _open_data(pair) as f:
        f.seek(fmt.HEADER_SIZE)
        block = 0
        while True:
            data = f.read(cbs)
            if not data:
                return bad
            try:
                cipher.decrypt(block, data)
            except BlockAuthError as e:
                bad.append((block, e.reason))
            block += 1
