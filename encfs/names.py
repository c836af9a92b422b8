"""The name layer: which backing names hold a plaintext name (docs/FORMAT.md, "Names").

Every tool maps names through here; nothing else builds backing names. A plaintext
``name`` in the directory whose backing path is ``parent`` is stored as:

* itself, when it fits: ``name`` (data file, directory, symlink...) and ``name.sfskey``
  (the sidecar of a regular file) both within NAME_MAX (255) bytes, and ``name`` is not one
  of the backing names this layer uses itself (below);
* otherwise, as a **long name**: ``encfs.long.<H>`` with ``H`` = unpadded base64url of
  SHA-256(name) (43 characters), its sidecar ``encfs.long.<H>.sfskey`` beside it as for any
  name, and the plaintext name in the **long-name file** ``encfs.long.<H>.name`` (the name's
  bytes, nothing else). Names of 249 to 255 bytes, names ending in ``.sfskey`` and names
  starting with ``encfs.long.`` are long, so every name a user may give is usable except
  ``.encfs`` in the root (the control directory).

A long-name file's content is fixed by its own name (the hash), so writing one is
idempotent and a leftover one (a crash between its creation and the data file's, or after
the data file left) is harmless: it is shown only beside an existing ``encfs.long.<H>``
whose hash it matches, and fsck and rmdir remove those without one.

In a backing dir made with ``--encrypt-names`` (docs/FORMAT.md, "Encrypted names") the
stored name is the encrypted name (`encfs/namecrypt.py`) under the parent directory's id
(`DirNames`): it is the data file's name when it fits, else it goes through the same
long-name files, whose content is then the *encrypted* name.
"""

from __future__ import annotations

import base64
import enum
import errno
import hashlib
import hmac
import os
from dataclasses import dataclass

from . import format as fmt
from .namecrypt import DIR_ID_SIZE, ROOT_DIR_ID, NameCipher, NameDecryptError

NAME_MAX = 255
SIDECAR_SUFFIX = fmt.SIDECAR_SUFFIX.encode()
LONG_PREFIX = b"encfs.long."
LONG_NAME_SUFFIX = b".name"
CONTROL_DIR = b".encfs"
#: the longest name stored as itself: its sidecar must fit in NAME_MAX too
SHORT_MAX = NAME_MAX - len(SIDECAR_SUFFIX)
_HASH_CHARS = 43  # unpadded base64 of 32 bytes
#: a backing directory's id in encrypted-names mode (the associated data of its children's
#: names); the root has none: its id is ROOT_DIR_ID
DIR_ID_XATTR = b"user.encfs.dirid"


class NameError_(Exception):
    """A plaintext name that cannot exist (the errno to answer with)."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.errno = err


class Kind(enum.Enum):
    """What a backing directory entry is."""

    OBJECT = "object"  # a data file, directory, symlink... under its own plaintext name
    LONG_OBJECT = "long object"  # the same under a long name's hashed name
    SIDECAR = "sidecar"  # the key record of the object whose backing name it extends
    LONG_NAME = "long-name file"  # the plaintext of a long name
    CONTROL = "control"  # .encfs in the backing root


@dataclass(frozen=True)
class BackingNames:
    """The backing names of one plaintext name, relative to its backing directory."""

    data: bytes
    sidecar: bytes
    long_name: bytes | None  # the long-name file; None when the name is stored as itself
    stored: bytes = b""  # the name as stored: the plaintext, or its encryption; the content
    #                      of the long-name file


@dataclass(frozen=True)
class DirNames:
    """How the names of one backing directory are stored when names are encrypted: under
    ``cipher`` with the directory's id as associated data. (None means: as themselves.)"""

    cipher: NameCipher
    dir_id: bytes


def _hash(name: bytes) -> bytes:
    return base64.urlsafe_b64encode(hashlib.sha256(name).digest()).rstrip(b"=")


def is_long_form(name: bytes) -> bool:
    """Whether a plaintext name is stored under a hashed name."""
    return (len(name) > SHORT_MAX or name.endswith(SIDECAR_SUFFIX)
            or name.startswith(LONG_PREFIX))


