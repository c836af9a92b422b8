"""encfs/dispatch.py on pyfuse3's real request loop: a real mount, real requests, and the
daemon's own count (logged at unmount) of how often pyfuse3 went through the patched
names. If a pyfuse3 or trio upgrade stops looking them up, the counts are zero and this
fails (pyproject.toml pins both to the versions this was tested with)."""

from __future__ import annotations

import os
import re
import threading

import pytest

pytestmark = pytest.mark.fuse


def test_pyfuse3_request_loop_uses_the_patched_wait_and_lock(encrypted_mount):
    m = encrypted_mount
    names = [os.path.join(m.mountpoint, f"f{i}") for i in range(40)]
    for n in names:
        with open(n, "wb") as f:
            f.write(b"x" * 5000)

    def busy():  # several threads at once: the kernel queues requests behind each other
        for _ in range(30):
            for n in names:
                os.stat(n)
                with open(n, "rb") as f:
                    f.read()

    threads = [threading.Thread(target=busy) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert m.unmount() == 0
    found = re.findall(r"dispatch: (\d+) fast returns, (\d+) real waits, (\d+) free lock "
                       r"acquires", m.log())
    assert found, m.log()[-2000:]
    fast, real, free = map(int, found[-1])
    assert real > 0, "pyfuse3 no longer awaits trio.lowlevel.wait_readable on /dev/fuse"
    assert free > 0, "pyfuse3's read lock is not the UncontendedLock"
    assert fast > 0, "no request was ever found queued: the fast path never ran"
