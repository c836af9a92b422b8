"""The daemon's I/O: HTTP/1.1 (h11) over a Unix socket and optionally TCP, under trio.

One trio task per connection, keep-alive, requests answered in order. The caller on the Unix
socket is the peer's uid (SO_PEERCRED); on TCP it is the access key of a verified
SDK-HMAC-SHA256 signature. Routing below ``/v1.0/{project_id}/kms/`` and everything about keys
is kms.api's job; this module owns sockets, framing, the body limit, the project check, logging,
the audit flush and the periodic sweep (deletion and rotation).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import resource
import signal
import socket
import ssl
import stat
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote

import h11
import trio

from . import auth, fasthttp, material
from .api import INLINE_OPERATIONS, MAX_BODY, THREADED_READ_OPERATIONS, Caller, Kms, KmsApiError, Result, caller_for_access_key, caller_for_uid
from .reqlog import RequestLog
from .shared import SharedWrites
from .store import Store
from .strict import StrictHuawei

log = logging.getLogger("kms")

AUDIT_FLUSH_INTERVAL = 0.05
SWEEP_INTERVAL = 1.0
MAX_HEADER_BYTES = 16 * 1024    # request line + headers; beyond: 431 KMS.0203
MAX_REFUSING = 256              # connections being answered 503 at once; beyond: closed at once
FD_RESERVE = 128                # file descriptors kept free for the databases, logs and refusals
_PEERCRED = struct.Struct("3i")


@dataclass
class ServerConfig:
    socket_path: str
    data_dir: str
    project_id: str
    socket_mode: int = 0o600
    listen: tuple[str, int] | None = None
    credentials: dict[str, auth.Credential] | None = None
    clock_file: str | None = None
    # Hostile-client limits (docs/KMS.md, "Limits"):
    header_timeout: float = 10.0        # from a request's first byte to the end of its headers
    body_timeout: float = 30.0          # from the end of the headers to the end of the body
    idle_timeout: float = 60.0          # a kept-alive connection without a new request; a stalled reply
    max_connections: int = 1024         # open connections in all
    max_connections_per_peer: int = 256     # per uid (Unix socket) or per IP address (TCP)
    rate_limit: float = 20000.0         # requests per second per caller (uid, access key); 0 = off
    passphrase: bytes | None = None     # root key from a passphrase (scrypt) instead of root.key
    tls: ssl.SSLContext | None = None   # TLS on the TCP listener (kms serve --tls-cert/--tls-key)
    strict_huawei: bool = False         # no x-encfs-* extensions, foreign ciphertexts (kms.strict)


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ server context; OSError / ssl.SSLError for unreadable or mismatched files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def make_clock(clock_file: str | None) -> Callable[[], int]:
    """Milliseconds since the epoch. FOR TESTING ONLY: with a clock file, its content (Unix
    seconds, a float) is "now" for key deletion, rotation and audit times; an empty or missing
    file falls back to the real clock."""
    if not clock_file:
        return lambda: int(time.time() * 1000)

    def clock() -> int:
        try:
            with open(clock_file) as f:
                text = f.read().strip()
            if text:
                return int(float(text) * 1000)
        except (OSError, ValueError):
            pass
        return int(time.time() * 1000)
    return clock


class _Reply(Exception):
    """Answer now with this error and close, from deep inside request reading."""

    def __init__(self, err: KmsApiError) -> None:
        self.err = err


class _Replayed(trio.abc.Stream):
    """A stream whose first bytes were already read (to tell TLS from plain HTTP): they are
    received again first."""

    def __init__(self, stream: trio.abc.Stream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            n = len(self._first) if max_bytes is None else max_bytes
            data, self._first = self._first[:n], self._first[n:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. Not thread-safe (event loop only)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def has(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RateLimiter:
    """One token bucket per caller: ``rate`` requests per second, bursts of one second's worth."""

    MAX_BUCKETS = 10000

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._warned: dict[str, float] = {}

    def _bucket(self, who: str, now: float) -> TokenBucket:
        b = self._buckets.get(who)
        if b is None:
            if len(self._buckets) >= self.MAX_BUCKETS:
                # Forget buckets that are full again: they behave exactly like new ones.
                for k in [k for k, v in self._buckets.items() if (v._refill(now), v.tokens)[1] >= v.burst]:
                    del self._buckets[k]
            b = self._buckets[who] = TokenBucket(self.rate, max(1.0, self.rate), now)
        return b

    def allow(self, who: str) -> bool:
        return self.rate <= 0 or self._bucket(who, self.clock()).take(self.clock())

    def exhausted(self, who: str) -> bool:
        return self.rate > 0 and not self._bucket(who, self.clock()).has(self.clock())

    def should_warn(self, who: str) -> bool:
        now = self.clock()
        if now - self._warned.get(who, -1e9) < 10:
            return False
        if len(self._warned) > self.MAX_BUCKETS:
            self._warned.clear()
        self._warned[who] = now
        return True


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _raw_error(status: int, code: str, msg: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error reply that closes the connection, without an h11 state machine
    (for connections refused before any request was read)."""
    body = json.dumps(KmsApiError(code, msg, status).body(), separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: application/json;charset=UTF-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


@dataclass
class WorkerRole:
    """What one worker process of ``kms serve --workers N`` (kms/workers.py) gets: the listening
    sockets made by the parent, which also removes the socket file; its index (worker 0 runs
    the sweep); the shared write lock and generation counter."""

    index: int
    unix: socket.socket
    tcp: list[socket.socket]
    shared: SharedWrites


class _Wire:
    """Bytes of one connection read for the fast path and not yet used (pipelined requests)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""


class Server:
    def __init__(self, config: ServerConfig, store: Store, role: WorkerRole | None = None) -> None:
        self.config = config
        self.store = store
        self._role = role
        self._shared = role.shared if role is not None else None
        self._write_turn = trio.Lock()
        self.kms = Kms(store)
        self._handle = StrictHuawei(self.kms.handle) if config.strict_huawei else self.kms.handle
        self._writes = trio.CapacityLimiter(1)
        self._sock_ino: int | None = None
        # Request ids: unique per daemon run, cheaper than a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:20]
        self._request_ids = itertools.count(1)
        self._limiter = RateLimiter(config.rate_limit)
        self._open = 0                          # connections being served
        self._per_peer: dict[str, int] = {}
        self._refusing = 0
        self._max_connections = config.max_connections
        self._warned_full = -1e9
        self._reqlog = RequestLog(log)

    # ---- lifecycle ---------------------------------------------------------------------------

    def _raise_fd_limit(self) -> None:
        """Make room for max_connections file descriptors (soft limit up to the hard limit);
        if there is not enough, serve fewer connections rather than ever hitting EMFILE."""
        want = self.config.max_connections + MAX_REFUSING + FD_RESERVE
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != resource.RLIM_INFINITY and soft < want:
                new = want if hard == resource.RLIM_INFINITY else min(want, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
        except (OSError, ValueError):
            return
        if soft != resource.RLIM_INFINITY and soft - FD_RESERVE - MAX_REFUSING < self.config.max_connections:
            self._max_connections = max(1, soft - FD_RESERVE - MAX_REFUSING)
            log.warning("open-file limit %d allows only %d connections (asked for --max-connections %d)",
                        soft, self._max_connections, self.config.max_connections)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._raise_fd_limit()
        if self._role is not None:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s))
                         for s in (self._role.unix, *self._role.tcp)]
        else:
            listeners = [await self._unix_listener()]
        try:
            if self.config.listen and self._role is None:
                host, port = self.config.listen
                listeners += await trio.open_tcp_listeners(port, host=host)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._audit_flusher)
                if self._role is None or self._role.index == 0:
                    nursery.start_soon(self._sweeper)
                nursery.start_soon(self._accept_loop, listeners[0], False)
                for tcp in listeners[1:]:
                    nursery.start_soon(self._accept_loop, tcp, True)
                where = self.config.socket_path + (
                    f" and {'https' if self.config.tls else 'http'} {self.config.listen[0]}:{self.config.listen[1]}"
                    if self.config.listen else "")
                if self.config.strict_huawei:
                    where += " (strict Huawei mode: no x-encfs-* extensions, foreign ciphertexts)"
                c = self.config
                if self._role is not None:
                    where += f" (worker {self._role.index})"
                log.info("serving project %s on %s (data dir %s)", c.project_id, where, c.data_dir)
                log.info("limits: %d connections (%d per uid/IP), %s requests/s per caller, timeouts "
                         "header %gs body %gs idle %gs", self._max_connections, c.max_connections_per_peer,
                         f"{c.rate_limit:g}" if c.rate_limit > 0 else "unlimited", c.header_timeout,
                         c.body_timeout, c.idle_timeout)
                task_status.started()
        finally:
            for lst in listeners:
                with trio.CancelScope(shield=True):
                    await lst.aclose()
            self._remove_socket()
            self.store.flush_audit()
            self._reqlog.close()
            log.info("stopped")

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                log.info("got %s, shutting down", signal.Signals(sig).name)
                scope.cancel()
                return

    async def _unix_listener(self) -> trio.SocketListener:
        sock, self._sock_ino = bind_unix(self.config.socket_path, self.config.socket_mode)
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    def _remove_socket(self) -> None:
        remove_unix(self.config.socket_path, self._sock_ino)

    async def _audit_flusher(self) -> None:
        # Batching: one small commit per interval instead of one per request. A commit of
        # audit.db (synchronous=NORMAL) needs no fsync, so it is cheap to do on the loop.
        while True:
            await trio.sleep(AUDIT_FLUSH_INTERVAL)
            if self.store.audit_pending():
                self.store.flush_audit()
            self._reqlog.flush()

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            self._refresh()
            if self.kms.sweep_due():
                destroyed, rotated = await self._write(self.kms.sweep)
                if destroyed or rotated:
                    log.info("sweep: destroyed %d key(s), rotated %d key(s)", destroyed, rotated)

    async def _accept_loop(self, listener: trio.SocketListener, tcp: bool) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:
                    # EMFILE and friends: back off instead of spinning.
                    log.warning("accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                try:
                    peer = self._peer(stream, tcp)
                except OSError:
                    stream.socket.close()
                    continue
                per_peer = self._per_peer.get(peer, 0)
                if self._open >= self._max_connections or per_peer >= self.config.max_connections_per_peer:
                    self._refuse_connection(nursery, stream, peer, per_peer)
                    continue
                self._open += 1
                self._per_peer[peer] = per_peer + 1
                nursery.start_soon(self._connection, stream, tcp, peer)

    @staticmethod
    def _peer(stream: trio.SocketStream, tcp: bool) -> str:
        """Who the connection limits count against: ``uid=N`` on the socket, ``ip=ADDR`` on TCP."""
        if tcp:
            return f"ip={stream.socket.getpeername()[0]}"
        cred = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        return f"uid={_PEERCRED.unpack(cred)[1]}"

    def _refuse_connection(self, nursery: trio.Nursery, stream: trio.SocketStream, peer: str, per_peer: int) -> None:
        now = time.monotonic()
        if now - self._warned_full > 10:
            self._warned_full = now
            if self._open >= self._max_connections:
                log.warning("connection limit (%d) reached: refusing new connections with 503", self._max_connections)
            else:
                log.warning("%s has %d connections open (limit %d per uid/IP): refusing more with 503", peer,
                            per_peer, self.config.max_connections_per_peer)
        if self._refusing >= MAX_REFUSING:
            stream.socket.close()       # under a flood: no answer, but no file descriptor held either
            return
        self._refusing += 1
        nursery.start_soon(self._refuse, stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """503 + Huawei body at once, then close (after reading away the request briefly, so
        that the client sees the reply rather than a reset)."""
        try:
            async with stream:
                await self._reply_and_close(stream, _raw_error(
                    503, "KMS.0103", "too many connections to the KMS; retry later", "Retry-After: 1\r\n"),
                    linger=0.25)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._refusing -= 1

    # ---- one connection ----------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream, tcp: bool, peer: str) -> None:
        caller = None
        reason = "closed"
        try:
            if not tcp:
                caller = caller_for_uid(int(peer[4:]))
            elif self.config.tls is not None:
                stream = await self._tls(stream, peer)
                if stream is None:
                    reason = "no TLS"
                    return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
            wire = _Wire()
            async with stream:
                while True:
                    reason = await self._one_request(conn, stream, caller, peer, wire)
                    if reason or conn.our_state is h11.MUST_CLOSE:
                        return
                    if conn.our_state is h11.DONE:      # not after a request of the fast path
                        conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            reason = "reset"
            return
        finally:
            self._open -= 1
            n = self._per_peer.get(peer, 1) - 1
            if n > 0:
                self._per_peer[peer] = n
            else:
                self._per_peer.pop(peer, None)
            log.debug("connection of %s ended (%s)", peer, reason or "close")

    async def _tls(self, stream: trio.SocketStream, peer: str) -> trio.SSLStream | None:
        """The TLS session of a new TCP connection, or None (closed) when the client speaks
        plain HTTP (answered with one Huawei-style error that says to use https://) or the
        handshake fails (a client that does not trust our certificate: logged in one line)."""
        cfg = self.config
        with trio.move_on_after(cfg.header_timeout):
            first = await stream.receive_some(65536)
            if not first:
                await stream.aclose()
                return None
            if first[:1].isalpha():      # "POST /v1.0/..." where a TLS ClientHello (0x16) belongs
                await self._reply_and_close(stream, _raw_error(
                    400, "KMS.0201", "this KMS port speaks TLS only: use an https:// URL"))
                log.info("%s: plain HTTP on the TLS port -> 400 KMS.0201", peer)
                await stream.aclose()
                return None
            tls = trio.SSLStream(_Replayed(stream, first), cfg.tls, server_side=True,
                                 https_compatible=True)
            try:
                await tls.do_handshake()
                return tls
            except trio.BrokenResourceError as e:
                why = e.__cause__
                log.info("%s: TLS handshake failed: %s", peer,
                         getattr(why, "reason", None) or type(why).__name__ if why else "connection lost")
        with trio.CancelScope(shield=True):
            await stream.aclose()
        return None

    async def _reply_and_close(self, stream: trio.SocketStream, data: bytes, linger: float = 1.0) -> None:
        """Send a final reply, then half-close and read away what the client is still sending
        (briefly, boundedly): closing with unread data would reset the connection and the client
        might never see the reply."""
        with trio.move_on_after(min(self.config.idle_timeout, 5.0)):
            await stream.send_all(data)
            if not isinstance(stream, trio.abc.HalfCloseableStream):
                return      # TLS: closing sends close_notify after the reply
            await stream.send_eof()
            drained = 0
            with trio.move_on_after(linger):
                while drained < 1 << 20:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    drained += len(chunk)

    async def _fill(self, conn: h11.Connection, stream: trio.SocketStream, deadline: float) -> bool:
        """Receive more bytes into h11 before ``deadline`` (trio clock). False on timeout."""
        # A CancelScope, not trio.move_on_at: the same thing without a generator-based context
        # manager, which cost ~4 % of the daemon's CPU per request (py-spy --gil).
        with trio.CancelScope(deadline=deadline):
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            return True
        return False

    async def _fast_request(self, conn: h11.Connection, stream: trio.SocketStream, caller: Caller | None,
                            peer: str, wire: _Wire) -> str | None:
        """The fast path (kms/fasthttp.py): a simple request that arrived whole is parsed and
        answered without h11. None: not such a request; its bytes are h11's now (the slow path
        goes on from them: its header deadline starts after this first read, at most one
        header_timeout later than it would have)."""
        raw = stream.socket if type(stream) is trio.SocketStream else None
        if not wire.pending:
            data = None
            with trio.CancelScope(deadline=trio.current_time() + self.config.idle_timeout):
                # The trio socket itself on plain connections: SocketStream's wrappers cost more
                # than the recv(2) here. Any OSError ends the connection, as SocketStream's would.
                if raw is None:
                    data = await stream.receive_some(65536)
                else:
                    try:
                        data = await raw.recv(65536)
                    except OSError as e:
                        raise trio.BrokenResourceError(f"recv: {e.strerror}") from None
            if data is None:
                return "idle timeout"
            if not data:
                return "closed by peer"
            wire.pending = data
        req = fasthttp.parse(wire.pending, MAX_HEADER_BYTES, MAX_BODY)
        if req is None:
            conn.receive_data(wire.pending)
            wire.pending = b""
            return None
        wire.pending = wire.pending[req.consumed:]
        start = time.perf_counter()
        result, op, caller, limited = await self._dispatch(req.method, req.target, req.headers, req.body,
                                                           caller, peer)
        data = fasthttp.response(result.status, _REASONS.get(result.status, ""), *self._reply_parts(result))
        if raw is not None:
            # The reply is small and the socket's buffer is almost always free: one send(2) without
            # trio's wrappers and scheduling round (a quarter of the daemon's CPU per request went
            # there). The next receive is a checkpoint, so other connections still get their turn.
            try:
                data = data[os.write(raw.fileno(), data):]
            except BlockingIOError:
                pass
            except OSError as e:
                raise trio.BrokenResourceError(f"send: {e.strerror}") from None
        if data:
            await self._send_bytes(stream, data)
        return self._after(result, op, caller, limited, req.method, req.target, peer, start)

    async def _one_request(self, conn: h11.Connection, stream: trio.SocketStream, caller: Caller | None,
                           peer: str, wire: _Wire) -> str:
        """Read and answer one request. Returns '' to go on, else why the connection ends.

        Deadlines are absolute, so a client sending a byte at a time cannot stretch them:
        idle_timeout for the first byte of a request, header_timeout from there to the end of
        the headers, body_timeout from there to the end of the body."""
        cfg = self.config
        if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
            reason = await self._fast_request(conn, stream, caller, peer, wire)
            if reason is not None:
                return reason
        try:
            started = bool(conn.trailing_data[0])       # pipelined bytes already here
            deadline = trio.current_time() + (cfg.header_timeout if started else cfg.idle_timeout)
            while (event := conn.next_event()) is h11.NEED_DATA:
                if not await self._fill(conn, stream, deadline):
                    if not started:
                        return "idle timeout"
                    raise _Reply(KmsApiError("KMS.0201", f"request headers not complete within "
                                                         f"{cfg.header_timeout:g}s", 408))
                if not started:
                    started = True
                    deadline = trio.current_time() + cfg.header_timeout
            if isinstance(event, h11.ConnectionClosed):
                return "closed by peer"
            assert isinstance(event, h11.Request)
            start = time.perf_counter()
            # h11 bounds only a head that arrives in pieces; one that arrives whole is measured here.
            if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > MAX_HEADER_BYTES:
                raise _Reply(KmsApiError("KMS.0203", f"request headers are longer than {MAX_HEADER_BYTES} bytes",
                                         431))
            headers: dict[str, str] = {}
            for name, value in event.headers:
                headers.setdefault(name.decode("latin-1"), value.decode("utf-8", "replace"))
            cl = headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > MAX_BODY:
                raise _Reply(KmsApiError("KMS.0203", f"request body is longer than {MAX_BODY} bytes"))
            body = bytearray()
            deadline = trio.current_time() + cfg.body_timeout
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    if not await self._fill(conn, stream, deadline):
                        raise _Reply(KmsApiError("KMS.0201", f"request body not complete within "
                                                             f"{cfg.body_timeout:g}s", 408))
                    continue
                if isinstance(ev, h11.ConnectionClosed):
                    return "closed by peer mid-request"
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > MAX_BODY:
                        raise _Reply(KmsApiError("KMS.0203", f"request body is longer than {MAX_BODY} bytes"))
                elif isinstance(ev, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError as e:
            # A fixed message: h11's own texts quote the offending bytes, which may be anything.
            if e.error_status_hint == 431:
                err = KmsApiError("KMS.0203", f"request headers are longer than {MAX_HEADER_BYTES} bytes", 431)
            else:
                err = KmsApiError("KMS.0201", "malformed HTTP request", 400)
            await self._reply_and_close(stream, _raw_error(err.status, err.code, err.msg))
            log.info("%s: malformed HTTP request -> %d %s", peer, err.status, err.code)
            return "malformed request"
        except _Reply as r:
            # Written raw: h11 will not answer a request it has not fully seen (timeouts).
            await self._reply_and_close(stream, _raw_error(r.err.status, r.err.code, r.err.msg))
            log.info("%s: %s -> %d %s", peer, r.err.msg, r.err.status, r.err.code)
            return "refused request"

        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        result, op, caller, limited = await self._dispatch(method, target, headers, bytes(body), caller, peer)
        await self._send(conn, stream, result)
        return self._after(result, op, caller, limited, method, target, peer, start)

    def _after(self, result: Result, op: str, caller: Caller | None, limited: bool, method: str, target: str,
               peer: str, start: float) -> str:
        """After a reply: the audit record and the request log line."""
        cfg = self.config
        label = caller.label if caller else "anonymous"
        if limited:
            # Not audited (a flood would only fill audit.db); a warning every 10 s says who.
            if self._limiter.should_warn(label if caller else peer):
                log.warning("%s exceeds the rate limit of %g requests/s: refusing with 429",
                            label if caller else peer, cfg.rate_limit)
            return ""
        for rec in self.kms.audit_records(caller or Caller("", frozenset(), False, label), op, result):
            self.store.audit(rec)
        if self._reqlog.enabled:
            keys = ",".join(sorted({k for k, _ in result.touched if k})) or "-"
            aad = f" aad={_printable(result.aad)}" if result.aad else ""
            code = f" {result.error_code}" if result.error_code else ""
            self._reqlog.line(f"{label} {method} {_printable(op or target)} key={keys}{aad} -> {result.status}"
                              f"{code} {(time.perf_counter() - start) * 1000:.1f}ms")
        return ""

    async def _dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes,
                        caller: Caller | None, peer: str) -> tuple[Result, str, Caller | None, bool]:
        """(result, operation, caller, rate_limited)."""
        op = ""
        try:
            if caller is None:      # TCP: the signature says who it is
                if self._limiter.exhausted(peer):
                    return self._too_many(peer), op, caller, True
                try:
                    cred = auth.verify(self.config.credentials or {}, method, target, headers, body, time.time())
                except KmsApiError:
                    self._limiter.allow(peer)       # failed signatures spend the address's budget
                    raise
                caller = caller_for_access_key(cred.user_name, cred.access_key)
            if not self._limiter.allow(caller.label):
                return self._too_many(caller.label), op, caller, True
            path, _, query_string = target.partition("?")
            parts = path.split("/")
            if path == "/" and method == "GET":
                return Result(200, {"versions": [_VERSION]}), "versions", caller, False
            if path in ("/v1.0", "/v1.0/") and method == "GET":
                # show_version: one object, Huawei's shape (the SDK model's ``version``)
                return Result(200, {"version": _VERSION}), "version", caller, False
            if len(parts) < 5 or parts[0] != "" or parts[1] != "v1.0" or parts[3] != "kms" or not parts[4]:
                raise KmsApiError("KMS.0201", "invalid request URL; expected /v1.0/{project_id}/kms/<operation>")
            project = unquote(parts[2])
            op = unquote("/".join(parts[4:]))
            if project != self.config.project_id:
                raise KmsApiError("KMS.0321", f"project id {_printable(project)[:80]} in the URL is not this "
                                              f"KMS's project ({self.config.project_id})")
            hdr_project = headers.get("x-project-id")
            if hdr_project and hdr_project != self.config.project_id:
                raise KmsApiError("KMS.0321", f"X-Project-Id {_printable(hdr_project)[:80]} is not this KMS's project")
            query = {}
            for part in query_string.split("&"):
                if part:
                    k, _, v = part.partition("=")
                    query[unquote(k)] = unquote(v)
            if op in INLINE_OPERATIONS:
                self._refresh()
                result = self._handle(caller, method, op, query, body)
            elif op in THREADED_READ_OPERATIONS and self._shared is not None:
                self._refresh()
                result = await trio.to_thread.run_sync(self._handle, caller, method, op, query, body,
                                                       limiter=self._writes)
            else:
                result = await self._write(self._handle, caller, method, op, query, body)
            return result, op, caller, False
        except KmsApiError as e:
            return Result(e.status, e.body(), error_code=e.code), op, caller, False
        except Exception as e:
            # The type and place only: an exception's text might quote request data.
            tb = e.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
            log.error("internal error in %s %s: %s at %s", method, _printable(op), type(e).__name__, where)
            e = KmsApiError("KMS.0101", "internal error in the KMS; see its log")
            return Result(e.status, e.body(), error_code=e.code), op, caller, False

    def _refresh(self) -> None:
        """Workers: reload the store's mirror when another worker wrote since (kms/shared.py).
        On the event loop, never while this worker's write thread runs (that holds the lock,
        so the counter cannot move)."""
        shared = self._shared
        if shared is not None and shared.moved():
            g = shared.current()        # read first: a write during the reload moves it again
            self.store.reload()
            shared.seen = g
            material.retain(self.store.live_material())

    async def _write(self, fn, *args):
        """Run an operation that may write (or is slow) in a thread. Workers: under the shared
        write lock, on a fresh mirror, and with the counter bumped before the reply if keys.db
        changed, so that every worker sees the write at its next request."""
        shared = self._shared
        if shared is None:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._writes)
        async with self._write_turn:
            await trio.to_thread.run_sync(shared.acquire, limiter=self._writes)
            try:
                self._refresh()
                before = self.store.changes()
                try:
                    return await trio.to_thread.run_sync(fn, *args, limiter=self._writes)
                finally:
                    if self.store.changes() != before:
                        shared.bump()
            finally:
                shared.release()

    def _too_many(self, who: str) -> Result:
        e = KmsApiError("APIGW.0308", f"the throttling threshold has been reached: at most "
                                      f"{self.config.rate_limit:g} requests per second for {who}")
        return Result(e.status, e.body(), error_code=e.code)

    def _reply_parts(self, result: Result, close: bool = False) -> tuple[list[tuple[str, str]], bytes]:
        payload = json.dumps(result.body, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json;charset=UTF-8"), ("Content-Length", str(len(payload))),
                   ("X-Request-Id", f"{self._id_prefix}{next(self._request_ids):012x}")]
        if result.status == 429:
            headers.append(("Retry-After", "1"))
        if close:
            headers.append(("Connection", "close"))
        return headers, payload

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, result: Result, close: bool = False) -> None:
        headers, payload = self._reply_parts(result, close)
        data = conn.send(h11.Response(status_code=result.status, headers=headers,
                                      reason=_REASONS.get(result.status, "").encode()))
        data += conn.send(h11.Data(data=payload))
        data += conn.send(h11.EndOfMessage())
        await self._send_bytes(stream, data)

    async def _send_bytes(self, stream: trio.SocketStream, data: bytes) -> None:
        # A client that does not read its replies must not hold the task forever.
        with trio.CancelScope(deadline=trio.current_time() + self.config.idle_timeout) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("the client did not read its reply")


