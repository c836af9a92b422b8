"""The backing directory: its control directory, sidecar files, and the ordered steps of
multi-file changes (a data file and its sidecar). Plain synchronous I/O, no FUSE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import secrets
from dataclasses import dataclass

from . import format as fmt

CONTROL_DIR = b".encfs"
CONFIG_NAME = "config.json"
TMP_DIR = "tmp"


class BackingError(Exception):
    """A backing directory that cannot be used; the message is for the user."""


@dataclass(frozen=True)
class BackingConfig:
    """Per-backing-dir settings, fixed when the directory is first mounted.

    The block size is also in every data file's header (the authority for reading); the
    config holds the value used to compute sizes in directory listings without reading
    each file's header.
    """

    block_size: int = fmt.DEFAULT_BLOCK_SIZE
    format_version: int = fmt.FORMAT_VERSION


def control_path(backing: bytes, *parts: str) -> bytes:
    return os.path.join(backing, CONTROL_DIR, *(p.encode() for p in parts))


def open_backing(backing: str | bytes) -> tuple[bytes, BackingConfig]:
    """Check a backing directory, create its control directory, and read its config."""
    root = os.fsencode(os.path.abspath(backing))
    if not os.path.exists(root):
        raise BackingError(f"backing directory {os.fsdecode(root)} does not exist")
    if not os.path.isdir(root):
        raise BackingError(f"backing path {os.fsdecode(root)} is not a directory")
    ctl = control_path(root)
    try:
        os.makedirs(os.path.join(ctl, TMP_DIR.encode()), mode=0o700, exist_ok=True)
    except OSError as e:
        raise BackingError(f"cannot create {os.fsdecode(ctl)}: {e.strerror}") from None
    cfg_path = control_path(root, CONFIG_NAME)
    try:
        with open(cfg_path, "rb") as f:
            raw = json.load(f)
        config = BackingConfig(block_size=int(raw["block_size"]),
                               format_version=int(raw["format_version"]))
        fmt.check_block_size(config.block_size)
    except FileNotFoundError:
        config = BackingConfig()
        write_file_atomic(root, cfg_path, json.dumps(
            {"format_version": config.format_version, "block_size": config.block_size},
            indent=1).encode() + b"\n")
    except (ValueError, KeyError, TypeError, fmt.FormatError):
        raise BackingError(f"{os.fsdecode(cfg_path)} is damaged; "
                           "restore it or run encfs fsck") from None
    return root, config


def tmp_path(backing: bytes) -> bytes:
    return control_path(backing, TMP_DIR, "t-" + secrets.token_hex(8))


def fsync_dir(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(backing: bytes, dest: bytes, data: bytes, mode: int = 0o600) -> None:
    """Write ``dest`` whole or not at all: a temp file in the control dir, fsync, rename."""
    tmp = tmp_path(backing)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(dest))


def sidecar_path(data_path: bytes) -> bytes:
    return fmt.sidecar_name(data_path)


def read_sidecar(data_path: bytes) -> fmt.KeyRecord:
    """The key record of a data file; FileNotFoundError when it has no sidecar."""
    fd = os.open(sidecar_path(data_path), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.pread(fd, fmt.SIDECAR_SIZE + 1, 0)
    finally:
        os.close(fd)
    return fmt.decode_sidecar(data)


def write_sidecar(backing: bytes, data_path: bytes, rec: fmt.KeyRecord,
                  uid: int | None = None, gid: int | None = None) -> None:
    """Put a new sidecar in place atomically (complete before it becomes visible)."""
    tmp = tmp_path(backing)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, fmt.encode_sidecar(rec))
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, sidecar_path(data_path))
    except BaseException:
        os.unlink(tmp)
        raise


def read_header(fd: int) -> fmt.Header | None:
    """The header of an open data file, or None when the file holds no data yet."""
    data = os.pread(fd, fmt.HEADER_SIZE, 0)
    if not data:
        return None
    return fmt.decode_header(data)


def remove_sidecar(data_path: bytes) -> None:
    """Remove the sidecar of a data file that was just unlinked (a missing one is fine)."""
    try:
        os.unlink(sidecar_path(data_path))
    except FileNotFoundError:
        pass


def is_reserved(parent_is_root: bool, name: bytes) -> bool:
    """Names the mount hides and refuses: sidecars, and the control dir at the root."""
    return fmt.is_sidecar_name(name) or (parent_is_root and name == CONTROL_DIR)


def reserved_errno() -> int:
    return errno.EINVAL


# --- writing data files -------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve backing space for ``[offset, offset+length)`` without changing the size.

    Done before a write touches anything, so that a full disk fails the request with
    ENOSPC up front instead of tearing a block halfway through a pwrite (gocryptfs does the
    same). False when the backing filesystem cannot preallocate (then writes go ahead
    unprotected); OSError(ENOSPC, ...) when the space is not there.
    """
    if length <= 0:
        return True
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite that never leaves a short write behind silently."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# --- one mount per backing dir, and noticing an unclean stop ------------------------------

LOCK_NAME = "lock"
DIRTY_NAME = "dirty"


class MountLock:
    """An flock on ``.encfs/lock`` held for the life of a mount; it names the holder's pid.

    The kernel drops the lock when the holder dies, so a crashed mount never blocks the
    next one; the separate ``dirty`` marker records that the stop was unclean.
    """

    def __init__(self, backing: bytes):
        self.backing = backing
        self.path = control_path(backing, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BackingError(f"{os.fsdecode(self.backing)} is already in use by another "
                               f"encfs process (pid {holder}): one mount per backing "
                               "directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def mark_dirty(backing: bytes) -> bool:
    """Mark a mount as running; True if the marker was already there (an unclean stop)."""
    path = control_path(backing, DIRTY_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return True
    os.close(fd)
    fsync_dir(control_path(backing))
    return False


def mark_clean(backing: bytes) -> None:
    try:
        os.unlink(control_path(backing, DIRTY_NAME))
    except FileNotFoundError:
        pass


def recover(backing: bytes) -> list[str]:
    """After an unclean stop: finish interrupted changes (journal) and drop temp files.
    Returns what was done, one line each."""
    from .journal import Journal

    journal = Journal(control_path(backing))
    try:
        done = journal.replay()
    finally:
        journal.close()
    tmp = control_path(backing, TMP_DIR)
    leftovers = os.listdir(tmp)
    for name in leftovers:
        os.unlink(os.path.join(tmp, name))
    if leftovers:
        done.append(f"removed {len(leftovers)} temporary file(s) of interrupted writes")
    return done
