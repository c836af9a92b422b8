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
from typing import Awaitable, Callable

import trio

from kms.client import AsyncKmsClient, KmsError, KmsUnavailable, is_unknown_operation

from . import format as fmt

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
POOL_SIZE = 32  # DEKs prepared ahead per CMK that new files use
CACHE_MAX = 65536  # cached DEKs (32 bytes each): bounded memory for huge trees

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


#: Huawei's public operation that tells a CMK's rotations; wrapped DEKs are opaque.
ROTATION_STATUS = "get-key-rotation-status"


def key_version(rec: fmt.KeyRecord) -> int | None:
    """The CMK version recorded in the sidecar when the DEK was wrapped; None if unknown."""
    return rec.key_version or None


def version_of(rotation_status: dict) -> int:
    """A CMK's current version from its get-key-rotation-status reply (0: it does not say).

    Huawei numbers no versions; number_of_rotations + 1 is one that only grows, and it is
    the version our own KMS names (its first key material is version 1)."""
    try:
        n = int(rotation_status["number_of_rotations"])
    except (KeyError, TypeError, ValueError):
        return 0
    return n + 1 if n >= 0 else 0


def version_unknowable(e: KmsError) -> bool:
    """The KMS will never tell this caller the CMK's rotations (a grantee, who may not ask,
    or a KMS without the operation): stop asking."""
    return e.error_code == "KMS.0306" or is_unknown_operation(e)


def check_period(ttl: float) -> float:
    """How often CMKs in use are rechecked: well within the grace period (the TTL)."""
    return max(0.25, min(ttl / 4, 10.0))


async def _nothing(_: str) -> None:
    return None


