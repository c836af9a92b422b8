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


def wait_for(cond) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "the pool thread did not get there"
        time.sleep(0.01)


def test_a_recycled_sidecar_is_zeroed_and_made_private_before_reuse(tmp_path):
    os.mkdir(tmp_path / "spares")
    pool = SparePool(bytes(tmp_path / "spares"), size=16, recycle_max=32)
    pool.start()
    try:
        wait_ready(pool, 16)  # fresh ones first
        assert pool.recycle(bytes(tmp_path / "missing.sfskey"))  # nothing to remove
        sides = []
        for i in range(17):
            side = tmp_path / f"f{i}.sfskey"
            side.write_bytes(b"wrapped DEK" * 10)
            os.chmod(side, 0o644)
            sides.append(side)
        for side in sides[:16]:
            assert pool.recycle(bytes(side))
            assert not side.exists()
        assert not pool.recycle(bytes(sides[16]))  # the pool is full: the caller unlinks
        pool._wanted.set()  # (fewer than a batch: wake the thread by hand)
        wait_for(lambda: len(pool._zeroed) == 16)
        for path in pool._zeroed:  # zeroed at once, while they wait to be used
            assert open(path, "rb").read() == bytes(110)
        taken = []
        for _ in range(32):
            wait_for(lambda: pool._ready)
            taken.append(pool.take())
        recycled = [(fd, path) for fd, path in taken if os.fstat(fd).st_size == 110]
        assert len(recycled) == 16
        for fd, path in taken:
            st = os.fstat(fd)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert os.pread(fd, 1000, 0) == bytes(st.st_size)
            os.close(fd)
            os.unlink(path)  # a taken spare is the caller's
    finally:
        pool.stop()
    assert os.listdir(tmp_path / "spares") == []


def test_recycled_sidecars_wait_as_paths_not_open_files(tmp_path):
    """Thousands may be recycled: only the pool's size is ever held open."""
    os.mkdir(tmp_path / "spares")
    pool = SparePool(bytes(tmp_path / "spares"), size=8, recycle_max=1000)
    pool.start()
    try:
        wait_ready(pool, 8)
        for i in range(500):
            side = tmp_path / f"f{i}.sfskey"
            side.write_bytes(b"k" * 1040)
            assert pool.recycle(bytes(side))
        pool._wanted.set()
        wait_for(lambda: not pool._recycled)
        assert len(pool._ready) == 8 and len(pool._zeroed) == 500
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
