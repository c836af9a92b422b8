"""Imported key material: get-parameters-for-import, import-key-material, delete-imported-key-material.

A key created with origin ``external`` waits in state 5 (pending import). The owner asks for
import parameters: a fresh RSA wrapping key pair (its private half stored wrapped by the root
key) and a random import token, both valid for IMPORT_PARAMS_MS. The material, encrypted with
the wrapping public key (RSAES-OAEP, SHA-256 or SHA-1), is imported with the token; the key is
then enabled. Imported material may carry an expiration time, after which the sweep deletes it
and the key waits for an import again; the same material can be imported again (Huawei: only
the same material), other material is refused.

Asymmetric keys (RSA, EC) are imported by Huawei's two-layer scheme (its user guide, "importing
key material"): ``encrypted_key_material`` is a temporary AES-256 key encrypted with the wrapping
public key, ``encrypted_privatekey`` the PKCS#8 DER private key wrapped under that temporary key
with AES key wrap with padding (RFC 5649, ``openssl enc -id-aes256-wrap-pad``).
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
    spec = self.spec(k)
    token = get_str(body, "import_token", required=True, code="KMS.2601", max_len=6144)
    encrypted = get_b64(body, "encrypted_key_material", code="KMS.2603", min_len=1, max_len=1024)
    wrapped_private = _wrapped_private(spec, body)
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
        unwrapped = material.unwrap_import(p.private_key, p.wrapping_algorithm, encrypted)
    except material.MaterialError:
        raise KmsApiError("KMS.2603", f"encrypted_key_material does not decrypt with the wrapping key "
                                      f"({p.wrapping_algorithm})") from None
    key_material = _imported_material(spec, unwrapped, wrapped_private)
    digest = hashlib.sha256(key_material).digest()
    before = self.store.imported_digest(k.key_id)
    if before is not None and not hmac.compare_digest(before, digest):
        raise KmsApiError("KMS.2606", f"key {k.key_id} had other material before: only the same material "
                                      f"can be imported again")
    self.store.import_material(k.key_id, key_material, expiration_ms, digest)
    material.forget(p.private_key)          # the wrapping key is used up
    return {}


def _wrapped_private(spec: material.Spec, body: dict) -> bytes | None:
    """encrypted_privatekey: required for an asymmetric key (Huawei's scheme: the private key
    wrapped under the temporary key that encrypted_key_material carries), refused for a
    symmetric one, whose material is encrypted_key_material itself."""
    if spec.symmetric:
        if present(body, "encrypted_privatekey"):
            raise KmsApiError("KMS.0308", f"encrypted_privatekey is for asymmetric keys; a {spec.name} key "
                                          f"takes its material in encrypted_key_material alone")
        return None
    if not present(body, "encrypted_privatekey"):
        raise KmsApiError("KMS.0204", f"encrypted_privatekey is required to import a {spec.name} key: the "
                                      f"private key wrapped (AES key wrap with padding) under the temporary "
                                      f"AES-256 key sent in encrypted_key_material")
    # The SDK documents 200-6144 base64 characters; a P-256 key in PKCS#8 without its public
    # half wraps to fewer, so the lower bound is the key wrap's own minimum (docs/KMS.md).
    return get_b64(body, "encrypted_privatekey", code="KMS.2603", min_len=16, max_len=4608)


def _imported_material(spec: material.Spec, unwrapped: bytes, wrapped_private: bytes | None) -> bytes:
    """What the store keeps for an import: the raw symmetric key, or the private key in PKCS#8 DER.
    Material (or a temporary key) of the wrong size or kind is KMS.2604; a private key that does
    not unwrap under the temporary key is KMS.2603, like material that does not decrypt."""
    try:
        if wrapped_private is None:
            material.check_imported(spec, unwrapped)
            return unwrapped
        if len(unwrapped) != material.TEMPORARY_KEY_BYTES:
            raise KmsApiError("KMS.2604", f"encrypted_key_material of a {spec.name} key must carry the "
                                          f"temporary AES-256 key ({material.TEMPORARY_KEY_BYTES} bytes), "
                                          f"not {len(unwrapped)} bytes")
        try:
            der = material.unwrap_private_import(unwrapped, wrapped_private)
        except material.MaterialError as e:
            raise KmsApiError("KMS.2603", str(e)) from None
        return material.check_imported_private(spec, der)
    except material.MaterialError as e:
        raise KmsApiError("KMS.2604", str(e)) from None


@route("POST", "delete-imported-key-material", fields=("key_id",))
def _delete_material(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _external(self, ctx, body)
    old = self.store.material(k.key_id, k.current_version)
    if old is None:
        raise KmsApiError("KMS.2701", f"key {k.key_id} has no imported material")
    self.store.delete_material(k.key_id)
    material.forget(old)                     # no parsed private key object outlives its material
    return {}
