"""Data keys at run time: new DEKs from the KMS, unwrapping, and the plaintext-DEK cache.

The plaintext DEK lives in memory only while a file needs it: the filesystem holds it for
open files, and this cache keeps it for ``ttl`` seconds after, so that reopening a file
does not cost a KMS round trip but a disabled CMK stops access within that grace period.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from kms.client import AsyncKmsClient, KmsError, KmsUnavailable

from . import format as fmt

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0

#: KMS error codes that mean "the key is the problem", and the errno a user sees for them.
KEY_ERRNO = {
    "KMS.0209": errno.EKEYREVOKED,  # key disabled
    "KMS.0210": errno.EKEYREVOKED,  # key pending deletion
    "KMS.0207": errno.ENOKEY,  # key does not exist (deleted)
    "KMS.0306": errno.EACCES,  # no permission on the key (no grant)
}


class KeyError_(OSError):
    """A key operation failed; ``errno`` is what the FUSE request returns."""


def file_aad(file_id: bytes) -> str:
    """The additional_authenticated_data that binds a wrapped DEK to its file."""
    return file_id.hex()


class KeyManager:
    def __init__(self, kms: AsyncKmsClient, key_id: str, ttl: float = DEFAULT_TTL):
        self.kms = kms
        self.key_id = key_id
        self.ttl = ttl
        self._cache: dict[bytes, tuple[bytes, float]] = {}

    async def new_file_key(self, key_id: str | None = None) -> tuple[fmt.KeyRecord, bytes]:
        """A fresh file id and DEK, wrapped by the CMK for new files."""
        key_id = key_id or self.key_id
        file_id = os.urandom(fmt.FILE_ID_SIZE)
        try:
            dek, cipher_text = await self.kms.create_datakey(key_id, aad=file_aad(file_id))
        except KmsError as e:
            raise self._failure("create a data key", key_id, e) from None
        rec = fmt.KeyRecord(file_id=file_id, key_id=key_id,
                            wrapped_dek=bytes.fromhex(cipher_text),
                            created_ns=time.time_ns(), dek_bytes=len(dek))
        self._remember(file_id, dek)
        return rec, dek

    async def unwrap(self, rec: fmt.KeyRecord, where: str) -> bytes:
        """The plaintext DEK of a file, from the cache or the KMS."""
        hit = self._cache.get(rec.file_id)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            dek = await self.kms.decrypt_datakey(rec.key_id, rec.cipher_text,
                                                 aad=file_aad(rec.file_id),
                                                 length_bytes=rec.dek_bytes)
        except KmsError as e:
            raise self._failure(f"unwrap the data key of {where}", rec.key_id, e) from None
        self._remember(rec.file_id, dek)
        return dek

    def _remember(self, file_id: bytes, dek: bytes) -> None:
        if self.ttl > 0:
            self._cache[file_id] = (dek, time.monotonic() + self.ttl)
        if len(self._cache) > 4096:
            self.expire()

    def expire(self) -> None:
        now = time.monotonic()
        for fid in [f for f, (_, t) in self._cache.items() if t <= now]:
            del self._cache[fid]

    def forget(self, file_id: bytes) -> None:
        self._cache.pop(file_id, None)

    def _failure(self, what: str, key_id: str, e: KmsError) -> KeyError_:
        if isinstance(e, KmsUnavailable):
            log.error("cannot %s: KMS unreachable: %s", what, e)
            return KeyError_(errno.EIO, str(e))
        code = KEY_ERRNO.get(e.error_code, errno.EIO)
        log.error("cannot %s: key %s: %s", what, key_id, e)
        return KeyError_(code, str(e))
