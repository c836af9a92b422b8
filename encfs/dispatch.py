"""Fewer trio scheduler passes per FUSE request.

pyfuse3's request loop, for every request, takes a trio.Lock (whose uncontended acquire
still yields to the scheduler) and then awaits `trio.lowlevel.wait_readable` on the
/dev/fuse fd (which parks the task until the next epoll_wait), even when the next request
is already queued. Each pass through trio's scheduler is an epoll_wait and a few dozen
Python steps: py-spy put trio's loop at about a third of the daemon's time in 4 KiB random
writes, where the kernel's writeback queues requests faster than one Python thread
serves them.

`install` patches the two names pyfuse3 looks up at call time:
- `trio.lowlevel.wait_readable`, for the /dev/fuse fd only: a zero-timeout poll first; when
  a request is waiting, return at once. After `FAST_STREAK` such returns in a row, one
  real wait lets the mount's other tasks (the KMS pool, key checks) run.
- `trio.Lock`, only until pyfuse3 has created its read lock (the first wait of its loop):
  that lock is an `UncontendedLock`, which does not yield when it is free.

Nothing changes when pyfuse3 stops looking these names up: the patches are then unused.
Measured: 4 KiB random writes +15-25 %; sequential and metadata rows within noise
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
import select
from typing import Any

import trio

#: Requests served in a row without a pass through trio's scheduler.
FAST_STREAK = 64


class Stats:
    """How often the patched names were used: the mount logs them at unmount, and
    tests/test_dispatch_real_loop.py checks pyfuse3's own request loop called them."""

    fast_returns = 0  # the next request was queued: no pass through the scheduler
    real_waits = 0  # the fd was idle (or the streak was up): trio's real wait
    free_locks = 0  # uncontended lock acquires that did not yield

    @classmethod
    def line(cls) -> str:
        return (f"dispatch: {cls.fast_returns} fast returns, {cls.real_waits} real waits, "
                f"{cls.free_locks} free lock acquires")


def fuse_fd() -> int | None:
    """The fd of /dev/fuse that `pyfuse3.init` opened in this process."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


class UncontendedLock:
    """A mutex for the tasks of one trio run that, unlike trio.Lock, only parks the caller
    when another task holds it (no checkpoint on a free acquire)."""

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        if not self._held:
            Stats.free_locks += 1
        while self._held:
            await self._lot.park()
        self._held = True

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of an unlocked lock")
        self._held = False
        self._lot.unpark()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        self.release()


def install(fd: int | None = None) -> bool:
    """Patch the two trio names pyfuse3's loop uses. Call after `pyfuse3.init()` and just
    before `pyfuse3.main()`, in the trio run that serves the mount. False when no
    /dev/fuse fd was found (nothing patched)."""
    fd = fuse_fd() if fd is None else fd
    if fd is None:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    real_wait = trio.lowlevel.wait_readable
    real_lock = trio.Lock
    streak = 0

    async def wait_readable(f: Any) -> None:
        nonlocal streak
        if f != fd:
            await real_wait(f)
            return
        if trio.Lock is not real_lock:
            trio.Lock = real_lock  # pyfuse3 holds its read lock now: nobody else gets one
        if streak < FAST_STREAK and poller.poll(0):  # also true on POLLERR (unmounted)
            streak += 1
            Stats.fast_returns += 1
            return
        streak = 0
        Stats.real_waits += 1
        await real_wait(f)

    trio.lowlevel.wait_readable = wait_readable
    trio.Lock = UncontendedLock  # type: ignore[misc]
    return True
