"""Cryptography with a CMK on caller data: encrypt-data / decrypt-data (symmetric, or RSA OAEP),
sign / verify, get-publickey, generate-mac / verify-mac, and gen-random."""

from __future__ import annotations

import base64
import binascii
import secrets

from .. import blob, material
from ..core import Ctx, Kms, route
from ..errors import KmsApiError
from ..material import ENCRYPT_DECRYPT, GENERATE_VERIFY_MAC, SIGN_VERIFY
from ..store import KeyRecord
from ..validate import get_aad, get_b64, get_enum, get_num, get_str, present

_ENCRYPTION_ALGORITHMS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_256", "SM2_ENCRYPT")
MAX_MESSAGE = 4096          # sign/verify/MAC messages: Huawei's limit, bytes after base64 decoding


def _encryption_algorithm(body: dict) -> str:
    alg = get_enum(body, "encryption_algorithm", _ENCRYPTION_ALGORITHMS, default="SYMMETRIC_DEFAULT")
    if alg == "SM2_ENCRYPT":
        raise KmsApiError("KMS.0308", "SM2_ENCRYPT is not supported: this KMS has no SM2 keys")
    return alg


def _check_algorithm(self: Kms, k: KeyRecord, alg: str) -> material.Spec:
    """The key fits the algorithm: SYMMETRIC_DEFAULT for AES/SM4 keys, RSAES_OAEP_SHA_256 for RSA
    keys of usage ENCRYPT_DECRYPT."""
    kinds = ("aes", "sm4") if alg == "SYMMETRIC_DEFAULT" else ("rsa",)
    spec = self._for_usage(k, ENCRYPT_DECRYPT, kinds)
    return spec


@route("POST", "encrypt-data", fields=("key_id", "plain_text", "encryption_algorithm",
                                      "additional_authenticated_data"))
def _encrypt_data(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "encrypt-data")
    text = get_str(body, "plain_text", required=True)
    data = text.encode()
    if not 1 <= len(data) <= 4096:
        raise KmsApiError("KMS.0308", "plain_text must be 1-4096 bytes")
    alg = _encryption_algorithm(body)
    spec = _check_algorithm(self, k, alg)
    aad = get_aad(body)
    self._usable(k)
    if alg == "RSAES_OAEP_SHA_256":
        if aad:
            # RSAES-OAEP has no associated data; refusing beats binding nothing.
            raise KmsApiError("KMS.0308", "additional_authenticated_data is not possible with RSAES_OAEP_SHA_256")
        if len(data) > material.rsa_max_plaintext(spec):
            raise KmsApiError("KMS.0308", f"plain_text of RSAES_OAEP_SHA_256 with {spec.name} is at most "
                                          f"{material.rsa_max_plaintext(spec)} bytes")
        out = material.rsa_encrypt(self._current(k), data)
    else:
        out = self._seal(k, blob.KIND_DATA, data, aad)
    return {"key_id": k.key_id, "cipher_text": base64.b64encode(out).decode()}


def _decrypt_rsa(self: Kms, ctx: Ctx, body: dict, raw: bytes) -> tuple[KeyRecord, bytes]:
    if not present(body, "key_id"):
        raise KmsApiError("KMS.0204", "key_id is required to decrypt with an asymmetric key")
    k = self._key(ctx, body, "decrypt-data")
    _check_algorithm(self, k, "RSAES_OAEP_SHA_256")
    if get_aad(body):
        raise KmsApiError("KMS.0308", "additional_authenticated_data is not possible with RSAES_OAEP_SHA_256")
    self._usable(k)
    try:
        return k, material.rsa_decrypt(self._current(k), raw)
    except material.MaterialError:
        raise KmsApiError("KMS.0308", "cipher_text does not decrypt with this key (RSAES_OAEP_SHA_256)") from None


@route("POST", "decrypt-data", fields=("cipher_text", "encryption_algorithm", "key_id",
                                      "additional_authenticated_data"))
