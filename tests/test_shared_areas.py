"""Layer 2: shared mounts' areas (encfs/sharedmount.py) on a local directory: a dead
mount's area is recovered by exactly one of the mounts that try at once, a live one by
none (docs/SHARED.md "What a crash of one host leaves")."""

from __future__ import annotations

import multiprocessing
import os
import signal

from encfs import backing as bk
from encfs import sharedmount
from encfs.content import PWrite
from encfs.journal import Journal


def _die_with_an_intent(backing: bytes, data: bytes, ready) -> None:
    claim = sharedmount.MountClaim(backing, shared=True)
    claim.acquire()
    area = claim.open_area()
    journal = Journal(area.journal_parent, root=backing)
    ino = os.lstat(data).st_ino
    journal.file_steps(data, ino, [PWrite(0, b"finished")])  # the kill comes before the steps
    ready.send("ok")
    signal.pause()


def _hold_an_area(backing: bytes, ready) -> None:
    claim = sharedmount.MountClaim(backing, shared=True)
    claim.acquire()
    claim.open_area()
    ready.send("ok")
    signal.pause()


def _recover(backing: bytes, start, out) -> None:
    start.wait()
    out.send(sharedmount.recover_dead_areas(backing))


def _start(target, *args):
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(False)
    p = ctx.Process(target=target, args=(*args, send))
    p.start()
    assert recv.recv() == "ok"
    return p


def test_dead_area_recovered_once_live_area_left_alone(tmp_path):
    backing, _ = bk.open_backing(str(tmp_path))
    data = os.path.join(backing, b"file")
    with open(data, "wb") as f:
        f.write(b"unfinished")
    dead = _start(_die_with_an_intent, backing, data)
    os.kill(dead.pid, signal.SIGKILL)
    dead.join()
    live = _start(_hold_an_area, backing)
    try:
        assert len(os.listdir(sharedmount.mounts_dir(backing))) == 2
        ctx = multiprocessing.get_context("fork")
        start = ctx.Event()
        pipes, procs = [], []
        for _ in range(4):
            recv, send = ctx.Pipe(False)
            p = ctx.Process(target=_recover, args=(backing, start, send))
            p.start()
            pipes.append(recv)
            procs.append(p)
        start.set()
        reports = [r.recv() for r in pipes]
        for p in procs:
            p.join()
        recovered = [r for r in reports if any("recovered the area" in line for line in r)]
        assert len(recovered) == 1, reports
        assert any("finished an interrupted write" in line for line in recovered[0])
        assert open(data, "rb").read() == b"finisheded"  # "finished" over "unfinished": the intent's step, applied
        assert len(os.listdir(sharedmount.mounts_dir(backing))) == 1  # the live one
    finally:
        os.kill(live.pid, signal.SIGKILL)
        live.join()
    assert len(sharedmount.recover_dead_areas(backing)) == 1  # now that one is dead too
    assert os.listdir(sharedmount.mounts_dir(backing)) == []


def test_clean_release_removes_the_area(tmp_path):
    backing, _ = bk.open_backing(str(tmp_path))
    claim = sharedmount.MountClaim(backing, shared=True)
    claim.acquire()
    claim.open_area()
    other = bk.MountLock(backing)
    try:
        other.acquire()
        raise AssertionError("an exclusive lock was granted beside a shared mount")
    except bk.BackingInUse as e:
        assert "in use by encfs mounts with --shared-backing" in str(e)
    claim.release()
    assert os.listdir(sharedmount.mounts_dir(backing)) == []
    other.acquire()  # nobody holds it now
    other.release()


def test_second_shared_claim_is_not_alone_and_keeps_the_first(tmp_path):
    """The first shared mount is alone (it may clear what earlier mounts left), a second
    is not; and trying for "alone" never drops a shared lock already held (a failed
    non-blocking flock upgrade would)."""
    backing, _ = bk.open_backing(str(tmp_path))
    first = sharedmount.MountClaim(backing, shared=True)
    second = sharedmount.MountClaim(backing, shared=True)
    first.acquire()
    second.acquire()
    try:
        assert first.alone() and not second.alone()
        for holder in (first, second):
            excl = bk.MountLock(backing)
            try:
                excl.acquire()
                raise AssertionError("exclusive lock granted beside shared mounts")
            except bk.BackingInUse:
                pass
            holder.release()
    finally:
        first.release()
        second.release()
