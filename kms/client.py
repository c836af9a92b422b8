"""The one client of the KMS: HTTP/1.1 over the daemon's Unix socket, or over TCP (http or
https) to a remote ``kms serve --listen`` or Huawei Cloud KMS itself, keep-alive.

``KmsClient`` is synchronous (CLI, tests, scripts); ``AsyncKmsClient`` is for trio (encfs) and
keeps a small pool of connections so that concurrent tasks do not queue behind one another.
Both raise ``KmsError`` with Huawei's error code for an error reply, and ``KmsUnavailable``
(a KmsError with status None) when nothing answers, with a message that says where.

Unix socket (the caller is the process's uid)::

    KmsClient("/run/user/1000/encfs-kms.sock", project_id="local")

TCP, every request signed with Huawei's SDK-HMAC-SHA256 by kms.auth (the same code the daemon
verifies with)::

    KmsClient(url="https://kms.cn-north-4.myhuaweicloud.com", project_id=P, ak=AK, sk=SK)
    KmsClient.from_credentials_file("http://127.0.0.1:8443", "credentials.csv", project_id=P)

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
from typing import Any
from urllib.parse import quote, urlsplit

from .paths import default_project_id, default_socket_path

_UUID_RE = re.compile(r"^[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}\Z")
USER_AGENT = "encfs-kms-client/1.0"
_MAX_RESPONSE = 16 * 1024 * 1024


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


class _Retry(Exception):
    """The reused connection was dead before the reply started: send again on a fresh one."""


def is_key_id(ref: str) -> bool:
    return bool(_UUID_RE.match(ref))


def _request_bytes(method: str, path: str, body: dict | None, remote: "_Remote | None" = None) -> bytes:
    # Written by hand rather than through h11: the client's share of a round trip is most of
    # the per-request cost in Python, and the request shape never varies.
    payload = b"" if body is None and method == "GET" else json.dumps(body or {}).encode()
    target = quote(path, safe="/?=&%-._~:,+")
    if remote is None:
        return (f"{method} {target} HTTP/1.1\r\nHost: kms\r\nContent-Type: application/json;charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\nAccept: application/json\r\n\r\n").encode() + payload
    from . import auth      # only TCP needs it (it pulls in the daemon's error type)
    headers = auth.sign_request(method, target, {
        "Host": remote.netloc, "Content-Type": "application/json;charset=utf-8",
        "X-Project-Id": remote.project_id, "User-Agent": USER_AGENT}, payload, remote.ak, remote.sk)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"{method} {target} HTTP/1.1\r\n{head}Content-Length: {len(payload)}\r\n"
            f"Accept: application/json\r\n\r\n").encode() + payload


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


class _BadReply(ValueError):
    """The bytes on the socket are not an HTTP/1.1 response."""


class _Response:
    """Incremental parser of one HTTP/1.1 response (Content-Length, chunked, or until close).

    ``feed(data)`` returns True once the response is complete; ``feed(b"")`` signals EOF.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.length: int | None = None
        self.chunked = False
        self.close = False
        self.head_done = False
        self.body = bytearray()
        self.got_any = False

    def feed(self, data: bytes) -> bool:
        if not data:
            if self.head_done and self.length is None and not self.chunked:
                self.body += self.buf
                self.close = True
                return True
            raise ConnectionResetError("the KMS closed the connection mid-reply")
        self.got_any = True
        self.buf += data
        while not self.head_done:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > 65536:
                    raise _BadReply("reply headers too long")
                return False
            self._head(bytes(self.buf[:i]).decode("latin-1"))
            del self.buf[:i + 4]
        if self.chunked:
            return self._chunks()
        if self.length is not None and len(self.buf) >= self.length:
            self.body = self.buf[:self.length]
            return True
        if self.length is not None and len(self.buf) > _MAX_RESPONSE:
            raise _BadReply("reply too large")
        return False

    def _head(self, head: str) -> None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _BadReply(f"not an HTTP reply: {lines[0][:60]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return                      # interim reply; the real one follows
        self.status = status
        self.close = parts[0] == "HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                if not value.isdigit():
                    raise _BadReply("bad Content-Length")
                self.length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                self.chunked = True
            elif name == "connection":
                self.close = "close" in value or (self.close and "keep-alive" not in value)
        if self.chunked:
            self.length = None
        self.head_done = True

    def _chunks(self) -> bool:
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                return False
            try:
                size = int(bytes(self.buf[:i]).split(b";")[0], 16)
            except ValueError:
                raise _BadReply("bad chunk size") from None
            if size == 0:
                rest = self.buf[i + 2:]         # optional trailers, then an empty line
                return rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
            if len(self.buf) < i + 2 + size + 2:
                return False
            self.body += self.buf[i + 2:i + 2 + size]
            del self.buf[:i + 2 + size + 2]


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


class _Base:
    def __init__(self, socket_path: str | None, project_id: str | None, timeout: float,
                 url: str | None = None, ak: str | None = None, sk: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.project_id = project_id or default_project_id()
        self.timeout = timeout
        self._remote: _Remote | None = None
        self._ssl_context = ssl_context
        if url is not None:
            if socket_path is not None:
                raise ValueError("give either a socket path or a url, not both")
            self._remote = _parse_url(url, self.project_id, ak, sk)
            self.socket_path: str | None = None
            self.url: str | None = self._remote.url
        else:
            if ak is not None or sk is not None:
                raise ValueError("ak/sk are for a url; on the Unix socket the caller is the process's uid")
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

    def _request(self, method: str, operation: str, body: dict | None) -> bytes:
        return _request_bytes(method, self._path(operation), body, self._remote)

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _unavailable_reason(self, reason: str) -> KmsUnavailable:
        return KmsUnavailable(self.socket_path or "", reason, url=self.url)

    def _unavailable(self, e: BaseException) -> KmsUnavailable:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return self._unavailable_reason(reason)


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
    to a KMS over TCP with signed requests (``ssl_context`` for https; default: the system's
    trust store with hostname checking)."""

    def __init__(self, socket_path: str | None = None, project_id: str | None = None,
                 timeout: float = 10.0, *, url: str | None = None, ak: str | None = None,
                 sk: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(socket_path, project_id, timeout, url, ak, sk, ssl_context)
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
        request = self._request(method, operation, body)
        for attempt in range(2):
            reused = self._sock is not None
            if not reused:
                self._connect()
            try:
                reply = self._roundtrip(request, reused and attempt == 0)
            except _Retry:
                self.close()
                continue
            except (OSError, _BadReply) as e:
                self.close()
                raise self._unavailable(e) from None
            if reply.close:
                self.close()
            return _decode(reply.status, bytes(reply.body))
        raise self._unavailable_reason("connection closed twice")   # pragma: no cover

    def _roundtrip(self, request: bytes, may_retry: bool) -> _Response:
        sock = self._sock
        assert sock is not None
        reply = _Response()
        try:
            sock.sendall(request)
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
        """KeyDetails of an alias or key id (extension x-encfs-resolve-key; a default alias such
        as ``sfs/default`` creates its key on first use)."""
        return self.call("x-encfs-resolve-key", {"key": ref})["key_info"]

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


class _AsyncConn:
    def __init__(self, stream) -> None:
        self.stream = stream


class AsyncKmsClient(_Base):
    """trio client with a small pool of kept-alive connections; every call is bounded by
    ``timeout`` and raises KmsUnavailable when it runs out or the socket fails."""

    def __init__(self, socket_path: str | None = None, project_id: str | None = None,
                 timeout: float = 10.0, max_connections: int = 8, *, url: str | None = None,
                 ak: str | None = None, sk: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(socket_path, project_id, timeout, url, ak, sk, ssl_context)
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
        return _decode(status, data)

    async def _call_pooled(self, method: str, operation: str, body: dict | None) -> tuple[int, bytes]:
        request = self._request(method, operation, body)
        for attempt in range(2):
            reused = bool(self._idle)
            c = self._idle.pop() if reused else await self._open()
            keep = False
            try:
                reply = await self._roundtrip(c, request, reused and attempt == 0)
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

    async def _roundtrip(self, c: _AsyncConn, request: bytes, may_retry: bool) -> _Response:
        trio = self._trio
        reply = _Response()
        try:
            await c.stream.send_all(request)
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
        return (await self.call("x-encfs-resolve-key", {"key": ref}))["key_info"]

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