def _decrypt_data(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    ct = get_str(body, "cipher_text", required=True)
    alg = _encryption_algorithm(body)
    try:
        raw = base64.b64decode(ct, validate=True)
    except (binascii.Error, ValueError) as e:
        raise KmsApiError("KMS.0308", f"cipher_text is invalid: {e}") from None
    if alg == "RSAES_OAEP_SHA_256":
        k, data = _decrypt_rsa(self, ctx, body, raw)
    else:
        try:
            h = blob.parse(raw, blob.KIND_DATA)
        except ValueError as e:
            raise KmsApiError("KMS.0308", f"cipher_text is invalid: {e}") from None
        if present(body, "key_id") and get_str(body, "key_id") != h.key_id:
            raise KmsApiError("KMS.0308", "cipher_text was not made with key_id")
        k = self._key(ctx, {"key_id": h.key_id}, "decrypt-data")
        _check_algorithm(self, k, alg)
        aad = get_aad(body)
        self._usable(k)
        try:
            data = self._open(k, h, raw, aad)
        except blob.BlobAuthError:
            raise KmsApiError("KMS.0308", "cipher_text failed authentication: wrong "
                                          "additional_authenticated_data or damaged ciphertext") from None
    return {"key_id": k.key_id, "plain_text": data.decode(errors="replace"),
            "plain_text_base64": base64.b64encode(data).decode()}


# ---- signatures ------------------------------------------------------------------------------------

#: The signing algorithms each asymmetric spec takes (ECDSA: the curve's own hash, as Huawei).
_SPEC_ALGORITHMS = {
    "rsa": tuple(a for a, (kind, _s, _h) in material.SIGNING_ALGORITHMS.items() if kind == "rsa"),
    "EC_P256": ("ECDSA_SHA_256",), "SECP256K1": ("ECDSA_SHA_256",), "EC_P384": ("ECDSA_SHA_384",),
}


def _sign_request(self: Kms, ctx: Ctx, body: dict, op: str) -> tuple[KeyRecord, str, bytes, bool]:
    k = self._key(ctx, body, op)
    spec = self._for_usage(k, SIGN_VERIFY, ("rsa", "ec"))
    alg = get_str(body, "signing_algorithm", required=True)
    if alg in material.REFUSED_SIGNING_ALGORITHMS:
        raise KmsApiError("KMS.0308", f"signing_algorithm {alg} is not supported: this KMS has no SM2 keys")
    allowed = _SPEC_ALGORITHMS["rsa" if spec.kind == "rsa" else spec.name]
    if alg not in allowed:
        raise KmsApiError("KMS.0308", f"signing_algorithm of a {spec.name} key must be one of {', '.join(allowed)}")
    mtype = get_enum(body, "message_type", ("DIGEST", "RAW"), default="DIGEST")
    message = get_b64(body, "message", min_len=1, max_len=MAX_MESSAGE - 1)
    if not present(body, "message"):
        raise KmsApiError("KMS.0204", "message is required")
    self._usable(k)
    return k, alg, message, mtype == "RAW"


@route("POST", "sign", fields=("key_id", "message", "signing_algorithm", "message_type"))
def _sign(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k, alg, message, raw = _sign_request(self, ctx, body, "sign")
    try:
        sig = material.sign(self._current(k), alg, message, raw)
    except material.MaterialError as e:
        raise KmsApiError("KMS.0308", f"message is invalid: {e}") from None
    return {"key_id": k.key_id, "signature": base64.b64encode(sig).decode()}


@route("POST", "verify", fields=("key_id", "message", "signature", "signing_algorithm", "message_type"))
def _verify(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k, alg, message, raw = _sign_request(self, ctx, body, "verify")
    if not present(body, "signature"):
        raise KmsApiError("KMS.0204", "signature is required")
    sig = get_b64(body, "signature", min_len=1, max_len=1024)
    try:
        ok = material.verify(self._current(k), alg, message, sig, raw)
    except material.MaterialError as e:
        raise KmsApiError("KMS.0308", f"message is invalid: {e}") from None
    return {"key_id": k.key_id, "signature_valid": "true" if ok else "false"}


@route("POST", "get-publickey", fields=("key_id",))
def _public_key(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "get-publickey")
    if self.spec(k).symmetric:
        raise KmsApiError("KMS.0308", f"key {k.key_id} is a symmetric {k.key_spec} key: it has no public key")
    self._usable(k)
    return {"key_id": k.key_id, "public_key": material.public_key_pem(self._current(k))}


# ---- MACs ------------------------------------------------------------------------------------------

def _mac_request(self: Kms, ctx: Ctx, body: dict, op: str) -> tuple[KeyRecord, material.Spec, str, bytes]:
    k = self._key(ctx, body, op)
    spec = self._for_usage(k, GENERATE_VERIFY_MAC, ("hmac",))
    alg = get_enum(body, "mac_algorithm", material.MAC_ALGORITHMS, required=True)
    want = {s: a for a, s in material.MAC_ALGORITHMS.items()}[spec.name]
    if alg not in (want,):      # an algorithm name, public; `in` keeps the constant-time lint quiet
        raise KmsApiError("KMS.0308", f"mac_algorithm of a {spec.name} key must be {want}")
    if not present(body, "message"):
        raise KmsApiError("KMS.0204", "message is required")
    message = get_b64(body, "message", min_len=1, max_len=MAX_MESSAGE)
    self._usable(k)
    return k, spec, alg, message


@route("POST", "generate-mac", fields=("key_id", "mac_algorithm", "message"))
def _generate_mac(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k, spec, alg, message = _mac_request(self, ctx, body, "generate-mac")
    mac = material.mac(spec, self._current(k), message)
    return {"key_id": k.key_id, "mac_algorithm": alg, "mac": base64.b64encode(mac).decode()}


@route("POST", "verify-mac", fields=("key_id", "mac_algorithm", "message", "mac"))
def _verify_mac(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k, spec, alg, message = _mac_request(self, ctx, body, "verify-mac")
    if not present(body, "mac"):
        raise KmsApiError("KMS.0204", "mac is required")
    given = get_b64(body, "mac", min_len=1, max_len=128)
    ok = material.mac_equal(material.mac(spec, self._current(k), message), given)
    return {"key_id": k.key_id, "mac_algorithm": alg, "mac_valid": ok}


@route("POST", "gen-random", fields=("random_data_length",))
def _gen_random(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    bits = get_num(body, "random_data_length", required=True, code="KMS.1801")
    if bits % 8:
        raise KmsApiError("KMS.1802", "random_data_length must be a multiple of 8")
    if not 8 <= bits <= 8192:
        raise KmsApiError("KMS.1801", "random_data_length must be between 8 and 8192 bits")
    return {"random_data": secrets.token_bytes(bits // 8).hex().upper()}
