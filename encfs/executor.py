"""The content executor: runs the planner's steps (encfs/content.py) against an open data
file, under the file's reader/writer lock.

Reads of one file run in parallel; a write or truncate of a file excludes every other
request of that file's content (`RWLock`, first come first served). That lock, not the
trio thread, is what makes a read-modify-write of a block safe once requests await: the
executor can run a large request's pread + decrypt, or its reads + encrypt, in a worker
thread (`trio.to_thread`; `cryptography`'s AES-GCM and pread/pwrite release the GIL).
It does not by default (`READ_OFFLOAD_MIN`/`WRITE_OFFLOAD_MIN` are None): measured on
these 2-core machines, a worker thread cost more than the overlap bought, for one stream
and for two files at once, warm and cold (the buffers change cores twice: AES-GCM and
the copies ran at half speed in the worker; docs/PERFORMANCE.md, "Sequential rows
back").

What changes the backing file and the journal (undo record or redo intent, the pwrites
and truncates, clearing the record) always runs on the trio thread with no await in
between (`_commit`): the journal has one in-place slot for each kind of record, and the
path a record names is taken in that same step, so a rename cannot slip in between.
"""

from __future__ import annotations

import collections
import fcntl
import os
from typing import Any, Callable, Protocol

import trio

from . import backing as bk
from . import content as ct
from . import format as fmt
from .cipher import BlockCipher
from .journal import Journal

#: Reads of at least this much ciphertext run their pread + decrypt in a worker thread;
#: None: never. Off by default: inline reads gave more MB/s for less daemon CPU, warm and
#: cold, one file or two (docs/PERFORMANCE.md).
READ_OFFLOAD_MIN: int | None = None
#: Writes of at least this many bytes run their reads + encryption in a worker thread;
#: None: never (same measurements).
WRITE_OFFLOAD_MIN: int | None = None


class RWLock:
    """A first-come, first-served reader/writer lock for the tasks of one trio run: readers
    share it, a writer has it alone, and a waiting writer keeps new readers out (no writer
    starvation). A free acquire does not yield to the scheduler.

    Waiters are granted the lock in the order they asked for it, by the releasing task
    (the lock is handed over, not fought for). Order matters: the kernel sends the WRITEs
    of a sequential writeback in file order, and trio runs woken tasks in a random order,
    so with a wake-everyone lock a later WRITE often went first and the earlier one then
    landed in a hole: a pread of the hole, a 1 MiB undo record and a re-encryption for
    every such request (3x the daemon CPU per GiB written; docs/PERFORMANCE.md)."""

    __slots__ = ("_readers", "_writer", "_queue")

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        #: waiting tasks, oldest first: [task, exclusive]
        self._queue: collections.deque[list[Any]] = collections.deque()

    async def acquire_read(self) -> None:
        if self._writer or self._queue:
            await self._wait(False)
        else:
            self._readers += 1

    def release_read(self) -> None:
        self._readers -= 1
        self._grant()

    async def acquire_write(self) -> None:
        if self._writer or self._readers or self._queue:
            await self._wait(True)
        else:
            self._writer = True

    def release_write(self) -> None:
        self._writer = False
        self._grant()

    async def _wait(self, exclusive: bool) -> None:
        entry = [trio.lowlevel.current_task(), exclusive]
        self._queue.append(entry)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._queue.remove(entry)
            self._grant()  # a cancelled writer at the head may have held back readers
            return trio.lowlevel.Abort.SUCCEEDED

        # The granting task has already counted us in: nothing to do when we wake.
        await trio.lowlevel.wait_task_rescheduled(abort)

    def _grant(self) -> None:
        """Hand the lock to the waiters at the head of the queue that can have it now: one
        writer, or every reader up to the next writer."""
        queue = self._queue
        while queue and not self._writer:
            task, exclusive = queue[0]
            if exclusive:
                if self._readers:
                    return
                self._writer = True
            else:
                self._readers += 1
            queue.popleft()
            trio.lowlevel.reschedule(task)

    def read(self) -> "_Held":
        return _Held(self, False)

    def write(self) -> "_Held":
        return _Held(self, True)

    @property
    def state(self) -> tuple[int, bool]:
        """(readers holding it, whether a writer holds it): for tests."""
        return self._readers, self._writer


class _Held:
    __slots__ = ("lock", "exclusive")

    def __init__(self, lock: RWLock, exclusive: bool):
        self.lock, self.exclusive = lock, exclusive

    async def __aenter__(self) -> None:
        if self.exclusive:
            await self.lock.acquire_write()
        else:
            await self.lock.acquire_read()

    async def __aexit__(self, *exc: Any) -> None:
        if self.exclusive:
            self.lock.release_write()
        else:
            self.lock.release_read()


class OpenContent(Protocol):
    """What the executor needs of an open file (fs.Node has it)."""

    ino: int
    fd: int | None
    cipher: BlockCipher | None
    block_size: int | None
    content_lock: RWLock


