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
import stat
from dataclasses import dataclass

from . import format as fmt
from . import names as nm
from .text import printable  # noqa: F401  (re-exported: bk.printable)

CONTROL_DIR = b".encfs"
CONFIG_NAME = "config.json"
TMP_DIR = "tmp"


class BackingError(Exception):
    """A backing directory that cannot be used; the message is for the user."""


class BackingInUse(BackingError):
    """Another encfs process holds the backing directory's mount lock."""


#: The largest config.json we read: it holds two small numbers.
CONFIG_MAX = 64 * 1024


def open_regular(path: bytes | str, flags: int = os.O_RDONLY, what: str = "file",
                 dir_fd: int | None = None) -> int:
    """Open an existing backing file that must be a regular file, safely.

    Never follows a symlink (O_NOFOLLOW: a planted link must not lead out of the backing
    dir) and never blocks (O_NONBLOCK: a FIFO planted in place of a file would hang a plain
    open). Raises fmt.FormatError naming ``what`` for anything but a regular file;
    FileNotFoundError and other OSError (EACCES, EIO) pass through.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise fmt.FormatError(f"{what} is a symlink (not followed)") from None
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.EWOULDBLOCK):
            raise fmt.FormatError(f"{what} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fmt.FormatError(f"{what} is not a regular file")
        if flags & os.O_ACCMODE == os.O_RDONLY:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class BackingConfig:
    """Per-backing-dir settings, fixed when the directory is first mounted.

    The block size is also in every data file's header (the authority for reading); the
    config holds the value used to compute sizes in directory listings without reading
    each file's header.
    """

    block_size: int = fmt.DEFAULT_BLOCK_SIZE
    format_version: int = fmt.FORMAT_VERSION
    #: names, symlink targets and user.* xattr names encrypted (docs/FORMAT.md, "Encrypted
    #: names"); chosen when the backing dir is first used, never switched afterwards
    encrypt_names: bool = False


def config_json(config: BackingConfig) -> bytes:
    """config.json for ``config`` (encrypt_names only when set: older dirs stay as they
    were, byte for byte)."""
    raw: dict = {"format_version": config.format_version, "block_size": config.block_size}
    if config.encrypt_names:
        raw["encrypt_names"] = True
    return json.dumps(raw, indent=1).encode() + b"\n"


def control_path(backing: bytes, *parts: str) -> bytes:
    return os.path.join(backing, CONTROL_DIR, *(p.encode() for p in parts))


def open_backing(backing: str | bytes) -> tuple[bytes, BackingConfig]:
    """Check a backing directory, create its control directory, and read its config.

    Everything in ``.encfs`` is checked before a mount uses it: anyone who can write to the
    backing dir can plant a symlink, a FIFO or a directory there, and the mount (running as
    root, maybe) must refuse with one clear line instead of following, hanging or crashing.
    """
    root = os.fsencode(os.path.abspath(backing))
    if not os.path.exists(root):
        raise BackingError(f"backing directory {printable(root)} does not exist")
    if not os.path.isdir(root):
        raise BackingError(f"backing path {printable(root)} is not a directory")
    ctl = control_path(root)
    try:
        for d in (ctl, os.path.join(ctl, TMP_DIR.encode()), os.path.join(ctl, b"journal")):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                raise BackingError(f"{printable(d)} is not a directory (a symlink or a "
                                   "file was put in its place); remove it")
    except OSError as e:
        raise BackingError(f"cannot create {printable(ctl)}: {e.strerror}") from None
    for name in (LOCK_NAME, DIRTY_NAME, CONFIG_NAME, "mount.log"):
        path = control_path(root, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise BackingError(f"cannot check {printable(path)}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise BackingError(f"{printable(path)} is not a regular file (a symlink, "
                               "directory or special file was put in its place); remove it")
    cfg_path = control_path(root, CONFIG_NAME)
    try:
        config = read_config(cfg_path)
    except FileNotFoundError:
        config = BackingConfig()
        write_file_atomic(root, cfg_path, config_json(config))
    except OSError as e:
        raise BackingError(f"cannot read {printable(cfg_path)}: {e.strerror}") from None
    except fmt.FormatError as e:
        raise BackingError(f"{printable(cfg_path)} is damaged ({e}); "
                           "restore it or run encfs fsck") from None
    return root, config


def read_config(cfg_path: bytes) -> BackingConfig:
    """Parse ``config.json``; fmt.FormatError for anything but the documented object."""
    fd = open_regular(cfg_path, what="config.json")
    try:
        raw_bytes = os.read(fd, CONFIG_MAX + 1)
    finally:
        os.close(fd)
    if len(raw_bytes) > CONFIG_MAX:
        raise fmt.FormatError(f"larger than {CONFIG_MAX} bytes")
    try:
        raw = json.loads(raw_bytes)
    except (ValueError, RecursionError):
        raise fmt.FormatError("not valid JSON") from None
    if not isinstance(raw, dict):
        raise fmt.FormatError("not a JSON object")
    values = {}
    for field in ("format_version", "block_size"):
        v = raw.get(field)
        if type(v) is not int:
            raise fmt.FormatError(f"{field} is missing or not an integer")
        values[field] = v
    if values["format_version"] != fmt.FORMAT_VERSION:
        raise fmt.FormatError(f"unsupported format_version {values['format_version']}")
    if not 0 < values["block_size"] <= 1 << fmt.MAX_BLOCK_SHIFT:
        raise fmt.FormatError(f"unsupported block size {values['block_size']}")
    fmt.check_block_size(values["block_size"])
    encrypt_names = raw.get("encrypt_names", False)
    if type(encrypt_names) is not bool:
        raise fmt.FormatError("encrypt_names is not true or false")
    return BackingConfig(block_size=values["block_size"],
                         format_version=values["format_version"], encrypt_names=encrypt_names)


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
    """The sidecar of a backing data path (the name layer decides: encfs/names.py)."""
    return nm.sidecar_of(data_path)


def read_sidecar(data_path: bytes) -> fmt.KeyRecord:
    """The key record of a data file; FileNotFoundError when it has no sidecar,
    fmt.FormatError when it is damaged or not a regular file (never followed, never a
    blocking open of a FIFO)."""
    return read_sidecar_file(sidecar_path(data_path))


def read_sidecar_file(side: bytes) -> fmt.KeyRecord:
    """The key record in the sidecar file ``side`` (see read_sidecar)."""
    fd = open_regular(side, what="sidecar")
    try:
        data = os.pread(fd, fmt.SIDECAR_SIZE + 1, 0)
    finally:
        os.close(fd)
    return fmt.decode_sidecar(data)


def write_sidecar(backing: bytes, data_path: bytes, rec: fmt.KeyRecord,
                  uid: int | None = None, gid: int | None = None, mode: int = 0o600,
                  durable: bool = True, beside_new_file: bool = False,
                  spare: tuple[int, bytes] | None = None) -> None:
    """Put a new sidecar in place atomically (complete before it becomes visible).

    ``durable=False`` skips the fsync: the mount makes a new file's sidecar durable when
    the file itself is fsynced (`fsync_sidecar`), as POSIX promises nothing before that.

    ``beside_new_file``: the data file was just created empty, so the sidecar is written
    straight under its name (one file creation, no rename); a crash in the middle leaves
    a torn sidecar beside an empty file, which the mount replaces with a new key. An
    existing (orphan) sidecar there falls back to the atomic temp + rename.

    ``spare``: an open empty file from `spares.SparePool` (mode 0600) that becomes the
    sidecar: filled, then renamed into place, replacing an orphan sidecar if there is one.
    """
    if spare is not None:
        fd, spare_path = spare
        try:
            _fill_sidecar(fd, rec, uid, gid, mode, durable, chmod=mode != 0o600)
            os.rename(spare_path, sidecar_path(data_path))
        except BaseException:
            try:
                os.unlink(spare_path)
            except OSError:
                pass
            raise
        return
    if beside_new_file:
        try:
            fd = os.open(sidecar_path(data_path),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except FileExistsError:
            pass
        else:
            _fill_sidecar(fd, rec, uid, gid, mode, durable)
            return
    tmp = tmp_path(backing)
    _fill_sidecar(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode),
                  rec, uid, gid, mode, durable)
    try:
        os.rename(tmp, sidecar_path(data_path))
    except BaseException:
        os.unlink(tmp)
        raise


def _fill_sidecar(fd: int, rec: fmt.KeyRecord, uid: int | None, gid: int | None, mode: int,
                  durable: bool, chmod: bool = False) -> None:
    """Write a new sidecar's content into ``fd``, give it its owner (and ``mode`` when
    ``chmod`` or after a chown), and close it."""
    try:
        os.write(fd, fmt.encode_sidecar(rec))
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
        if uid is not None or chmod:
            os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_sidecar(data_path: bytes) -> None:
    try:
        fd = os.open(sidecar_path(data_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Backing entries the mount never shows as themselves: sidecars, long-name files,
    and the control dir at the root (encfs/names.py classifies)."""
    return nm.classify(parent_is_root, name) in (nm.Kind.SIDECAR, nm.Kind.LONG_NAME,
                                                 nm.Kind.CONTROL)


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
SHARED_HOLDER = "shared"  # what shared mounts write into the lock
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
        self._acquire(shared=False)

    def acquire_shared(self) -> bool:
        """A shared mount's claim (encfs/sharedmount.py): any number of shared holders,
        on any host; never together with an exclusive one. True if there was no other
        holder at all (then what earlier mounts left is garbage)."""
        return self._acquire(shared=True)

    def _acquire(self, shared: bool) -> bool:
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise BackingError(f"cannot open the mount lock {printable(self.path)}: "
                               f"{_lock_reason(e)}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BackingError(f"the mount lock {printable(self.path)} is not a regular "
                                   "file; remove it")
            alone = False
            try:
                if shared:
                    # Alone if it can be had exclusively; then down to shared, which cannot
                    # fail against other shared holders. (Never the other way up: a
                    # failed LOCK_NB upgrade of a flock drops the lock that was held.)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        alone = True
                    except BlockingIOError:
                        pass
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                else:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                if holder == SHARED_HOLDER:
                    raise BackingInUse(f"{printable(self.backing)} is in use by encfs mounts "
                                       "with --shared-backing: mount it with --shared-backing "
                                       "too, or wait until they are unmounted") from None
                holder = holder if holder.isdigit() else "?"
                if shared:
                    raise BackingInUse(
                        f"{printable(self.backing)} is already in use by another encfs "
                        f"process (pid {holder}) mounted without --shared-backing: one mount "
                        "per backing directory unless every mount is shared") from None
                raise BackingInUse(f"{printable(self.backing)} is already in use by another "
                                   f"encfs process (pid {holder}): one mount per backing "
                                   "directory") from None
            # Shared holders are many, on many hosts: they all write the same word (each
            # names itself in its own area, encfs/sharedmount.py).
            os.ftruncate(fd, 0)
            os.pwrite(fd, (SHARED_HOLDER if shared else str(os.getpid())).encode() + b"\n", 0)
        except OSError as e:
            os.close(fd)
            raise BackingError(f"cannot use the mount lock {printable(self.path)}: "
                               f"{e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return alone

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "it is a symlink (not followed); remove it"
    if e.errno == errno.EISDIR:
        return "it is a directory; remove it"
    return e.strerror or str(e)


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
    except IsADirectoryError:  # planted in its place; open_backing refuses it next time
        pass
