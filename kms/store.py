"""The keystore: SQLite tables for keys, key versions, aliases, grants and tags, and the root key.

Key material never touches the database in the clear: every CMK version is stored as
``nonce ‖ AES-256-GCM(root key, material, aad = "<key_id>:<version>")``, so a copied database
is useless without ``root.key`` and a wrapped version cannot be swapped onto another key.

Durability: keys.db runs in WAL mode with ``synchronous=FULL`` — a write that returned has
been fsynced, so a ``kill -9`` (or a power cut) right after an acknowledged create-key loses
nothing. The audit log lives in its own file (``audit.db``) with ``synchronous=NORMAL``:
each batch is committed before the daemon forgets it, which survives a process kill
(the OS holds the pages); only a machine crash may lose the newest audit rows.

Concurrency: the daemon is one process (an flock on ``lock`` refuses a second one on the same
data dir), so every key, alias and grant is mirrored in memory, and so is the unwrapped
material of every live key version (loaded at start, kept up to date by every write): the hot
paths (create-datakey, decrypt-datakey) never touch SQLite. Writes take ``self._lock``, go to disk,
then replace the in-memory record; readers see either the old or the new immutable record.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT_KEY_FILE = "root.key"
SCRYPT_FILE = "root.scrypt"         # salt and parameters of a passphrase-derived root key
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1      # 128 MiB, a few tenths of a second
_SCRYPT_CHECK = b"encfs-kms root key check v1"
KEYS_DB = "keys.db"
AUDIT_DB = "audit.db"
LOCK_FILE = "lock"
ROOT_KEY_BYTES = 32

STATE_PENDING_ACTIVATION = 1
STATE_ENABLED = 2
STATE_DISABLED = 3
STATE_PENDING_DELETION = 4
STATE_PENDING_IMPORT = 5


class StoreError(Exception):
    """The data directory cannot be used safely (permissions, lock, corrupt root key)."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    owner: str                      # principal string, e.g. "uid:1000" or "user:alice"
    alias: str | None               # None once the key is destroyed (frees the alias)
    description: str
    key_spec: str
    key_usage: str
    origin: str
    state: int
    default_key: bool
    creation_ms: int
    deletion_ms: int | None         # when pending deletion ends
    rotation_enabled: bool
    rotation_interval: int          # days
    rotation_anchor_ms: int         # last rotation or rotation enable time
    last_rotation_ms: int | None
    rotations: int
    current_version: int
    destroyed_ms: int | None        # set when the material was destroyed for good
    expiration_ms: int | None = None    # imported material: when it is deleted


@dataclass(frozen=True)
class VersionRecord:
    key_id: str
    version: int
    creation_ms: int


@dataclass(frozen=True)
class GrantRecord:
    grant_id: str
    key_id: str
    grantee: str                    # as given by the user (echoed back)
    grantee_type: str
    grantee_norm: str               # principal it matches: "uid:N" or "user:name"
    operations: tuple[str, ...]
    name: str
    retiring: str                   # as given, "" when none
    retiring_norm: str
    issuer: str
    creation_ms: int


@dataclass(frozen=True)
class AliasRecord:
    owner: str
    alias: str
    key_id: str
    create_ms: int
    update_ms: int


@dataclass(frozen=True)
class ImportParams:
    """One get-parameters-for-import answer: the wrapping key (private half) and the token."""

    key_id: str
    wrapping_algorithm: str
    private_key: bytes              # PKCS#8 DER, unwrapped
    token: str
    expiry_ms: int


@dataclass(frozen=True)
class AuditRecord:
    time_ms: int
    caller: str
    operation: str
    key_id: str
    grant_id: str
    outcome: str                    # "ok" / "error"
    status: int
    error_code: str
    aad: str = ""                   # the request's additional_authenticated_data (not secret), ≤ 128 chars


_KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    alias TEXT,
    description TEXT NOT NULL DEFAULT '',
    key_spec TEXT NOT NULL,
    key_usage TEXT NOT NULL,
    origin TEXT NOT NULL,
    state INTEGER NOT NULL,
    default_key INTEGER NOT NULL DEFAULT 0,
    creation_ms INTEGER NOT NULL,
    deletion_ms INTEGER,
    rotation_enabled INTEGER NOT NULL DEFAULT 0,
    rotation_interval INTEGER NOT NULL DEFAULT 365,
    rotation_anchor_ms INTEGER NOT NULL,
    last_rotation_ms INTEGER,
    rotations INTEGER NOT NULL DEFAULT 0,
    current_version INTEGER NOT NULL DEFAULT 1,
    destroyed_ms INTEGER,
    expiration_ms INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_owner_alias ON keys(owner, alias) WHERE alias IS NOT NULL;
