"""Name encryption (docs/FORMAT.md, "Encrypted names"): file names, symlink targets and
``user.*`` xattr names of a backing dir made with ``--encrypt-names``. Pure: no I/O.

One name key per backing dir (a KMS data key, `encfs/namekey.py`), stretched by
HKDF-SHA256 into a 64-byte AES-SIV key (AES-256-SIV). Plaintext is padded to a multiple
of 16 bytes (PKCS#7) so that only the length bucket shows, then:

* a file name: AES-SIV with associated data ``[b"name", dir_id]``, deterministic per
  directory (a lookup is one computation); ``dir_id`` is the parent directory's stable id
  (`ROOT_DIR_ID` for the root, else its backing ``user.encfs.dirid``), which moves with the
  directory, so renaming a directory leaves its children's names valid;
* a symlink target: ``nonce || AES-SIV(target, [b"symlink", nonce])`` with a random
  16-byte nonce (equal targets do not look equal);
* a ``user.X`` xattr name: ``user.`` + AES-SIV(X, [b"xattr"]) (deterministic, so a
  getxattr is one computation; equal names on two objects look equal).

Each result is unpadded base64url (RFC 4648 section 5): the backing filesystems encfs
runs on are case-sensitive, and base64url is 20 % shorter than base32, so more names fit
in NAME_MAX without a long-name file. The alphabet has no ``.``, so an encrypted name is
never a sidecar, long-name or control name.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HKDF_INFO = b"encfs names v1"
PAD = 16
DIR_ID_SIZE = 16
ROOT_DIR_ID = bytes(DIR_ID_SIZE)
NONCE_SIZE = 16
XATTR_NAME_MAX = 255  # Linux: the whole name, namespace included
TARGET_MAX = 4095  # a symlink target the backing filesystem accepts (PATH_MAX - 1)
_CACHE_MAX = 1 << 16


class NameDecryptError(Exception):
    """A backing name, target or xattr name that is not ours under this key."""


def b64e(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64d(text: bytes) -> bytes:
    if not text or b"=" in text or len(text) % 4 == 1:
        raise NameDecryptError("not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise NameDecryptError("not base64url") from None


def pad(data: bytes) -> bytes:
    n = PAD - len(data) % PAD
    return data + bytes([n]) * n


def unpad(data: bytes) -> bytes:
    if not data or len(data) % PAD:
        raise NameDecryptError("bad padding")
    n = data[-1]
    if not 1 <= n <= PAD or data[-n:] != bytes([n]) * n:
        raise NameDecryptError("bad padding")
    return data[:-n]


def siv_key(name_dek: bytes) -> bytes:
    """The AES-256-SIV key of a name key (HKDF-SHA256, no salt, info HKDF_INFO)."""
    return HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=HKDF_INFO).derive(name_dek)


class NameCipher:
    """Encrypts and decrypts the names of one backing dir (its name key)."""

    def __init__(self, name_dek: bytes):
        self._siv = AESSIV(siv_key(name_dek))
        # (dir id, name) <-> encrypted name: _path maps every component of every request
        self._enc: dict[tuple[bytes, bytes], bytes] = {}
        self._dec: dict[tuple[bytes, bytes], bytes] = {}

    def _open(self, blob: bytes, ad: list[bytes]) -> bytes:
        try:
            return unpad(self._siv.decrypt(blob, ad))
        except (InvalidTag, ValueError):
            raise NameDecryptError("authentication failed") from None

    # --- file names ----------------------------------------------------------------------

    def encrypt_name(self, dir_id: bytes, name: bytes) -> bytes:
        key = (dir_id, name)
        enc = self._enc.get(key)
        if enc is None:
            enc = b64e(self._siv.encrypt(pad(name), [b"name", dir_id]))
            if len(self._enc) >= _CACHE_MAX:
                self._enc.clear()
            self._enc[key] = enc
        return enc

    def decrypt_name(self, dir_id: bytes, enc: bytes) -> bytes:
        """The plaintext of an encrypted name; NameDecryptError if it is not one of ours."""
        key = (dir_id, enc)
        name = self._dec.get(key)
        if name is None:
            name = self._open(b64d(enc), [b"name", dir_id])
            if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                raise NameDecryptError("not a valid name")
            if len(self._dec) >= _CACHE_MAX:
                self._dec.clear()
            self._dec[key] = name
        return name

    # --- symlink targets -----------------------------------------------------------------

    def encrypt_target(self, target: bytes, nonce: bytes) -> bytes:
        """``nonce`` is 16 random bytes (os.urandom); a parameter so that this stays pure."""
        assert len(nonce) == NONCE_SIZE
        return b64e(nonce + self._siv.encrypt(pad(target), [b"symlink", nonce]))

    def decrypt_target(self, enc: bytes) -> bytes:
        raw = b64d(enc)
        if len(raw) < NONCE_SIZE + 16 + PAD:
            raise NameDecryptError("too short")
        nonce = raw[:NONCE_SIZE]
        return self._open(raw[NONCE_SIZE:], [b"symlink", nonce])

    # --- xattr names ---------------------------------------------------------------------

    def encrypt_xattr(self, name: bytes) -> bytes:
        """The backing name of ``user.X``."""
        assert name.startswith(b"user.")
        return b"user." + b64e(self._siv.encrypt(pad(name[5:]), [b"xattr"]))

    def decrypt_xattr(self, backing_name: bytes) -> bytes:
        if not backing_name.startswith(b"user."):
            raise NameDecryptError("not a user.* name")
        return b"user." + self._open(b64d(backing_name[5:]), [b"xattr"])


def target_fits(target: bytes) -> bool:
    """Whether an encrypted target stays within what a symlink can hold."""
    raw = NONCE_SIZE + 16 + len(pad(target))
    return (raw * 4 + 2) // 3 <= TARGET_MAX


def xattr_name_fits(name: bytes) -> bool:
    raw = 16 + len(pad(name[5:]))
    return 5 + (raw * 4 + 2) // 3 <= XATTR_NAME_MAX
