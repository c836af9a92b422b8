"""Key material of every key spec: generation, per-spec cryptography, import unwrapping. Pure; no I/O.

The store keeps what ``generate`` returns, wrapped by the root key, and hands it back to the
handlers; nothing here sees HTTP or SQLite. Symmetric material is the raw key bytes; the
material of an asymmetric key is its private key as PKCS#8 DER, which never leaves the daemon:
only ``public_key_der`` of it is ever answered.

Everything comes from ``cryptography`` (OpenSSL): SM4 and SM3 are there, SM2 is not, so SM2
keys are refused (docs/KMS.md). No curve arithmetic is written here.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
SIGN_VERIFY = "SIGN_VERIFY"
GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"


@dataclass(frozen=True)
class Spec:
    """What one key_spec is and may do."""

    name: str
    kind: str                   # "aes", "sm4", "rsa", "ec", "hmac"
    usages: tuple[str, ...]     # allowed key_usage values; the first is the default
    size: int                   # symmetric: bytes of material; RSA: modulus bits; EC: field bits
    curve: type | None = None
    hash_name: str = ""         # HMAC: the hash

    @property
    def symmetric(self) -> bool:
        return self.kind in ("aes", "sm4", "hmac")

    @property
    def rotatable(self) -> bool:
        # Huawei rotates symmetric encryption keys only: KMS.0324 for asymmetric ones.
        return self.kind in ("aes", "sm4")


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("AES_256", "aes", (ENCRYPT_DECRYPT,), 32),
    Spec("SM4", "sm4", (ENCRYPT_DECRYPT,), 16),
    Spec("RSA_2048", "rsa", (SIGN_VERIFY, ENCRYPT_DECRYPT), 2048),
    Spec("RSA_3072", "rsa", (SIGN_VERIFY, ENCRYPT_DECRYPT), 3072),
    Spec("RSA_4096", "rsa", (SIGN_VERIFY, ENCRYPT_DECRYPT), 4096),
    Spec("EC_P256", "ec", (SIGN_VERIFY,), 256, ec.SECP256R1),
    Spec("EC_P384", "ec", (SIGN_VERIFY,), 384, ec.SECP384R1),
    Spec("SECP256K1", "ec", (SIGN_VERIFY,), 256, ec.SECP256K1),
    Spec("HMAC_256", "hmac", (GENERATE_VERIFY_MAC,), 32, hash_name="SHA256"),
    Spec("HMAC_384", "hmac", (GENERATE_VERIFY_MAC,), 48, hash_name="SHA384"),
    Spec("HMAC_512", "hmac", (GENERATE_VERIFY_MAC,), 64, hash_name="SHA512"),
    Spec("HMAC_SM3", "hmac", (GENERATE_VERIFY_MAC,), 32, hash_name="SM3"),
)}

#: Specs Huawei lists that this KMS refuses, and why (docs/KMS.md repeats it).
REFUSED_SPECS = {
    "SM2": "SM2 is not available in the cryptography library this KMS uses",
    "ED25519": "Huawei's sign/verify have no signing_algorithm for ED25519 keys, so such a key could not be used",
}

_HASHES = {"SHA_256": hashes.SHA256, "SHA_384": hashes.SHA384, "SHA_512": hashes.SHA512}
_HASH_BY_NAME = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512, "SM3": hashes.SM3}

#: signing_algorithm → (key kind, padding scheme, hash)
SIGNING_ALGORITHMS = {
    "RSASSA_PSS_SHA_256": ("rsa", "pss", "SHA_256"), "RSASSA_PSS_SHA_384": ("rsa", "pss", "SHA_384"),
    "RSASSA_PSS_SHA_512": ("rsa", "pss", "SHA_512"),
    "RSASSA_PKCS1_V1_5_SHA_256": ("rsa", "pkcs1", "SHA_256"),
    "RSASSA_PKCS1_V1_5_SHA_384": ("rsa", "pkcs1", "SHA_384"),
    "RSASSA_PKCS1_V1_5_SHA_512": ("rsa", "pkcs1", "SHA_512"),
    "ECDSA_SHA_256": ("ec", "ecdsa", "SHA_256"), "ECDSA_SHA_384": ("ec", "ecdsa", "SHA_384"),
    "ECDSA_SHA_512": ("ec", "ecdsa", "SHA_512"),
}
#: Huawei lists SM2DSA_SM3 too; refused with the SM2 keys.
REFUSED_SIGNING_ALGORITHMS = ("SM2DSA_SM3",)

MAC_ALGORITHMS = {"HMAC_SHA_256": "HMAC_256", "HMAC_SHA_384": "HMAC_384", "HMAC_SHA_512": "HMAC_512",
                  "HMAC_SM3": "HMAC_SM3"}

#: Data-key pair specs of create-rsa/ec-datakey-pair (Huawei's names).
RSA_PAIR_SPECS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
EC_PAIR_SPECS = {"ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1, "ECC_NIST_P521": ec.SECP521R1,
                 "ECC_SECG_P256K1": ec.SECP256K1}

#: Wrapping algorithms of get-parameters-for-import: the OAEP hash.
WRAPPING_ALGORITHMS = {"RSAES_OAEP_SHA_256": hashes.SHA256, "RSAES_OAEP_SHA_1": hashes.SHA1}
WRAPPING_KEY_BITS = 4096
#: Huawei's asymmetric import: the private key is wrapped (RFC 5649, AES key wrap with padding,
#: `openssl enc -id-aes256-wrap-pad`) under a temporary AES-256 key, which is itself wrapped
#: with the wrapping public key like symmetric material.
TEMPORARY_KEY_BYTES = 32


class MaterialError(ValueError):
    """Input that the material cannot take (wrong length, undecryptable, malformed public key)."""


# ---- generation ----------------------------------------------------------------------------

def _pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate(spec: Spec) -> bytes:
    """New material of ``spec``: raw bytes (symmetric) or a PKCS#8 DER private key."""
    if spec.symmetric:
        return secrets.token_bytes(spec.size)
    if spec.kind == "rsa":
        return _pkcs8(rsa.generate_private_key(65537, spec.size))
    return _pkcs8(ec.generate_private_key(spec.curve()))