def bind_unix(path: str, mode: int) -> tuple[socket.socket, int]:
    """The listening Unix socket at ``path`` and its inode (to remove only our own at exit).
    A stale socket of a daemon that died is replaced; a live one is refused."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)     # stale socket of a daemon that died
        else:
            raise OSError(errno.EADDRINUSE, f"another daemon already answers at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Create the socket inaccessible, then open it up to the requested mode: no window in
    # which another user could connect.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    ino = os.stat(path).st_ino
    sock.listen(1024)
    return sock, ino


def remove_unix(path: str, ino: int | None) -> None:
    """Remove the socket file if it is still the one we bound (not a successor's)."""
    try:
        if ino is not None and os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets for --listen HOST:PORT, as trio.open_tcp_listeners makes them (one
    per address family the host resolves to), for worker processes to share."""
    socks = []
    try:
        for family, type_, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE):
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(1024)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _printable(text: str) -> str:
    """Caller-chosen text made safe for one log line: control characters and non-ASCII escaped."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                   f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)


_VERSION = {"id": "v1.0", "links": [], "version": "", "status": "CURRENT",
            "updated": "2026-01-01T00:00:00Z", "min_version": ""}


def serve(config: ServerConfig, workers: int = 1) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status. ``workers`` > 1: that many
    processes on the one socket and store (kms/workers.py)."""
    if workers > 1:
        from .workers import serve_workers
        return serve_workers(config, workers)
    store = Store(config.data_dir, clock=make_clock(config.clock_file), passphrase=config.passphrase)
    try:
        trio.run(Server(config, store).run)
    finally:
        store.close()
    return 0
