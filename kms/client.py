"""The one client of the KMS: HTTP/1.1 (h11) over the daemon's Unix socket, or over TCP (http or
https) to a remote ``kms serve --listen`` or Huawei Cloud KMS itself, keep-alive.

``KmsClient`` is synchronous (CLI, tests, scripts); ``AsyncKmsClient`` is for trio (encfs) and
keeps a small pool of connections so that concurrent tasks do not queue behind one another.
Both raise ``KmsError`` with Huawei's error code for an error reply, and ``KmsUnavailable``
(a KmsError with status None) when nothing answers, with a message that says where.

Unix socket (the caller is the process's uid)::

    KmsClient("/run/user/1000/encfs-kms.sock", project_id="local")

TCP, every request signed with Huawei's SDK-HMAC-SHA256 by kms.auth (the same code the daemon
verifies with); https verifies the server's certificate against the system's trust store, or
against ``ca_file`` only (a private CA, e.g. made by ``kms make-cert``)::

    KmsClient(url="https://kms.cn-north-4.myhuaweicloud.com", project_id=P, ak=AK, sk=SK)
    KmsClient.from_credentials_file("https://127.0.0.1:8443", "credentials.csv", project_id=P,
                                    ca_file="ca.pem")

Only Huawei's public API is needed: aliases resolve with list-keys and the aliases API, using the
``x-encfs-resolve-key`` extension of our own daemon only as a shortcut where it answers.

A kept-alive connection may have been closed by the daemon (idle timeout, restart). When a
request on a *reused* connection fails before any byte of the reply arrived, it is sent once
more on a fresh connection: the daemon closes idle connections only between requests, so the
first attempt was not processed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Generator
from urllib.parse import quote, urlsplit

import h11

from .paths import default_project_id, default_socket_path

_UUID_RE = re.compile(r"^[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}\Z")
USER_AGENT = "encfs-kms-client/1.0"
_MAX_RESPONSE = 16 * 1024 * 1024
RESOLVE_EXTENSION = "x-encfs-resolve-key"


class KmsError(Exception):
    """An error reply of the KMS (Huawei's ``{"error": {"error_code", "error_msg"}}``)."""

    def __init__(self, status: int | None, error_code: str, error_msg: str) -> None:
        super().__init__(f"{error_code}: {error_msg}")
        self.status = status
        self.error_code = error_code
        self.error_msg = error_msg

    def __str__(self) -> str:
        return f"{self.error_code}: {self.error_msg}"


class KmsUnavailable(KmsError):
    """No KMS answers on the socket or at the URL (missing, refused, TLS failure, timed out)."""

    def __init__(self, socket_path: str, reason: str, url: str | None = None) -> None:
        if url is not None:
            msg = (f"no KMS answers at {url} ({reason}); check the URL, the network and that the KMS "
                   f"runs there (kms serve --listen HOST:PORT --credentials FILE)")
        else:
            msg = (f"no KMS answers at {socket_path} ({reason}); start one with: "
                   f"kms serve --socket {socket_path} --data-dir DIR")
        super().__init__(None, "KMS.UNAVAILABLE", msg)
        self.socket_path = socket_path
        self.url = url

    def __str__(self) -> str:
        return self.error_msg


class KmsTlsError(KmsUnavailable):
    """The TLS handshake failed: the server's certificate is not trusted, expired, for another
    host, or the server does not speak TLS. Retrying does not help; the message says what to fix."""

    def __init__(self, url: str, reason: str) -> None:
        KmsError.__init__(self, None, "KMS.TLS", f"TLS connection to {url} failed: {reason}")
        self.socket_path = ""
        self.url = url


class KmsExtensionUnsupported(KmsError):
    """An ``x-encfs-*`` operation that only encfs's own KMS daemon offers, asked of a KMS that
    does not (Huawei Cloud KMS, or ``kms serve --strict-huawei``)."""

    def __init__(self, operation: str, where: str, cause: KmsError) -> None:
        super().__init__(cause.status, cause.error_code,
                         f"{operation} is an extension of encfs's own KMS daemon; the KMS at {where} "
                         f"does not offer it ({cause.error_msg})")
        self.operation = operation


def is_key_id(ref: str) -> bool:
    return bool(_UUID_RE.match(ref))


#: How KMSes answer a path they lack: ours (and Huawei's KMS layer) KMS.0201, Huawei's API
#: gateway APIGW.0101 / APIGW.0201. Codes a client recognises, not ones our daemon answers.
UNKNOWN_PATH_CODES = frozenset("KMS.0201 APIGW.0101 APIGW.0201".split())


def is_unknown_operation(e: KmsError) -> bool:
    """True when the KMS answered "no such operation" (how Huawei answers a path it lacks),
    as opposed to an answer of the operation itself."""
    if isinstance(e, KmsUnavailable):
        return False
    if e.error_code in UNKNOWN_PATH_CODES:
        return True
    return e.status in (404, 405) and e.error_code.startswith("HTTP.")


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's trust store, or only the CA(s) in ``ca_file``;
    the host name is always checked. OSError/ssl.SSLError for an unreadable CA file."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tls_reason(e: BaseException) -> str:
    """What a user must fix, from an ssl error (never the bytes the peer sent)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or "certificate verify failed"
        untrusted = ("no CA we trust signed the server's certificate; give the one that did "
                     "(encfs --kms-ca-file FILE, kms --ca-file FILE)")
        hint = {"certificate has expired": "renew the server certificate (kms make-cert)",
                "self-signed certificate": untrusted,
                "self signed certificate": untrusted,
                "self-signed certificate in certificate chain": untrusted,
                "unable to get local issuer certificate": untrusted,
                }.get(why, "")
        if "Hostname mismatch" in why or "IP address mismatch" in why:
            hint = "the certificate is for another host name; make one for this host (kms make-cert)"
        return f"certificate not trusted: {why}" + (f"; {hint}" if hint else "")
    reason = getattr(e, "reason", None) or str(e)
    if reason in ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE") or \
            "wrong version number" in str(e):
        return "the server does not speak TLS (a plain-HTTP KMS? then use an http:// URL)"
    return f"TLS handshake failed ({reason})"


class _BadReply(ValueError):
    """The bytes on the socket are not an HTTP/1.1 response."""


#: What the h11 state machine is told we sent. The request bytes themselves are written by
#: hand (the client's share of a round trip is most of the per-request cost in Python, and
#: the request shape never varies); a response's framing depends on the request only for
#: HEAD and CONNECT, which this client never sends. Events are immutable: built once.
_SENT = h11.Request(method="POST", target="/", headers=[("Host", "kms"), ("Content-Length", "0")])
_SENT_END = h11.EndOfMessage()


class _Response:
    """The reply to one request, parsed by a fresh h11 client state machine: ``feed(data)``
    takes it as it arrives and returns True once it is complete (``feed(b"")`` signals EOF).
    Then ``status``, ``body`` and ``close`` (the connection must not be reused) are set. A new
    state machine per request: the daemon never pipelines, and a kept-alive connection
    carries nothing between replies."""

    __slots__ = ("_conn", "request", "status", "body", "close", "got_any")

    def __init__(self, request: bytes = b"") -> None:
        conn = self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
        conn.send(_SENT)
        conn.send(_SENT_END)
        self.request = request
        self.status = 0
        self.body = bytearray()
        self.close = False
        self.got_any = False

    def feed(self, data: bytes) -> bool:
        conn = self._conn
        if data:
            self.got_any = True
        conn.receive_data(data)
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError:
                if not data:
                    raise ConnectionResetError("the KMS closed the connection mid-reply") from None
                # A fixed message: h11's own texts quote the bytes, which may be anything.
                raise _BadReply("the KMS's reply is not HTTP/1.1") from None
            if ev is h11.NEED_DATA:
                return False
            if isinstance(ev, h11.Response):
                self.status = ev.status_code
            elif isinstance(ev, h11.Data):
                self.body += ev.data
                if len(self.body) > _MAX_RESPONSE:
                    raise _BadReply("reply too large")
            elif isinstance(ev, h11.EndOfMessage):
                self.close = h11.MUST_CLOSE in (conn.our_state, conn.their_state)
                return True
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionResetError("the KMS closed the connection mid-reply")


def _exchange(method: str, path: str, body: dict | None, remote: "_Remote | None" = None) -> _Response:
    payload = b"" if body is None and method == "GET" else json.dumps(body or {}).encode()
    target = quote(path, safe="/?=&%-._~:,+")
    if remote is None:
        return _Response((f"{method} {target} HTTP/1.1\r\nHost: kms\r\nContent-Type: application/json;"
                          f"charset=utf-8\r\nContent-Length: {len(payload)}\r\nAccept: application/json"
                          f"\r\n\r\n").encode() + payload)
    from . import auth      # only TCP needs it (it pulls in the daemon's error type)
    headers = auth.sign_request(method, target, {
        "Host": remote.netloc, "Content-Type": "application/json;charset=utf-8",
        "X-Project-Id": remote.project_id, "User-Agent": USER_AGENT}, payload, remote.ak, remote.sk)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return _Response((f"{method} {target} HTTP/1.1\r\n{head}Content-Length: {len(payload)}\r\n"
                      f"Accept: application/json\r\n\r\n").encode() + payload)


@dataclass(frozen=True)
class _Remote:
    """Where and as whom a TCP client talks."""

    url: str                # normalised, for messages
    scheme: str             # http / https
    host: str
    port: int
    netloc: str             # the Host header, as the SDK sends it (host[:port] as given in the URL)
    project_id: str
    ak: str
    sk: str

    def __repr__(self) -> str:     # never show the secret key
        return f"_Remote(url={self.url!r}, ak={self.ak!r})"


def _parse_url(url: str, project_id: str, ak: str | None, sk: str | None) -> _Remote:
    if not ak or not sk:
        raise ValueError("a KMS url needs an access key and a secret key (ak=, sk=, or a credentials file)")
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"KMS url {url!r} must look like http://HOST[:PORT] or https://HOST[:PORT]")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ValueError(f"KMS url {url!r} must have no path, query or user info")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"KMS url {url!r} has an invalid port") from None
    return _Remote(url=f"{u.scheme}://{u.netloc}", scheme=u.scheme, host=u.hostname, port=port,
                   netloc=u.netloc, project_id=project_id, ak=ak, sk=sk)


def _decode(status: int, data: bytes) -> Any:
    try:
        reply = json.loads(data) if data else {}
    except ValueError:
        reply = None
    if status == 200:
        if reply is None:
            raise KmsError(status, "KMS.0101", "the KMS sent a reply that is not JSON")
        return reply
    err = reply.get("error", reply) if isinstance(reply, dict) else {}
    if isinstance(err, dict) and "error_code" in err:
        raise KmsError(status, str(err["error_code"]), str(err.get("error_msg", "")))
    raise KmsError(status, f"HTTP.{status}", data[:200].decode("utf-8", "replace"))


# ---- alias resolution (sans I/O: both clients drive the same steps) ---------------------------

#: One step: (operation, body, method); the driver sends back the reply, or the KmsError.
Step = tuple[str, dict | None, str]
_PAGE = "100"


def _resolve_steps(ref: str, where: str, shortcut: bool) -> Generator[Step, Any, dict]:
    """KeyDetails of a key id or alias through Huawei's public API: describe-key for an id;
    for an alias the keys' own aliases (list-keys, every page), then the aliases API (aliases
    added with create-alias), then describe-key of the key found. ``shortcut``: ask our
    daemon's x-encfs-resolve-key first (one round trip; it also creates a default key such as
    sfs/default on first use); a KMS that lacks it answers "unknown operation" and the public
    steps follow. The driver raises a KmsError it gets unless the steps handle it."""
    if shortcut:
        reply = yield (RESOLVE_EXTENSION, {"key": ref}, "POST")
        if not isinstance(reply, KmsError):
            return reply["key_info"]
        if not is_unknown_operation(reply):
            raise reply
    if is_key_id(ref):
        return (yield from _public_step("describe-key", {"key_id": ref}, "POST"))["key_info"]
    marker = None
    while True:
        body = {"limit": _PAGE, **({"marker": marker} if marker else {})}
        reply = yield from _public_step("list-keys", body, "POST")
        for d in reply.get("key_details") or []:
            if isinstance(d, dict) and d.get("key_alias") == ref and d.get("key_id"):
                return d
        marker = reply.get("next_marker")
        if str(reply.get("truncated")).lower() != "true" or not marker:
            break
    marker = None
    while True:
        op = f"aliases?limit={_PAGE}" + (f"&marker={quote(str(marker))}" if marker else "")
        reply = yield (op, None, "GET")
        if isinstance(reply, KmsError):
            if is_unknown_operation(reply):
                break           # a KMS without the newer aliases API
            raise reply
        pages = reply if isinstance(reply, list) else [reply]
        marker = None
        for page in pages:
            if not isinstance(page, dict):
                continue
            for a in page.get("aliases") or []:
                if isinstance(a, dict) and a.get("alias") == ref and a.get("key_id"):
                    found = yield from _public_step("describe-key", {"key_id": a["key_id"]}, "POST")
                    return found["key_info"]
            marker = marker or (page.get("page_info") or {}).get("next_marker")
        if not marker:
            break
    raise KmsError(404, "KMS.0207", f"no key has the alias {ref!r} at {where} (looked through "
                                    f"list-keys and the aliases API)")


def _public_step(op: str, body: dict, method: str) -> Generator[Step, Any, dict]:
    reply = yield (op, body, method)
    if isinstance(reply, KmsError):
        raise reply
    return reply


class _Base:
    def __init__(self, socket_path: str | None, project_id: str | None, timeout: float,
                 url: str | None = None, ak: str | None = None, sk: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, ca_file: str | None = None) -> None:
        self.project_id = project_id or default_project_id()
        self.timeout = timeout
        self._remote: _Remote | None = None
        if ca_file is not None and ssl_context is not None:
            raise ValueError("give either ca_file or ssl_context, not both")
        self._ssl_context = ssl_context if ca_file is None else tls_context(ca_file)
        #: None: not known yet whether this KMS offers x-encfs-resolve-key
        self._shortcut: bool | None = None
        if url is not None:
            if socket_path is not None:
                raise ValueError("give either a socket path or a url, not both")
            self._remote = _parse_url(url, self.project_id, ak, sk)
            if ca_file is not None and self._remote.scheme != "https":
                raise ValueError(f"a CA file is for an https:// KMS url, not {self._remote.url}")
            self.socket_path: str | None = None
            self.url: str | None = self._remote.url
        else:
            if ak is not None or sk is not None:
                raise ValueError("ak/sk are for a url; on the Unix socket the caller is the process's uid")
            if ca_file is not None:
                raise ValueError("a CA file is for an https:// KMS url, not the Unix socket")
            self.socket_path = socket_path or default_socket_path()
            self.url = None

    @classmethod
    def from_credentials_file(cls, url: str, credentials_path: str, project_id: str | None = None,
                              who: str | None = None, **kwargs: Any):
        """A TCP client whose AK/SK come from Huawei's downloaded access-key CSV
        (``User Name,Access Key Id,Secret Access Key``; refused unless only its owner can read
        it). ``who`` picks a row by user name or access key id, default the first."""
        from .auth import read_access_key
        cred = read_access_key(credentials_path, who)
        return cls(url=url, project_id=project_id, ak=cred.access_key, sk=cred.secret_key, **kwargs)

    @property
    def where(self) -> str:
        return self.url or self.socket_path or ""

    def _path(self, operation: str) -> str:
        return f"/v1.0/{self.project_id}/kms/{operation.lstrip('/')}"

    def _exchange(self, method: str, operation: str, body: dict | None) -> _Response:
        return _exchange(method, self._path(operation), body, self._remote)

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = tls_context()
        return self._ssl_context

    def _unavailable_reason(self, reason: str) -> KmsUnavailable:
        return KmsUnavailable(self.socket_path or "", reason, url=self.url)

    def _unavailable(self, e: BaseException) -> KmsUnavailable:
        if isinstance(e, ssl.SSLError) and self.url:
            return KmsTlsError(self.url, _tls_reason(e))
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return self._unavailable_reason(reason)

    def _decode(self, operation: str, status: int, data: bytes) -> Any:
        try:
            return _decode(status, data)
        except KmsError as e:
            if operation.startswith("x-encfs-") and is_unknown_operation(e):
                raise KmsExtensionUnsupported(operation, self.where, e) from None
            raise

    @property
    def has_resolve_extension(self) -> bool | None:
        """Whether this KMS answered x-encfs-resolve-key (None: not asked yet)."""
        return self._shortcut

    def _resolution(self, ref: str) -> Generator[Step, Any, dict]:
        return _resolve_steps(ref, self.where, self._shortcut is not False)

    def _learn(self, step: Step, reply: Any) -> None:
        if step[0] == RESOLVE_EXTENSION:
            self._shortcut = not (isinstance(reply, KmsError) and is_unknown_operation(reply))


def _datakey_body(key_id: str, aad: str | None, length_bits: int) -> dict:
    body = {"key_id": key_id, "datakey_length": str(length_bits)}
    if aad is not None:
        body["additional_authenticated_data"] = aad
    return body


def _decrypt_body(key_id: str, cipher_text: str, aad: str | None, length_bytes: int) -> dict:
    body = {"key_id": key_id, "cipher_text": cipher_text, "datakey_cipher_length": str(length_bytes)}
    if aad is not None:
        body["additional_authenticated_data"] = aad
    return body


def _dek_of(reply: dict) -> bytes:
    dek = bytes.fromhex(reply["data_key"])
    # The daemon sends the digest; checking it catches a corrupted reply cheaply.
    if not hmac.compare_digest(hashlib.sha256(dek).hexdigest().upper(), reply.get("datakey_dgst", "").upper()):
        raise KmsError(200, "KMS.2203", "the data key in the reply does not match its digest")
    return dek


class KmsClient(_Base):
    """Synchronous client; one kept-alive connection; use from one thread at a time.

    ``KmsClient(socket_path)`` talks to the local daemon; ``KmsClient(url=..., ak=..., sk=...)``
    to a KMS over TCP with signed requests (https: ``ca_file`` to trust only that CA, or
    ``ssl_context``; default: the system's trust store with hostname checking)."""

    def __init__(self, socket_path: str | None = None, project_id: str | None = None,
                 timeout: float = 10.0, *, url: str | None = None, ak: str | None = None,
                 sk: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 ca_file: str | None = None) -> None:
        super().__init__(socket_path, project_id, timeout, url, ak, sk, ssl_context, ca_file)
        self._sock: socket.socket | None = None

    def __enter__(self) -> "KmsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _connect(self) -> None:
        r = self._remote
        if r is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.socket_path)
            except OSError as e:
                s.close()
                raise self._unavailable(e) from None
            self._sock = s
            return
        try:
            s = socket.create_connection((r.host, r.port), timeout=self.timeout)
        except OSError as e:
            raise self._unavailable(e) from None
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if r.scheme == "https":
                s = self._ssl().wrap_socket(s, server_hostname=r.host)
        except OSError as e:        # ssl.SSLError (certificate, handshake) is an OSError
            s.close()
            raise self._unavailable(e) from None
        self._sock = s

    def call(self, operation: str, body: dict | None = None, method: str = "POST") -> Any:
        """One API call: ``operation`` is the path below ``/v1.0/{project_id}/kms/``."""
        for attempt in range(2):
            reused = self._sock is not None
            if not reused:
                self._connect()
            try:
                reply = self._roundtrip(self._exchange(method, operation, body), reused and attempt == 0)
            except _Retry:
                self.close()
                continue
            except (OSError, _BadReply) as e:
                self.close()
                raise self._unavailable(e) from None
            if reply.close:
                self.close()
            return self._decode(operation, reply.status, bytes(reply.body))
        raise self._unavailable_reason("connection closed twice")   # pragma: no cover

    def _roundtrip(self, reply: _Response, may_retry: bool) -> _Response:
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(reply.request)
            while True:
                data = sock.recv(65536)
                if not data and not reply.got_any and may_retry:
                    raise _Retry()
                if reply.feed(data):
                    return reply
        except (BrokenPipeError, ConnectionResetError):
            if may_retry and not reply.got_any:
                raise _Retry() from None
            raise

    # ---- helpers -------------------------------------------------------------------------

    def resolve_key(self, ref: str) -> dict:
        """KeyDetails of an alias or key id, through Huawei's public operations (the
        x-encfs-resolve-key extension as a shortcut where the KMS has it; there a default alias
        such as ``sfs/default`` creates its key on first use)."""
        steps = self._resolution(ref)
        try:
            step = next(steps)
            while True:
                try:
                    reply: Any = self.call(*step)
                except KmsUnavailable:
                    raise
                except KmsError as e:
                    reply = e
                self._learn(step, reply)
                step = steps.send(reply)
        except StopIteration as done:
            return done.value

    def key_id(self, ref: str) -> str:
        return ref if is_key_id(ref) else self.resolve_key(ref)["key_id"]

    def create_key(self, alias: str, description: str | None = None) -> dict:
        body = {"key_alias": alias}
        if description is not None:
            body["key_description"] = description
        return self.call("create-key", body)["key_info"]

    def describe_key(self, key_id: str) -> dict:
        return self.call("describe-key", {"key_id": self.key_id(key_id)})["key_info"]

    def create_datakey(self, key_id: str, aad: str | None = None, length_bits: int = 256) -> tuple[bytes, str]:
        reply = self.call("create-datakey", _datakey_body(self.key_id(key_id), aad, length_bits))
        return bytes.fromhex(reply["plain_text"]), reply["cipher_text"]

    def decrypt_datakey(self, key_id: str, cipher_text: str, aad: str | None = None,
                        length_bytes: int = 32) -> bytes:
        return _dek_of(self.call("decrypt-datakey", _decrypt_body(self.key_id(key_id), cipher_text, aad,
                                                                  length_bytes)))


