"""The name key of a backing dir with encrypted names: chosen at first use, a KMS data
key like any other, its key record in ``.encfs/names.key`` (the sidecar format, docs/
FORMAT.md "Encrypted names"). Disabling its CMK hides the names as it hides contents.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

from kms.client import KmsClient, KmsError

from . import backing as bk
from . import format as fmt
from .keys import file_aad
from .namecrypt import NameCipher

RECORD_NAME = "names.key"


def record_path(backing: bytes) -> bytes:
    return bk.control_path(backing, RECORD_NAME)


def has_content(backing: bytes) -> bool:
    """Whether the backing dir holds anything but its control directory."""
    with os.scandir(backing) as it:
        return any(e.name != bk.CONTROL_DIR for e in it)


def choose(backing: bytes, config: bk.BackingConfig, want: bool) -> bk.BackingConfig:
    """The config after ``--encrypt-names`` (``want``): an empty backing dir takes the mode
    (written to config.json); one with plaintext names and content refuses it; without
    the flag, the config decides. Raises bk.BackingError with the message for the user."""
    if not want or config.encrypt_names:
        return config
    if has_content(backing):
        raise bk.BackingError(
            f"{bk.printable(backing)} already holds files with plaintext names: "
            "--encrypt-names is chosen when a backing dir is first used (mount an empty "
            "one with it and copy the files over)")
    config = dataclasses.replace(config, encrypt_names=True)
    bk.write_file_atomic(backing, bk.control_path(backing, bk.CONFIG_NAME),
                         bk.config_json(config))
    return config


def read_record(backing: bytes) -> fmt.KeyRecord | None:
    """The name key's record; None when there is none yet. fmt.FormatError if damaged."""
    try:
        fd = bk.open_regular(record_path(backing), what=RECORD_NAME)
    except FileNotFoundError:
        return None
    try:
        return fmt.decode_sidecar(os.read(fd, 64 * 1024))
    finally:
        os.close(fd)


def ensure_record(backing: bytes, client: KmsClient, key_id: str) -> fmt.KeyRecord:
    """The name key's record, made from ``key_id`` (the mount's CMK) on first use. A dir
    with content but no record lost its key: refused (bk.BackingError)."""
    try:
        rec = read_record(backing)
    except fmt.FormatError as e:
        raise bk.BackingError(f"{bk.printable(record_path(backing))} is damaged ({e}); "
                              "restore it from a backup: without it no name can be read")
    if rec is not None:
        return rec
    if has_content(backing):
        raise bk.BackingError(f"{bk.printable(record_path(backing))} (the name key) is "
                              "missing; restore it from a backup: without it no name can "
                              "be read")
    file_id = os.urandom(fmt.FILE_ID_SIZE)
    try:
        dek, cipher_text = client.create_datakey(key_id, aad=file_aad(file_id))
    except KmsError as e:
        raise bk.BackingError(f"cannot create the name key under {key_id}: {e}") from None
    rec = fmt.KeyRecord(file_id=file_id, key_id=key_id, wrapped_dek=bytes.fromhex(cipher_text),
                        created_ns=time.time_ns(), dek_bytes=len(dek))
    bk.write_file_atomic(backing, record_path(backing), fmt.encode_sidecar(rec))
    return rec


def write_record(backing: bytes, rec: fmt.KeyRecord) -> None:
    """Replace the record (rewrap), whole or not at all."""
    bk.write_file_atomic(backing, record_path(backing), fmt.encode_sidecar(rec))


def offline_cipher(backing: bytes, client: KmsClient | None) -> NameCipher | None:
    """For the offline tools: the backing dir's name cipher (None with plaintext names),
    unwrapped with the KMS. Raises bk.BackingError when it cannot be had."""
    cfg = bk.read_config(bk.control_path(backing, bk.CONFIG_NAME))
    if not cfg.encrypt_names:
        return None
    if client is None:
        raise bk.BackingError("this backing dir has encrypted names: the KMS is needed to "
                              "read them")
    try:
        rec = read_record(backing)
    except fmt.FormatError as e:
        raise bk.BackingError(f"{bk.printable(record_path(backing))} is damaged ({e})")
    if rec is None:
        raise bk.BackingError(f"{bk.printable(record_path(backing))} (the name key) is "
                              "missing")
    try:
        dek = client.decrypt_datakey(rec.key_id, rec.cipher_text, aad=file_aad(rec.file_id),
                                     length_bytes=rec.dek_bytes)
    except KmsError as e:
        raise bk.BackingError(f"cannot unwrap the name key (CMK {rec.key_id}): {e}") from None
    return NameCipher(dek)


class CipherSource:
    """Name ciphers of backing dirs for a tool, each unwrapped once. ``connect(root)`` gives
    a KMS client for a backing dir; it is asked only for dirs with encrypted names."""

    def __init__(self, connect: Callable[[bytes], KmsClient] | None):
        self.connect = connect
        self._ciphers: dict[bytes, NameCipher | None] = {}

    def __call__(self, root: bytes) -> NameCipher | None:
        root = os.path.abspath(root)
        if root not in self._ciphers:
            cfg = bk.read_config(bk.control_path(root, bk.CONFIG_NAME))
            if not cfg.encrypt_names:
                self._ciphers[root] = None
            elif self.connect is None:
                raise bk.BackingError("this backing dir has encrypted names: the KMS is "
                                      "needed to read them")
            else:
                with self.connect(root) as c:
                    self._ciphers[root] = offline_cipher(root, c)
        return self._ciphers[root]