CREATE TABLE IF NOT EXISTS key_versions (
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    version INTEGER NOT NULL,
    wrapped BLOB,                    -- NULL once destroyed
    creation_ms INTEGER NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    owner TEXT NOT NULL,
    alias TEXT NOT NULL,
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    create_ms INTEGER NOT NULL,
    update_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, alias)
);
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    grantee TEXT NOT NULL,
    grantee_type TEXT NOT NULL,
    grantee_norm TEXT NOT NULL,
    operations TEXT NOT NULL,
    name TEXT NOT NULL,
    retiring TEXT NOT NULL,
    retiring_norm TEXT NOT NULL,
    issuer TEXT NOT NULL,
    creation_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS import_params (
    key_id TEXT PRIMARY KEY REFERENCES keys(key_id),
    wrapping_algorithm TEXT NOT NULL,
    wrapped_private BLOB NOT NULL,   -- the wrapping key pair's private key, wrapped by the root key
    token TEXT NOT NULL,
    expiry_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS imported_digests (
    key_id TEXT PRIMARY KEY REFERENCES keys(key_id),
    digest BLOB NOT NULL             -- SHA-256 of imported material, wrapped: a re-import must match it
);
CREATE TABLE IF NOT EXISTS tags (
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    tag_key TEXT NOT NULL,
    tag_value TEXT NOT NULL,
    PRIMARY KEY (key_id, tag_key)
);
"""

_AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    caller TEXT NOT NULL,
    operation TEXT NOT NULL,
    key_id TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    error_code TEXT NOT NULL,
    aad TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_key ON audit(key_id, time_ms);
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_ms);
"""

# Schema migrations of audit.db, applied in order by _migrate_audit (PRAGMA user_version counts
# how many ran). 1: the request's AAD (audit.db files written before it lack the column).
_AUDIT_MIGRATIONS = [
    "ALTER TABLE audit ADD COLUMN aad TEXT NOT NULL DEFAULT ''",
]
_AUDIT_INDEXES = "CREATE INDEX IF NOT EXISTS audit_aad ON audit(aad, time_ms) WHERE aad != ''"


def _check_private_dir(path: str) -> None:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is not a directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(f"refusing to use data dir {path}: it is writable by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w {path}")


def _private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 (O_EXCL), before anything is written to it, or make
    an existing one 0600. SQLite then opens the existing file and creates its -wal and -shm
    files with the same mode, so no key-bearing file is ever readable by others, not even for
    an instant, whatever the umask."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{path} is not a regular file")
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    else:
        os.close(fd)


def _write_new_private(path: str, data: bytes) -> None:
    """Create ``path`` (O_EXCL, mode 0600 from the start), write, fsync it and its directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_private(path: str, limit: int) -> bytes:
    """Read a secret-bearing file, refusing one that group or others may access or that another
    uid owns."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise StoreError(f"refusing to use {path}: group or others have access "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
        if st.st_uid != os.geteuid():
            raise StoreError(f"refusing to use {path}: owned by uid {st.st_uid}, "
                             f"not by the daemon's uid {os.geteuid()}")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _check_fresh(data_dir: str, what: str) -> None:
    """A new root key is made only for a data dir without keys: in one with keys it could
    unwrap nothing, and every key would look lost."""
    db = os.path.join(data_dir, KEYS_DB)
    if os.path.exists(db) and os.path.getsize(db) > 0:
        raise StoreError(f"{data_dir} holds keys ({KEYS_DB}) but no {what}; restore the {what} from "
                         f"its backup (a new one could unwrap nothing)")


def derive_root_key(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024 + 128 * r * p * 1024,
                          dklen=ROOT_KEY_BYTES)


