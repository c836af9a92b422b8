"""pytest fixtures for users of encfs: a real KMS daemon and a real encrypted mount.

Registered through the ``pytest11`` entry point, so any test suite in an environment where
this package is installed can ask for ``kms_server`` or ``encrypted_mount``. Every process
the fixtures start is stopped by PID in teardown, and every mount is unmounted, also when
the test fails.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

from kms.client import KmsClient, KmsError
from kms.paths import DEFAULT_PROJECT_ID

if TYPE_CHECKING:
    from .namecrypt import NameCipher

START_TIMEOUT = 20.0


TEMP_ROOT_ENV = "ENCFS_TEST_TMPDIR"


def short_tempdir(prefix: str) -> str:
    """A new private temp dir with a short path (Unix socket paths are limited to 107 bytes;
    pytest's tmp_path can be longer), under the test run's own root when one is set
    (``ENCFS_TEST_TMPDIR``, see tests/conftest.py), so that checks for leftovers look only
    at what this run made."""
    root = os.environ.get(TEMP_ROOT_ENV)
    if not root or len(root) > 40 or not os.path.isdir(root):
        root = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=root)


#: What a daemon started by these fixtures inherits from the caller's environment: how to
#: find programs and the locale, nothing else. Variables that configure the KMS or encfs
#: (KMS_PASSPHRASE, KMS_SOCKET, KMS_PROJECT_ID, KMS_TEST_CLOCK_FILE, ...) never leak in;
#: a test that wants one passes it explicitly.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH")


def daemon_env(**extra: str) -> dict[str, str]:
    """A clean, explicit environment for a daemon: ``PASSED_ENV`` of ours, plus ``extra``."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(extra)
    return env


def _usable_by_others(path: str) -> bool:
    """Whether a uid with no rights of its own can execute ``path`` (o+x on every dir)."""
    real = os.path.realpath(path)
    parts = real.split("/")
    return all(os.stat("/".join(parts[:i]) or "/").st_mode & 0o001 for i in range(1, len(parts) + 1))


def python_for_other_uids() -> str:
    """An interpreter for stdlib-only code run as another uid (multi-user tests).

    Our own (``sys.executable``, resolved: a venv's python is a link to its base
    interpreter) when every uid can run it; else the system's ``python3`` on the standard
    PATH (Debian's python3-minimal, a dependency the Makefile installs), because the venv
    may live where other uids cannot reach."""
    for cand in (os.path.realpath(sys.executable), shutil.which("python3", path=os.defpath)):
        if cand and _usable_by_others(cand):
            return cand
    raise RuntimeError("no python3 that other uids can run (install python3-minimal)")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process we started, by PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@dataclass
class UidChild:
    """A forked child running a function as another uid (`start_as_uid`)."""

    pid: int
    fd: int  # the read end of the pipe its result comes through

    def result(self) -> tuple[str, Any]:
        """Wait for the child; its result as `run_as_uid` gives it."""
        data = b""
        while chunk := os.read(self.fd, 65536):
            data += chunk
        os.close(self.fd)
        os.waitpid(self.pid, 0)
        return pickle.loads(data)


def start_as_uid(uid: int, fn: Callable[[], Any]) -> UidChild:
    """Start ``fn()`` in a forked child that has become ``uid`` (gid = uid, no other
    groups); several may run at once. ``.result()`` waits for it.

    A fork after import rather than a new interpreter: the venv may live where that uid
    cannot read."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                result: tuple[str, Any] = ("ok", fn())
            except KmsError as e:
                result = ("kms", (e.status, e.error_code, e.error_msg))
            except OSError as e:
                result = ("errno", e.errno)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                result = ("exc", repr(e))
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(w)
    return UidChild(pid, r)


def mount_options(mountpoint: str) -> set[str]:
    """The options the kernel shows for the mount at ``mountpoint`` (/proc/self/mounts)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == mountpoint:
                return set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} not mounted")


