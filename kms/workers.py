"""``kms serve --workers N``: N worker processes serving one data directory on one socket.

The parent opens the store once (the exclusive flock on ``lock``, the root key, schema and
migrations), binds the Unix socket and the TCP listeners, closes its databases and forks the
workers. Each worker runs the whole daemon (kms/server.py) on the inherited listening sockets:
the kernel hands each new connection to one of them. Each has its own mirror of the store and
its own SQLite connections; writes are serialised across workers and made visible to all of
them before they are acknowledged by kms/shared.py. Durability is unchanged: a write returns
only after keys.db's fsync (synchronous=FULL), whichever worker made it.

The parent only supervises: SIGTERM/SIGINT are passed to every worker and waited for; a worker
that dies is logged and started again, after the parent bumps the write counter for it (it may
have died between a commit and its own bump) (a worker that fails right at its start stops the daemon,
rather than looping). Workers get SIGTERM if the parent dies (PR_SET_PDEATHSIG). Limits are per
worker: --rate-limit, --max-connections and --max-connections-per-uid are divided by N, so
the daemon as a whole never allows more than asked (docs/KMS.md).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import signal
import sys
import time

log = logging.getLogger("kms")

_PR_SET_PDEATHSIG = 1
EARLY_DEATH_S = 2.0         # a worker that exits this soon after its start is not restarted


@dataclasses.dataclass
class _Worker:
    index: int
    pid: int
    started: float


def per_worker(config, n: int):
    """The limits of one of ``n`` workers: the daemon's divided by n (never below 1)."""
    return dataclasses.replace(
        config, rate_limit=config.rate_limit / n if config.rate_limit > 0 else 0,
        max_connections=max(1, math.ceil(config.max_connections / n)),
        max_connections_per_peer=max(1, math.ceil(config.max_connections_per_peer / n)))


def serve_workers(config, n: int) -> int:
    """Run the daemon as ``n`` worker processes until SIGTERM/SIGINT. Returns the exit status."""
    import trio

    from .server import Server, WorkerRole, bind_tcp, bind_unix, make_clock, remove_unix
    from .shared import SharedWrites, create_generation_file
    from .store import Store

    clock = make_clock(config.clock_file)
    store = Store(config.data_dir, clock=clock, passphrase=config.passphrase)
    root_key = store.root_key_for_workers()
    create_generation_file(store.data_dir)
    unix, ino = bind_unix(config.socket_path, config.socket_mode)
    tcp = []
    try:
        if config.listen:
            tcp = bind_tcp(*config.listen)
    except BaseException:
        unix.close()
        remove_unix(config.socket_path, ino)
        store.close()
        raise
    lock_fd = store.detach_for_workers()
    parent_shared = SharedWrites(store.data_dir)
    worker_config = per_worker(config, n)

    def child(index: int) -> None:
        # In the new process: default signal handling (trio installs its own), die with the parent.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        for h in logging.getLogger().handlers:
            if h.formatter is not None and h.formatter._fmt:
                h.setFormatter(logging.Formatter(h.formatter._fmt.replace("kms ", f"kms[{index}] ", 1)))
        status = 1
        try:
            # The counter is read before the store is loaded: a write in between is reloaded.
            shared = SharedWrites(store.data_dir)
            s = Store(config.data_dir, clock=clock, worker_of=root_key)
            try:
                role = WorkerRole(index, unix, tcp, shared)
                trio.run(Server(worker_config, s, role).run)
                status = 0
            finally:
                s.close()
        except BaseException as e:      # noqa: BLE001 - a worker reports and exits, never returns
            if not isinstance(e, KeyboardInterrupt):
                log.error("worker %d failed: %s: %s", index, type(e).__name__, e)
        finally:
            sys.stderr.flush()
            os._exit(status)

    def spawn(index: int) -> _Worker:
        pid = os.fork()
        if pid == 0:
            child(index)
        return _Worker(index, pid, time.monotonic())

    workers: dict[int, _Worker] = {}
    stopping = [False]

    def stop(signum, _frame) -> None:
        if not stopping[0]:
            log.info("got %s, stopping %d worker(s)", signal.Signals(signum).name, len(workers))
        stopping[0] = True
        for w in workers.values():
            try:
                os.kill(w.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for i in range(n):
            w = spawn(i)
            workers[w.pid] = w
        log.info("serving with %d worker processes (pids %s)", n, " ".join(str(p) for p in workers))
        while workers:
            pid, wstatus = os.wait()
            w = workers.pop(pid, None)
            if w is None or stopping[0]:
                continue
            how = (f"signal {signal.Signals(os.WTERMSIG(wstatus)).name}" if os.WIFSIGNALED(wstatus)
                   else f"exit status {os.waitstatus_to_exitcode(wstatus)}")
            if time.monotonic() - w.started < EARLY_DEATH_S and not os.WIFSIGNALED(wstatus):
                log.error("worker %d (pid %d) ended at its start (%s): stopping", w.index, pid, how)
                status = 1
                stop(signal.SIGTERM, None)
                continue
            # It may have died between a commit and its bump of the counter: bump it for it, so
            # that every worker reloads what keys.db now holds.
            parent_shared.acquire()
            try:
                parent_shared.bump()
            finally:
                parent_shared.release()
            log.warning("worker %d (pid %d) ended (%s); starting it again", w.index, pid, how)
            nw = spawn(w.index)
            workers[nw.pid] = nw
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in (unix, *tcp):
            s.close()
        parent_shared.close()
        remove_unix(config.socket_path, ino)
        os.close(lock_fd)
        log.info("stopped")
    return status