class ContentExecutor:
    """Reads, writes and truncates the content of open data files, recording what a crash
    must undo or finish in ``journal``."""

    def __init__(self, journal: Journal, read_offload_min: int | None = READ_OFFLOAD_MIN,
                 write_offload_min: int | None = WRITE_OFFLOAD_MIN):
        self.journal = journal
        self.read_offload_min = read_offload_min
        self.write_offload_min = write_offload_min
        self.can_preallocate = True  # until the backing filesystem says it cannot

    # --- reads ---------------------------------------------------------------------------

    async def read(self, f: OpenContent, off: int, size: int,
                   atime_due: Callable[[os.stat_result], bool]) -> bytes:
        """Plaintext ``[off, off+size)`` of the file (short at its end). Raises
        cipher.BlockAuthError for a damaged block."""
        async with f.content_lock.read():
            st = os.fstat(f.fd)
            plan = ct.plan_read(st.st_size, f.block_size, off, size)
            if plan.blocks is None:
                return b""
            if atime_due(st):
                # A user read that would update atime on the backing filesystem (relatime):
                # this one pread does it, so the backing's own atime policy applies. The
                # fd's flags are shared: no await until they are back.
                flags = fcntl.fcntl(f.fd, fcntl.F_GETFL)
                fcntl.fcntl(f.fd, fcntl.F_SETFL, flags & ~os.O_NOATIME)
                try:
                    return _read(f.fd, f.cipher, f.block_size, plan)
                finally:
                    fcntl.fcntl(f.fd, fcntl.F_SETFL, flags)
            if self.read_offload_min is not None and \
                    plan.blocks.length >= self.read_offload_min:
                return await trio.to_thread.run_sync(_read, f.fd, f.cipher, f.block_size,
                                                     plan)
            return _read(f.fd, f.cipher, f.block_size, plan)

    # --- writes and truncates ---------------------------------------------------------------

    async def write(self, f: OpenContent, off: int, data: bytes,
                    path_of: Callable[[], bytes | None]) -> None:
        """Write ``data`` at ``off``. ``path_of()`` gives the data file's backing path for
        the journal, or None when it has no name left (then no record is needed: nobody
        can find the file after a crash)."""
        async with f.content_lock.write():
            plan = ct.plan_write(os.fstat(f.fd).st_size, f.block_size, off, len(data))
            if self.write_offload_min is not None and len(data) >= self.write_offload_min:
                done = await trio.to_thread.run_sync(self._prepare, f, plan, data)
            else:
                done = self._prepare(f, plan, data)
            self._commit(f, plan, done, path_of)

    async def truncate(self, f: OpenContent, size: int,
                       path_of: Callable[[], bytes | None]) -> None:
        async with f.content_lock.write():
            plan = ct.plan_truncate(os.fstat(f.fd).st_size, f.block_size, size)
            self._commit(f, plan, self._prepare(f, plan, b""), path_of)

    def _prepare(self, f: OpenContent, plan: ct.ContentPlan, data: bytes) -> ct.Realized:
        """Reserve the space, read the old blocks and encrypt: everything before the first
        change of the backing file. May run in a worker thread."""
        if self.can_preallocate:
            for start, end in plan.reserve:
                # Also inside the file: the range may be a hole; allocated ranges cost a
                # lookup. A full disk fails here with ENOSPC, before anything changed.
                if not bk.preallocate(f.fd, start, end - start):
                    self.can_preallocate = False
                    break
        reads = [os.pread(f.fd, r.length, r.offset) for r in plan.reads]
        cipher = f.cipher
        return ct.realize(plan, f.block_size, reads, data, cipher.decrypt,
                          cipher.encrypt,
                          lambda: fmt.encode_header(cipher.file_id, f.block_size))

    def _commit(self, f: OpenContent, plan: ct.ContentPlan, done: ct.Realized,
                path_of: Callable[[], bytes | None]) -> None:
        """Record, apply, clear: on the trio thread, without an await."""
        if not done.steps:
            return
        path = path_of() if (plan.journal and len(done.steps) > 1) or plan.undo else None
        if plan.undo is not None:
            if path is not None:
                self.journal.undo_before_write(path, f.ino, plan.undo.offset, done.undo_old,
                                               plan.undo.old_size)
            _apply(f.fd, done.steps)
            if path is not None:
                self.journal.write_done()
            return
        intent = None
        if path is not None:
            intent = self.journal.file_steps(path, os.fstat(f.fd).st_ino, done.steps)
        _apply(f.fd, done.steps)
        if intent is not None:
            self.journal.done(intent)


def _read(fd: int, cipher: BlockCipher, bs: int, plan: ct.ReadPlan) -> bytes:
    data = os.pread(fd, plan.blocks.length, plan.blocks.offset)
    return ct.read_result(plan, bs, data, cipher.decrypt)


def _apply(fd: int, steps: list[ct.Step]) -> None:
    for step in steps:
        if isinstance(step, ct.PWrite):
            bk.pwrite_all(fd, step.data, step.offset)
        else:
            os.ftruncate(fd, step.size)
