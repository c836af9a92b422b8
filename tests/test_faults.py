"""Faults from outside: a full backing filesystem, a KMS that goes away and comes back."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import pytest

from encfs.pytest_plugin import short_tempdir, make_mount, temporary_mount


@pytest.fixture
def small_backing_mount(kms_server):
    """A mount whose backing dir is an 8 MiB tmpfs."""
    work = short_tempdir("encfs-")
    backing = os.path.join(work, "backing")
    os.makedirs(backing)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", backing],
                   check=True)
    m = None
    try:
        m = make_mount(kms_server, work)
        yield m
    finally:
        if m is not None:
            m.unmount()
        subprocess.run(["umount", backing], check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.fuse
def test_enospc_fails_the_write_and_keeps_everything_else(small_backing_mount):
    m = small_backing_mount
    keep = {f"keep{i}": os.urandom(100_000 + i) for i in range(5)}
    for name, data in keep.items():
        with open(f"{m.mountpoint}/{name}", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    base = os.urandom(50_000)
    with open(f"{m.mountpoint}/grow", "wb") as f:
        f.write(base)
        os.fsync(f.fileno())
    chunk = os.urandom(1 << 20)
    with pytest.raises(OSError) as e:
        with open(f"{m.mountpoint}/grow", "ab") as f:
            for _ in range(20):  # 20 MiB into 8 MiB
                f.write(chunk)
                f.flush()
            os.fsync(f.fileno())
    assert e.value.errno == errno.ENOSPC
    for name, data in keep.items():
        assert open(f"{m.mountpoint}/{name}", "rb").read() == data
    grown = open(f"{m.mountpoint}/grow", "rb").read()
    assert grown[:len(base)] == base  # what was fsynced before is intact
    # Space comes back once something is removed, and writing works again.
    os.unlink(f"{m.mountpoint}/grow")
    with open(f"{m.mountpoint}/after", "wb") as f:
        f.write(b"ok")
    m.remount()
    for name, data in keep.items():
        assert open(f"{m.mountpoint}/{name}", "rb").read() == data
    assert open(f"{m.mountpoint}/after", "rb").read() == b"ok"


#: DEKs prepared ahead in the outage test: a handful, so that it sees them used up
POOL = 4
WAIT = 60.0  # for a state to come about on a loaded machine; never reached when it works


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        time.sleep(0.01)


def datakeys_created(kms) -> int:
    """create-datakey requests the KMS answered with 200, from its log."""
    return sum(1 for line in kms.log().splitlines()
               if " create-datakey " in line and "-> 200" in line)


@pytest.mark.fuse
def test_kms_unreachable_then_back(kms_server):
    with temporary_mount(kms_server, extra_args=["--dek-pool", str(POOL)]) as m:
        _kms_unreachable_then_back(m)


def _kms_unreachable_then_back(m) -> None:
    open(f"{m.mountpoint}/open-before", "wb").write(b"A" * 10000)
    open(f"{m.mountpoint}/closed", "wb").write(b"B" * 10000)
    m.remount()  # nothing cached: every DEK must come from the KMS again
    held = open(f"{m.mountpoint}/open-before", "r+b")
    assert held.read(5) == b"AAAAA"
    # The first new file asks the KMS itself and wakes the pool, which fills to POOL.
    before = datakeys_created(m.kms)
    open(f"{m.mountpoint}/first", "wb").write(b"1")
    wait_until(lambda: datakeys_created(m.kms) >= before + 1 + POOL, "the DEK pool filled")
    m.kms.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            open(f"{m.mountpoint}/closed", "rb").read()
        assert e.value.errno == errno.EIO
        # New files take the DEKs prepared ahead while the pool lasts, then fail with EIO.
        made = []
        with pytest.raises(OSError) as e:
            for i in range(POOL + 5):
                open(f"{m.mountpoint}/new-{i}", "wb").write(b"x")
                made.append(i)
        assert e.value.errno == errno.EIO
        assert len(made) == POOL, made
        assert time.monotonic() - t0 < WAIT  # a bounded wait, never a hang
        held.seek(0)
        assert held.read() == b"A" * 10000  # files already open keep working
        held.write(b"more")
        held.flush()
        assert "KMS" in m.log() and "closed" in m.log()
    finally:
        m.kms.start()
    assert open(f"{m.mountpoint}/closed", "rb").read() == b"B" * 10000
    open(f"{m.mountpoint}/new-file", "wb").write(b"x")
    for i in made:  # made from pooled DEKs while the KMS was away: fine
        assert open(f"{m.mountpoint}/new-{i}", "rb").read() == b"x"
    held.close()
    assert open(f"{m.mountpoint}/open-before", "rb").read() == b"A" * 10000 + b"more"


@pytest.mark.fuse
def test_kms_killed_and_restarted_under_load(kms_server):
    """Files created while the KMS dies either fail with EIO or are complete; none is lost.
    No DEKs prepared ahead (--dek-pool 0): every create needs the KMS, so the outage shows."""
    with temporary_mount(kms_server, extra_args=["--dek-pool", "0"]) as m:
        _kms_killed_and_restarted_under_load(m)


def _kms_killed_and_restarted_under_load(m) -> None:
    import threading

    results: dict[str, bytes | int] = {}
    stop = threading.Event()

    def writer(tid: int) -> None:
        i = 0
        while not stop.is_set():
            name = f"w{tid}-{i}"
            data = os.urandom(3000 + i)
            try:
                with open(f"{m.mountpoint}/{name}", "wb") as f:
                    f.write(data)
                results[name] = data
            except OSError as e:
                results[name] = e.errno
            i += 1

    def count(kind) -> int:
        return sum(1 for r in list(results.values()) if isinstance(r, kind))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: count(bytes) >= 10, "files written before the kill")
        m.kms.kill()  # SIGKILL mid-stream
        wait_until(lambda: count(int) >= 1, "a create failed while the KMS was dead")
        m.kms.start()
        n = count(bytes)
        wait_until(lambda: count(bytes) >= n + 10, "files written after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [n for n, r in results.items() if isinstance(r, int)]
    assert all(results[n] == errno.EIO for n in failed), {results[n] for n in failed}
    written = {n: r for n, r in results.items() if isinstance(r, bytes)}
    m.remount()
    for name, data in written.items():
        assert open(f"{m.mountpoint}/{name}", "rb").read() == data
    open(f"{m.mountpoint}/after", "wb").write(b"fine")
    assert open(f"{m.mountpoint}/after", "rb").read() == b"fine"