_PARSED: dict[bytes, object] = {}
_PARSED_MAX = 4096


def _private(material: bytes):
    """The key object of stored material, parsed once: parsing checks an RSA key, which takes
    tens of milliseconds in OpenSSL 3. The check is skipped for this material: it was made by
    this KMS (or wrapped by the root key under AES-GCM), so it cannot have been tampered with.
    ``forget`` drops an entry when its key's material is destroyed."""
    key = _PARSED.get(material)
    if key is None:
        key = serialization.load_der_private_key(material, None, unsafe_skip_rsa_key_validation=True)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[material] = key
    return key


def forget(material: bytes | None) -> None:
    """Drop the parsed key object of ``material`` (its key was destroyed or deleted)."""
    if material is not None:
        _PARSED.pop(material, None)


def retain(live: set[bytes]) -> None:
    """Drop the parsed key objects of material no longer live (after a reload of the store by a
    worker process: another worker destroyed or deleted it)."""
    for m in [m for m in _PARSED if m not in live]:
        _PARSED.pop(m, None)


def public_key_der(material: bytes) -> bytes:
    """SubjectPublicKeyInfo (DER) of an asymmetric key's material."""
    return _private(material).public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem(material: bytes) -> str:
    return _private(material).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# ---- symmetric encryption under a CMK ------------------------------------------------------

