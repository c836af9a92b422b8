"""The FUSE frontend: a `pyfuse3.Operations` subclass mapping requests onto the backing dir.

Content requests (read, write, truncate) go to the content executor (encfs/executor.py),
which plans them with encfs/content.py and runs them under each file's reader/writer lock;
that lock, not the absence of awaits, keeps a block's read-modify-write whole when
requests overlap. Key loading awaits the KMS, serialised per inode by ``Node.key_lock``,
before any backing change it guards. docs/ARCHITECTURE.md shows how the modules fit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from typing import Any, Callable

import pyfuse3
import trio

from kms.client import KmsError

from . import backing as bk
from . import format as fmt
from . import namekey
from . import names as nm
from . import xattrs as xa
from .cipher import BlockAuthError, BlockCipher
from .executor import ContentExecutor, RWLock
from .inodes import InodeTable
from .longpath import LongPaths
from .namecrypt import ROOT_DIR_ID, NameCipher, NameDecryptError, target_fits, xattr_name_fits
from .journal import Journal
from .keys import KEY_ERRNO, KeyError_, KeyManager
from .renameat2 import renameat2
from .reqstats import RequestStats
from .sharedlock import ContentLocks, NameLocks
from .sharedmount import names_lock_path, recover_dead_areas
from .spares import SparePool
from .trash import Trash, backing_discards

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
CAPABILITY_XATTR = b"security.capability"


class Node:
    """What the filesystem knows about one inode the kernel holds.

    ``links`` are (parent inode, name) pairs: the path is derived by walking up, so renaming
    a directory needs no update of its descendants.
    """

    __slots__ = ("ino", "generation", "kind", "dead", "links", "lookups", "opens", "fd",
                 "cipher", "xattr", "record", "key_lock", "block_size", "dir_dirty", "no_caps",
                 "content_lock", "dir_id")

    def __init__(self, ino: int):
        self.ino = ino
        # identity, kept by encfs/inodes.py: the generation the kernel knows this object
        # by, its file type, and whether it lost its last name (its number may come back)
        self.generation = 0
        self.kind = 0
        self.dead = False
        self.links: set[tuple[int, bytes]] = set()
        self.lookups = 0
        self.opens = 0
        self.fd: int | None = None
        self.cipher: BlockCipher | None = None
        self.xattr: xa.XattrCipher | None = None
        self.record: fmt.KeyRecord | None = None
        self.key_lock = trio.Lock()
        self.block_size: int | None = None
        self.dir_dirty = False  # a directory entry of this file is not yet fsynced
        self.no_caps = False  # the backing file has no security.capability xattr
        self.content_lock = RWLock()  # reads share it; writes and truncates hold it alone
        self.dir_id: bytes | None = None  # encrypted names: a directory's id, once read


def _open_backing(path: bytes, flags: int, mode: int = 0o600) -> int:
    """Open a backing data file without atime updates: our own reads (headers, the
    read-modify-write of partial blocks) must not look like user reads. `EncFS.read` lets
    real user reads update atime. O_NOATIME needs ownership or CAP_FOWNER; without either
    the open proceeds without it."""
    try:
        return os.open(path, flags | os.O_NOATIME, mode)
    except PermissionError:
        return os.open(path, flags, mode)


def _sidecar_mode(mode: int) -> int:
    """A sidecar is readable by whoever may read its data file, and writable only by the
    owner: the wrapped DEK it holds is useless without the KMS's permission, and another
    user who serves the files (`encfs mount --user`) needs to read it."""
    return stat.S_IMODE(mode) & 0o644


def _mirror_mode(data_path: bytes, mode: int) -> None:
    os.chmod(bk.sidecar_path(data_path), _sidecar_mode(mode), follow_symlinks=False)


#: relatime: atime is updated when it is not newer than mtime or ctime, or a day old.
_RELATIME_NS = 24 * 3600 * 10**9


def _atime_due(st: os.stat_result) -> bool:
    return (st.st_atime_ns <= st.st_mtime_ns or st.st_atime_ns <= st.st_ctime_ns
            or time.time_ns() - st.st_atime_ns >= _RELATIME_NS)


def _fuse_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OSError from the backing dir into the same errno for the caller, and count the
    request and its latency in the mount's `RequestStats` (`encfs status`)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: "EncFS", *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        finally:
            self.stats.record(op, time.perf_counter_ns() - t0)

    return wrapper


#: Kernel cache settings. Without --shared-backing the mount is the only writer of its
#: backing dir (the mount lock refuses a second mount; docs/CONSISTENCY.md "Kernel caches"),
#: so every change reaches the kernel through the mount itself, which keeps its caches in
#: step as a local filesystem's: entries (missing names too) and attributes are trusted for
#: an hour instead of gocryptfs's 1 s. (What reads and writes change without a reply
#: saying so, the kernel drops itself: atime after each READ it sends, st_blocks at each
#: close under the writeback cache; tests/test_posix_mmap_cache.py.) Also the writeback cache (the
#: kernel merges small writes into pages and up to 1 MiB requests) and keep_cache (page
#: cache survives reopen).
DEFAULT_CACHE_TIMEOUT = 3600.0


class EncFS(pyfuse3.Operations):
    enable_writeback_cache = True
    # POSIX ACLs are passed through to the backing files, so the kernel enforces them under
    # default_permissions exactly as on the backing filesystem (see `mount_options`).
    enable_acl = True
    #: default_permissions: the kernel checks modes, owners and ACLs before each request
    kernel_permissions = True

    def __init__(self, backing: bytes, config: bk.BackingConfig, keys: KeyManager,
                 mountpoint: str = "", cache_timeout: float = DEFAULT_CACHE_TIMEOUT,
                 shared_backing: bool = False, content: ContentExecutor | None = None,
                 spare_dir: bytes | None = None):
        """``content``: the content executor, with the journal it records into (by
        default one over this backing dir's journal); ``spare_dir``: where spare
        sidecars are made (a shared mount's own area)."""
        super().__init__()
        self.backing = backing
        self.config = config
        self.keys = keys
        self.mountpoint = mountpoint
        # --shared-backing: other writers touch the backing dir, so the kernel must not
        # trust anything it cached: no timeouts, no writeback cache (the kernel's size and
        # mtime would override the backing's), no page cache kept across opens.
        self.timeout = 0.0 if shared_backing else cache_timeout
        #: nobody else writes the backing dir: what the kernel cached stays true until this
        #: mount changes it (the optimisations that depend on it test this one flag)
        self.exclusive = not shared_backing
        self.enable_writeback_cache = not shared_backing
        self.keep_cache = not shared_backing
        self.content = content or ContentExecutor(Journal(bk.control_path(backing)))
        self.journal = self.content.journal  # also records renames
        self.spares = SparePool(spare_dir or bk.control_path(backing, bk.TMP_DIR))  # started by the mount
        # Removed files freed by a thread where freeing waits for discards (started in init;
        # exclusive mounts only: with --shared-backing others' tools own the layout of tmp/)
        self.trash = Trash(bk.control_path(backing, bk.TMP_DIR),
                           enabled=not shared_backing and backing_discards(backing))
        #: --shared-backing: locks that hold across hosts (encfs/sharedlock.py, docs/SHARED.md)
        self.name_locks = NameLocks(names_lock_path(backing), backing) if shared_backing else None
        self.content_locks = ContentLocks() if shared_backing else None
        self._dir_keys: dict[int, str | None] = {}  # directory inode -> its own CMK
        self.max_write_seen = 0  # the largest write request so far (root control xattr)
        root_st = os.lstat(backing)
        self.root_ino, self.backing_dev = root_st.st_ino, root_st.st_dev
        self.nodes = InodeTable(self.root_ino, Node)  # node ids and generations
        self.long_paths = LongPaths()  # backing paths past PATH_MAX
        self.dir_handles: dict[int, tuple[int, list[bytes]]] = {}
        self._next_dh = 1
        self.stats = RequestStats()  # per-request counts and latencies (encfs status)
        #: encrypted names (config.encrypt_names): the name cipher, set by `load_names`
        #: before the first request, and the CMK of the name key (revocation hides names)
        self.names: NameCipher | None = None
        self.name_key_id: str | None = None

    def mount_options(self, options: set[str], explicit: set[str],
                      serving_user: bool) -> set[str]:
        """The mount options to use, given those chosen so far (``options``) and those the
        user gave (``explicit``). The kernel's permission checks (``default_permissions``,
        which ``FUSE_POSIX_ACL`` implies) cost a GETATTR of the directory after every
        create, unlink, rename, mkdir or rmdir in it (the kernel drops the directory's
        attributes and needs its mode for the next check). They are left out where only
        root can reach the mount: the daemon is root, serves as root (no ``--user``), and
        neither ``allow_other`` nor ``allow_root`` nor ``default_permissions`` was asked
        for; then the backing filesystem's answers to the daemon are root's answers.
        ACLs are still set and read as xattrs (setfacl/getfacl), stored on the backing
        files, and enforced there (root passes them, as on any filesystem)."""
        if (self.as_root and not serving_user
                and not {"allow_other", "allow_root", "default_permissions"} & explicit):
            self.kernel_permissions = False
            self.enable_acl = False
            return options - {"default_permissions"}
        return options

    def init(self) -> None:
        """The kernel's INIT was answered: the daemon has its final identity (after
        `encfs mount --user`), so its threads start now."""
        self.trash.start()

    async def load_names(self) -> None:
        """Unwrap the backing dir's name key (encrypted names) through the key manager, so
        that its CMK is rechecked like any file's."""
        rec = namekey.read_record(self.backing)
        if rec is None:
            raise bk.BackingError("the name key is missing")
        dek = await self.keys.unwrap(rec, "the name key")
        self.names = NameCipher(dek)
        self.name_key_id = rec.key_id

    # The daemon's own ids, asked each time: `encfs mount --user` drops from root to the
    # user after the mount is made, and nothing has to tell the filesystem.
    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @property
    def euid(self) -> int:
        return os.geteuid()

    @property
    def egid(self) -> int:
        return os.getegid()

    # --- paths and nodes ----------------------------------------------------------------

    def _path(self, ino: int) -> bytes:
        parts = []
        while ino != ROOT:
            node = self.nodes.get(ino)
            if node is None or not node.links:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if len(node.links) == 1:
                ino, name = next(iter(node.links))
            else:
                ino, name = self._live_link(node)
            parts.append((ino, name))
        path = self.backing
        if self.names is None:
            for _, name in reversed(parts):
                path = nm.data_path(path, name)  # the name layer: long names are hashed
        else:
            for parent, name in reversed(parts):
                path = nm.data_path(path, name, self._dir_names(parent, path))
        return self.long_paths.short(path)

    def _dir_names(self, ino: int, path: bytes) -> nm.DirNames | None:
        """How the names in directory ``ino`` (backing ``path``) are stored: None when names
        are not encrypted; else its id, read once from its backing ``user.encfs.dirid``
        (made now if missing: a directory made outside the mount, or a crash right after
        mkdir). Fails with the name key's errno once its CMK is revoked."""
        if self.names is None:
            return None
        err = self.keys.revoked.get(self.name_key_id)
        if err is not None:
            raise pyfuse3.FUSEError(err)
        if ino == ROOT:
            return nm.DirNames(self.names, ROOT_DIR_ID)
        node = self.nodes.get(ino)
        if node is not None and node.dir_id is not None:
            return nm.DirNames(self.names, node.dir_id)
        short = self.long_paths.short(path)
        dir_id = nm.read_dir_id(short)
        if dir_id is None:
            try:
                os.setxattr(short, nm.DIR_ID_XATTR, os.urandom(len(ROOT_DIR_ID)),
                            os.XATTR_CREATE, follow_symlinks=False)
            except FileExistsError:
                pass
            except OSError as e:
                log.error("%s: cannot give the directory an id for its names: %s",
                          self._display(path), e.strerror)
                raise pyfuse3.FUSEError(errno.EIO) from None
            dir_id = nm.read_dir_id(short)
            if dir_id is None:
                log.error("%s: damaged directory id", self._display(path))
                raise pyfuse3.FUSEError(errno.EIO)
        if node is not None:
            node.dir_id = dir_id
        return nm.DirNames(self.names, dir_id)

    def _map(self, parent: int, parent_path: bytes, name: bytes) -> bytes:
        """The backing path of ``name`` in directory ``parent`` (backing ``parent_path``)."""
        return nm.data_path(parent_path, name, self._dir_names(parent, parent_path))

    def _live_link(self, node: Node) -> tuple[int, bytes]:
        """One of several names of a node that still leads to it; drops names that no
        longer do (changed behind our back, with --shared-backing)."""
        for parent, name in sorted(node.links):
            try:
                st = os.lstat(self.long_paths.short(self._map(parent, self._path(parent), name)))
            except (OSError, pyfuse3.FUSEError):
                st = None
            if st is not None and self._ino(st) == node.ino:
                return parent, name
            node.links.discard((parent, name))
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _child(self, parent: int, name: bytes) -> bytes:
        """Backing path of an existing name (the name layer maps it)."""
        try:
            nm.check_name(parent == ROOT, name, creating=False)
        except nm.NameError_ as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return self.long_paths.short(self._map(parent, self._path(parent), name))

    def _new_name(self, parent: int, name: bytes) -> bytes:
        """Backing path for a name being created; refuses the control dir's name and names
        over NAME_MAX. A long name also needs `_long_name_first` before its entry is made."""
        try:
            nm.check_name(parent == ROOT, name, creating=True)
        except nm.NameError_ as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return self.long_paths.short(self._map(parent, self._path(parent), name))

    def _long_name_first(self, path: bytes, parent: int, name: bytes, ctx=None) -> bool:
        """Before an entry is created or renamed to backing ``path`` (``name`` in directory
        ``parent``): make the long-name file of ``name`` durable, if the name is long. True
        if one was written (for `_long_name_undo` when the operation then fails)."""
        long_name = nm.long_name_of(path)
        if long_name is None:
            return False  # a short name
        enc = self._dir_names(parent, os.path.dirname(path))
        if nm.read_long_name(path, enc) == name:
            return False  # the file is there (its content is fixed)
        stored = nm.backing_names(b"", name, enc).stored  # the encrypted name, if encrypted
        bk.write_file_atomic(self.backing, long_name, stored, mode=0o644)  # fsynced, renamed
        if ctx is not None and self.as_root and (ctx.uid, ctx.gid) != (self.euid, self.egid):
            os.chown(long_name, ctx.uid, ctx.gid, follow_symlinks=False)
        return True

    @staticmethod
    def _long_name_undo(path: bytes, written: bool) -> None:
        """The operation that needed the long-name file failed: remove it again, unless an
        entry under that name exists (then it is that entry's)."""
        if written and not os.path.lexists(path):
            nm.remove_long_name(path)

    def _ino(self, st: os.stat_result) -> int:
        return self.nodes.node_id(st)

    def _remember(self, st: os.stat_result, parent: int, name: bytes) -> Node:
        """Count one kernel reference to the inode behind ``parent/name``."""
        return self.nodes.remember(st, parent, name)

    def _drop_link(self, parent: int, name: bytes, ino: int, last: bool = False) -> None:
        """``parent/name`` is gone; ``last``: it was the object's last name."""
        self.nodes.unlinked(parent, name, ino, last)

    def _display(self, path: bytes) -> str:
        """The plaintext path of a backing path, for log lines."""
        rel = os.path.relpath(path, self.backing)
        return bk.printable(os.path.join(os.fsencode(self.mountpoint), rel))

    def _attr(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        node = self.nodes.get(ino)
        e.generation = node.generation if node is not None else 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        if stat.S_ISREG(st.st_mode):
            bs = (node.block_size if node and node.block_size else self.config.block_size)
            e.st_size = fmt.plain_size(st.st_size, bs)
        elif self.names is not None and stat.S_ISLNK(st.st_mode):
            e.st_size = self._link_size(ino, st.st_size)
        else:
            e.st_size = st.st_size
        e.st_blksize = 4096
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _link_size(self, ino: int, backing_size: int) -> int:
        """A symlink's size is its target's length: the plaintext's, with encrypted names."""
        try:
            path = self._path(ino)
            return len(self._plain_target(path, os.readlink(path)))
        except (OSError, pyfuse3.FUSEError):
            return backing_size

    def _stat(self, ino: int) -> os.stat_result:
        node = self.nodes.get(ino)
        if node is not None and node.fd is not None:
            return os.fstat(node.fd)
        return os.lstat(self._path(ino))

    def _chown_new(self, path: bytes, ctx: pyfuse3.RequestContext, fd: int | None = None,
                   mode: int | None = None) -> None:
        """New objects belong to the caller. Set explicitly: the daemon never switches uid.

        In a set-group-id directory the group the backing filesystem gave (the directory's)
        stays, as on ext4. chown clears set-uid/set-gid bits, so a requested mode with them
        is put back (the kernel already decided the caller may have them).
        """
        if not self.as_root or (ctx.uid == self.euid and ctx.gid == self.egid):
            return  # created by us for ourselves: already right, save two syscalls
        gid = -1 if os.stat(os.path.dirname(path)).st_mode & stat.S_ISGID else ctx.gid
        if fd is not None:
            os.fchown(fd, ctx.uid, gid)
        else:
            os.chown(path, ctx.uid, gid, follow_symlinks=False)
        if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(mode))
            elif not stat.S_ISLNK(mode):
                os.chmod(path, stat.S_IMODE(mode), follow_symlinks=False)

    # --- keys ---------------------------------------------------------------------------

    async def _load_key(self, node: Node, path: bytes, fd: int, ctx_uid: int = 0) -> None:
        """Give an open node its block cipher. Shared mode: a broken pair may be one that
        a dead mount on another host left half changed; recover dead mounts' areas and
        try once more before answering EIO."""
        if self.name_locks is None or not path:
            return await self._load_key_once(node, path, fd, ctx_uid)
        try:
            return await self._load_key_once(node, path, fd, ctx_uid)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.EIO or not await self._recover_dead_mounts():
                raise
        return await self._load_key_once(node, path, fd, ctx_uid)

    async def _load_key_once(self, node: Node, path: bytes, fd: int, ctx_uid: int = 0) -> None:
        """Give an open node its block cipher: header + sidecar + KMS unwrap."""
        async with node.key_lock, self._pair_guard(path, fd):
            if node.cipher is not None:
                return
            try:
                header = bk.read_header(fd)
            except fmt.FormatError as e:
                log.error("%s (backing %s): bad data file header: %s",
                          self._display(path), bk.printable(path), e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            try:
                record = bk.read_sidecar(path)
            except FileNotFoundError:
                record = None
            except (fmt.FormatError, OSError) as e:
                if header is None and os.fstat(fd).st_size == 0:
                    # Torn while both were being created: the empty file gets a new key.
                    log.warning("%s (backing %s): replacing the damaged sidecar of an "
                                "empty file: %s", self._display(path), bk.printable(path), e)
                    record = None
                else:
                    log.error("%s (backing %s): unreadable sidecar: %s",
                              self._display(path), bk.printable(path), e)
                    raise pyfuse3.FUSEError(errno.EIO) from None
            if record is None:
                if header is not None or os.fstat(fd).st_size > 0:
                    log.error("%s (backing %s): data file has no sidecar %s",
                              self._display(path), bk.printable(path),
                              bk.printable(bk.sidecar_path(path)))
                    raise pyfuse3.FUSEError(errno.EIO)
                # An empty file without a key (made outside the mount): give it one now.
                parent = next(iter(node.links))[0] if node.links else ROOT
                record, dek = await self._new_key(parent)
                st = os.fstat(fd)
                bk.write_sidecar(self.backing, path, record,
                                 *((st.st_uid, st.st_gid) if self.as_root else ()),
                                 mode=_sidecar_mode(st.st_mode), durable=False)
                node.dir_dirty = True
            else:
                if header is not None and header.file_id != record.file_id:
                    log.error("%s (backing %s): sidecar belongs to another file "
                              "(file id mismatch)", self._display(path), bk.printable(path))
                    raise pyfuse3.FUSEError(errno.EIO)
                try:
                    dek = await self.keys.unwrap(
                        record, f"{self._display(path)} (backing {bk.printable(path)})")
                except KeyError_ as e:
                    raise pyfuse3.FUSEError(e.errno) from None
            node.block_size = header.block_size if header else self.config.block_size
            node.record = record
            node.cipher = BlockCipher(dek, record.file_id, node.block_size)
            node.xattr = xa.XattrCipher(dek, record.file_id)

    def _check_key(self, node: Node) -> None:
        """Refuse access to a file whose CMK the KMS no longer lets us use."""
        err = self.keys.revoked.get(node.record.key_id) if node.record else None
        if err is not None:
            raise pyfuse3.FUSEError(err)

    def open_key_ids(self) -> set[str]:
        ids = {n.record.key_id for n in self.nodes.values()
               if n.cipher is not None and n.record is not None}
        if self.name_key_id is not None:
            ids.add(self.name_key_id)  # the name key is in use as long as the mount is
        return ids

    async def drop_cached_pages(self, key_id: str) -> None:
        """After a CMK is revoked, the kernel must not serve its files from the page cache.
        invalidate_inode can block under writeback caching, so it runs in a thread."""
        for node in list(self.nodes.values()):
            if node.record is not None and node.record.key_id == key_id:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, node.ino, False)

    async def _new_key(self, parent: int) -> tuple[fmt.KeyRecord, bytes]:
        try:
            return await self.keys.new_file_key(self.key_for_new_file(parent))
        except KeyError_ as e:
            raise pyfuse3.FUSEError(e.errno) from None

    # --- content ------------------------------------------------------------------------

    def _bad_block(self, node: Node, e: BlockAuthError) -> pyfuse3.FUSEError:
        self._log_bad_block(node, e.block_no, e.reason)
        return pyfuse3.FUSEError(errno.EIO)

    def _log_bad_block(self, node: Node, block_no: int, reason: str) -> None:
        path = self._any_path(node)
        log.error("%s (backing %s): block %d: %s", self._display(path) if path else
                  f"inode {node.ino}", bk.printable(path) if path else "unlinked",
                  block_no, reason)

    def _any_path(self, node: Node) -> bytes | None:
        try:
            return self._path(node.ino)
        except pyfuse3.FUSEError:
            return None

    def _journal_path(self, node: Node) -> Callable[[], bytes | None]:
        """The backing path the journal names for a change of ``node`` (None once the
        file has no name: nobody could find it after a crash)."""
        return lambda: self._path(node.ino) if node.links else None

    async def _truncate(self, node: Node, new: int) -> None:
        try:
            if self.content_locks is not None:
                async with self._block_lock(node, new, 0, write=True):
                    return await self.content.truncate(node, new, self._journal_path(node))
            await self.content.truncate(node, new, self._journal_path(node))
        except BlockAuthError as e:
            raise self._bad_block(node, e) from None

    # --- open files ---------------------------------------------------------------------

    async def _open_node(self, node: Node, path: bytes) -> None:
        """Open the backing data file of a node once and load its key (refcounted)."""
        if node.fd is None:
            # Always read-write and never O_APPEND: writeback caching makes the kernel
            # read through write-only handles and pick append offsets itself.
            try:
                node.fd = _open_backing(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except PermissionError:
                # Not ours to write (e.g. --user serving another user's files): reads work,
                # writes fail with EBADF from the backing fd, as for a read-only file.
                node.fd = _open_backing(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        node.opens += 1
        try:
            await self._load_key(node, path, node.fd)
            self._check_key(node)
        except BaseException:
            self._close_node(node)
            raise

    def _close_node(self, node: Node) -> None:
        node.opens -= 1
        if node.opens == 0:
            if node.fd is not None:
                os.close(node.fd)
            node.fd = None
            node.cipher = None  # the key cache keeps the DEK for the grace period only
            node.xattr = None
            self.nodes.released(node)

    # --- --shared-backing: locks across hosts (encfs/sharedlock.py, docs/SHARED.md) ------

    def _pair_guard(self, path: bytes, fd: int):
        """Shared mode, while an open reads a file's pair: hold its name's lock, and make
        sure the name still leads to the opened data file (else it was renamed or removed
        meanwhile: ENOENT, as if the open had come a moment later). Else nothing."""
        if self.name_locks is None or not path:
            return contextlib.nullcontext()
        return self._pair_held(path, fd)

    @contextlib.asynccontextmanager
    async def _pair_held(self, path: bytes, fd: int):
        async with self.name_locks.hold([path]):
            try:
                same = os.lstat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                raise pyfuse3.FUSEError(errno.ENOENT)
            yield

    async def _recover_dead_mounts(self) -> bool:
        """Shared mode: recover the areas of mounts that died (on any host), as a mount
        does when it starts; True if there was one. Called where a half-done change
        shows (a pair without its sidecar, a block that does not authenticate), with no
        lock held: the replay takes every name lock."""
        done = await trio.to_thread.run_sync(recover_dead_areas, self.backing)
        for line in done:
            log.warning("recovered what a dead mount left: %s", line)
        return any(line.startswith("recovered the area") for line in done)

    def _block_lock(self, node: Node, off: int, length: int, write: bool):
        """Shared mode: the blocks a request reads or rewrites, locked on the backing data
        file. A write that may move the end of file (or re-pad the last block) and a
        truncate lock from the old last block on, to the end."""
        bs = node.block_size or self.config.block_size
        first = off // bs
        if not write:
            return self.content_locks.read(node.ino, node.fd, first,
                                           (off + max(length, 1) - 1) // bs)
        size = fmt.plain_size(os.fstat(node.fd).st_size, bs)
        if length == 0 or off + length >= size:
            return self.content_locks.write(node.ino, node.fd, min(first, size // bs), None)
        return self.content_locks.write(node.ino, node.fd, first, (off + length - 1) // bs)

    # --- handlers -----------------------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        if name == b".":
            st = os.lstat(self._path(parent_inode))
            self.nodes[parent_inode].lookups += 1  # the kernel counts this reply too
            return self._attr(st, parent_inode)
        path = self._child(parent_inode, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not self.timeout:
                raise
            # A negative entry the kernel may cache like a positive one: build tools and
            # git look up the same missing names again and again.
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = self.timeout
            return e
        node = self._remember(st, parent_inode, name)
        return self._attr(st, node.ino)

    async def forget(self, inode_list) -> None:
        for ino, nlookup in inode_list:
            self.nodes.forget(ino, nlookup)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext):
        return self._attr(self._stat(inode), inode)

    @_fuse_errors
    async def setattr(self, inode: int, attr, fields, fh, ctx):
        node = self.nodes.get(inode)
        # An open file that was unlinked has no path left; its fd still works.
        unlinked = node is not None and node.fd is not None and not node.links
        path = None if unlinked else self._path(inode)
        if fields.update_size:
            await self._truncate_inode(inode, path, attr.st_size)
        if fields.update_mode:
            if unlinked:
                os.fchmod(node.fd, stat.S_IMODE(attr.st_mode))
            elif not stat.S_ISLNK(os.lstat(path).st_mode):  # Linux has no lchmod
                os.chmod(path, stat.S_IMODE(attr.st_mode))
                if os.path.lexists(bk.sidecar_path(path)):
                    _mirror_mode(path, attr.st_mode)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if unlinked:
                os.fchown(node.fd, uid, gid)
            else:
                os.chown(path, uid, gid, follow_symlinks=False)
                if os.path.lexists(bk.sidecar_path(path)):
                    os.chown(bk.sidecar_path(path), uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(node.fd) if unlinked else os.lstat(path)
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            if unlinked:
                os.utime(node.fd, ns=times)
            else:
                os.utime(path, ns=times, follow_symlinks=False)
        return self._attr(self._stat(inode), inode)

    async def _truncate_inode(self, inode: int, path: bytes | None, size: int) -> None:
        node = self.nodes.get(inode)
        if node is None:
            node = self.nodes[inode] = Node(inode)  # kernel-held inode we lost track of
        if path is not None and stat.S_ISDIR(os.lstat(path).st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        await self._open_node(node, path if node.fd is None else b"")
        try:
            await self._truncate(node, size)
        finally:
            self._close_node(node)

    # create, unlink, rename, link: with --shared-backing, under the lock of each name
    # they change, so that no other host sees or changes the pair meanwhile.
    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        if self.name_locks is None:
            return await self._create(parent_inode, name, mode, flags, ctx)
        async with self.name_locks.hold([self._new_name(parent_inode, name)]):
            return await self._create(parent_inode, name, mode, flags, ctx)

    async def _create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        self._new_name(parent_inode, name)  # refuse a bad name before asking the KMS
        record, dek = await self._new_key(parent_inode)
        path = self._new_name(parent_inode, name)  # again: the parent may have moved
        written = self._long_name_first(path, parent_inode, name, ctx)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = _open_backing(path, flags, stat.S_IMODE(mode))
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.trash.pending:
                    raise
                self.trash.drain()  # removed files not yet freed: free them, then retry
                fd = _open_backing(path, flags, stat.S_IMODE(mode))
        except BaseException:
            self._long_name_undo(path, written)
            raise
        try:
            self._chown_new(path, ctx, fd, mode)
            st = os.fstat(fd)
            owner = (st.st_uid, st.st_gid)
            bk.write_sidecar(self.backing, path, record,
                             *(owner if owner != (self.euid, self.egid) else ()),
                             mode=_sidecar_mode(st.st_mode), durable=False,
                             beside_new_file=True, spare=self.spares.take())
        except BaseException:
            os.close(fd)
            os.unlink(path)
            self._long_name_undo(path, written)
            raise
        st = os.fstat(fd)
        node = self._remember(st, parent_inode, name)
        if node.fd is not None:  # cannot happen for a new inode, but never leak an fd
            os.close(node.fd)
        node.fd = fd
        node.opens += 1
        node.record = record
        node.block_size = self.config.block_size
        node.cipher = BlockCipher(dek, record.file_id, node.block_size)
        node.xattr = xa.XattrCipher(dek, record.file_id)
        node.dir_dirty = True
        node.no_caps = True  # just created: the kernel's check before its first write is free
        return pyfuse3.FileInfo(fh=node.ino, keep_cache=self.keep_cache), self._attr(st, node.ino)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx):
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self._open_node(node, self._path(inode) if node.fd is None else b"")
        if flags & os.O_TRUNC:  # only if the kernel hands us O_TRUNC (atomic_o_trunc)
            try:
                await self._truncate(node, 0)
            except BaseException:
                self._close_node(node)
                raise
        # O_APPEND and O_DIRECT need nothing here: the backing fd is shared and never
        # O_APPEND (the kernel picks append offsets), and O_DIRECT requests reach `read` and
        # `write` like any other, just without the page cache.
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.keep_cache)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.nodes[fh]
        self._check_key(node)
        try:
            if self.content_locks is None:
                return await self.content.read(node, off, size, _atime_due)
            # Shared mode: reads take no lock first. A block that another host is
            # rewriting at this moment fails its tag; then read again under the block
            # locks, which wait for that write.
            try:
                return await self.content.read(node, off, size, _atime_due)
            except BlockAuthError:
                pass
            try:
                async with self._block_lock(node, off, size, write=False):
                    return await self.content.read(node, off, size, _atime_due)
            except BlockAuthError:
                if not await self._recover_dead_mounts():  # a dead host's torn write?
                    raise
            async with self._block_lock(node, off, size, write=False):
                return await self.content.read(node, off, size, _atime_due)
        except BlockAuthError as e:
            raise self._bad_block(node, e) from None

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if buf:
            node = self.nodes[fh]
            self._check_key(node)
            try:
                if self.content_locks is None:
                    await self.content.write(node, off, buf, self._journal_path(node))
                else:
                    async with self._block_lock(node, off, len(buf), write=True):
                        await self.content.write(node, off, buf, self._journal_path(node))
            except BlockAuthError as e:
                raise self._bad_block(node, e) from None
            if len(buf) > self.max_write_seen:
                self.max_write_seen = len(buf)
        return len(buf)

    async def flush(self, fh: int) -> None:
        # Nothing to do at close: the daemon buffers no writes, and the kernel writes its
        # dirty pages back before it would send FLUSH. ENOSYS makes the kernel stop sending
        # FLUSH at all (fc->no_flush): one round trip less for every close(2).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self.nodes[fh]
        (os.fdatasync if datasync else os.fsync)(node.fd)
        if node.dir_dirty:
            # New or renamed: the sidecar and the directory entries become durable now.
            if node.links:
                bk.fsync_sidecar(self._path(node.ino))
            for parent, _ in list(node.links):
                bk.fsync_dir(self._path(parent))
            node.dir_dirty = False

    async def release(self, fh: int) -> None:
        node = self.nodes.get(fh)
        if node is not None:
            self._close_node(node)

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        if self.name_locks is None:
            return await self._unlink(parent_inode, name, ctx)
        async with self.name_locks.hold([self._child(parent_inode, name)]):
            return await self._unlink(parent_inode, name, ctx)

    async def _unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        if not self._frees_blocks(st) or not self.trash.put(path):
            os.unlink(path)
        if stat.S_ISREG(st.st_mode):
            side = bk.sidecar_path(path)
            if st.st_nlink != 1 or not self.spares.recycle(side):
                # Its other links keep it (nothing freed), or the spare pool is full.
                if st.st_nlink != 1 or not self._trash_sidecar(side):
                    bk.remove_sidecar(path)
        nm.remove_long_name(path)  # last: until the entry is gone, its name must stay
        self._drop_link(parent_inode, name, self._ino(st),
                        last=stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1)

    def _frees_blocks(self, st: os.stat_result) -> bool:
        """Whether removing the object ``st`` describes frees its blocks now: a regular
        file with blocks, its last link, not held open (an open one keeps its blocks
        until its last close). Those go to the trash (encfs/trash.py)."""
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_blocks == 0
                or st.st_dev != self.backing_dev):  # a rename into tmp/ would be EXDEV
            return False
        node = self.nodes.get(self._ino(st))
        return node is None or node.fd is None

    def _trash_sidecar(self, side: bytes) -> bool:
        """Free a removed file's sidecar in the background; True when it is gone from its
        directory (or was not there)."""
        try:
            return self.trash.put(side)
        except FileNotFoundError:
            return True

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx):
        path = self._new_name(parent_inode, name)
        written = self._long_name_first(path, parent_inode, name, ctx)
        try:
            os.mkdir(path, stat.S_IMODE(mode))
        except BaseException:
            self._long_name_undo(path, written)
            raise
        dir_id = None
        if self.names is not None:
            # Its id before any child: a crash right after mkdir leaves an empty directory
            # without one, which `_dir_names` then gives one.
            dir_id = os.urandom(len(ROOT_DIR_ID))
            os.setxattr(path, nm.DIR_ID_XATTR, dir_id, os.XATTR_CREATE,
                        follow_symlinks=False)
        self._chown_new(path, ctx, mode=mode)
        st = os.lstat(path)
        node = self._remember(st, parent_inode, name)
        if dir_id is not None:
            node.dir_id = dir_id
        return self._attr(st, node.ino)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx) -> None:
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        if not self._rmdir_later(path, st):
            try:
                os.rmdir(path)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY or not self._remove_orphan_sidecars(path):
                    raise
                os.rmdir(path)
        self.long_paths.invalidate()
        nm.remove_long_name(path)
        self._drop_link(parent_inode, name, self._ino(st), last=True)

    def _rmdir_later(self, path: bytes, st: os.stat_result) -> bool:
        """Where freeing blocks waits for discards (the trash runs), an empty directory is
        taken out of its parent by a rename into tmp/ and removed there by the trash
        thread (an rmdir of a directory with its block allocated took 120-580 µs here).
        Its emptiness is checked by listing it first, which nothing can change meanwhile:
        the kernel holds the directory locked for the RMDIR, and nobody else writes the
        backing dir (exclusive mode). False: the caller removes it in place (also when it
        is not a directory, for rmdir's own errno)."""
        if (not self.exclusive or not self.trash.running or not stat.S_ISDIR(st.st_mode)
                or st.st_dev != self.backing_dev):
            return False
        node = self.nodes.get(self._ino(st))
        if node is not None and node.fd is not None:
            return False  # open (a cwd or a listing): removed in place, as before
        names = os.listdir(path)
        if names and not self._remove_orphan_sidecars(path, names):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        return self.trash.put(path)

    def _remove_orphan_sidecars(self, dirpath: bytes, names: list[bytes] | None = None) -> bool:
        """A directory that looks empty in the mount may hold sidecars or long-name files
        whose entries are gone (a crash between two steps). Remove those; True if nothing
        else is left. ``names``: its listing, if already made."""
        names = os.listdir(dirpath) if names is None else names
        orphans = nm.orphans(names)
        if len(orphans) != len(names):
            return False
        for n in orphans:
            os.unlink(os.path.join(dirpath, n))
        return True

    @_fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx) -> None:
        if self.name_locks is None:
            return await self._rename(parent_inode_old, name_old, parent_inode_new,
                                      name_new, flags, ctx)
        async with self.name_locks.hold([self._child(parent_inode_old, name_old),
                                         self._new_name(parent_inode_new, name_new)]):
            return await self._rename(parent_inode_old, name_old, parent_inode_new,
                                      name_new, flags, ctx)

    async def _rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                      name_new: bytes, flags: int, ctx) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._new_name(parent_inode_new, name_new)
        st_old = os.lstat(old)
        try:
            st_new = os.lstat(new)
        except FileNotFoundError:
            st_new = None
        if (st_new is not None and st_new.st_ino == st_old.st_ino
                and st_new.st_dev == st_old.st_dev):
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            return  # two names of one inode: rename(2) does nothing (EXCHANGE too)
        # Data first, then the sidecar: an error (ENOTEMPTY, EISDIR, EEXIST...) leaves
        # everything untouched; the intent lets the next mount finish a rename that a crash
        # interrupted between the two steps.
        old_reg = stat.S_ISREG(st_old.st_mode)
        new_reg = st_new is not None and stat.S_ISREG(st_new.st_mode)
        intent = None
        # A long target name's file first, durable: a crash at any later point leaves
        # either the old entry (and a harmless unused long-name file) or the new one with
        # its name. With EXCHANGE both names stay, so each needs its long-name file.
        written = self._long_name_first(new, parent_inode_new, name_new, ctx)
        if flags & pyfuse3.RENAME_EXCHANGE:
            self._long_name_first(old, parent_inode_old, name_old, ctx)
        if old_reg or new_reg:
            sides = [bk.sidecar_path(p) for p in (old, new)]
            intent = self.journal.rename(old, new, flags,
                                         *(p if os.path.lexists(p) else None for p in sides))
        try:
            renameat2(old, new, flags)
        except BaseException:
            if intent is not None:
                self.journal.done(intent)
            self._long_name_undo(new, written)
            raise
        if flags & pyfuse3.RENAME_EXCHANGE:
            if old_reg and new_reg:
                self._rename_sidecar(old, new, exchange=True)
            elif old_reg:
                self._rename_sidecar(old, new)
            elif new_reg:
                self._rename_sidecar(new, old)
        elif old_reg:
            self._rename_sidecar(old, new)
        if intent is not None:
            self.journal.done(intent)
        if stat.S_ISDIR(st_old.st_mode) or st_new is not None and stat.S_ISDIR(st_new.st_mode):
            self.long_paths.invalidate()
        if not flags & pyfuse3.RENAME_EXCHANGE:
            nm.remove_long_name(old)  # the old name is gone (a short one has none)
        ino_old = self._ino(st_old)
        self._drop_link(parent_inode_old, name_old, ino_old)
        if st_new is not None:
            ino_new = self._ino(st_new)
            exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
            # A replaced target lost a name; its last one unless it has other links.
            self._drop_link(parent_inode_new, name_new, ino_new, last=not exchange and (
                stat.S_ISDIR(st_new.st_mode) or st_new.st_nlink <= 1))
            if exchange:
                self.nodes.linked(parent_inode_old, name_old, ino_new)
        self.nodes.linked(parent_inode_new, name_new, ino_old)
        if ino_old in self.nodes:
            self.nodes[ino_old].dir_dirty = True  # fsync makes the new name durable

    def _rename_sidecar(self, old: bytes, new: bytes, exchange: bool = False) -> None:
        src, dst = bk.sidecar_path(old), bk.sidecar_path(new)
        if exchange and os.path.lexists(src) and os.path.lexists(dst):
            renameat2(src, dst, pyfuse3.RENAME_EXCHANGE)
        elif os.path.lexists(src):
            os.rename(src, dst)
        else:
            # The moved file had no key yet (empty); the name must not keep the old one's.
            bk.remove_sidecar(new)

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        if self.name_locks is None:
            return await self._link(inode, new_parent_inode, new_name, ctx)
        async with self.name_locks.hold([self._path(inode),
                                         self._new_name(new_parent_inode, new_name)]):
            return await self._link(inode, new_parent_inode, new_name, ctx)

    async def _link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        src = self._path(inode)
        dst = self._new_name(new_parent_inode, new_name)
        node = self.nodes.get(inode)
        if (node is not None and stat.S_ISREG(os.lstat(src).st_mode)
                and not os.path.lexists(bk.sidecar_path(src))):
            # An empty file made outside the mount has no key yet; give it one now, or
            # the key created later under one name would be missing under the other.
            await self._open_node(node, src if node.fd is None else b"")
            self._close_node(node)
        src, dst = self._path(inode), self._new_name(new_parent_inode, new_name)  # after the await
        if os.path.lexists(dst):
            raise pyfuse3.FUSEError(errno.EEXIST)
        # Long-name file and sidecar first: a crash in between leaves invisible orphans,
        # never a data file without its key or name. The sidecar replaces any stale
        # orphan at the new name.
        written = self._long_name_first(dst, new_parent_inode, new_name, ctx)
        side = bk.sidecar_path(src)
        try:
            if os.path.lexists(side):
                tmp = bk.tmp_path(self.backing)
                os.link(side, tmp, follow_symlinks=False)
                os.rename(tmp, bk.sidecar_path(dst))
            os.link(src, dst, follow_symlinks=False)
        except BaseException:
            if os.path.lexists(side) and not os.path.lexists(dst):
                bk.remove_sidecar(dst)
            self._long_name_undo(dst, written)
            raise
        st = os.lstat(dst)
        return self._attr(st, self._remember(st, new_parent_inode, new_name).ino)

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx):
        path = self._new_name(parent_inode, name)
        if self.names is not None:
            if not target_fits(target):
                raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
            target = self.names.encrypt_target(target, os.urandom(16))
        written = self._long_name_first(path, parent_inode, name, ctx)
        try:
            os.symlink(target, path)
        except BaseException:
            self._long_name_undo(path, written)
            raise
        self._chown_new(path, ctx)
        st = os.lstat(path)
        return self._attr(st, self._remember(st, parent_inode, name).ino)

    @_fuse_errors
    async def readlink(self, inode: int, ctx) -> bytes:
        path = self._path(inode)
        target = os.readlink(path)
        return target if self.names is None else self._plain_target(path, target)

    def _plain_target(self, path: bytes, target: bytes) -> bytes:
        try:
            return self.names.decrypt_target(target)
        except NameDecryptError as e:
            log.error("%s: symlink target does not decrypt (%s): not ours or damaged",
                      self._display(path), e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx):
        path = self._new_name(parent_inode, name)
        written = self._long_name_first(path, parent_inode, name, ctx)
        try:
            os.mknod(path, mode, rdev)
        except BaseException:
            self._long_name_undo(path, written)
            raise
        self._chown_new(path, ctx, mode=mode)
        st = os.lstat(path)
        return self._attr(st, self._remember(st, parent_inode, name).ino)

    @_fuse_errors
    async def opendir(self, inode: int, ctx) -> int:
        # One listing per handle: re-listing on every READDIRPLUS call is quadratic.
        path = self._path(inode)
        node = self.nodes.get(inode)
        # Names only: their attributes are taken when they are returned (readdir).
        entries, unnamed = nm.list_dir(path, inode == ROOT, enc=self._dir_names(inode, path))
        for b in unnamed:
            log.warning("%s: entry %s has no valid name (a long-name entry without its "
                        "long-name file, or a name that does not decrypt); not shown "
                        "(encfs fsck reports it)", self._display(path), bk.printable(b))
        if node is not None and inode != ROOT:
            # Hold the directory open, like a file: fstat and fsyncdir keep working
            # after it is removed (fdopendir() stats an open, possibly removed dir).
            if node.fd is None:
                node.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC)
            node.opens += 1
        fh = self._next_dh
        self._next_dh += 1
        self.dir_handles[fh] = (inode, entries)
        return fh

    async def readdir(self, fh: int, start_id: int, token) -> None:
        parent, entries = self.dir_handles[fh]
        try:
            dirpath = self._path(parent)
        except pyfuse3.FUSEError:
            return  # removed since opendir: nothing more to list
        for i in range(start_id, len(entries)):
            name, backing_name = entries[i].name, entries[i].backing
            # Attributes now, not from opendir: READDIRPLUS hands the kernel an inode per
            # entry, and a name removed meanwhile (whose inode number the backing fs may
            # already have reused) must not be linked to that number.
            try:
                st = os.lstat(self.long_paths.short(os.path.join(dirpath, backing_name)))
            except FileNotFoundError:
                continue
            node = self._remember(st, parent, name)  # its generation goes into the reply
            if not pyfuse3.readdir_reply(token, name, self._attr(st, node.ino), i + 1):
                self.nodes.forget(node.ino, 1)  # not sent: the kernel does not hold it
                break

    async def releasedir(self, fh: int) -> None:
        handle = self.dir_handles.pop(fh, None)
        if handle is not None and handle[0] != ROOT:
            node = self.nodes.get(handle[0])
            if node is not None and node.fd is not None:
                self._close_node(node)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        parent, _ = self.dir_handles[fh]
        node = self.nodes.get(parent)
        if node is not None and node.fd is not None:
            os.fsync(node.fd)
        else:
            bk.fsync_dir(self._path(parent))

    @_fuse_errors
    async def statfs(self, ctx):
        sv = os.statvfs(self.backing)
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail"):
            setattr(out, attr, getattr(sv, attr))
        out.f_namemax = nm.NAME_MAX  # long names fit whatever the backing's limit
        return out

    # --- extended attributes (policy and value format: encfs/xattrs.py, docs/FORMAT.md) -----

    CONTROL_XATTR_PID = b"user.encfs.pid"
    #: the largest write request the kernel has sent (checks that large writes are on)
    CONTROL_XATTR_MAX_WRITE = b"user.encfs.max_write"

    def _xattr_call(self, inode: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Call an os.*xattr function on the backing object of ``inode``: its open fd when
        it has no name left (open, then unlinked), else its path (never following links)."""
        node = self.nodes.get(inode)
        if node is not None and node.fd is not None and not node.links:
            return fn(node.fd, *args)
        return fn(self._path(inode), *args, follow_symlinks=False)

    async def _xattr_cipher(self, inode: int, create: bool = False) -> xa.XattrCipher | None:
        """The value cipher of a regular file (loads its key; may create one for an empty
        file made outside the mount) or of a directory (`_dir_xattr_cipher`)."""
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if stat.S_ISDIR(self._stat(inode).st_mode):
            return await self._dir_xattr_cipher(node, inode, create)
        await self._open_node(node, self._path(inode) if node.fd is None else b"")
        try:
            assert node.xattr is not None
            return node.xattr
        finally:
            self._close_node(node)

    async def _dir_xattr_cipher(self, node: Node, inode: int,
                                create: bool) -> xa.XattrCipher | None:
        """A directory's value cipher, from the key record in its backing
        ``user.encfs.dirkey`` (docs/FORMAT.md); with ``create``, a directory without one
        gets a new DEK (from its CMK for new files). None: no record and not creating."""
        async with node.key_lock:
            if node.xattr is not None:
                return node.xattr
            try:
                blob = self._xattr_call(inode, os.getxattr, xa.DIR_RECORD_XATTR)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
                blob = None
            where = f"directory {self._display(self._path(inode))}"
            if blob is None:
                if not create:
                    return None
                record, dek = await self._new_key(inode)
                try:
                    self._xattr_call(inode, os.setxattr, xa.DIR_RECORD_XATTR,
                                     fmt.encode_sidecar(record), os.XATTR_CREATE)
                except FileExistsError:  # made meanwhile (the KMS call awaited): use it
                    blob = self._xattr_call(inode, os.getxattr, xa.DIR_RECORD_XATTR)
            if blob is not None:
                try:
                    record = fmt.decode_sidecar(blob)
                except fmt.FormatError as e:
                    log.error("%s: damaged directory key record: %s", where, e)
                    raise pyfuse3.FUSEError(errno.EIO) from None
                try:
                    dek = await self.keys.unwrap(record, where)
                except KeyError_ as e:
                    raise pyfuse3.FUSEError(e.errno) from None
            node.xattr = xa.XattrCipher(dek, record.file_id)
            return node.xattr

    def _check_xattr_name(self, name: bytes, setting: bool) -> xa.Kind:
        kind = xa.classify(name)
        if kind is xa.Kind.RESERVED:
            raise pyfuse3.FUSEError(bk.reserved_errno() if setting else pyfuse3.ENOATTR)
        if kind is xa.Kind.UNSUPPORTED:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        return kind

    #: a directory's CMK for new files below it (a key id or alias when set; reads give
    #: the key id); stored as this same attribute on the backing directory, in the clear
    DIR_KEY_XATTR = b"user.encfs.key"

    def _dir_key(self, ino: int) -> str | None:
        """The CMK configured on a directory itself (not inherited), cached."""
        if ino not in self._dir_keys:
            try:
                value = os.getxattr(self._path(ino), self.DIR_KEY_XATTR, follow_symlinks=False)
                self._dir_keys[ino] = value.decode("ascii")
            except (OSError, UnicodeDecodeError):
                self._dir_keys[ino] = None
        return self._dir_keys[ino]

    def key_for_new_file(self, parent: int) -> str:
        """The CMK for a file created in ``parent``: the nearest directory that names one,
        else the mount's --key."""
        ino = parent
        for _ in range(4096):  # deeper than any real tree; guards against a link loop
            key = self._dir_key(ino)
            if key:
                return key
            node = self.nodes.get(ino)
            if ino == ROOT or node is None or not node.links:
                break
            ino = next(iter(node.links))[0]
        return self.keys.key_id

    async def _set_dir_key(self, inode: int, value: bytes, ctx) -> None:
        st = self._stat(inode)
        if not stat.S_ISDIR(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if ctx.uid not in (0, st.st_uid):
            raise pyfuse3.FUSEError(errno.EPERM)
        ref = value.decode("utf-8", "replace").strip()
        try:
            info = await self.keys.kms.resolve_key(ref)
        except KmsError as e:
            log.error("cannot use key %r for new files in %s: %s", ref,
                      self._display(self._path(inode)), e)
            raise pyfuse3.FUSEError(KEY_ERRNO.get(e.error_code, errno.EIO)) from None
        if info.get("key_state") != "2":
            raise pyfuse3.FUSEError(errno.EKEYREVOKED)
        os.setxattr(self._path(inode), self.DIR_KEY_XATTR, info["key_id"].encode(),
                    follow_symlinks=False)
        self._dir_keys.clear()

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        # The kernel asks for security.capability before every write(2): answer a known
        # absence first, without any other lookup (it is remembered per inode until we
        # set the attribute ourselves).
        node = self.nodes.get(inode)
        if name == CAPABILITY_XATTR and node is not None and node.no_caps:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if name == self.DIR_KEY_XATTR and stat.S_ISDIR(self._stat(inode).st_mode):
            key = self._dir_key(inode)
            if key is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return key.encode()
        if inode == ROOT and name == self.CONTROL_XATTR_PID:
            return str(os.getpid()).encode()
        if inode == ROOT and name == self.CONTROL_XATTR_MAX_WRITE:
            return str(self.max_write_seen).encode()
        kind = self._check_xattr_name(name, setting=False)
        # Absent attributes are answered without touching the key.
        try:
            blob = self._xattr_call(inode, os.getxattr, self._xattr_backing(name, kind))
        except OSError as e:
            if e.errno == errno.ENODATA and name == CAPABILITY_XATTR and node is not None:
                node.no_caps = True
            raise
        if kind is xa.Kind.PLAIN:
            return blob
        mode = self._stat(inode).st_mode
        cipher = (await self._xattr_cipher(inode)
                  if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else None)
        if cipher is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)  # not ours: set outside the mount
        try:
            return cipher.decrypt(name, blob)
        except xa.XattrAuthError as e:
            path = self._any_path(self.nodes[inode])
            # the backing name of the attribute: with encrypted names, never the plaintext
            log.error("%s (backing %s): xattr %s: %s",
                      self._display(path) if path else f"inode {inode}",
                      bk.printable(path) if path else "unlinked",
                      bk.printable(self._xattr_backing(name, kind)), e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _xattr_backing(self, name: bytes, kind: xa.Kind) -> bytes:
        """The backing name of an xattr: a user.* name encrypted with encrypted names."""
        if self.names is None or kind is not xa.Kind.ENCRYPTED:
            return name
        self._dir_names(ROOT, self.backing)  # the name key's revocation check
        if not xattr_name_fits(name):
            raise pyfuse3.FUSEError(errno.ERANGE)  # as Linux answers a name too long
        return self.names.encrypt_xattr(name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx) -> list[bytes]:
        names = [os.fsencode(n) for n in self._xattr_call(inode, os.listxattr)]
        mode = self._stat(inode).st_mode
        ours = stat.S_ISREG(mode) or stat.S_ISDIR(mode)  # objects with a DEK for values
        names = [n for n in names if xa.visible(n)
                 and (ours or xa.classify(n) is not xa.Kind.ENCRYPTED)]
        if self.names is None:
            return names
        self._dir_names(ROOT, self.backing)  # the name key's revocation check
        out = []
        for n in names:
            if xa.classify(n) is xa.Kind.ENCRYPTED:
                try:
                    n = self.names.decrypt_xattr(n)
                except NameDecryptError:
                    continue  # set outside the mount: not ours to show
            out.append(n)
        return out

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx) -> None:
        if name == self.DIR_KEY_XATTR:
            return await self._set_dir_key(inode, value, ctx)
        if name == CAPABILITY_XATTR and inode in self.nodes:
            self.nodes[inode].no_caps = False
        kind = self._check_xattr_name(name, setting=True)
        if kind is xa.Kind.ENCRYPTED:
            mode = self._stat(inode).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                # Only files and directories have a DEK to encrypt with (docs/FORMAT.md).
                raise pyfuse3.FUSEError(errno.ENOTSUP)
            value = (await self._xattr_cipher(inode, create=True)).encrypt(name, value)
        self._xattr_call(inode, os.setxattr, self._xattr_backing(name, kind), value)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx) -> None:
        if name == self.DIR_KEY_XATTR and stat.S_ISDIR(self._stat(inode).st_mode):
            st = self._stat(inode)
            if ctx.uid not in (0, st.st_uid):
                raise pyfuse3.FUSEError(errno.EPERM)
            self._dir_keys.clear()
            return self._xattr_call(inode, os.removexattr, name)
        kind = self._check_xattr_name(name, setting=True)
        mode = self._stat(inode).st_mode
        if kind is xa.Kind.ENCRYPTED and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        self._xattr_call(inode, os.removexattr, self._xattr_backing(name, kind))

    async def access(self, inode: int, mode: int, ctx) -> bool:
        if self.kernel_permissions:
            return True  # default_permissions: the kernel checked; reaching here means allowed
        # Only root can reach this mount (`mount_options`): answer as the backing
        # filesystem answers root (X_OK needs an x bit on a file).
        node = self.nodes.get(inode)
        if node is not None and node.fd is not None and not node.links:
            return True  # open and nameless: nothing left to check by path
        return os.access(self._path(inode), mode, follow_symlinks=False)

    def close_all(self) -> None:
        """At unmount: forgets may never arrive, so drop every open backing fd."""
        self.spares.stop()
        self.trash.stop()  # what it still holds is freed now
        self.journal.close()
        self.long_paths.invalidate()
        for node in self.nodes.values():
            if node.fd is not None:
                os.close(node.fd)
                node.fd = None
            node.cipher = None
