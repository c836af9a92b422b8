"""Process tuning of the mount daemon: memory allocator, cycle collector, the mount's
readahead. Each setting is a measured speed-up (docs/PERFORMANCE.md); none changes what
the filesystem does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

import trio

from .mounts import device_of_mountpoint

log = logging.getLogger("encfs")


def quiet_cycle_collector() -> None:
    """Every request allocates a few dozen objects and almost never a cycle: the default
    threshold (700) made the cycle collector a few % of the daemon's CPU, walking the
    module objects each time. Those are frozen out of its sight; the threshold still
    bounds the memory any cycles can hold. Call once startup is done."""
    gc.freeze()
    gc.set_threshold(20000, 50, 50)


#: The kernel's readahead window on the mount. Sequential reads then arrive as 1 MiB READ
#: requests (the FUSE maximum here) instead of 128 KiB ones, a quarter of the requests per
#: byte: +20 % read throughput, less daemon CPU (docs/PERFORMANCE.md). 2 and 4 MiB were
#: slower.
READAHEAD_KB = 1024


async def raise_readahead(mountpoint: str) -> None:
    """Set the mount's readahead (needs root; otherwise the kernel's default stays).

    Only after the kernel has processed our reply to FUSE's INIT, which resets it: a stat
    of the mount (served by this daemon) returns only after that."""
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        dev = device_of_mountpoint(mountpoint)
        if dev is None:
            return
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.debug("readahead of %s left at the kernel default: %s", mountpoint, e.strerror)


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> None:
    """Let glibc keep and reuse the daemon's freed request buffers.

    Every write request allocates about 3 MiB (the request, the ciphertext, the joined
    blocks) and frees it again. By default glibc serves such sizes from fresh mappings, or
    trims the heap top after the free, so each request paid for 700+ page faults, page
    zeroing and munmap: a fifth of the daemon's CPU in sequential writes (perf). With these
    settings freed buffers stay in the heap, at the price of keeping up to 64 MiB of it.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for param, value in ((_M_MMAP_THRESHOLD, 16 << 20), (_M_TRIM_THRESHOLD, 64 << 20),
                             (_M_TOP_PAD, 16 << 20)):
            libc.mallopt(param, value)
    except (OSError, AttributeError):  # not glibc: its defaults stay
        pass