def run_as_uid(uid: int, fn: Callable[[], Any]) -> tuple[str, Any]:
    """Call ``fn()`` as ``uid`` in a forked child (`start_as_uid`) and wait for it.

    Returns ("ok", value), ("errno", n) for an OSError, ("kms", (status, code, message))
    for a KmsError, or ("exc", repr) for anything else.
    """
    return start_as_uid(uid, fn).result()


@dataclass
class KmsServer:
    """A running ``kms serve`` on a private socket and data directory."""

    socket_path: str
    data_dir: str
    project_id: str
    log_path: str
    process: subprocess.Popen
    extra_args: list[str] = field(default_factory=list)
    #: the daemon's whole environment; None: ``daemon_env()``
    env: dict[str, str] | None = None

    @property
    def client(self) -> KmsClient:
        return KmsClient(self.socket_path, project_id=self.project_id)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def start(self) -> None:
        """(Re)start the daemon on the same socket and data directory."""
        cmd = [sys.executable, "-m", "kms", "serve", "--socket", self.socket_path,
               "--data-dir", self.data_dir, "--project-id", self.project_id, *self.extra_args]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL,
                                        env=self.env if self.env is not None else daemon_env())
        log.close()
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"kms serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                with KmsClient(self.socket_path, project_id=self.project_id, timeout=2) as c:
                    c.call("list-keys", {"limit": "1"})
                return
            except (KmsError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kms serve did not answer within {START_TIMEOUT}s:\n{self.log()}")
                time.sleep(0.05)

    def stop(self) -> None:
        _stop(self.process)

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_kms_server(workdir: str | None = None, project_id: str = DEFAULT_PROJECT_ID,
                     extra_args: list[str] | None = None,
                     env: dict[str, str] | None = None) -> KmsServer:
    """Start ``kms serve`` in a fresh directory; the caller must call ``.stop()``."""
    workdir = workdir or short_tempdir("kms-")
    os.makedirs(workdir, exist_ok=True)
    server = KmsServer(socket_path=os.path.join(workdir, "kms.sock"),
                       data_dir=os.path.join(workdir, "data"), project_id=project_id,
                       log_path=os.path.join(workdir, "kms.log"), process=None,  # type: ignore[arg-type]
                       extra_args=list(extra_args or []), env=env)
    server.start()
    return server


@contextlib.contextmanager
def running_kms(prefix: str = "kms-") -> Iterator[KmsServer]:
    """A KMS daemon in a fresh temp dir, stopped and removed on exit (any fixture scope)."""
    workdir = short_tempdir(prefix)
    server = start_kms_server(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def kms_server() -> Iterator[KmsServer]:
    """A real KMS daemon on a temporary socket and data dir, stopped in teardown."""
    with running_kms() as server:
        yield server


def _in_mount_table(mountpoint: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == mountpoint for line in f)


def backing_path_of(backing: str, rel: str, cipher: NameCipher | None) -> str:
    """The backing path of plaintext ``rel`` in backing dir ``backing``, each component
    through the name layer (long names hashed; with ``cipher``, names encrypted). A last
    component ``NAME.sfskey`` means NAME's sidecar, as tests always used it; the control
    dir (``.encfs/...``) is itself in both modes."""
    from . import names as nm
    if rel.split("/")[0] == ".encfs":
        return os.path.join(backing, rel)
    rel_b, suffix = os.fsencode(rel), b""
    if rel_b.endswith(nm.SIDECAR_SUFFIX):
        rel_b, suffix = rel_b[:-len(nm.SIDECAR_SUFFIX)], nm.SIDECAR_SUFFIX
    return os.fsdecode(nm.backing_path(os.fsencode(backing), rel_b, cipher) + suffix)


@dataclass
class EncryptedMount:
    """An encfs mount in a subprocess: ``mountpoint`` (plaintext), ``backing`` (ciphertext)."""

    mountpoint: str
    backing: str
    key_id: str
    kms: KmsServer
    log_path: str
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    #: how the mount reaches the KMS (default: ``kms``'s socket), e.g. ``--kms-url https://..
    #: --credentials F --kms-ca-file F``
    kms_args: list[str] | None = None
    #: (the name-key record, its cipher): `name_cipher`'s cache
    _cipher: tuple[bytes, Any] | None = field(default=None, repr=False)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def mount(self) -> None:
        kms_args = self.kms_args if self.kms_args is not None else [
            "--kms-socket", self.kms.socket_path, "--project-id", self.kms.project_id]
        cmd = [sys.executable, "-m", "encfs", "mount", self.backing, self.mountpoint,
               *kms_args, "--key", self.key_id, "--foreground", *self.extra_args]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=daemon_env())
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None:
                raise RuntimeError(f"encfs mount exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            if time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"encfs mount not ready in {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.02)

    def unmount(self) -> int | None:
        """Unmount (lazily if busy) and stop the daemon; returns its exit code."""
        if _in_mount_table(self.mountpoint):  # also a dead mount, whose stat fails
            res = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        if self.process is None:
            return None
        try:
            rc = self.process.wait(15)
        except subprocess.TimeoutExpired:
            _stop(self.process)
            rc = self.process.returncode
        self.process = None
        return rc

    def remount(self) -> None:
        rc = self.unmount()
        if rc not in (0, None):
            raise RuntimeError(f"encfs exited with {rc} at unmount:\n{self.log()}")
        self.mount()

    def backing_path(self, rel: str) -> str:
        """The backing path of plaintext ``rel`` (`backing_path_of`), with encrypted names
        through the name key unwrapped by this mount's KMS."""
        return backing_path_of(self.backing, rel, self.name_cipher())

    def backing_rel(self, rel: str) -> str:
        """`backing_path` relative to the backing dir (what a listing of it shows)."""
        return os.path.relpath(self.backing_path(rel), self.backing)

    def backing_xattr(self, name: str) -> str:
        """The name a ``user.*`` attribute has on the backing file: itself with plaintext
        names, its encryption with encrypted names (other namespaces, and our own
        ``user.encfs.*``, pass through)."""
        from . import xattrs as xa
        raw = os.fsencode(name)
        if not self.encrypted_names or xa.classify(raw) is not xa.Kind.ENCRYPTED:
            return name
        return os.fsdecode(self.name_cipher().encrypt_xattr(raw))

    def name_cipher(self) -> NameCipher | None:
        """The backing dir's name cipher (None with plaintext names), unwrapped by this
        mount's KMS once per name-key record (a rewrap writes a new one)."""
        from .namekey import offline_cipher, record_path
        if not self.encrypted_names:
            return None
        root = os.fsencode(self.backing)
        try:
            with open(record_path(root), "rb") as f:
                record = f.read()
        except FileNotFoundError:
            record = b""
        if self._cipher is None or self._cipher[0] != record:
            with self.kms.client as c:
                self._cipher = (record, offline_cipher(root, c))
        return self._cipher[1]

    @property
    def encrypted_names(self) -> bool:
        return "--encrypt-names" in self.extra_args


#: the two name modes a test may run in (`names_args`, the ``names_mode`` fixture)
NAME_MODES = ("plain-names", "encrypted-names")
NAMES_ENV = "ENCFS_TEST_NAMES"


def default_names_mode() -> str:
    """$ENCFS_TEST_NAMES, or plain names: so that a whole suite can be run with encrypted
    names (ENCFS_TEST_NAMES=encrypted-names pytest)."""
    mode = os.environ.get(NAMES_ENV, "plain-names")
    if mode not in NAME_MODES:
        raise ValueError(f"unknown name mode {mode!r} in ${NAMES_ENV}")
    return mode


def names_args(mode: str | None = None) -> list[str]:
    """Mount arguments for a name mode; with none given, `default_names_mode()`."""
    mode = mode or default_names_mode()
    if mode not in NAME_MODES:
        raise ValueError(f"unknown name mode {mode!r}")
    return ["--encrypt-names"] if mode == "encrypted-names" else []


#: Run a test that uses ``encrypted_mount`` (or asks for ``names_mode``) once per name
#: mode: for tests of what the name layer affects (names, listings, backing paths, xattr
#: names); content-only tests run in the default mode alone.
both_name_modes = pytest.mark.parametrize("names_mode", NAME_MODES)


def make_mount(kms: KmsServer, workdir: str, key: str = "sfs/default",
               extra_args: list[str] | None = None,
               kms_args: list[str] | None = None,
               names_mode: str | None = None) -> EncryptedMount:
    """Create and mount a fresh backing dir under ``workdir``; the caller unmounts.
    ``kms_args``: the mount's KMS connection options (default: ``kms``'s socket). Names
    are encrypted when ``extra_args`` say so, or ``names_mode`` does, or (no mode given)
    $ENCFS_TEST_NAMES does (`names_args`)."""
    extra_args = list(extra_args or [])
    if "--encrypt-names" not in extra_args:
        extra_args += names_args(names_mode)
    backing = os.path.join(workdir, "backing")
    mountpoint = os.path.join(workdir, "mnt")
    os.makedirs(backing, exist_ok=True)
    os.makedirs(mountpoint, exist_ok=True)
    key_id = kms.client.resolve_key(key)["key_id"]
    m = EncryptedMount(mountpoint=mountpoint, backing=backing, key_id=key_id, kms=kms,
                       log_path=os.path.join(workdir, "encfs.log"),
                       extra_args=list(extra_args or []), kms_args=kms_args)
    m.mount()
    return m


@contextlib.contextmanager
def temporary_mount(kms: KmsServer, prefix: str = "encfs-", key: str = "sfs/default",
                    extra_args: list[str] | None = None,
                    kms_args: list[str] | None = None,
                    names_mode: str | None = None) -> Iterator[EncryptedMount]:
    """A fresh backing dir in a new temp dir, mounted against ``kms``; unmounted (its
    daemon stopped) and removed on exit, also when the body fails."""
    workdir = short_tempdir(prefix)
    try:
        m = make_mount(kms, workdir, key=key, extra_args=extra_args, kms_args=kms_args,
                       names_mode=names_mode)
        try:
            yield m
        finally:
            m.unmount()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def mount_with_own_kms(prefix: str = "encfs-", extra_args: list[str] | None = None,
                       shared: bool = False,
                       names_mode: str | None = None) -> Iterator[EncryptedMount]:
    """A KMS and a mount of their own in a fresh temp dir, all gone on exit; for
    module-scoped fixtures. ``shared``: the temp dir is reachable by other uids (for
    ``-o allow_other`` tests)."""
    workdir = short_tempdir(prefix)
    if shared:
        os.chmod(workdir, 0o755)
    os.mkdir(os.path.join(workdir, "kms"), 0o700)
    kms = start_kms_server(os.path.join(workdir, "kms"))
    try:
        m = make_mount(kms, workdir, extra_args=extra_args, names_mode=names_mode)
        try:
            yield m
        finally:
            m.unmount()
    finally:
        kms.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def names_mode() -> str:
    """The name mode of ``encrypted_mount``: `default_names_mode()`; a test parametrized
    with `both_name_modes` runs in each."""
    return default_names_mode()


@pytest.fixture
def encrypted_mount(kms_server: KmsServer, names_mode: str) -> Iterator[EncryptedMount]:
    """A temporary backing dir mounted through encfs against ``kms_server``, with names
    encrypted or not as ``names_mode`` says.

    Unmounted, and its daemon stopped, in teardown even when the test fails.
    """
    with temporary_mount(kms_server, names_mode=names_mode) as m:
        yield m