def check_name(parent_is_root: bool, name: bytes, creating: bool) -> None:
    """Raise NameError_ for names no directory can hold: too long, empty, with a slash,
    ``.``/``..``, or the control directory in the root (EINVAL when creating it, ENOENT
    when looking it up)."""
    if len(name) > NAME_MAX:
        raise NameError_(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise NameError_(errno.EINVAL)
    if parent_is_root and name == CONTROL_DIR:
        raise NameError_(errno.EINVAL if creating else errno.ENOENT)


def backing_names(parent: bytes, name: bytes, enc: DirNames | None = None) -> BackingNames:
    """The backing names of plaintext ``name`` in the backing directory ``parent`` (whose
    names are encrypted as ``enc`` says, or stored as themselves)."""
    if enc is not None:
        stored = enc.cipher.encrypt_name(enc.dir_id, name)
        if len(stored) <= SHORT_MAX:  # base64url has no ".": never a reserved form
            return BackingNames(stored, stored + SIDECAR_SUFFIX, None, stored)
    elif not is_long_form(name):
        return BackingNames(name, name + SIDECAR_SUFFIX, None, name)
    else:
        stored = name
    hashed = LONG_PREFIX + _hash(stored)
    return BackingNames(hashed, hashed + SIDECAR_SUFFIX, hashed + LONG_NAME_SUFFIX, stored)


def data_path(parent: bytes, name: bytes, enc: DirNames | None = None) -> bytes:
    """The backing path of plaintext ``name`` in backing directory ``parent``."""
    return os.path.join(parent, backing_names(parent, name, enc).data)


def plain_of_stored(stored: bytes, enc: DirNames | None) -> bytes | None:
    """The plaintext of a stored name (itself without encryption); None if it is not one of
    ours (planted, damaged, or under another key or directory)."""
    if enc is None:
        return stored
    try:
        return enc.cipher.decrypt_name(enc.dir_id, stored)
    except NameDecryptError:
        return None


def sidecar_of(data_path_: bytes) -> bytes:
    """The sidecar path of a backing data path (of either form)."""
    return data_path_ + SIDECAR_SUFFIX


def long_name_of(data_path_: bytes) -> bytes | None:
    """The long-name file beside a backing data path, None for a name stored as itself."""
    base = os.path.basename(data_path_)
    return data_path_ + LONG_NAME_SUFFIX if base.startswith(LONG_PREFIX) else None


def classify(parent_is_root: bool, backing_name: bytes) -> Kind:
    """What the backing entry ``backing_name`` is."""
    if parent_is_root and backing_name == CONTROL_DIR:
        return Kind.CONTROL
    if backing_name.endswith(SIDECAR_SUFFIX):
        return Kind.SIDECAR
    if backing_name.startswith(LONG_PREFIX):
        return Kind.LONG_NAME if backing_name.endswith(LONG_NAME_SUFFIX) else Kind.LONG_OBJECT
    return Kind.OBJECT


def is_sidecar(backing_name: bytes) -> bool:
    return backing_name.endswith(SIDECAR_SUFFIX)


def data_of_sidecar(side: bytes) -> bytes:
    """The data path (or name) a sidecar path (or name) belongs to."""
    assert is_sidecar(side)
    return side[:-len(SIDECAR_SUFFIX)]


def object_of(backing_name: bytes) -> bytes | None:
    """The backing name of the object a sidecar or long-name file belongs to."""
    for suffix in (SIDECAR_SUFFIX, LONG_NAME_SUFFIX):
        if backing_name.endswith(suffix):
            return backing_name[:-len(suffix)]
    return None


def stored_of_long(hashed: bytes, content: bytes, encrypted: bool) -> bytes | None:
    """The stored name a long-name file's ``content`` gives for ``encfs.long.<H>`` (its
    hash checked, nothing decrypted), or None when it is not that name's."""
    limit = 2 * NAME_MAX if encrypted else NAME_MAX  # an encrypted name is longer
    if not content or len(content) > limit or b"/" in content or b"\0" in content:
        return None
    if not encrypted and not is_long_form(content):
        return None
    return content if hmac.compare_digest(LONG_PREFIX + _hash(content), hashed) else None


def plain_of_long(hashed: bytes, content: bytes, enc: DirNames | None = None) -> bytes | None:
    """The plaintext name a long-name file's ``content`` gives for ``encfs.long.<H>``, or
    None when it is not that name's (damaged, planted, or for another hash)."""
    stored = stored_of_long(hashed, content, enc is not None)
    return None if stored is None else plain_of_stored(stored, enc)


# --- I/O: long-name files and listings ----------------------------------------------------

def read_long_name(data_path_: bytes, enc: DirNames | None = None) -> bytes | None:
    """The plaintext name of the long-form entry at ``data_path_``; None when its long-name
    file is missing, unreadable or does not match (never follows a link, never blocks)."""
    content = _read_long_file(data_path_)
    return None if content is None else plain_of_long(os.path.basename(data_path_), content, enc)


def read_long_stored(data_path_: bytes, encrypted: bool) -> bytes | None:
    """The stored name in the long-name file of ``data_path_`` if its hash matches (fsck
    without the name key)."""
    content = _read_long_file(data_path_)
    return None if content is None else stored_of_long(os.path.basename(data_path_),
                                                       content, encrypted)


def _read_long_file(data_path_: bytes) -> bytes | None:
    path = long_name_of(data_path_)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 2 * NAME_MAX + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_long_name(data_path_: bytes) -> None:
    """Remove the long-name file beside ``data_path_`` (after the entry itself is gone)."""
    path = long_name_of(data_path_)
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class Entry:
    """One plaintext directory entry and the backing name holding it."""

    name: bytes
    backing: bytes


def list_dir(dirpath: bytes, parent_is_root: bool,
             backing_names_: list[bytes] | None = None,
             enc: DirNames | None = None) -> tuple[list[Entry], list[bytes]]:
    """The plaintext entries of backing directory ``dirpath``, and the backing names of
    entries whose name could not be read (hidden; for a log line or fsck): long-form ones
    without a valid long-name file, and with ``enc`` names that do not decrypt."""
    names = os.listdir(dirpath) if backing_names_ is None else backing_names_
    entries: list[Entry] = []
    unnamed: list[bytes] = []
    for b in names:
        kind = classify(parent_is_root, b)
        if kind is Kind.OBJECT:
            plain = plain_of_stored(b, enc)
            if plain is None:
                unnamed.append(b)
            else:
                entries.append(Entry(plain, b))
        elif kind is Kind.LONG_OBJECT:
            plain = read_long_name(os.path.join(dirpath, b), enc)
            if plain is None:
                unnamed.append(b)
            else:
                entries.append(Entry(plain, b))
    return entries, unnamed


def orphans(names: list[bytes]) -> list[bytes]:
    """Sidecars and long-name files in a listing whose object is not in it."""
    present = set(names)
    return [n for n in names if (o := object_of(n)) is not None and o not in present
            and classify(False, n) in (Kind.SIDECAR, Kind.LONG_NAME)]


def read_dir_id(dirpath: bytes) -> bytes | None:
    """A backing directory's id (encrypted names), None if it has none or a bad one."""
    try:
        value = os.getxattr(dirpath, DIR_ID_XATTR, follow_symlinks=False)
    except OSError:
        return None
    return value if len(value) == DIR_ID_SIZE else None


def dir_names(root: bytes, dirpath: bytes, cipher: NameCipher | None) -> DirNames | None:
    """How the names in backing directory ``dirpath`` are stored (offline tools: the id
    read from the backing dir). Raises NameError_(EIO) for a directory without an id."""
    if cipher is None:
        return None
    if os.path.abspath(dirpath) == os.path.abspath(root):
        return DirNames(cipher, ROOT_DIR_ID)
    dir_id = read_dir_id(dirpath)
    if dir_id is None:
        raise NameError_(errno.EIO)
    return DirNames(cipher, dir_id)


def backing_path(root: bytes, rel: bytes, cipher: NameCipher | None = None) -> bytes:
    """The backing path of plaintext path ``rel`` (relative to the mount's root) in the
    backing dir ``root``: each component through the name layer (with ``cipher``, names
    are encrypted under each directory's id read from the backing dir)."""
    path = root
    for part in rel.split(b"/"):
        if part in (b"", b"."):
            continue
        path = (os.path.dirname(path) if part == b".." else
                data_path(path, part, dir_names(root, path, cipher)))
    return path



def plain_name(root: bytes, dirpath: bytes, backing_name: bytes,
               cipher: NameCipher | None) -> bytes | None:
    """The plaintext name of entry ``backing_name`` of backing directory ``dirpath`` (None:
    not an entry, or its name cannot be read)."""
    kind = classify(os.path.abspath(dirpath) == os.path.abspath(root), backing_name)
    try:
        enc = dir_names(root, dirpath, cipher)
    except NameError_:
        return None
    if kind is Kind.OBJECT:
        return plain_of_stored(backing_name, enc)
    if kind is Kind.LONG_OBJECT:
        return read_long_name(os.path.join(dirpath, backing_name), enc)
    return None


def plain_path(root: bytes, path: bytes, cipher: NameCipher | None) -> bytes | None:
    """The plaintext path (relative to the mount's root) of backing ``path`` in backing dir
    ``root``; None when a component's name cannot be read or it is not an entry."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == b".":
        return b""
    if rel.startswith(b"../"):
        return None
    cur, out = os.path.abspath(root), []
    for part in rel.split(b"/"):
        plain = plain_name(root, cur, part, cipher)
        if plain is None:
            return None
        out.append(plain)
        cur = os.path.join(cur, part)
    return b"/".join(out)
