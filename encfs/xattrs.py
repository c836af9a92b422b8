"""Extended attributes: which namespaces we encrypt, pass through or refuse, and the
encryption of ``user.*`` values. Pure: no I/O, no FUSE.

Policy (docs/FORMAT.md, "Extended attributes"):

* ``user.*`` on regular files: the value is encrypted with the file's DEK and stored under
  the same name on the backing data file. Hard links share it (xattrs belong to the inode),
  renames carry it.
* ``user.*`` on directories: the same, with the directory's own DEK, whose key record (a
  sidecar's bytes) is the backing directory's ``user.encfs.dirkey`` attribute, made when
  the first value is set (`DIR_RECORD_XATTR`). It moves with the directory on rename. The
  kernel itself refuses ``user.*`` on symlinks and device nodes with EPERM, as on ext4;
  ``trusted.*``/``security.*`` on symlinks pass through like on any other object.
* ``user.encfs.*`` is ours: hidden from listings, reads give ENODATA, writes EINVAL. The
  exceptions, handled in fs.py before this policy is asked: ``user.encfs.key`` on a
  directory (the CMK of new files below it, stored in the clear as a key id), and the
  root's read-only control attributes ``user.encfs.pid`` and ``user.encfs.max_write``.
* ``trusted.*``, ``security.*`` and POSIX ACLs (``system.posix_acl_access/default``) are
  metadata the kernel and system tools interpret (capabilities, SELinux labels, ACL
  checks); like modes and owners they are passed through to the backing file in the clear.
* Anything else (other ``system.*`` names, unknown namespaces) is EOPNOTSUPP, as on ext4.
"""

from __future__ import annotations

import enum
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import format as fmt

PASSTHROUGH_PREFIXES = (b"trusted.", b"security.")
#: a directory's key record for its ``user.*`` values (the sidecar format, docs/FORMAT.md)
DIR_RECORD_XATTR = b"user.encfs.dirkey"
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")


class Kind(enum.Enum):
    ENCRYPTED = "encrypted"  # user.*: value encrypted with the file's or directory's DEK
    RESERVED = "reserved"  # user.encfs.*: ours, never the user's
    PLAIN = "plain"  # trusted.*, security.*, ACLs: passed through in the clear
    UNSUPPORTED = "unsupported"


def classify(name: bytes) -> Kind:
    if name.startswith(fmt.RESERVED_XATTR_PREFIX):
        return Kind.RESERVED
    if name.startswith(b"user."):
        return Kind.ENCRYPTED
    if name.startswith(PASSTHROUGH_PREFIXES) or name in ACL_NAMES:
        return Kind.PLAIN
    return Kind.UNSUPPORTED


def visible(name: bytes) -> bool:
    """Whether a backing xattr name is shown by listxattr through the mount."""
    return classify(name) in (Kind.ENCRYPTED, Kind.PLAIN)


class XattrAuthError(Exception):
    """An encrypted value failed authentication (tampered, moved, or not ours)."""


class XattrCipher:
    """Encrypts and decrypts the ``user.*`` values of one file (its DEK and file id)."""

    def __init__(self, dek: bytes, file_id: bytes):
        self._aead = AESGCM(dek)
        self.file_id = file_id

    def encrypt(self, name: bytes, value: bytes) -> bytes:
        nonce = os.urandom(fmt.NONCE_SIZE)
        return (bytes([fmt.XATTR_VERSION]) + nonce
                + self._aead.encrypt(nonce, value, fmt.xattr_aad(self.file_id, name)))

    def decrypt(self, name: bytes, blob: bytes) -> bytes:
        if len(blob) < fmt.XATTR_OVERHEAD or blob[0] != fmt.XATTR_VERSION:
            raise XattrAuthError("not an encfs xattr value (bad length or version)")
        nonce = blob[1:1 + fmt.NONCE_SIZE]
        if not any(nonce):
            raise XattrAuthError("all-zero nonce")
        try:
            return self._aead.decrypt(nonce, blob[1 + fmt.NONCE_SIZE:],
                                      fmt.xattr_aad(self.file_id, name))
        except InvalidTag:
            raise XattrAuthError("authentication failed") from None
