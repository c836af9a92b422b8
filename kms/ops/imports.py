"""Imported key material: get-parameters-for-import, import-key-material, delete-imported-key-material.

A key created with origin ``external`` waits in state 5 (pending import). The owner asks for
import parameters: a fresh RSA wrapping key pair (its private half stored wrapped by the root
key) and a random import token, both valid for IMPORT_PARAMS_MS. The material, encrypted with
the wrapping public key (RSAES-OAEP, SHA-256 or SHA-1), is imported with the token; the key is
then enabled. Imported material may carry an expiration time, after which the sweep deletes it
and the key waits for an import again; the same material can be imported again (Huawei: only
the same material), other material is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from .. import material
from ..core import Ctx, Kms, route
from ..errors import KmsApiError
from ..store import STATE_PENDING_IMPORT, ImportParams, KeyRecord
from ..validate import get_b64, get_enum, get_num, get_str, present

IMPORT_PARAMS_MS = 24 * 3600 * 1000       # Huawei: import parameters are valid for 24 hours
TOKEN_BYTES = 192                          # 256 base64 characters: inside Huawei's 200-6144
MAX_EXPIRATION_S = 10**11                  # seconds since the epoch; refuses absurd values


def _external(self: Kms, ctx: Ctx, body: dict) -> KeyRecord:
    k = self._key(ctx, body, None, owner_only=True)
    if k.origin != "external":
        raise KmsApiError("KMS.0309", f"key {k.key_id} has origin {k.origin}: only keys created with "
                                      f"origin external take imported material")
    return k


def _pending_import(k: KeyRecord) -> None:
    if k.state != STATE_PENDING_IMPORT:
        raise KmsApiError("KMS.0310", f"key {k.key_id} is not pending import (state {k.state})")


@route("POST", "get-parameters-for-import", fields=("key_id", "wrapping_algorithm"))
def _parameters(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _external(self, ctx, body)
    alg = get_str(body, "wrapping_algorithm", required=True)
    if alg == "SM2_ENCRYPT":
        raise KmsApiError("KMS.0308", "wrapping_algorithm SM2_ENCRYPT is not supported (no SM2 here)")
    get_enum(body, "wrapping_algorithm", material.WRAPPING_ALGORITHMS)
    _pending_import(k)
    private = material.new_wrapping_key()
    p = ImportParams(k.key_id, alg, private, base64.b64encode(secrets.token_bytes(TOKEN_BYTES)).decode(),
                     self.now + IMPORT_PARAMS_MS)
    self.store.put_import_params(p)
    return {"key_id": k.key_id, "import_token": p.token, "expiration_time": p.expiry_ms // 1000,
            "public_key": base64.b64encode(material.public_key_der(private)).decode()}


@route("POST", "import-key-material", fields=("key_id", "import_token", "encrypted_key_material",
                                             "encrypted_privatekey", "expiration_time"))
def _import(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _external(self, ctx, body)
    token = get_str(body, "import_token", required=True, code="KMS.2601", max_len=6144)
    encrypted = get_b64(body, "encrypted_key_material", code="KMS.2603", min_len=1, max_len=1024)
    if present(body, "encrypted_privatekey"):
        raise KmsApiError("KMS.0308", "encrypted_privatekey: importing asymmetric keys is not supported here")
    expiration = get_num(body, "expiration_time", code="KMS.2605")
    expiration_ms = None
    if expiration is not None:
        if not self.now // 1000 < expiration <= MAX_EXPIRATION_S:
            raise KmsApiError("KMS.2605", "expiration_time must be in the future (seconds since the epoch)")
        expiration_ms = expiration * 1000
    _pending_import(k)
    p = self.store.import_params(k.key_id)
    if p is None or not hmac.compare_digest(p.token.encode(), token.encode()):
        raise KmsApiError("KMS.2601", "import_token was not issued for this key (get-parameters-for-import)")
    if p.expiry_ms <= self.now:
        raise KmsApiError("KMS.2602", "the import token expired; call get-parameters-for-import again")
    try:
        key_material = material.unwrap_import(p.private_key, p.wrapping_algorithm, encrypted)
    except material.MaterialError:
        raise KmsApiError("KMS.2603", f"encrypted_key_material does not decrypt with the wrapping key "
                                      f"({p.wrapping_algorithm})") from None
    spec = self.spec(k)
    try:
        material.check_imported(spec, key_material)
    except material.MaterialError as e:
        raise KmsApiError("KMS.2604", str(e)) from None
    digest = hashlib.sha256(key_material).digest()
    before = self.store.imported_digest(k.key_id)
    if before is not None and not hmac.compare_digest(before, digest):
        raise KmsApiError("KMS.2606", f"key {k.key_id} had other material before: only the same material "
                                      f"can be imported again")
    self.store.import_material(k.key_id, key_material, expiration_ms, digest)
    material.forget(p.private_key)          # the wrapping key is used up
    return {}


@route("POST", "delete-imported-key-material", fields=("key_id",))
def _delete_material(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _external(self, ctx, body)
    if self.store.material(k.key_id, k.current_version) is None:
        raise KmsApiError("KMS.2701", f"key {k.key_id} has no imported material")
    self.store.delete_material(k.key_id)
    return {}
