"""``kms serve --strict-huawei``: this daemon as a client sees Huawei Cloud KMS. Pure; no I/O.

A test fixture for clients (encfs first) that must work against Huawei's service itself:

* every ``x-encfs-*`` extension is answered exactly as an unknown path is (``KMS.0201``), so a
  client that depends on one fails here as it would there;
* data-key ciphertexts are presented in a foreign layout, so a client that reads our own
  blob layout (kms.blob) instead of treating ciphertexts as opaque fails here too. The
  envelope loosely follows the one observed from Huawei (reference §4)::

      02 00 | total length u16 LE | our blob, every byte XOR 0x5A | CMK id (36 ASCII) | 00 00 00 00

Requests carrying such a ciphertext (decrypt-datakey, re-encrypt) are unwrapped before the
operation runs, replies carrying one (create-datakey[-without-plaintext], encrypt-datakey,
re-encrypt) wrapped after.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from typing import Callable

from .api import Caller, KmsApiError, Result

EXTENSION_PREFIX = "x-encfs-"
_MASK = 0x5A
_PREFIX = b"\x02\x00"
_KEY_ID_LEN = 36
_TAIL = b"\0\0\0\0"
_OVERHEAD = len(_PREFIX) + 2 + _KEY_ID_LEN + len(_TAIL)
_HEX = re.compile(r"^[0-9A-Fa-f]*\Z")
#: operations whose request body names a data-key ciphertext, and those whose reply does
UNWRAP_REQUEST = frozenset({"decrypt-datakey", "re-encrypt"})
WRAP_REPLY = frozenset({"create-datakey", "create-datakey-without-plaintext", "encrypt-datakey",
                        "re-encrypt"})

Handler = Callable[[Caller, str, str, dict, bytes], Result]


def wrap(cipher_text: str) -> str:
    """Our daemon's data-key ciphertext (hex) in the foreign envelope (hex)."""
    raw = bytes.fromhex(cipher_text)
    key_id = raw[2:2 + _KEY_ID_LEN]  # kms.blob: version, kind, then the CMK id
    body = bytes(b ^ _MASK for b in raw)
    total = _OVERHEAD + len(body)
    return (_PREFIX + struct.pack("<H", total) + body + key_id + _TAIL).hex().upper()


def unwrap(cipher_text: str) -> str:
    """The inverse of `wrap`; KmsApiError KMS.2201 (as for any bad ciphertext) otherwise."""
    if not isinstance(cipher_text, str) or not _HEX.match(cipher_text) or len(cipher_text) % 2:
        raise KmsApiError("KMS.2201", "cipher_text is not hexadecimal")
    raw = bytes.fromhex(cipher_text)
    if (len(raw) <= _OVERHEAD or raw[:2] != _PREFIX or struct.unpack("<H", raw[2:4])[0] != len(raw)
            or raw[-len(_TAIL):] != _TAIL):
        raise KmsApiError("KMS.2201", "cipher_text is invalid")
    body = raw[4:-(_KEY_ID_LEN + len(_TAIL))]
    return bytes(b ^ _MASK for b in body).hex().upper()


class StrictHuawei:
    """Wraps `Kms.handle` (same signature): refuses extensions, translates ciphertexts."""

    def __init__(self, handle: Handler) -> None:
        self._handle = handle

    def __call__(self, caller: Caller, method: str, op: str, query: dict, body: bytes) -> Result:
        try:
            if op.startswith(EXTENSION_PREFIX):
                # Word for word what kms.api answers for a path it does not know.
                raise KmsApiError("KMS.0201", f"unknown operation {op!r}")
            if op in UNWRAP_REQUEST:
                body = self._unwrap_request(body)
        except KmsApiError as e:
            return Result(e.status, e.body(), error_code=e.code)
        result = self._handle(caller, method, op, query, body)
        if op in WRAP_REPLY and result.status == 200 and isinstance(result.body, dict) \
                and isinstance(result.body.get("cipher_text"), str):
            result = dataclasses.replace(result, body={**result.body,
                                                       "cipher_text": wrap(result.body["cipher_text"])})
        return result

    @staticmethod
    def _unwrap_request(body: bytes) -> bytes:
        try:
            data = json.loads(body) if body.strip() else None
        except ValueError:
            return body     # the operation itself answers KMS.0202
        if not isinstance(data, dict) or not isinstance(data.get("cipher_text"), str):
            return body     # the operation itself answers the missing or mistyped field
        data["cipher_text"] = unwrap(data["cipher_text"])
        return json.dumps(data).encode()
