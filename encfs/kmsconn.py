"""The KMS connection of every encfs tool: one option group, one place that parses it.

``--kms-socket PATH`` (our daemon on a Unix socket), or ``--kms-url URL --credentials FILE``
(any Huawei-compatible KMS over HTTP(S), requests signed with AK/SK; ``--kms-ca-file`` to
trust a private CA), plus ``--project-id``. Where none is given, a tool pointed at a backing
dir uses the KMS its mount uses: ``encfs mount`` records the connection (paths and ids, never
a secret) in ``BACKING/.encfs/kms.json``. Then ``$KMS_SOCKET``, then the default socket.

Only Huawei's public API is needed: key ids are used as they are, aliases resolve through
list-keys / the aliases API (kms.client), and a KMS that answers nothing gives one line that
says where we looked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from kms.client import AsyncKmsClient, KmsClient, KmsError, KmsUnavailable, is_key_id
from kms.paths import SOCKET_ENV, default_project_id, default_socket_path

from . import backing as bk

RECORD_FILE = "kms.json"
READY_TIMEOUT = 30.0
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class KmsConnError(Exception):
    """The KMS connection cannot be used: one line for the user, exit status 1 or 2."""


@dataclass(frozen=True)
class KmsTarget:
    """Where the KMS is: a Unix socket, or a URL with AK/SK credentials (a file path; the
    secret stays in that file) and optionally the CA that signed its certificate."""

    project_id: str
    socket_path: str | None = None
    url: str | None = None
    credentials: str | None = None
    ca_file: str | None = None

    @property
    def where(self) -> str:
        return self.url or self.socket_path or ""

    def client(self, timeout: float = 10.0) -> KmsClient:
        if self.url:
            return KmsClient.from_credentials_file(self.url, self.credentials,
                                                   project_id=self.project_id, timeout=timeout,
                                                   ca_file=self.ca_file)
        return KmsClient(self.socket_path, project_id=self.project_id, timeout=timeout)

    def async_client(self) -> AsyncKmsClient:
        if self.url:
            return AsyncKmsClient.from_credentials_file(self.url, self.credentials,
                                                        project_id=self.project_id,
                                                        ca_file=self.ca_file)
        return AsyncKmsClient(self.socket_path, project_id=self.project_id)

    def to_record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, data: Any) -> "KmsTarget":
        if not isinstance(data, dict) or not isinstance(data.get("project_id"), str):
            raise ValueError("not a KMS connection record")
        fields = {k: data.get(k) for k in ("socket_path", "url", "credentials", "ca_file")}
        if not all(v is None or isinstance(v, str) for v in fields.values()):
            raise ValueError("not a KMS connection record")
        if bool(fields["socket_path"]) == bool(fields["url"]):
            raise ValueError("a KMS connection record names a socket or a url")
        return cls(project_id=data["project_id"], **fields)


# ---- options -------------------------------------------------------------------------------

TOOL_DEFAULT = "the KMS the backing dir's mount uses, else $KMS_SOCKET, else the local socket"


def add_options(p: argparse.ArgumentParser, local_hint: str = "",
                default: str = TOOL_DEFAULT) -> None:
    """The KMS connection options, the same for every tool."""
    g = p.add_argument_group(f"KMS connection (default: {default})")
    g.add_argument("--kms-socket", metavar="PATH",
                   help=f"our KMS daemon's Unix socket (default: $KMS_SOCKET or "
                        f"{default_socket_path()}{local_hint})")
    g.add_argument("--kms-url", metavar="URL",
                   help="a KMS over HTTPS instead, e.g. https://kms.REGION.myhuaweicloud.com or "
                        "https://HOST:PORT of `kms serve --listen ... --tls-cert`; needs "
                        "--credentials. http:// only to a loopback address")
    g.add_argument("--credentials", metavar="FILE",
                   help="Huawei access-key CSV (User Name,Access Key Id,Secret Access Key), "
                        "mode 0600, for --kms-url")
    g.add_argument("--kms-ca-file", metavar="FILE",
                   help="trust only the CA certificate(s) in FILE (PEM) for --kms-url https://, "
                        "e.g. the ca.pem of `kms make-cert`; default: the system's trust store")
    g.add_argument("--project-id", help="KMS project id (default: $KMS_PROJECT_ID or 'local')")


def target_from_args(args: argparse.Namespace, backing: bytes | None = None) -> KmsTarget:
    """The KMS named by the options; without any, the one recorded for ``backing``, then
    $KMS_SOCKET, then the default socket. KmsConnError for contradicting options."""
    url, socket_path = getattr(args, "kms_url", None), getattr(args, "kms_socket", None)
    creds, ca_file = getattr(args, "credentials", None), getattr(args, "kms_ca_file", None)
    project_id = getattr(args, "project_id", None)
    if url and socket_path:
        raise KmsConnError("give --kms-socket or --kms-url, not both")
    if url:
        if not creds:
            raise KmsConnError("--kms-url needs --credentials FILE (Huawei's access-key CSV)")
        u = urlsplit(url)
        if u.scheme == "http" and u.hostname not in _LOOPBACK:
            raise KmsConnError(f"--kms-url {url}: plain http:// would carry data keys in the "
                               f"clear over the network; use https:// (http:// is accepted "
                               f"for loopback addresses only)")
        if ca_file and u.scheme != "https":
            raise KmsConnError("--kms-ca-file is for an https:// --kms-url")
        return KmsTarget(project_id or default_project_id(), url=url,
                         credentials=os.path.abspath(creds),
                         ca_file=os.path.abspath(ca_file) if ca_file else None)
    if creds or ca_file:
        raise KmsConnError("--credentials and --kms-ca-file go with --kms-url")
    if socket_path:
        return KmsTarget(project_id or default_project_id(), socket_path=socket_path)
    if backing is not None:
        recorded = recorded_target(backing)
        if recorded is not None:
            if project_id and project_id != recorded.project_id:
                recorded = KmsTarget(project_id, recorded.socket_path, recorded.url,
                                     recorded.credentials, recorded.ca_file)
            return recorded
    return KmsTarget(project_id or default_project_id(),
                     socket_path=os.environ.get(SOCKET_ENV) or default_socket_path())


def explicit(args: argparse.Namespace) -> bool:
    """Whether the user named a KMS (an option or $KMS_SOCKET), rather than the default."""
    return bool(getattr(args, "kms_url", None) or getattr(args, "kms_socket", None)
                or os.environ.get(SOCKET_ENV))


# ---- connecting ----------------------------------------------------------------------------

def connect(target: KmsTarget, timeout: float = 10.0) -> KmsClient:
    """A client for ``target``; KmsConnError for unreadable credentials or CA files."""
    try:
        return target.client(timeout=timeout)
    except OSError as e:  # only the CA file is opened here (ssl.SSLError: not a certificate)
        raise KmsConnError(f"CA file {target.ca_file}: "
                           f"{getattr(e, 'strerror', None) or getattr(e, 'reason', None) or e}") from None
    except ValueError as e:  # a malformed URL
        raise KmsConnError(str(e)) from None
    except Exception as e:  # kms.auth.CredentialsError: its message names the file
        raise KmsConnError(str(e)) from None


def _ping(target: KmsTarget) -> KmsUnavailable | None:
    """One request: None when the KMS answers and accepts us, the KmsUnavailable when none
    answers; KmsConnError when one answers but refuses us (credentials, project)."""
    with connect(target, timeout=5) as c:
        try:
            c.call("list-keys", {"limit": "1"})
            return None
        except KmsUnavailable as e:
            return e
        except KmsError as e:
            raise KmsConnError(f"the KMS at {target.where} refused us: {e}") from None


def answers(target: KmsTarget) -> bool:
    return _ping(target) is None


def probe(target: KmsTarget) -> None:
    """KmsConnError (one line: where, and what to do) unless the KMS answers and accepts us.
    Tools call this before walking a tree, so that a missing KMS is one message and not one
    per file."""
    missing = _ping(target)
    if missing is not None:
        raise KmsConnError(str(missing))


def target_for_tool(args: argparse.Namespace, backing: bytes | None) -> KmsTarget:
    """The KMS of a tool that only uses an existing KMS (never starts one), checked."""
    target = target_from_args(args, backing)
    probe(target)
    return target


def start_local_kms(target: KmsTarget, data_dir: str) -> int:
    """Start `kms serve` detached from us, wait until it answers, return its pid."""
    socket_path, project_id = target.socket_path, target.project_id
    assert socket_path is not None
    os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(data_dir, "kms.log")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kms", "serve", "--socket", socket_path, "--data-dir",
             data_dir, "--project-id", project_id],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    with open(os.path.join(data_dir, "kms.pid"), "w") as f:
        f.write(f"{proc.pid}\n")
    deadline = time.monotonic() + READY_TIMEOUT
    while not answers(target):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise KmsConnError(f"could not start a local KMS (see {log_path})")
        time.sleep(0.05)
    print(f"started a local KMS: pid {proc.pid}, socket {socket_path}, data {data_dir}, "
          f"log {log_path}", file=sys.stderr)
    return proc.pid


# ---- keys ----------------------------------------------------------------------------------

def check_key(target: KmsTarget, ref: str) -> str:
    """The CMK id for ``ref`` (a key id, used as it is, or an alias), checked usable now."""
    c = connect(target)
    try:
        info = c.resolve_key(ref)
    except KmsUnavailable as e:
        raise KmsConnError(str(e)) from None
    except KmsError as e:
        if e.error_code == "KMS.0306" and is_key_id(ref) and c.has_resolve_extension is False:
            # Huawei's describe-key needs its own grant; a grantee holding only
            # create-/decrypt-datakey may still use the key. (Our daemon's extension knows
            # any grant, so there a refusal means none.)
            return ref
        if e.error_code in ("KMS.0207", "KMS.0205"):
            hint = ("create it with: kms create-key --alias " + ref) if not is_key_id(ref) \
                else "check the key id"
            raise KmsConnError(f"key {ref!r} is unknown to the KMS at {target.where}: "
                               f"{e.error_msg}; {hint}") from None
        raise KmsConnError(f"cannot use key {ref!r}: {e}") from None
    finally:
        c.close()
    key_id, state = info.get("key_id", ref), info.get("key_state")
    if state == "3":
        raise KmsConnError(f"key {ref!r} ({key_id}) is disabled; "
                           f"enable it with: kms enable-key {key_id}")
    if state == "4":
        raise KmsConnError(f"key {ref!r} ({key_id}) is pending deletion; "
                           f"cancel with: kms cancel-key-deletion {key_id}")
    if state != "2":
        raise KmsConnError(f"key {ref!r} ({key_id}) cannot be used (state {state})")
    return key_id


# ---- the record in the control dir -----------------------------------------------------------

def record(backing: bytes, target: KmsTarget) -> None:
    """Note in BACKING/.encfs/ which KMS the mount uses (no secrets: file paths and ids)."""
    data = (json.dumps(target.to_record(), indent=1) + "\n").encode()
    bk.write_file_atomic(backing, bk.control_path(backing, RECORD_FILE), data, mode=0o600)


def recorded_target(backing: bytes) -> KmsTarget | None:
    """The KMS the (last) mount of ``backing`` used, if it recorded one that we can read."""
    try:
        fd = bk.open_regular(bk.control_path(backing, RECORD_FILE), what="KMS record")
    except (OSError, ValueError):
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return KmsTarget.from_record(json.loads(f.read(65536)))
    except (OSError, ValueError):
        return None


def backing_root_of(path: bytes) -> bytes | None:
    """The backing dir holding the backing file ``path`` (the nearest parent with a control
    dir), or None."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(d, bk.CONTROL_DIR, b"config.json")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