def _passphrase_root_key(data_dir: str, passphrase: bytes, n: int = SCRYPT_N) -> bytes:
    """The root key derived from a passphrase with scrypt. The salt, the parameters and a check
    value (HMAC of a constant under the derived key, to tell a wrong passphrase from damage)
    live in ``root.scrypt``, created 0600 on first use."""
    if os.path.exists(os.path.join(data_dir, ROOT_KEY_FILE)):
        raise StoreError(f"{data_dir} has a root key file ({ROOT_KEY_FILE}); refusing to also use a "
                         f"passphrase (a data dir uses one or the other)")
    path = os.path.join(data_dir, SCRYPT_FILE)
    if not passphrase:
        raise StoreError("the passphrase is empty")
    if not os.path.exists(path):
        _check_fresh(data_dir, SCRYPT_FILE)
        salt = secrets.token_bytes(16)
        key = derive_root_key(passphrase, salt, n, SCRYPT_R, SCRYPT_P)
        meta = {"kdf": "scrypt", "salt": base64.b64encode(salt).decode(), "n": n, "r": SCRYPT_R, "p": SCRYPT_P,
                "check": hmac.new(key, _SCRYPT_CHECK, hashlib.sha256).hexdigest()}
        _write_new_private(path, (json.dumps(meta, indent=1) + "\n").encode())
        return key
    try:
        meta = json.loads(_read_private(path, 4096))
        salt = base64.b64decode(meta["salt"], validate=True)
        n, r, p, check = meta["n"], meta["r"], meta["p"], meta["check"]
        if not (meta.get("kdf") == "scrypt" and isinstance(n, int) and 2**10 <= n <= 2**22 and n & (n - 1) == 0
                and isinstance(r, int) and 1 <= r <= 32 and isinstance(p, int) and 1 <= p <= 16
                and isinstance(check, str) and len(salt) >= 16):
            raise ValueError("parameters out of range")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is damaged ({type(e).__name__}); restore it from its backup") from None
    key = derive_root_key(passphrase, salt, n, r, p)
    if not hmac.compare_digest(hmac.new(key, _SCRYPT_CHECK, hashlib.sha256).hexdigest().encode(),
                               check.encode("ascii", "replace")):
        raise StoreError("wrong passphrase for this data dir")
    return key


def load_or_create_root_key(data_dir: str, passphrase: bytes | None = None, scrypt_n: int = SCRYPT_N) -> bytes:
    """The root key (HSM stand-in): created once with O_EXCL and mode 0600, then only read; or,
    with a passphrase, derived from it with scrypt (salt and parameters in root.scrypt).

    Refuses a key file that group or others may read or write: such a key may have leaked.
    Refuses to mix: a data dir with root.key takes no passphrase, one with root.scrypt needs it.
    """
    if passphrase is not None:
        return _passphrase_root_key(data_dir, passphrase, scrypt_n)
    if os.path.exists(os.path.join(data_dir, SCRYPT_FILE)):
        raise StoreError(f"{data_dir} uses a root key derived from a passphrase ({SCRYPT_FILE}); give "
                         f"--passphrase-file FILE or KMS_PASSPHRASE")
    path = os.path.join(data_dir, ROOT_KEY_FILE)
    if not os.path.exists(path):
        _check_fresh(data_dir, ROOT_KEY_FILE)
    try:
        key = secrets.token_bytes(ROOT_KEY_BYTES)
        _write_new_private(path, key)
        return key
    except FileExistsError:
        pass
    key = _read_private(path, ROOT_KEY_BYTES + 1)
    if len(key) != ROOT_KEY_BYTES:
        raise StoreError(f"root key {path} is damaged (expected {ROOT_KEY_BYTES} bytes)")
    return key


def _row_to_key(r: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        key_id=r["key_id"], owner=r["owner"], alias=r["alias"], description=r["description"],
        key_spec=r["key_spec"], key_usage=r["key_usage"], origin=r["origin"], state=r["state"],
        default_key=bool(r["default_key"]), creation_ms=r["creation_ms"], deletion_ms=r["deletion_ms"],
        rotation_enabled=bool(r["rotation_enabled"]), rotation_interval=r["rotation_interval"],
        rotation_anchor_ms=r["rotation_anchor_ms"], last_rotation_ms=r["last_rotation_ms"],
        rotations=r["rotations"], current_version=r["current_version"], destroyed_ms=r["destroyed_ms"],
        expiration_ms=r["expiration_ms"])


def _row_to_grant(r: sqlite3.Row) -> GrantRecord:
    return GrantRecord(
        grant_id=r["grant_id"], key_id=r["key_id"], grantee=r["grantee"], grantee_type=r["grantee_type"],
        grantee_norm=r["grantee_norm"], operations=tuple(json.loads(r["operations"])), name=r["name"],
        retiring=r["retiring"], retiring_norm=r["retiring_norm"], issuer=r["issuer"],
        creation_ms=r["creation_ms"])


