"""The per-inode reader/writer lock of the content executor (encfs/executor.py)."""

import trio
import trio.testing

from encfs.executor import RWLock


def test_readers_share_writers_exclude_and_a_waiting_writer_holds_back_new_readers():
    log = []

    async def reader(lock, n, hold):
        async with lock.read():
            log.append(("r+", n, lock.state))
            await trio.sleep(hold)
            log.append(("r-", n))

    async def writer(lock, n):
        async with lock.write():
            assert lock.state == (0, True)
            log.append(("w+", n))
            await trio.sleep(0.01)
            log.append(("w-", n))

    async def main():
        lock = RWLock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, lock, 1, 0.05)
            nursery.start_soon(reader, lock, 2, 0.05)
            await trio.sleep(0.01)
            nursery.start_soon(writer, lock, 1)
            await trio.sleep(0.01)
            nursery.start_soon(reader, lock, 3, 0)  # arrives while the writer waits
        assert lock.state == (0, False)

    trio.run(main)
    # Both first readers were inside at once; the writer came after both left, and the
    # late reader after the writer.
    assert log[1][2] == (2, False)
    order = [e[:2] for e in log]
    assert order.index(("w+", 1)) > max(order.index(("r-", 1)), order.index(("r-", 2)))
    assert order.index(("r+", 3)) > order.index(("w-", 1))


def test_a_free_lock_is_taken_without_a_checkpoint():
    async def main():
        lock = RWLock()
        with trio.CancelScope() as scope:
            scope.cancel()
            async with lock.write():  # would raise Cancelled if it checkpointed
                pass
            async with lock.read():
                pass

    trio.run(main)


def test_waiters_get_the_lock_in_the_order_they_asked_for_it():
    # trio runs the tasks woken in one batch in a random order: a lock that woke every
    # waiter let a later WRITE of a sequential writeback go first, and the earlier one then
    # filled a hole (a pread, an undo record of the whole request, 3x the CPU per GiB).
    got = []

    async def task(lock, n, exclusive):
        async with (lock.write() if exclusive else lock.read()):
            got.append(n)
            await trio.sleep(0)

    async def main():
        lock = RWLock()
        kinds = [True, True, False, False, True, False, True, True, True, True]
        for _ in range(20):
            got.clear()
            async with trio.open_nursery() as nursery:
                await lock.acquire_write()
                for n, exclusive in enumerate(kinds):
                    nursery.start_soon(task, lock, n, exclusive)
                    await trio.testing.wait_all_tasks_blocked()  # queued in this order
                lock.release_write()
            # readers 2 and 3 share the lock: either may append first
            assert got[:2] == [0, 1] and sorted(got[2:4]) == [2, 3]
            assert got[4:] == list(range(4, len(kinds)))
            assert lock.state == (0, False)

    trio.run(main)


def test_readers_behind_a_cancelled_writer_go_in():
    entered = []

    async def reader(lock):
        async with lock.read():
            entered.append("r")

    async def main():
        lock = RWLock()
        await lock.acquire_read()
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def writer():
                with scope:
                    async with lock.write():
                        entered.append("w")

            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reader, lock)  # held back by the waiting writer
            await trio.testing.wait_all_tasks_blocked()
            assert entered == []
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert entered == ["r"]
        lock.release_read()
        assert lock.state == (0, False)

    trio.run(main)


def test_offloaded_requests_of_one_file_apply_in_the_order_they_came(tmp_path):
    # With the worker-thread offload on (thresholds 0: every request), a burst of
    # overlapping unaligned writes and reads of one file ends as the writes applied in
    # arrival order, and each read sees exactly the writes that came before it.
    import os
    import random
    from dataclasses import dataclass, field

    from encfs.cipher import BlockCipher
    from encfs.executor import ContentExecutor
    from encfs.journal import Journal

    bs = 4096
    control = tmp_path / ".encfs"
    control.mkdir()
    executor = ContentExecutor(Journal(os.fsencode(control)), read_offload_min=0,
                               write_offload_min=0)
    path = tmp_path / "data"

    @dataclass
    class File:
        fd: int
        ino: int = 1
        cipher: BlockCipher = field(default_factory=lambda: BlockCipher(bytes(32), bytes(16), bs))
        block_size: int = bs
        content_lock: RWLock = field(default_factory=RWLock)

    f = File(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    rng = random.Random(7)
    model = bytearray()
    expected, seen = {}, {}

    async def write(off, data):
        await executor.write(f, off, data, lambda: os.fsencode(path))

    async def read(n, off, size):
        seen[n] = await executor.read(f, off, size, lambda st: False)

    async def main():
        async with trio.open_nursery() as nursery:
            for n in range(60):
                off = rng.randrange(0, 6 * bs)
                if rng.random() < 0.6:
                    data = rng.randbytes(rng.randrange(1, 3 * bs))
                    model.extend(bytes(max(0, off + len(data) - len(model))))
                    model[off:off + len(data)] = data
                    nursery.start_soon(write, off, data)
                else:
                    size = rng.randrange(1, 3 * bs)
                    expected[n] = bytes(model[off:off + size])
                    nursery.start_soon(read, n, off, size)
                await trio.testing.wait_all_tasks_blocked()  # queued in this order

    try:
        trio.run(main)
        assert seen == expected
        assert trio.run(executor.read, f, 0, 1 << 20, lambda st: False) == bytes(model)
    finally:
        os.close(f.fd)
        executor.journal.close()
