"""Data keys under a symmetric CMK: create (with and without plaintext), encrypt, decrypt,
re-encrypt, and the asymmetric data key pairs (create-rsa/ec-datakey-pair)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from .. import blob, material
from ..core import Ctx, Kms, route
from ..errors import KmsApiError
from ..material import ENCRYPT_DECRYPT
from ..validate import HEX_RE, get_aad, get_bool, get_enum, get_num, get_str, present

_SYMMETRIC = ("aes", "sm4")
_DATAKEY_FIELDS = ("key_id", "key_spec", "datakey_length", "additional_authenticated_data", "pin", "pin_type")


def _no_pin(body: dict) -> None:
    # Huawei's PIN protection exists only for level-4 dedicated HSMs: refused, never ignored.
    for name in ("pin", "pin_type"):
        if get_str(body, name) is not None:
            raise KmsApiError("KMS.0308", f"{name} is not supported (no dedicated HSM here)")


def _cmk(self: Kms, ctx: Ctx, body: dict, op: str, name: str = "key_id"):
    k = self._key(ctx, body, op, name=name)
    self._for_usage(k, ENCRYPT_DECRYPT, _SYMMETRIC)
    return k

# =============================== data keys ======================================================

@route("POST", "create-datakey", fields=_DATAKEY_FIELDS)
def _create_datakey(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _cmk(self, ctx, body, "create-datakey")
    _no_pin(body)
    bits = self._datakey_bits(body, "KMS.1901")
    aad = get_aad(body)
    self._usable(k)
    dek = secrets.token_bytes(bits // 8)
    return {"key_id": k.key_id, "plain_text": dek.hex().upper(), "cipher_text": self._seal_datakey(k, dek, aad)}


@route("POST", "create-datakey-without-plaintext", fields=_DATAKEY_FIELDS)
def _create_datakey_np(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _cmk(self, ctx, body, "create-datakey-without-plaintext")
    _no_pin(body)
    bits = self._datakey_bits(body, "KMS.2001")
    aad = get_aad(body)
    self._usable(k)
    dek = secrets.token_bytes(bits // 8)
    return {"key_id": k.key_id, "cipher_text": self._seal_datakey(k, dek, aad)}


@route("POST", "encrypt-datakey", fields=("key_id", "plain_text", "datakey_plain_length",
                                         "additional_authenticated_data", "pin", "pin_type", "key_spec"))
def _encrypt_datakey(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _cmk(self, ctx, body, "encrypt-datakey")
    _no_pin(body)
    if present(body, "key_spec") and body["key_spec"] not in ("AES_256", "SM4"):
        raise KmsApiError("KMS.0308", "key_spec must be AES_256 or SM4")
    plain = get_str(body, "plain_text", required=True, code="KMS.2101")
    n = get_num(body, "datakey_plain_length", required=True, code="KMS.2102")
    if not 1 <= n <= 1024:
        raise KmsApiError("KMS.2102", "datakey_plain_length must be between 1 and 1024 bytes")
    if not HEX_RE.match(plain) or len(plain) % 2:
        raise KmsApiError("KMS.2101", "plain_text must be hexadecimal: DEK followed by its SHA-256")
    raw = bytes.fromhex(plain)
    if len(raw) != n + 32:
        raise KmsApiError("KMS.2104", "plain_text length does not match datakey_plain_length + 32-byte SHA-256")
    dek, digest = raw[:n], raw[n:]
    if not hmac.compare_digest(material.datakey_digest(self.spec(k), dek), digest):
        raise KmsApiError("KMS.2103", "the digest in plain_text (SHA-256; SM3 for SM4 keys) does not match "
                                      "the data key")
    aad = get_aad(body)
    self._usable(k)
    return {"key_id": k.key_id, "cipher_text": self._seal_datakey(k, dek, aad), "datakey_length": str(n)}


@route("POST", "decrypt-datakey", fields=("key_id", "cipher_text", "datakey_cipher_length",
                                         "additional_authenticated_data"))
def _decrypt_datakey(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = _cmk(self, ctx, body, "decrypt-datakey")
    ct = get_str(body, "cipher_text", required=True, code="KMS.2201")
    n = get_num(body, "datakey_cipher_length", required=True, code="KMS.2202")
    if not 1 <= n <= 1024:
        raise KmsApiError("KMS.2202", "datakey_cipher_length must be between 1 and 1024 bytes")
    aad = get_aad(body)
    raw, h = self._parse_datakey(ct)
    if h.key_id != k.key_id:
        raise KmsApiError("KMS.2201", f"cipher_text was not made with key {k.key_id}")
    self._usable(k)
    dek = self._open_datakey(k, raw, h, aad)
    if len(dek) != n:
        raise KmsApiError("KMS.2204", f"datakey_cipher_length {n} does not match the data key length")
    return {"data_key": dek.hex().upper(), "datakey_length": str(len(dek)),
            "datakey_dgst": hashlib.sha256(dek).hexdigest().upper()}


@route("POST", "re-encrypt", fields=("source_key_id", "source_additional_authenticated_data",
                                    "source_encryption_algorithm", "destination_key_id",
                                    "destination_additional_authenticated_data", "destination_encryption_algorithm",
                                    "datakey_cipher_length", "cipher_text"))
def _re_encrypt(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    ct = get_str(body, "cipher_text", required=True, code="KMS.2201")
    get_str(body, "destination_key_id", required=True)
    for name in ("source_encryption_algorithm", "destination_encryption_algorithm"):
        alg = get_str(body, name, default="SYMMETRIC_DEFAULT")
        if alg != "SYMMETRIC_DEFAULT":
            raise KmsApiError("KMS.0308", f"{name} must be SYMMETRIC_DEFAULT")
    raw, h = self._parse_datakey(ct)
    if present(body, "source_key_id") and get_str(body, "source_key_id") != h.key_id:
        raise KmsApiError("KMS.2201", "cipher_text was not made with source_key_id")
    src = _cmk(self, ctx, {"key_id": h.key_id}, "decrypt-datakey")
    dst = _cmk(self, ctx, body, "encrypt-datakey", name="destination_key_id")
    self._usable(src)
    self._usable(dst)
    dek = self._open_datakey(src, raw, h, get_aad(body, "source_additional_authenticated_data"))
    n = get_num(body, "datakey_cipher_length", code="KMS.2202")
    if n is not None and n != len(dek):
        raise KmsApiError("KMS.2204", f"datakey_cipher_length {n} does not match the data key length")
    out = self._seal_datakey(dst, dek, get_aad(body, "destination_additional_authenticated_data"))
    return {"key_id": dst.key_id, "source_key_id": src.key_id, "cipher_text": out,
            "source_encryption_algorithm": "SYMMETRIC_DEFAULT",
            "destination_encryption_algorithm": "SYMMETRIC_DEFAULT"}



# ---- data key pairs ------------------------------------------------------------------------------

def _datakey_pair(self: Kms, ctx: Ctx, body: dict, op: str, specs) -> dict:
    """A fresh key pair: the public key (base64 DER) and the private key (PKCS#8 DER) sealed by
    the CMK as an encrypt-data ciphertext, so that decrypt-data gives it back (decrypt-datakey
    is limited to 1024 bytes, less than an RSA private key), plus the private key in the clear
    unless with_plain_text is false."""
    k = _cmk(self, ctx, body, op)
    spec = get_enum(body, "key_spec", specs, required=True)
    with_plain = get_bool(body, "with_plain_text", True)
    aad = get_aad(body)
    _no_pin(body)
    self._usable(k)
    private, public = material.new_pair(spec)
    out = {"key_id": k.key_id, "key_spec": spec, "public_key": base64.b64encode(public).decode(),
           "private_key_cipher_text": base64.b64encode(self._seal(k, blob.KIND_DATA, private, aad)).decode()}
    if with_plain:
        out["private_key_plain_text"] = base64.b64encode(private).decode()
    return out


@route("POST", "create-rsa-datakey-pair", fields=("key_id", "key_spec", "with_plain_text",
                                                 "additional_authenticated_data"))
def _rsa_pair(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    return _datakey_pair(self, ctx, body, "create-rsa-datakey-pair", material.RSA_PAIR_SPECS)


@route("POST", "create-ec-datakey-pair", fields=("key_id", "key_spec", "with_plain_text",
                                                "additional_authenticated_data", "pin", "pin_type"))
def _ec_pair(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    return _datakey_pair(self, ctx, body, "create-ec-datakey-pair", material.EC_PAIR_SPECS)