_KEY_COLUMNS = [f.name for f in dataclasses.fields(KeyRecord)]


class Store:
    """Keys, versions, aliases, grants and tags of one data directory, mirrored in memory.

    Thread-safe: writes serialise on one lock (the server runs them in a worker thread);
    lookups read immutable records from dicts without locking.
    """

    def __init__(self, data_dir: str, clock: Callable[[], int] | None = None, passphrase: bytes | None = None,
                 scrypt_n: int = SCRYPT_N, *, worker_of: bytes | None = None) -> None:
        """``worker_of``: the root key, for a worker process of ``kms serve --workers N``; the
        parent holds the exclusive flock on ``lock`` for all of them (kms/workers.py) and the
        workers serialise their writes through kms/shared.py."""
        self.data_dir = os.path.abspath(data_dir)
        self.clock = clock or (lambda: int(time.time() * 1000))
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        _check_private_dir(self.data_dir)
        self._lock_fd: int | None = None
        if worker_of is None:
            self._lock_fd = os.open(os.path.join(self.data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise StoreError(f"another kms daemon is using {self.data_dir}") from None
        try:
            self._root_key = worker_of if worker_of is not None else \
                load_or_create_root_key(self.data_dir, passphrase, scrypt_n)
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self._aead = AESGCM(self._root_key)
        self._lock = threading.RLock()
        self._db = self._open(os.path.join(self.data_dir, KEYS_DB), "FULL", _KEYS_SCHEMA)
        self._audit_db = self._open(os.path.join(self.data_dir, AUDIT_DB), "NORMAL", _AUDIT_SCHEMA)
        _migrate_audit(self._audit_db)
        self._audit_lock = threading.Lock()
        # A deque: append (event loop) and popleft (flush, maybe in a worker thread) are atomic.
        self._audit_pending: collections.deque[AuditRecord] = collections.deque()
        self._load()

    def root_key_for_workers(self) -> bytes:
        """The root key, handed to the worker processes forked by kms/workers.py (never written)."""
        return self._root_key

    def detach_for_workers(self) -> int:
        """Close the databases before forking workers (an SQLite connection must not cross a
        fork); keep and return the fd of the exclusive ``lock``, which the workers inherit."""
        self.flush_audit()
        with self._lock:
            self._db.close()
            self._audit_db.close()
        fd, self._lock_fd = self._lock_fd, None
        self._material = {}         # the parent serves nothing: keep no key material in it
        return fd

    def reload(self) -> None:
        """Read the mirror again from keys.db: another worker process wrote (kms/shared.py)."""
        with self._lock:
            self._load()

    def changes(self) -> int:
        """Rows this process changed in keys.db so far: a write happened when it moved."""
        return self._db.total_changes

    def live_material(self) -> set[bytes]:
        return set(self._material.values())

    @staticmethod
    def _open(path: str, sync: str, schema: str) -> sqlite3.Connection:
        # check_same_thread=False: the server runs writes in a worker thread; self._lock
        # (or the audit lock) serialises every use of a connection.
        _private_file(path)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        # Worker processes (kms serve --workers) share the files: wait for a lock, never fail.
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(schema)
        if schema is _KEYS_SCHEMA:
            _migrate_keys(db)
        for suffix in ("-wal", "-shm"):     # SQLite gives them the mode of the database file
            if os.path.exists(path + suffix):
                _private_file(path + suffix)
        return db

    def _load(self) -> None:
        # Built aside and swapped in at the end: a reload (kms serve --workers, another worker
        # wrote) may run while a thread of this process reads the mirror; it sees the old
        # mirror or the new one, never a half-filled one.
        keys: dict[str, KeyRecord] = {}
        by_alias: dict[tuple[str, str], str] = {}
        versions: dict[str, list[VersionRecord]] = {}
        materials: dict[tuple[str, int], bytes] = {}
        damaged: dict[tuple[str, int], str] = {}
        grants: dict[str, GrantRecord] = {}
        aliases: dict[tuple[str, str], AliasRecord] = {}
        for r in self._db.execute("SELECT * FROM keys ORDER BY rowid"):
            k = _row_to_key(r)
            keys[k.key_id] = k
            if k.alias is not None:
                by_alias[(k.owner, k.alias)] = k.key_id
        for r in self._db.execute("SELECT key_id, version, creation_ms, wrapped FROM key_versions "
                                  "ORDER BY key_id, version"):
            versions.setdefault(r["key_id"], []).append(
                VersionRecord(r["key_id"], r["version"], r["creation_ms"]))
            k = keys.get(r["key_id"])
            if r["wrapped"] is not None and k is not None and k.destroyed_ms is None:
                # Every live version unwrapped now, so that no request ever waits for SQLite. One
                # that does not authenticate fails its own requests, not the daemon's start.
                try:
                    materials[(r["key_id"], r["version"])] = self._unwrap(r["key_id"], r["version"], r["wrapped"])
                except StoreError as e:
                    damaged[(r["key_id"], r["version"])] = str(e)
        for r in self._db.execute("SELECT * FROM grants ORDER BY rowid"):
            g = _row_to_grant(r)
            grants[g.grant_id] = g
        for r in self._db.execute("SELECT * FROM aliases ORDER BY rowid"):
            a = AliasRecord(r["owner"], r["alias"], r["key_id"], r["create_ms"], r["update_ms"])
            aliases[(a.owner, a.alias)] = a
        # material and versions before keys: a reader that finds a new key finds its material
        self._material, self._damaged, self._versions = materials, damaged, versions
        self._grants, self._aliases = grants, aliases
        self._keys, self._by_alias = keys, by_alias

    def close(self) -> None:
        self.flush_audit()
        with self._lock:
            self._db.close()
            self._audit_db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    # ---- in-memory lookups -------------------------------------------------------------

    def _put_key(self, k: KeyRecord) -> None:
        old = self._keys.get(k.key_id)
        if old is not None and old.alias is not None:
            self._by_alias.pop((old.owner, old.alias), None)
        self._keys[k.key_id] = k
        if k.alias is not None:
            self._by_alias[(k.owner, k.alias)] = k.key_id

    def get_key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    def key_by_alias(self, owner: str, alias: str) -> KeyRecord | None:
        key_id = self._by_alias.get((owner, alias))
        if key_id is None:
            a = self._aliases.get((owner, alias))
            key_id = a.key_id if a else None
        return self._keys.get(key_id) if key_id else None

    def alias_taken(self, owner: str, alias: str) -> bool:
        return (owner, alias) in self._by_alias or (owner, alias) in self._aliases

    def keys(self) -> list[KeyRecord]:
        # Creation order (dicts keep insertion order; _load reads by rowid): stable list-keys paging.
        return list(self._keys.values())

    def versions(self, key_id: str) -> list[VersionRecord]:
        return list(self._versions.get(key_id, ()))

    def grants_for_key(self, key_id: str) -> list[GrantRecord]:
        # list() first: another thread may add a grant while we filter. Insertion order.
        return [g for g in list(self._grants.values()) if g.key_id == key_id]

    def all_grants(self) -> list[GrantRecord]:
        return list(self._grants.values())

    def get_grant(self, grant_id: str) -> GrantRecord | None:
        return self._grants.get(grant_id)

    def aliases(self) -> list[AliasRecord]:
        return list(self._aliases.values())

    def material(self, key_id: str, version: int) -> bytes | None:
        """Unwrapped material of one version, or None when destroyed, not imported or unknown.
        From memory only: every live version is unwrapped at start and on each write. Raises
        StoreError for a version whose stored material did not authenticate at start."""
        m = self._material.get((key_id, version))
        if m is None and (key_id, version) in self._damaged:
            raise StoreError(self._damaged[(key_id, version)])
        return m

    def import_params(self, key_id: str) -> ImportParams | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM import_params WHERE key_id=?", (key_id,)).fetchone()
        if r is None:
            return None
        return ImportParams(key_id, r["wrapping_algorithm"], self._unwrap(f"import:{key_id}", 0, r["wrapped_private"]),
                            r["token"], r["expiry_ms"])

    # ---- root-key wrapping ---------------------------------------------------------------

    def _wrap(self, key_id: str, version: int, material: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, material, f"{key_id}:{version}".encode())

    def _unwrap(self, key_id: str, version: int, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], f"{key_id}:{version}".encode())
        except InvalidTag:
            raise StoreError(f"stored material of key {key_id} version {version} does not "
                             "authenticate under the root key (wrong root.key or tampering)") from None

    # ---- writes ------------------------------------------------------------------------------

    def _tx(self):
        return _Tx(self._db)

    def create_key(self, *, owner: str, alias: str, description: str, material: bytes | None = None,
                   key_spec: str = "AES_256", key_usage: str = "ENCRYPT_DECRYPT", origin: str = "kms",
                   default_key: bool = False, key_id: str | None = None) -> KeyRecord:
        """A new key with ``material`` as version 1 (made by kms.material; None: a random AES-256
        key), or, for origin external, a key waiting for its material (state 5)."""
        import uuid
        if origin == "external":
            material = None
        elif material is None:
            material = secrets.token_bytes(32)
        with self._lock:
            now = self.clock()
            k = KeyRecord(
                key_id=key_id or str(uuid.uuid4()), owner=owner, alias=alias, description=description,
                key_spec=key_spec, key_usage=key_usage, origin=origin,
                state=STATE_ENABLED if material is not None else STATE_PENDING_IMPORT,
                default_key=default_key, creation_ms=now, deletion_ms=None, rotation_enabled=False,
                rotation_interval=365, rotation_anchor_ms=now, last_rotation_ms=None, rotations=0,
                current_version=1, destroyed_ms=None)
            with self._tx() as db:
                db.execute(f"INSERT INTO keys ({','.join(_KEY_COLUMNS)}) VALUES "
                           f"({','.join('?' * len(_KEY_COLUMNS))})", dataclasses.astuple(k))
                if material is not None:
                    db.execute("INSERT INTO key_versions (key_id, version, wrapped, creation_ms) VALUES (?,?,?,?)",
                               (k.key_id, 1, self._wrap(k.key_id, 1, material), now))
            self._put_key(k)
            if material is not None:
                self._versions[k.key_id] = [VersionRecord(k.key_id, 1, now)]
                self._material[(k.key_id, 1)] = material
            return k

    def put_import_params(self, p: ImportParams) -> None:
        with self._lock:
            with self._tx() as db:
                db.execute("INSERT OR REPLACE INTO import_params VALUES (?,?,?,?,?)",
                           (p.key_id, p.wrapping_algorithm, self._wrap(f"import:{p.key_id}", 0, p.private_key),
                            p.token, p.expiry_ms))

    def import_material(self, key_id: str, material: bytes, expiration_ms: int | None, digest: bytes) -> KeyRecord:
        """Imported material becomes version 1 of a pending-import key, which is then enabled; the
        import parameters are used up in the same transaction."""
        with self._lock:
            now = self.clock()
            k = dataclasses.replace(self._keys[key_id], state=STATE_ENABLED, expiration_ms=expiration_ms)
            with self._tx() as db:
                db.execute("INSERT OR REPLACE INTO key_versions (key_id, version, wrapped, creation_ms) "
                           "VALUES (?,?,?,?)", (key_id, 1, self._wrap(key_id, 1, material), now))
                db.execute("UPDATE keys SET state=?, expiration_ms=? WHERE key_id=?",
                           (k.state, expiration_ms, key_id))
                db.execute("DELETE FROM import_params WHERE key_id=?", (key_id,))
                db.execute("INSERT OR REPLACE INTO imported_digests VALUES (?,?)",
                           (key_id, self._wrap(f"digest:{key_id}", 0, digest)))
            self._put_key(k)
            self._versions[key_id] = [VersionRecord(key_id, 1, now)]
            self._material[(key_id, 1)] = material
            return k

    def imported_digest(self, key_id: str) -> bytes | None:
        """SHA-256 of the material imported earlier (kept after deletion), so that a re-import
        must bring the same material back, as Huawei requires."""
        with self._lock:
            r = self._db.execute("SELECT digest FROM imported_digests WHERE key_id=?", (key_id,)).fetchone()
        return self._unwrap(f"digest:{key_id}", 0, r["digest"]) if r else None

    def delete_material(self, key_id: str) -> KeyRecord:
        """delete-imported-key-material, or its expiry: the material is erased and the key waits
        for an import again (state 5)."""
        with self._lock:
            old = self._keys[key_id]
            # A key pending deletion stays so; any other goes back to waiting for an import.
            state = old.state if old.state == STATE_PENDING_DELETION else STATE_PENDING_IMPORT
            k = dataclasses.replace(old, state=state, expiration_ms=None)
            self._db.execute("PRAGMA secure_delete=ON")
            with self._tx() as db:
                db.execute("DELETE FROM key_versions WHERE key_id=?", (key_id,))
                db.execute("UPDATE keys SET state=?, expiration_ms=NULL WHERE key_id=?", (k.state, key_id))
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._put_key(k)
            for v in self._versions.pop(key_id, ()):
                self._material.pop((key_id, v.version), None)
            return k

    def update_key(self, key_id: str, **changes) -> KeyRecord:
        """Change columns of one key (state, alias, description, rotation settings...)."""
        with self._lock:
            k = dataclasses.replace(self._keys[key_id], **changes)
            cols = list(changes)
            with self._tx() as db:
                db.execute(f"UPDATE keys SET {','.join(c + '=?' for c in cols)} WHERE key_id=?",
                           [getattr(k, c) for c in cols] + [key_id])
            self._put_key(k)
            return k

    def rotate_key(self, key_id: str, material: bytes | None = None) -> KeyRecord:
        """Add ``material`` (None: a random AES-256 key) as a new key version; it becomes the one
        new ciphertexts use."""
        material = material if material is not None else secrets.token_bytes(32)
        with self._lock:
            old = self._keys[key_id]
            now = self.clock()
            version = old.current_version + 1
            k = dataclasses.replace(old, current_version=version, rotations=old.rotations + 1,
                                    last_rotation_ms=now, rotation_anchor_ms=now)
            with self._tx() as db:
                db.execute("INSERT INTO key_versions (key_id, version, wrapped, creation_ms) VALUES (?,?,?,?)",
                           (key_id, version, self._wrap(key_id, version, material), now))
                db.execute("UPDATE keys SET current_version=?, rotations=?, last_rotation_ms=?, "
                           "rotation_anchor_ms=? WHERE key_id=?",
                           (version, k.rotations, now, now, key_id))
            self._put_key(k)
            self._versions.setdefault(key_id, []).append(VersionRecord(key_id, version, now))
            self._material[(key_id, version)] = material
            return k

    def destroy_key(self, key_id: str) -> KeyRecord:
        """End of the pending-deletion period: the material of every version is erased for good.

        The row stays (so describe-key can say the key was deleted), without alias, grants,
        aliases or tags. SQLite's secure_delete overwrites the freed pages and the WAL is
        checkpointed, so the wrapped material does not linger in the files either.
        """
        with self._lock:
            now = self.clock()
            k = dataclasses.replace(self._keys[key_id], destroyed_ms=now, alias=None, rotation_enabled=False)
            self._db.execute("PRAGMA secure_delete=ON")
            with self._tx() as db:
                db.execute("UPDATE key_versions SET wrapped=NULL WHERE key_id=?", (key_id,))
                db.execute("UPDATE keys SET destroyed_ms=?, alias=NULL, rotation_enabled=0 WHERE key_id=?",
                           (now, key_id))
                db.execute("DELETE FROM grants WHERE key_id=?", (key_id,))
                db.execute("DELETE FROM aliases WHERE key_id=?", (key_id,))
                db.execute("DELETE FROM tags WHERE key_id=?", (key_id,))
                db.execute("DELETE FROM import_params WHERE key_id=?", (key_id,))
                db.execute("DELETE FROM imported_digests WHERE key_id=?", (key_id,))
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._put_key(k)
            for v in self._versions.get(key_id, ()):
                self._material.pop((key_id, v.version), None)
            for gid in [g.grant_id for g in self._grants.values() if g.key_id == key_id]:
                del self._grants[gid]
            for ak in [a for a, r in self._aliases.items() if r.key_id == key_id]:
                del self._aliases[ak]
            return k

    def add_grant(self, g: GrantRecord) -> None:
        with self._lock:
            with self._tx() as db:
                db.execute("INSERT INTO grants VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                           (g.grant_id, g.key_id, g.grantee, g.grantee_type, g.grantee_norm,
                            json.dumps(list(g.operations)), g.name, g.retiring, g.retiring_norm,
                            g.issuer, g.creation_ms))
            self._grants[g.grant_id] = g

    def delete_grant(self, grant_id: str) -> None:
        with self._lock:
            with self._tx() as db:
                db.execute("DELETE FROM grants WHERE grant_id=?", (grant_id,))
            self._grants.pop(grant_id, None)

    def put_alias(self, owner: str, alias: str, key_id: str) -> AliasRecord:
        with self._lock:
            now = self.clock()
            old = self._aliases.get((owner, alias))
            a = AliasRecord(owner, alias, key_id, old.create_ms if old else now, now)
            with self._tx() as db:
                db.execute("INSERT OR REPLACE INTO aliases VALUES (?,?,?,?,?)",
                           (owner, alias, key_id, a.create_ms, a.update_ms))
            self._aliases[(owner, alias)] = a
            return a

    def delete_aliases(self, owner: str, aliases: Iterable[str]) -> None:
        with self._lock:
            with self._tx() as db:
                for alias in aliases:
                    db.execute("DELETE FROM aliases WHERE owner=? AND alias=?", (owner, alias))
            for alias in aliases:
                self._aliases.pop((owner, alias), None)

    def tags(self, key_id: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(r["tag_key"], r["tag_value"]) for r in
                    self._db.execute("SELECT tag_key, tag_value FROM tags WHERE key_id=? ORDER BY tag_key",
                                     (key_id,))]

    def all_tags(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        with self._lock:
            for r in self._db.execute("SELECT key_id, tag_key, tag_value FROM tags ORDER BY key_id, tag_key"):
                out.setdefault(r["key_id"], []).append((r["tag_key"], r["tag_value"]))
        return out

    def set_tags(self, key_id: str, put: Iterable[tuple[str, str]] = (), delete: Iterable[str] = ()) -> None:
        with self._lock:
            with self._tx() as db:
                for k in delete:
                    db.execute("DELETE FROM tags WHERE key_id=? AND tag_key=?", (key_id, k))
                for k, v in put:
                    db.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", (key_id, k, v))

    # ---- audit --------------------------------------------------------------------------

    def audit(self, rec: AuditRecord) -> None:
        """Queue one audit row; flush_audit() commits the queue in one transaction."""
        self._audit_pending.append(rec)

    def audit_pending(self) -> int:
        return len(self._audit_pending)

    def flush_audit(self) -> None:
        with self._audit_lock:
            rows = []
            while True:
                try:
                    rows.append(self._audit_pending.popleft())
                except IndexError:
                    break
            if not rows:
                return
            with _Tx(self._audit_db) as db:
                db.executemany("INSERT INTO audit (time_ms, caller, operation, key_id, grant_id, outcome, "
                               "status, error_code, aad) VALUES (?,?,?,?,?,?,?,?,?)",
                               # explicit tuples: dataclasses.astuple deep-copies, too slow here
                               [(r.time_ms, r.caller, r.operation, r.key_id, r.grant_id, r.outcome,
                                 r.status, r.error_code, r.aad) for r in rows])

    def query_audit(self, *, key_id: str | None = None, since_ms: int | None = None,
                    callers: Iterable[str] | None = None, key_ids: Iterable[str] | None = None,
                    aad: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        """Newest-last audit rows. ``callers``/``key_ids`` restrict to what a non-root caller may see."""
        self.flush_audit()
        where, args = [], []
        if key_id:
            where.append("key_id=?")
            args.append(key_id)
        if aad:
            where.append("aad=?")
            args.append(aad)
        if since_ms is not None:
            where.append("time_ms>=?")
            args.append(since_ms)
        if callers is not None or key_ids is not None:
            ors = []
            callers, key_ids = list(callers or ()), list(key_ids or ())
            if callers:
                ors.append(f"caller IN ({','.join('?' * len(callers))})")
                args.extend(callers)
            if key_ids:
                ors.append(f"key_id IN ({','.join('?' * len(key_ids))})")
                args.extend(key_ids)
            where.append("(" + (" OR ".join(ors) or "0") + ")")
        sql = "SELECT time_ms, caller, operation, key_id, grant_id, outcome, status, error_code, aad FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._audit_lock:
            rows = self._audit_db.execute(sql, args).fetchall()
        return [AuditRecord(*r) for r in reversed(rows)]


def _migrate_keys(db: sqlite3.Connection) -> None:
    """keys.db files written before imported material lack keys.expiration_ms; add it."""
    if "expiration_ms" not in {r[1] for r in db.execute("PRAGMA table_info(keys)")}:
        db.execute("ALTER TABLE keys ADD COLUMN expiration_ms INTEGER")


def _migrate_audit(db: sqlite3.Connection) -> None:
    """Bring an audit.db of an older version up to date. A fresh file already has every column
    (from _AUDIT_SCHEMA); an old one gets them added. Idempotent and crash-safe: each step runs
    in one transaction with the user_version bump."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    columns = {r[1] for r in db.execute("PRAGMA table_info(audit)")}
    for i, sql in enumerate(_AUDIT_MIGRATIONS[version:], start=version):
        with _Tx(db):
            if not (sql.startswith("ALTER TABLE audit ADD COLUMN ") and sql.split()[5] in columns):
                db.execute(sql)
            db.execute(f"PRAGMA user_version={i + 1}")
    db.execute(_AUDIT_INDEXES)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
