"""Faults from outside: a full backing filesystem, a KMS that goes away and comes back."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import pytest

from encfs.keys import POOL_SIZE
from encfs.pytest_plugin import short_tempdir, make_mount


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


def test_kms_unreachable_then_back(encrypted_mount):
    m = encrypted_mount
    open(f"{m.mountpoint}/open-before", "wb").write(b"A" * 10000)
    open(f"{m.mountpoint}/closed", "wb").write(b"B" * 10000)
    m.remount()  # nothing cached: every DEK must come from the KMS again
    held = open(f"{m.mountpoint}/open-before", "r+b")
    assert held.read(5) == b"AAAAA"
    m.kms.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            open(f"{m.mountpoint}/closed", "rb").read()
        assert e.value.errno == errno.EIO
        # New files take DEKs prepared ahead while the pool lasts, then fail with EIO.
        made = []
        with pytest.raises(OSError) as e:
            for i in range(POOL_SIZE + 5):
                open(f"{m.mountpoint}/new-{i}", "wb").write(b"x")
                made.append(i)
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t0 < 30  # a bounded wait, never a hang
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


def test_kms_killed_and_restarted_under_load(encrypted_mount):
    """Files created while the KMS dies either fail with EIO or are complete; none is lost."""
    import threading

    m = encrypted_mount
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

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        m.kms.kill()  # SIGKILL mid-stream
        time.sleep(0.5)
        m.kms.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [n for n, r in results.items() if isinstance(r, int)]
    assert all(results[n] == errno.EIO for n in failed)
    written = {n: r for n, r in results.items() if isinstance(r, bytes)}
    assert len(written) > 10 and failed, (len(written), len(failed))
    m.remount()
    for name, data in written.items():
        assert open(f"{m.mountpoint}/{name}", "rb").read() == data
    open(f"{m.mountpoint}/after", "wb").write(b"fine")
    assert open(f"{m.mountpoint}/after", "rb").read() == b"fine"