class KeyManager:
    """DEKs for the filesystem, and the state of every CMK it uses.

    Revocation: a task (`watch`) re-asks the KMS to unwrap one DEK of every CMK in use at
    least every `check_period` seconds. When the KMS says the key is disabled, pending
    deletion, deleted or no longer granted to us, the CMK is marked revoked: its cached
    DEKs are dropped and every open, read and write of its files fails with the errno of
    `KEY_ERRNO`. When the KMS unwraps again (key enabled, deletion cancelled, grant given
    back), access comes back without a remount. A KMS that does not answer revokes
    nothing: files already open keep working.
    """

    def __init__(self, kms: AsyncKmsClient, key_id: str, ttl: float = DEFAULT_TTL,
                 pool_size: int = POOL_SIZE):
        self.kms = kms
        #: DEKs prepared ahead per CMK; 0: every new file asks the KMS (tests of that path)
        self.pool_size = pool_size
        self.key_id = key_id
        self.ttl = ttl
        #: file id -> (DEK, expiry on the monotonic clock, CMK id)
        self._cache: dict[bytes, tuple[bytes, float, str]] = {}
        #: CMK id -> errno, for CMKs the KMS refused to use for us at the last check.
        self.revoked: dict[str, int] = {}
        #: CMK id -> a wrapped DEK under it (key record), to test that CMK with.
        self._probes: dict[str, fmt.KeyRecord] = {}
        #: CMK id -> DEKs prepared ahead for new files (plaintext DEKs in memory: at most
        #: POOL_SIZE per CMK, dropped when the CMK is revoked)
        self._pools: dict[str, list[tuple[fmt.KeyRecord, bytes]]] = {}
        self._pool_low = trio.Event()
        #: CMK id -> its version as last reported (`version_of`); CMKs whose version the KMS
        #: will not tell us. New DEKs record the version known *before* they were made, so a
        #: sidecar never claims a version newer than the one that wrapped it.
        self._versions: dict[str, int] = {}
        self._no_version: set[str] = set()

    @property
    def check_period(self) -> float:
        return check_period(self.ttl)

    def check(self, key_id: str) -> None:
        """Raise the revocation errno if the CMK is revoked (cheap: a dict lookup)."""
        err = self.revoked.get(key_id)
        if err is not None:
            raise KeyError_(err, f"key {key_id} is revoked")

    async def new_file_key(self, key_id: str | None = None) -> tuple[fmt.KeyRecord, bytes]:
        """A fresh file id and DEK, wrapped by ``key_id`` (default: the mount's CMK).

        Taken from the pool of DEKs prepared ahead (`fill_pool`) when it has one, so that
        creating a file does not wait for the KMS; the KMS is asked directly otherwise.
        """
        key_id = key_id or self.key_id
        self.check(key_id)
        pool = self._pools.setdefault(key_id, [])
        if len(pool) <= self.pool_size // 2 and self.pool_size:
            self._pool_low.set()
        if pool:
            rec, dek = pool.pop()
        else:
            rec, dek = await self._create(key_id)
        self._remember(rec, dek)
        return rec, dek

    async def _create(self, key_id: str) -> tuple[fmt.KeyRecord, bytes]:
        file_id = os.urandom(fmt.FILE_ID_SIZE)
        version = self._versions.get(key_id)
        if version is None:
            version = await self._learn_version(key_id)
        try:
            dek, cipher_text = await self.kms.create_datakey(key_id, aad=file_aad(file_id))
        except KmsError as e:
            raise self._failure("create a data key", key_id, e) from None
        now = time.time_ns()
        rec = fmt.KeyRecord(file_id=file_id, key_id=key_id,
                            wrapped_dek=bytes.fromhex(cipher_text), created_ns=now,
                            dek_bytes=len(dek), wrapped_ns=now, key_version=version)
        return rec, dek

    async def _learn_version(self, key_id: str) -> int:
        """Ask the KMS for the CMK's current version (0 when it does not say)."""
        if key_id in self._no_version:
            return 0
        try:
            version = version_of(await self.kms.call(ROTATION_STATUS, {"key_id": key_id}))
        except KmsUnavailable:
            return self._versions.get(key_id, 0)
        except KmsError as e:
            if version_unknowable(e):
                self._no_version.add(key_id)
                log.info("the KMS does not tell the version of key %s (%s): new files follow "
                         "its rotations only after `encfs rewrap`", key_id, e.error_code)
            return self._versions.get(key_id, 0)
        if not version:
            self._no_version.add(key_id)
        self._versions[key_id] = version
        return version

    async def fill_pool(self) -> None:
        """Keep up to POOL_SIZE fresh DEKs ready for each CMK that new files use (run in the
        mount's nursery). A CMK that fails is left alone until the next request wakes us."""
        while True:
            await self._pool_low.wait()
            self._pool_low = trio.Event()
            for key_id, pool in list(self._pools.items()):
                while len(pool) < self.pool_size and key_id not in self.revoked:
                    try:
                        item = await self._create(key_id)
                    except KeyError_:
                        break
                    # Revoked while we waited, or rotated: the version was read before
                    # the DEK was made, and a rotation noticed meanwhile (`_follow_rotation`)
                    # makes it stale: discard, as the rotation check discarded its peers.
                    stale = item[0].key_version != self._versions.get(key_id, item[0].key_version)
                    if key_id not in self.revoked and not stale:
                        pool.append(item)

    async def unwrap(self, rec: fmt.KeyRecord, where: str) -> bytes:
        """The plaintext DEK of a file, from the cache or the KMS."""
        self.check(rec.key_id)
        hit = self._cache.get(rec.file_id)
        if hit is not None and hit[1] > time.monotonic() and hit[2] == rec.key_id:
            return hit[0]
        try:
            dek = await self.kms.decrypt_datakey(rec.key_id, rec.cipher_text,
                                                 aad=file_aad(rec.file_id),
                                                 length_bytes=rec.dek_bytes)
        except KmsError as e:
            raise self._failure(f"unwrap the data key of {where}", rec.key_id, e) from None
        self._remember(rec, dek)
        return dek

    def _remember(self, rec: fmt.KeyRecord, dek: bytes) -> None:
        self._probes[rec.key_id] = rec
        if self.ttl > 0:
            self._cache.pop(rec.file_id, None)  # re-insert: the dict stays in expiry order
            self._cache[rec.file_id] = (dek, time.monotonic() + self.ttl, rec.key_id)
            if len(self._cache) > CACHE_MAX:
                del self._cache[next(iter(self._cache))]  # the oldest; no scan

    def expire(self) -> None:
        """Drop expired DEKs: entries are in expiry order, so stop at the first live one."""
        now = time.monotonic()
        while self._cache:
            fid = next(iter(self._cache))
            if self._cache[fid][1] > now:
                return
            del self._cache[fid]

    # --- revocation ---------------------------------------------------------------------

    async def watch(self, open_key_ids: Callable[[], set[str]] = set,
                    on_revoke: Callable[[str], Awaitable[None]] = _nothing) -> None:
        """Recheck every CMK in use, forever (run in the mount's nursery).
        ``open_key_ids()`` gives the CMK ids of open files; ``on_revoke(key_id)`` runs
        when one gets revoked (the filesystem drops the kernel's cached pages of that
        CMK's files)."""
        while True:
            await trio.sleep(self.check_period)
            self.expire()
            await self.recheck(open_key_ids, on_revoke)

    async def recheck(self, open_key_ids: Callable[[], set[str]] = set,
                      on_revoke: Callable[[str], Awaitable[None]] = _nothing) -> None:
        for key_id, pool in list(self._pools.items()):
            if pool and key_id not in self.revoked:
                await self._follow_rotation(key_id, pool)
        in_use = (open_key_ids() | {k for _, _, k in self._cache.values()}
                  | {k for k, pool in self._pools.items() if pool}
                  | set(self.revoked))
        for key_id in in_use:
            probe = self._probes.get(key_id)
            if probe is None:
                continue
            try:
                await self.kms.decrypt_datakey(key_id, probe.cipher_text,
                                               aad=file_aad(probe.file_id),
                                               length_bytes=probe.dek_bytes)
            except KmsUnavailable as e:
                log.warning("cannot recheck key %s: KMS unreachable: %s", key_id, e)
                continue
            except KmsError as e:
                err = KEY_ERRNO.get(e.error_code)
                if err is None:
                    continue  # not about the key's usability (e.g. this probe was damaged)
                newly = key_id not in self.revoked
                self.revoked[key_id] = err
                self._drop_key(key_id)
                if newly:
                    log.error("key %s can no longer be used (%s): its files now fail with "
                              "%s", key_id, e, errno.errorcode.get(err, err))
                    await on_revoke(key_id)
                continue
            if self.revoked.pop(key_id, None) is not None:
                log.warning("key %s is usable again: access to its files is restored", key_id)

    async def _follow_rotation(self, key_id: str, pool: list) -> None:
        """DEKs prepared before a rotation of their CMK are wrapped under its old version.
        The CMK's rotation status, asked once per check, tells the current version; prepared
        DEKs recorded under another are dropped, so new files follow a rotation within one
        check period."""
        if key_id in self._no_version:
            return
        version = await self._learn_version(key_id)
        if not version:
            return
        current = [item for item in pool if item[0].key_version == version]
        if len(current) < len(pool):
            log.info("key %s was rotated: %d data keys prepared under its previous version "
                     "were dropped", key_id, len(pool) - len(current))
            pool[:] = current
            self._pool_low.set()

    def _drop_key(self, key_id: str) -> None:
        for fid in [f for f, (_, _, k) in self._cache.items() if k == key_id]:
            del self._cache[fid]
        self._pools.get(key_id, []).clear()

    def _failure(self, what: str, key_id: str, e: KmsError) -> KeyError_:
        if isinstance(e, KmsUnavailable):
            log.error("cannot %s: KMS unreachable: %s", what, e)
            return KeyError_(errno.EIO, str(e))
        code = KEY_ERRNO.get(e.error_code, errno.EIO)
        log.error("cannot %s: key %s: %s", what, key_id, e)
        return KeyError_(code, str(e))
