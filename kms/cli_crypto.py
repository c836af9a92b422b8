"""`kms` subcommands of asymmetric, MAC and imported keys: sign, verify, get-public-key,
generate-mac, verify-mac, create-datakey-pair, import-key-material FILE,
delete-imported-key-material. Registered into kms.cli's command table on import."""

from __future__ import annotations

import argparse
import base64
import secrets
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from .cli import UsageError, _aad_arg, _fields, _key_arg, _with_aad, command
from .client import KmsClient

_WRAPPING_HASH = {"RSAES_OAEP_SHA_256": hashes.SHA256, "RSAES_OAEP_SHA_1": hashes.SHA1}


def _read(path: str, what: str, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is longer than {limit} bytes")
    return data


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def _message_args(p: argparse.ArgumentParser) -> None:
    _key_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--message", help="the message, as text")
    g.add_argument("--file", metavar="FILE", help="the message, read from FILE")
    p.add_argument("--digest", action="store_true",
                   help="the message is already the digest (message_type DIGEST); default RAW")


def _message(a: argparse.Namespace) -> bytes:
    return a.message.encode() if a.message is not None else _read(a.file, "message file", 4095)


def _sign_args(p: argparse.ArgumentParser) -> None:
    _message_args(p)
    p.add_argument("--algorithm", required=True, metavar="ALG",
                   help="RSASSA_PSS_SHA_256/384/512, RSASSA_PKCS1_V1_5_SHA_256/384/512, ECDSA_SHA_256/384")


def _sign_body(c: KmsClient, a: argparse.Namespace) -> dict:
    return {"key_id": c.key_id(a.key), "message": base64.b64encode(_message(a)).decode(),
            "signing_algorithm": a.algorithm, "message_type": "DIGEST" if a.digest else "RAW"}


@command("sign", "sign a message with an asymmetric key (the private key stays in the KMS)",
         lambda p: (_sign_args(p), p.add_argument("--out", metavar="FILE",
                                                  help="also write the raw signature to FILE (for openssl)")))
def _c_sign(c, a):
    r = c.call("sign", _sign_body(c, a))
    if a.out:
        _write(a.out, base64.b64decode(r["signature"]))
    return r, _fields


@command("verify", "verify a signature with an asymmetric key",
         lambda p: (_sign_args(p), p.add_argument("--signature", required=True, metavar="FILE",
                                                  help="the raw signature (as sign --out writes it)")))
def _c_verify(c, a):
    body = _sign_body(c, a)
    body["signature"] = base64.b64encode(_read(a.signature, "signature file", 1024)).decode()
    return c.call("verify", body), _fields


@command("get-public-key", "print the public key of an asymmetric key (PEM)",
         lambda p: (_key_arg(p), p.add_argument("--out", metavar="FILE", help="write the PEM to FILE")))
def _c_public_key(c, a):
    r = c.call("get-publickey", {"key_id": c.key_id(a.key)})
    if a.out:
        _write(a.out, r["public_key"].encode())
    return r, lambda r: r["public_key"].rstrip("\n")


def _mac_args(p: argparse.ArgumentParser) -> None:
    _key_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--message", help="the message, as text")
    g.add_argument("--file", metavar="FILE", help="the message, read from FILE")
    p.add_argument("--algorithm", required=True, metavar="ALG", help="HMAC_SHA_256/384/512 or HMAC_SM3")


def _mac_body(c: KmsClient, a: argparse.Namespace) -> dict:
    msg = a.message.encode() if a.message is not None else _read(a.file, "message file", 4096)
    return {"key_id": c.key_id(a.key), "mac_algorithm": a.algorithm, "message": base64.b64encode(msg).decode()}


@command("generate-mac", "compute a MAC with an HMAC key", _mac_args)
def _c_generate_mac(c, a):
    return c.call("generate-mac", _mac_body(c, a)), _fields


@command("verify-mac", "check a MAC (base64) with an HMAC key",
         lambda p: (_mac_args(p), p.add_argument("--mac", required=True, help="the MAC, base64")))
def _c_verify_mac(c, a):
    body = _mac_body(c, a)
    body["mac"] = a.mac
    return c.call("verify-mac", body), lambda r: _fields({**r, "mac_valid": str(r["mac_valid"]).lower()})


@command("create-datakey-pair", "generate a data key pair under a symmetric key",
         lambda p: (_key_arg(p), p.add_argument("--spec", required=True,
                                                help="RSA_2048/3072/4096, ECC_NIST_P256/P384/P521, ECC_SECG_P256K1"),
                    p.add_argument("--without-plaintext", action="store_true",
                                   help="do not return the private key in the clear"), _aad_arg(p)))
def _c_datakey_pair(c, a):
    op = "create-rsa-datakey-pair" if a.spec.startswith("RSA") else "create-ec-datakey-pair"
    body = _with_aad({"key_id": c.key_id(a.key), "key_spec": a.spec, "with_plain_text": not a.without_plaintext},
                     a.aad)
    return c.call(op, body), _fields


_SYMMETRIC_SPECS = ("AES_256", "SM4", "HMAC_256", "HMAC_384", "HMAC_512", "HMAC_SM3")


@command("import-key-material", "import key material from FILE into a key of origin external",
         lambda p: (_key_arg(p), p.add_argument("file", metavar="FILE",
                                                help="the raw key (e.g. 32 bytes for AES_256), or for an RSA/EC "
                                                     "key its private key (PEM or DER, unencrypted)"),
                    p.add_argument("--wrapping-algorithm", default="RSAES_OAEP_SHA_256",
                                   choices=sorted(_WRAPPING_HASH)),
                    p.add_argument("--expires-days", type=float, metavar="DAYS",
                                   help="the KMS deletes the material after DAYS days")))
def _c_import(c, a):
    """get-parameters-for-import, wrap the material here with the wrapping public key, import.
    An RSA/EC key's private key goes by Huawei's two layers: wrapped (AES key wrap with
    padding) under a fresh AES-256 key, which is wrapped with the wrapping public key."""
    if a.expires_days is not None and a.expires_days <= 0:
        raise UsageError("--expires-days must be more than 0")
    kid = c.key_id(a.key)
    spec = c.call("describe-key", {"key_id": kid})["key_info"].get("key_spec", "AES_256")
    asymmetric = spec not in _SYMMETRIC_SPECS
    material = _read(a.file, "private key file" if asymmetric else "key material file",
                     65536 if asymmetric else 1024)
    private_der = _private_key_der(a.file, material) if asymmetric else None
    p = c.call("get-parameters-for-import", {"key_id": kid, "wrapping_algorithm": a.wrapping_algorithm})
    pub = serialization.load_der_public_key(base64.b64decode(p["public_key"]))
    h = _WRAPPING_HASH[a.wrapping_algorithm]
    body = {"key_id": kid, "import_token": p["import_token"]}
    if private_der is not None:
        temporary = secrets.token_bytes(32)
        body["encrypted_privatekey"] = base64.b64encode(aes_key_wrap_with_padding(temporary, private_der)).decode()
        material = temporary
    wrapped = pub.encrypt(material, padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None))
    body["encrypted_key_material"] = base64.b64encode(wrapped).decode()
    if a.expires_days is not None:
        body["expiration_time"] = int(time.time() + a.expires_days * 86400)
    c.call("import-key-material", body)
    what = f"a {spec} private key" if private_der is not None else str(len(material)) + " bytes"
    return {"key_id": kid, "imported": what}, _fields


def _private_key_der(path: str, data: bytes) -> bytes:
    """The PKCS#8 DER of the private key in ``data`` (PEM or DER, PKCS#8 or traditional)."""
    for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            key = load(data, None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    raise UsageError(f"{path} is not an unencrypted private key (PEM or DER): an RSA/EC key imports its "
                     f"private key")


@command("delete-imported-key-material", "erase the imported material of a key (back to pending import)",
         _key_arg)
def _c_delete_material(c, a):
    kid = c.key_id(a.key)
    c.call("delete-imported-key-material", {"key_id": kid})
    return {"key_id": kid}, _fields
