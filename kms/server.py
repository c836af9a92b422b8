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
import signal
import socket
import stat
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote

import h11
import trio

from . import auth
from .api import INLINE_OPERATIONS, MAX_BODY, Caller, Kms, KmsApiError, Result, caller_for_access_key, caller_for_uid
from .store import Store

log = logging.getLogger("kms")

IDLE_TIMEOUT = 300.0        # a kept-alive connection with no request for this long is closed
REQUEST_TIMEOUT = 30.0      # a started request must arrive completely within this
AUDIT_FLUSH_INTERVAL = 0.05
SWEEP_INTERVAL = 1.0
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
    """Answer now with this error (and maybe close), from deep inside request reading."""

    def __init__(self, err: KmsApiError, close: bool = False) -> None:
        self.err = err
        self.close = close


class Server:
    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.kms = Kms(store)
        self._writes = trio.CapacityLimiter(1)
        self._sock_ino: int | None = None
        # Request ids: unique per daemon run, cheaper than a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:20]
        self._request_ids = itertools.count(1)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = [await self._unix_listener()]
        try:
            if self.config.listen:
                host, port = self.config.listen
                listeners += await trio.open_tcp_listeners(port, host=host)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._audit_flusher)
                nursery.start_soon(self._sweeper)
                nursery.start_soon(self._accept_loop, listeners[0], False)
                for tcp in listeners[1:]:
                    nursery.start_soon(self._accept_loop, tcp, True)
                where = self.config.socket_path + (f" and tcp {self.config.listen[0]}:{self.config.listen[1]}"
                                                   if self.config.listen else "")
                log.info("serving project %s on %s (data dir %s)", self.config.project_id, where,
                         self.config.data_dir)
                task_status.started()
        finally:
            for lst in listeners:
                with trio.CancelScope(shield=True):
                    await lst.aclose()
            self._remove_socket()
            self.store.flush_audit()
            log.info("stopped")

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                log.info("got %s, shutting down", signal.Signals(sig).name)
                scope.cancel()
                return

    async def _unix_listener(self) -> trio.SocketListener:
        path = self.config.socket_path
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
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Create the socket inaccessible, then open it up to the requested mode: no window in
        # which another user could connect.
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, self.config.socket_mode)
        self._sock_ino = os.stat(path).st_ino
        sock.listen(256)
        return trio.SocketListener(sock)

    def _remove_socket(self) -> None:
        try:
            if self._sock_ino is not None and os.stat(self.config.socket_path).st_ino == self._sock_ino:
                os.unlink(self.config.socket_path)
        except OSError:
            pass

    async def _audit_flusher(self) -> None:
        # Batching: one small commit per interval instead of one per request. A commit of
        # audit.db (synchronous=NORMAL) needs no fsync, so it is cheap to do on the loop.
        while True:
            await trio.sleep(AUDIT_FLUSH_INTERVAL)
            if self.store.audit_pending():
                self.store.flush_audit()

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            if self.kms.sweep_due():
                destroyed, rotated = await trio.to_thread.run_sync(self.kms.sweep, limiter=self._writes)
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
                nursery.start_soon(self._connection, stream, tcp)

    # ---- one connection ----------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream, tcp: bool) -> None:
        caller = None
        if not tcp:
            cred = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            _pid, uid, _gid = _PEERCRED.unpack(cred)
            caller = caller_for_uid(uid)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            async with stream:
                while True:
                    if not await self._one_request(conn, stream, caller):
                        return
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return

    async def _next_event(self, conn: h11.Connection, stream: trio.SocketStream, timeout: float):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(timeout) as scope:
                data = await stream.receive_some(65536)
            if scope.cancelled_caught:
                return None
            conn.receive_data(data)

    async def _one_request(self, conn: h11.Connection, stream: trio.SocketStream, caller: Caller | None) -> bool:
        """Read, answer one request. False when the connection should end."""
        try:
            event = await self._next_event(conn, stream, IDLE_TIMEOUT)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request)
            start = time.perf_counter()
            headers: dict[str, str] = {}
            for name, value in event.headers:
                headers.setdefault(name.decode("latin-1"), value.decode("utf-8", "replace"))
            cl = headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > MAX_BODY:
                raise _Reply(KmsApiError("KMS.0203", f"request body is longer than {MAX_BODY} bytes"), close=True)
            body = bytearray()
            while True:
                ev = await self._next_event(conn, stream, REQUEST_TIMEOUT)
                if ev is None or isinstance(ev, h11.ConnectionClosed):
                    return False
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > MAX_BODY:
                        raise _Reply(KmsApiError("KMS.0203", f"request body is longer than {MAX_BODY} bytes"),
                                     close=True)
                elif isinstance(ev, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send(conn, stream, Result(e.error_status_hint, KmsApiError(
                    "KMS.0201", f"malformed HTTP request: {e}", e.error_status_hint).body()), close=True)
            return False
        except _Reply as r:
            await self._send(conn, stream, Result(r.err.status, r.err.body(), error_code=r.err.code), close=r.close)
            return not r.close

        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        result, op, caller = await self._dispatch(method, target, headers, bytes(body), caller)
        await self._send(conn, stream, result)
        label = caller.label if caller else "anonymous"
        for rec in self.kms.audit_records(caller or Caller("", frozenset(), False, label), op, result):
            self.store.audit(rec)
        keys = ",".join(sorted({k for k, _ in result.touched if k})) or "-"
        log.info("%s %s %s key=%s -> %d%s %.1fms", label, method, op or target, keys, result.status,
                 f" {result.error_code}" if result.error_code else "", (time.perf_counter() - start) * 1000)
        return True

    async def _dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes,
                        caller: Caller | None) -> tuple[Result, str, Caller | None]:
        op = ""
        try:
            if caller is None:      # TCP: the signature says who it is
                cred = auth.verify(self.config.credentials or {}, method, target, headers, body, time.time())
                caller = caller_for_access_key(cred.user_name, cred.access_key)
            path, _, query_string = target.partition("?")
            parts = path.split("/")
            if path in ("/", "/v1.0", "/v1.0/") and method == "GET":
                return Result(200, _versions()), "versions", caller
            if len(parts) < 5 or parts[0] != "" or parts[1] != "v1.0" or parts[3] != "kms" or not parts[4]:
                raise KmsApiError("KMS.0201", f"invalid request URL {path}; expected /v1.0/{{project_id}}/kms/<operation>")
            project = unquote(parts[2])
            op = unquote("/".join(parts[4:]))
            if project != self.config.project_id:
                raise KmsApiError("KMS.0321", f"project id {project} in the URL is not this KMS's project "
                                              f"({self.config.project_id})")
            hdr_project = headers.get("x-project-id")
            if hdr_project and hdr_project != self.config.project_id:
                raise KmsApiError("KMS.0321", f"X-Project-Id {hdr_project} is not this KMS's project")
            query = {}
            for part in query_string.split("&"):
                if part:
                    k, _, v = part.partition("=")
                    query[unquote(k)] = unquote(v)
            if op in INLINE_OPERATIONS:
                result = self.kms.handle(caller, method, op, query, body)
            else:
                result = await trio.to_thread.run_sync(self.kms.handle, caller, method, op, query, body,
                                                       limiter=self._writes)
            return result, op, caller
        except KmsApiError as e:
            return Result(e.status, e.body(), error_code=e.code), op, caller
        except Exception:
            log.exception("internal error in %s %s", method, op)
            e = KmsApiError("KMS.0101", "internal error in the KMS; see its log")
            return Result(e.status, e.body(), error_code=e.code), op, caller

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, result: Result, close: bool = False) -> None:
        payload = json.dumps(result.body, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json;charset=UTF-8"), ("Content-Length", str(len(payload))),
                   ("X-Request-Id", f"{self._id_prefix}{next(self._request_ids):012x}")]
        if close:
            headers.append(("Connection", "close"))
        reason = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found",
                  500: b"Internal Server Error"}.get(result.status, b"")
        data = conn.send(h11.Response(status_code=result.status, headers=headers, reason=reason))
        data += conn.send(h11.Data(data=payload))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)


def _versions() -> dict:
    return {"versions": [{"id": "v1.0", "links": [], "version": "", "status": "CURRENT",
                          "updated": "2026-01-01T00:00:00Z", "min_version": ""}]}


def serve(config: ServerConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status."""
    store = Store(config.data_dir, clock=make_clock(config.clock_file))
    try:
        trio.run(Server(config, store).run)
    finally:
        store.close()
    return 0
