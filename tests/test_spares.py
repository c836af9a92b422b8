"""The pool of spare sidecar inodes (encfs/spares.py), without FUSE."""

import os
import stat
import time

import pytest

from encfs.spares import SparePool


@pytest.fixture
def pool(tmp_path):
    p = SparePool(bytes(tmp_path), size=8, recycle_max=16)
    yield p
    p.stop()


def wait_ready(pool: SparePool, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(pool._ready) < n:
        assert time.monotonic() < deadline, "the pool did not fill"
        time.sleep(0.01)


def test_an_unstarted_pool_gives_nothing_and_recycles_nothing(tmp_path):
    p = SparePool(bytes(tmp_path))
    side = tmp_path / "x.sfskey"
    side.write_bytes(b"k")
    assert p.take() is None and not p.recycle(bytes(side))
    assert side.exists()


def test_spares_are_empty_private_files_that_are_refilled(pool, tmp_path):
    pool.start()
    wait_ready(pool, 8)
    taken = [pool.take() for _ in range(6)]
    for fd, path in taken:
        st = os.fstat(fd)
        assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o600
        assert os.path.basename(path).startswith(b"s-")
        os.close(fd)
        os.unlink(path)
    wait_ready(pool, 8)  # taking below half the size wakes the thread


def test_stop_removes_every_spare(pool, tmp_path):
    pool.start()
    wait_ready(pool, 8)
    pool.stop()
    assert os.listdir(tmp_path) == []
    assert pool.take() is None


def test_a_recycled_sidecar_is_zeroed_and_made_private_before_reuse(tmp_path):
    pool = SparePool(bytes(tmp_path / "spares"), size=0, recycle_max=16)
    os.mkdir(tmp_path / "spares")
    pool.start()
    try:
        sides = []
        for i in range(64):  # one batch: the thread zeroes them in one go
            side = tmp_path / f"f{i}.sfskey"
            side.write_bytes(b"wrapped DEK" * 10)
            os.chmod(side, 0o644)
            sides.append(side)
        assert pool.recycle(bytes(tmp_path / "missing.sfskey"))  # nothing to remove
        for side in sides[:16]:
            assert pool.recycle(bytes(side))
            assert not side.exists()
        assert not pool.recycle(bytes(sides[16]))  # the pool is full: the caller unlinks
        pool._wanted.set()
        wait_ready(pool, 16)
        for _ in range(16):
            fd, path = pool.take()
            st = os.fstat(fd)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert os.pread(fd, 1000, 0) == bytes(110)
            os.close(fd)
            os.unlink(path)  # a taken spare is the caller's
    finally:
        pool.stop()
    assert os.listdir(tmp_path / "spares") == []


def test_a_sidecar_with_other_links_is_never_recycled(pool, tmp_path):
    pool.start()
    side = tmp_path / "a.sfskey"
    side.write_bytes(b"shared key")
    os.link(side, tmp_path / "b.sfskey")
    assert not pool.recycle(bytes(side))
    assert side.read_bytes() == b"shared key"
