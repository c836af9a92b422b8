"""The per-inode reader/writer lock of the content executor (encfs/executor.py)."""

import trio

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