class _Retry(Exception):
    """The reused connection was dead before the reply started: send again on a fresh one."""


class _AsyncConn:
    def __init__(self, stream) -> None:
        self.stream = stream


class AsyncKmsClient(_Base):
    """trio client with a small pool of kept-alive connections; every call is bounded by
    ``timeout`` and raises KmsUnavailable when it runs out or the socket fails."""

    def __init__(self, socket_path: str | None = None, project_id: str | None = None,
                 timeout: float = 10.0, max_connections: int = 8, *, url: str | None = None,
                 ak: str | None = None, sk: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, ca_file: str | None = None) -> None:
        super().__init__(socket_path, project_id, timeout, url, ak, sk, ssl_context, ca_file)
        import trio
        self._trio = trio
        self._idle: list[_AsyncConn] = []
        self._slots = trio.Semaphore(max_connections)
        self._closed = False

    async def __aenter__(self) -> "AsyncKmsClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for c in idle:
            with self._trio.CancelScope(shield=True):
                await c.stream.aclose()

    async def _open(self) -> _AsyncConn:
        trio = self._trio
        r = self._remote
        try:
            if r is None:
                return _AsyncConn(await trio.open_unix_socket(self.socket_path))
            stream = await trio.open_tcp_stream(r.host, r.port)
        except OSError as e:
            raise self._unavailable(e) from None
        if r.scheme == "https":
            # https_compatible: servers that close without close_notify end the stream cleanly.
            tls = trio.SSLStream(stream, self._ssl(), server_hostname=r.host, https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, OSError) as e:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise self._unavailable(e.__cause__ or e) from None
            return _AsyncConn(tls)
        return _AsyncConn(stream)

    async def call(self, operation: str, body: dict | None = None, method: str = "POST") -> Any:
        trio = self._trio
        if self._closed:
            raise self._unavailable_reason("client is closed")
        try:
            with trio.fail_after(self.timeout):
                async with self._slots:
                    status, data = await self._call_pooled(method, operation, body)
        except trio.TooSlowError:
            raise self._unavailable_reason(f"no reply within {self.timeout:g}s") from None
        return self._decode(operation, status, data)

    async def _call_pooled(self, method: str, operation: str, body: dict | None) -> tuple[int, bytes]:
        for attempt in range(2):
            reused = bool(self._idle)
            c = self._idle.pop() if reused else await self._open()
            keep = False
            try:
                reply = await self._roundtrip(c, self._exchange(method, operation, body), reused and attempt == 0)
                keep = not reply.close
                return reply.status, bytes(reply.body)
            except _Retry:
                # The daemon closed this kept-alive connection; the other idle ones are most
                # likely dead too (restart): drop them all and retry on a fresh connection.
                stale, self._idle = self._idle, []
                for s in stale:
                    with self._trio.CancelScope(shield=True):
                        await s.stream.aclose()
                continue
            except (OSError, _BadReply, self._trio.BrokenResourceError, self._trio.ClosedResourceError) as e:
                raise self._unavailable(e) from None
            finally:
                if keep and not self._closed:
                    self._idle.append(c)
                else:
                    # Cancelled, failed or told to close: the connection state is unknown.
                    with self._trio.CancelScope(shield=True):
                        await c.stream.aclose()
        raise self._unavailable_reason("connection closed twice")   # pragma: no cover

    async def _roundtrip(self, c: _AsyncConn, reply: _Response, may_retry: bool) -> _Response:
        trio = self._trio
        try:
            await c.stream.send_all(reply.request)
            while True:
                data = await c.stream.receive_some(65536)
                if not data and not reply.got_any and may_retry:
                    raise _Retry()
                if reply.feed(data):
                    return reply
        except (trio.BrokenResourceError, ConnectionError):
            if may_retry and not reply.got_any:
                raise _Retry() from None
            raise

    # ---- helpers -------------------------------------------------------------------------

    async def resolve_key(self, ref: str) -> dict:
        """As KmsClient.resolve_key."""
        steps = self._resolution(ref)
        try:
            step = next(steps)
            while True:
                try:
                    reply: Any = await self.call(*step)
                except KmsUnavailable:
                    raise
                except KmsError as e:
                    reply = e
                self._learn(step, reply)
                step = steps.send(reply)
        except StopIteration as done:
            return done.value

    async def key_id(self, ref: str) -> str:
        return ref if is_key_id(ref) else (await self.resolve_key(ref))["key_id"]

    async def create_key(self, alias: str, description: str | None = None) -> dict:
        body = {"key_alias": alias}
        if description is not None:
            body["key_description"] = description
        return (await self.call("create-key", body))["key_info"]

    async def describe_key(self, key_id: str) -> dict:
        return (await self.call("describe-key", {"key_id": await self.key_id(key_id)}))["key_info"]

    async def create_datakey(self, key_id: str, aad: str | None = None,
                             length_bits: int = 256) -> tuple[bytes, str]:
        reply = await self.call("create-datakey", _datakey_body(await self.key_id(key_id), aad, length_bits))
        return bytes.fromhex(reply["plain_text"]), reply["cipher_text"]

    async def decrypt_datakey(self, key_id: str, cipher_text: str, aad: str | None = None,
                              length_bytes: int = 32) -> bytes:
        return _dek_of(await self.call("decrypt-datakey", _decrypt_body(await self.key_id(key_id), cipher_text,
                                                                        aad, length_bytes)))
