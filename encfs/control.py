"""The mount daemon's control channel: what a running mount is doing, for `encfs status`.

A Unix socket ``BACKING/.encfs/control.sock`` (mode 0600 in the 0700 control dir, so only
the daemon's uid and root can ask) served by a trio task in the mount's nursery. A client
sends one JSON line, ``{"op": "status"}``, and gets one JSON line back: the report of
`build_report`. The report is built on the daemon's trio thread between two requests, so
it is one consistent snapshot; the only wait is a bounded round trip to the KMS (its
latency and the state of every CMK in use). Nothing in it is secret: key ids, counts,
timings and the last log lines (which never hold key material).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Iterator

import trio

from kms.client import KmsError, KmsUnavailable

from . import backing as bk

if TYPE_CHECKING:
    from .fs import EncFS

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
PROTOCOL_VERSION = 1
MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0  # a client that sends nothing is dropped after this
KMS_TIMEOUT = 3.0  # the KMS check of one status request, all CMKs together
LAST_ERRORS = 10

#: Huawei KMS key_state values.
KEY_STATES = {"1": "pending_creation", "2": "enabled", "3": "disabled",
              "4": "pending_deletion", "5": "pending_import"}


def socket_path(backing: bytes) -> bytes:
    return bk.control_path(backing, SOCKET_NAME)


@contextlib.contextmanager
def addressable(path: bytes) -> Iterator[bytes]:
    """A name for ``path`` that fits in a sockaddr_un (107 bytes): the path itself, or,
    for a deep backing dir, the same file reached through an O_PATH fd of its directory
    (/proc/self/fd/N/NAME), valid while the context lasts."""
    if len(path) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield b"/proc/self/fd/%d/%s" % (fd, os.path.basename(path))
    finally:
        os.close(fd)


class RecentErrors(logging.Handler):
    """The last warnings and errors the daemon logged, for the report."""

    def __init__(self, size: int = LAST_ERRORS) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        self.records.append({"time": round(record.created, 3), "level": record.levelname,
                             "message": message})


class ControlServer:
    """Serves status reports of one mount (`ops`) whose KMS is `target`."""

    def __init__(self, ops: "EncFS", target: Any) -> None:
        self.ops = ops
        self.target = target  # kmsconn/mount KmsTarget: only .where is used
        self.started = time.time()
        self.errors = RecentErrors()
        self.path = socket_path(ops.backing)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled (the mount's nursery, at unmount); the socket file is
        removed again on the way out."""
        logging.getLogger().addHandler(self.errors)
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # left by a daemon that was killed
            # bind and chmod with no checkpoint between (the daemon's umask is 0; the 0700
            # control dir keeps others out meanwhile)
            with addressable(self.path) as name:
                plain.bind(name)
            os.chmod(self.path, 0o600)
            plain.listen(16)
            sock = trio.socket.from_stdlib_socket(plain)
        except OSError as e:
            plain.close()
            logging.getLogger().removeHandler(self.errors)
            log.warning("no control channel (encfs status) for this mount: %s: %s",
                        bk.printable(self.path), e.strerror)
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                listener = trio.SocketListener(sock)
                task_status.started()
                await trio.serve_listeners(self._handle, [listener],
                                           handler_nursery=nursery)
        finally:
            logging.getLogger().removeHandler(self.errors)
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    request = await _read_line(stream)
                    reply = await self.answer(request)
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def answer(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except ValueError:
            return {"error": "the request is not JSON"}
        if not isinstance(request, dict) or request.get("op") != "status":
            return {"error": "unknown request; send {\"op\": \"status\"}"}
        return await self.build_report()

    async def build_report(self) -> dict[str, Any]:
        ops, keys = self.ops, self.ops.keys
        keys.expire()
        usage = _key_usage(ops)
        kms_info, states, aliases = await self._check_kms(sorted(usage))
        key_rows = []
        for key_id in sorted(usage):
            revoked = keys.revoked.get(key_id)
            key_rows.append({
                "key_id": key_id, "alias": aliases.get(key_id),
                "default": key_id == keys.key_id,
                "state": states.get(key_id, "unknown"),
                "revoked_here": errno.errorcode.get(revoked, str(revoked)) if revoked else None,
                **usage[key_id]})
        try:
            pending = len(ops.journal.pending())
        except OSError:
            pending = None
        stats = ops.stats.summary()
        return {
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uid": os.geteuid(),
            "backing": os.fsdecode(ops.backing),
            "mountpoint": ops.mountpoint,
            "started": round(self.started, 3),
            "uptime_s": round(time.time() - self.started, 1),
            "settings": {"key": keys.key_id, "key_cache_ttl": keys.ttl,
                         "shared_backing": not ops.enable_writeback_cache},
            "kms": kms_info,
            "keys": key_rows,
            "deks_cached": sum(k["deks_cached"] for k in key_rows),
            "deks_prepared": sum(k["deks_prepared"] for k in key_rows),
            "open_files": sum(k["open_files"] for k in key_rows),
            "journal_pending": pending,
            "requests": {op: s.as_dict() for op, s in stats.items()},
            "last_errors": list(self.errors.records),
        }

    async def _check_kms(self, key_ids: list[str]
                         ) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
        """Ask the KMS for the state of every CMK in use; the first answer's round trip is
        the KMS latency. Bounded by KMS_TIMEOUT altogether."""
        info: dict[str, Any] = {"endpoint": self.target.where, "reachable": None,
                                "latency_ms": None, "error": None}
        states: dict[str, str] = {}
        aliases: dict[str, str] = {}
        kms = self.ops.keys.kms
        with trio.move_on_after(KMS_TIMEOUT) as scope:
            for key_id in key_ids:
                t0 = time.perf_counter()
                try:
                    key_info = await kms.call("describe-key", {"key_id": key_id})
                except KmsUnavailable as e:
                    info.update(reachable=False, error=str(e))
                    break
                except KmsError as e:
                    info["reachable"] = True
                    states[key_id] = "not_found" if e.error_code == "KMS.0207" else \
                        f"unknown ({e.error_code})"
                else:
                    info["reachable"] = True
                    ki = key_info.get("key_info", {})
                    states[key_id] = KEY_STATES.get(str(ki.get("key_state")), "unknown")
                    if ki.get("key_alias"):
                        aliases[key_id] = str(ki["key_alias"])
                if info["latency_ms"] is None:
                    info["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        if scope.cancelled_caught and info["reachable"] is None:
            info.update(reachable=False, error=f"no answer within {KMS_TIMEOUT:g}s")
        return info, states, aliases


def _key_usage(ops: "EncFS") -> dict[str, dict[str, int]]:
    """Per CMK in use (the mount's own, those of open files, cached or prepared DEKs, and
    revoked ones): how many open files, cached and prepared DEKs it has. Reads the
    KeyManager's tables; one pass each, no KMS call."""
    keys = ops.keys
    usage: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: {"open_files": 0, "deks_cached": 0, "deks_prepared": 0})
    usage[keys.key_id]
    for key_id in keys.revoked:
        usage[key_id]
    for node in ops.nodes.values():
        if node.opens and node.record is not None:
            usage[node.record.key_id]["open_files"] += 1
    for _dek, _expiry, key_id in getattr(keys, "_cache", {}).values():
        usage[key_id]["deks_cached"] += 1
    for key_id, pool in getattr(keys, "_pools", {}).items():
        if pool:
            usage[key_id]["deks_prepared"] += len(pool)
    return dict(usage)


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            break
    return data.split(b"\n", 1)[0]


async def serve(ops: "EncFS", target: Any, *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The mount's hook: serve this mount's control channel until cancelled."""
    await ControlServer(ops, target).serve(task_status=task_status)
