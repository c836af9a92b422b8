"""The dispatch shortcuts (encfs/dispatch.py), on a pipe instead of /dev/fuse."""

import os

import trio

from encfs import dispatch


def test_uncontended_lock_excludes_and_hands_over():
    inside = []
    order = []

    async def worker(lock, n):
        for _ in range(3):
            async with lock:
                inside.append(n)
                assert len(inside) == 1, "two tasks inside the lock"
                await trio.sleep(0)  # give the others a chance to barge in
                inside.remove(n)
                order.append(n)

    async def main():
        lock = dispatch.UncontendedLock()
        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(worker, lock, n)
        assert not lock.locked()

    trio.run(main)
    assert sorted(order) == sorted(list(range(4)) * 3)


def test_wait_readable_returns_at_once_for_a_queued_request_and_yields_in_between():
    real_wait, real_lock = trio.lowlevel.wait_readable, trio.Lock
    real_waits = []

    async def counting_wait(fd):
        real_waits.append(fd)
        await real_wait(fd)

    r, w = os.pipe()
    other_r, other_w = os.pipe()
    trio.lowlevel.wait_readable = counting_wait
    try:
        assert dispatch.install(r)
        assert trio.Lock is dispatch.UncontendedLock

        async def main():
            os.write(w, b"x")
            for _ in range(dispatch.FAST_STREAK):
                await trio.lowlevel.wait_readable(r)  # readable: no scheduler pass
            assert trio.Lock is real_lock  # restored at the first wait
            assert real_waits == []
            await trio.lowlevel.wait_readable(r)  # the streak is over: a real wait
            assert real_waits == [r]
            os.read(r, 1)
            with trio.move_on_after(0.05) as scope:
                await trio.lowlevel.wait_readable(r)  # nothing queued: a real wait
            assert scope.cancelled_caught and real_waits == [r, r]
            os.write(other_w, b"y")
            await trio.lowlevel.wait_readable(other_r)  # other fds: the real thing
            assert real_waits == [r, r, other_r]

        trio.run(main)
    finally:
        trio.lowlevel.wait_readable, trio.Lock = real_wait, real_lock
        for fd in (r, w, other_r, other_w):
            os.close(fd)