class SM4GCM:
    """SM4 in GCM mode with AESGCM's interface (``cryptography`` has no SM4 AEAD class)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        return enc.update(data) + enc.finalize() + enc.tag

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        if len(data) < 16:
            raise InvalidTag()
        dec = Cipher(algorithms.SM4(self._key), modes.GCM(nonce, data[-16:])).decryptor()
        dec.authenticate_additional_data(aad)
        return dec.update(data[:-16]) + dec.finalize()


def aead(spec: Spec, material: bytes):
    """The AEAD a symmetric encryption CMK seals data keys and data with."""
    return SM4GCM(material) if spec.kind == "sm4" else AESGCM(material)


def datakey_digest(spec: Spec, dek: bytes) -> bytes:
    """The digest encrypt-datakey expects after the DEK: SM3 for SM4 CMKs, else SHA-256."""
    if spec.kind == "sm4":
        h = hashes.Hash(hashes.SM3())
        h.update(dek)
        return h.finalize()
    return hashlib.sha256(dek).digest()


# ---- RSA encryption ------------------------------------------------------------------------

def _oaep(hash_cls) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hash_cls()), algorithm=hash_cls(), label=None)


def rsa_encrypt(material: bytes, plaintext: bytes) -> bytes:
    return _private(material).public_key().encrypt(plaintext, _oaep(hashes.SHA256))


def rsa_max_plaintext(spec: Spec) -> int:
    return spec.size // 8 - 2 * 32 - 2


def rsa_decrypt(material: bytes, ciphertext: bytes, hash_cls=hashes.SHA256) -> bytes:
    try:
        return _private(material).decrypt(ciphertext, _oaep(hash_cls))
    except ValueError:
        raise MaterialError("ciphertext does not decrypt with this key") from None


# ---- signatures ----------------------------------------------------------------------------

def _sign_args(algorithm: str, message: bytes, raw: bool):
    _kind, scheme, hname = SIGNING_ALGORITHMS[algorithm]
    h = _HASHES[hname]()
    if raw:
        return scheme, h, message
    want = h.digest_size
    if len(message) != want:
        raise MaterialError(f"a {hname} digest is {want} bytes, not {len(message)}")
    return scheme, utils.Prehashed(h), message


def _pad(scheme: str, h):
    if scheme == "pss":
        # Salt as long as the digest: what openssl and Huawei use for RSASSA-PSS.
        base = h._algorithm if isinstance(h, utils.Prehashed) else h
        return padding.PSS(mgf=padding.MGF1(base), salt_length=base.digest_size)
    return padding.PKCS1v15()


def sign(material: bytes, algorithm: str, message: bytes, raw: bool) -> bytes:
    """Signature of ``message`` (RAW) or of the digest ``message`` (DIGEST); ECDSA as DER."""
    scheme, h, data = _sign_args(algorithm, message, raw)
    key = _private(material)
    if scheme == "ecdsa":
        return key.sign(data, ec.ECDSA(h))
    return key.sign(data, _pad(scheme, h), h)


def verify(material: bytes, algorithm: str, message: bytes, signature: bytes, raw: bool) -> bool:
    scheme, h, data = _sign_args(algorithm, message, raw)
    pub = _private(material).public_key()
    try:
        if scheme == "ecdsa":
            pub.verify(signature, data, ec.ECDSA(h))
        else:
            pub.verify(signature, data, _pad(scheme, h), h)
    except InvalidSignature:
        return False
    return True


# ---- MACs ----------------------------------------------------------------------------------

def mac(spec: Spec, material: bytes, message: bytes) -> bytes:
    h = crypto_hmac.HMAC(material, _HASH_BY_NAME[spec.hash_name]())
    h.update(message)
    return h.finalize()


def mac_equal(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)


# ---- data key pairs ------------------------------------------------------------------------

def new_pair(pair_spec: str) -> tuple[bytes, bytes]:
    """(private PKCS#8 DER, public SubjectPublicKeyInfo DER) of a fresh data key pair."""
    if pair_spec in RSA_PAIR_SPECS:
        key = rsa.generate_private_key(65537, RSA_PAIR_SPECS[pair_spec])
    else:
        key = ec.generate_private_key(EC_PAIR_SPECS[pair_spec]())
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _pkcs8(key), pub


# ---- import ----------------------------------------------------------------------------------

def new_wrapping_key() -> bytes:
    return _pkcs8(rsa.generate_private_key(65537, WRAPPING_KEY_BITS))


def unwrap_import(wrapping_private: bytes, wrapping_algorithm: str, encrypted: bytes) -> bytes:
    """Key material the importer encrypted with the wrapping public key (RSAES-OAEP)."""
    return rsa_decrypt(wrapping_private, encrypted, WRAPPING_ALGORITHMS[wrapping_algorithm])


def check_imported(spec: Spec, material: bytes) -> None:
    """Imported symmetric material must have the spec's length (HMAC keys: 1 byte at least)."""
    if spec.kind == "hmac":
        ok = 1 <= len(material) <= 128
    else:
        ok = len(material) == spec.size
    if not ok:
        raise MaterialError(f"key material of a {spec.name} key is {spec.size} bytes, not {len(material)}")


def unwrap_private_import(temporary_key: bytes, wrapped_private: bytes) -> bytes:
    """The private key of an asymmetric import: ``wrapped_private`` is AES-KWP (RFC 5649) of its
    DER under ``temporary_key`` (already unwrapped with the wrapping key). Raises MaterialError."""
    if len(temporary_key) != TEMPORARY_KEY_BYTES:
        raise MaterialError(f"the temporary key of an asymmetric import is an AES-256 key "
                            f"({TEMPORARY_KEY_BYTES} bytes), not {len(temporary_key)} bytes")
    try:
        return aes_key_unwrap_with_padding(temporary_key, wrapped_private)
    except (InvalidUnwrap, ValueError):
        raise MaterialError("encrypted_privatekey does not unwrap with the temporary key "
                            "(AES key wrap with padding, RFC 5649)") from None


def check_imported_private(spec: Spec, der: bytes) -> bytes:
    """The stored form (PKCS#8 DER, re-encoded so that the same key always gives the same bytes)
    of an imported private key, which must be a key of ``spec``: an RSA key of its modulus size
    or an EC key on its curve. The key is fully checked here (OpenSSL's RSA key check, EC point
    on the curve): it comes from outside, unlike generated material. Raises MaterialError."""
    try:
        key = serialization.load_der_private_key(der, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The message never quotes the input: it is private key material.
        raise MaterialError("the unwrapped private key is not a DER private key (PKCS#8 expected)") from None
    if spec.kind == "rsa":
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != spec.size:
            raise MaterialError(f"a {spec.name} key needs an RSA private key of {spec.size} bits, "
                                f"not {_describe(key)}")
    elif not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, spec.curve):
        raise MaterialError(f"a {spec.name} key needs an EC private key on {spec.curve.name}, not {_describe(key)}")
    return _pkcs8(key)


def _describe(key) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA key of {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on {key.curve.name}"
    return f"a {type(key).__name__.removeprefix('_').replace('PrivateKey', '')} key"
