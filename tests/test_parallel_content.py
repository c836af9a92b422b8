"""Layer 3: many readers and writers at once on the same and on different files of a real
mount, with overlapping unaligned ranges, compared with a model.

Every writer writes, wherever it writes, the byte ``new(p)`` (a function of the position
only), so whatever order the writes land in, the model is exact: a byte any writer covered
is ``new(p)``, any other byte keeps its old value (``old(p)`` for files that had content,
zero in the holes of files that grew). Readers running meanwhile must see, at every
position, the old or the new byte: a block read in the middle of its read-modify-write, a
lost update of one writer's bytes by another's stale copy of the block, or a torn block
(EIO) all fail the test. On the default mount the writers' fdatasync calls make the
kernel write back scattered dirty pages of one block in concurrent WRITE requests;
``--shared-backing`` has no writeback cache, so every write reaches the daemon as made and
unaligned writes to one block race in encfs itself.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from encfs.pytest_plugin import mount_with_own_kms

pytestmark = pytest.mark.fuse

SIZE = 300_000  # 18+ blocks of 16 KiB: writes cross block boundaries at odd offsets
WRITERS_PER_FILE = 4
READERS_PER_FILE = 2
OPS = 60


def old(p0: int, n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(p0, p0 + n))


def new(p0: int, n: int) -> bytes:
    return bytes((i * 13 + 101) % 253 for i in range(p0, p0 + n))


@pytest.fixture(scope="module", params=["default", "shared-backing"])
def mnt(request):
    extra = ["--shared-backing"] if request.param == "shared-backing" else []
    with mount_with_own_kms("encfs-par-", extra) as m:
        yield m


def test_parallel_unaligned_readers_and_writers_match_the_model(mnt, request):
    tag = request.node.callspec.id
    files = {f"{tag}-full-{i}": SIZE for i in range(2)}  # overwritten inside their size
    files |= {f"{tag}-grow-{i}": 0 for i in range(2)}  # grow from empty by appends/holes
    for name, size in files.items():
        with open(os.path.join(mnt.mountpoint, name), "wb") as f:
            f.write(old(0, size))
    covered = {name: bytearray(2 * SIZE) for name in files}  # 1 where a writer wrote
    ends = {name: size for name, size in files.items()}
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(name: str, seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(os.path.join(mnt.mountpoint, name), os.O_WRONLY)
        try:
            for _ in range(OPS):
                limit = files[name] or 2 * SIZE
                off = rng.randrange(0, limit - 1)
                n = min(rng.choice((1, 7, 100, 4095, 4097, 16383, 16385, 40000)),
                        limit - off)
                with lock:
                    # Recorded before the write: readers may see it land any time after.
                    covered[name][off:off + n] = b"\1" * n
                    ends[name] = max(ends[name], off + n)
                os.pwrite(fd, new(off, n), off)
                if rng.random() < 0.3:
                    # Write back now, from several threads at once: the kernel then sends
                    # the dirty pages of one block as separate, concurrent WRITE requests.
                    os.fdatasync(fd)
        except OSError as e:
            errors.append(f"writer {name}: {e}")
        finally:
            os.close(fd)

    def reader(name: str, seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(os.path.join(mnt.mountpoint, name), os.O_RDONLY)
        try:
            while not stop.is_set() and not errors:
                off = rng.randrange(0, files[name] or 2 * SIZE)
                n = rng.choice((1, 4096, 5000, 16384, 70000))
                got = os.pread(fd, n, off)
                base = files[name]
                want_old = old(off, len(got)) if base else bytes(len(got))
                want_new = new(off, len(got))
                for i, b in enumerate(got):
                    p = off + i
                    was = want_old[i] if p < base else 0
                    if b != was and b != want_new[i]:
                        errors.append(f"reader {name}: byte {p} is {b}, neither the old "
                                      f"{was} nor the new {want_new[i]}")
                        return
        except OSError as e:
            errors.append(f"reader {name}: {e}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(name, hash((name, k)) & 0xffff))
               for name in files for k in range(WRITERS_PER_FILE)]
    readers = [threading.Thread(target=reader, args=(name, k))
               for name in files for k in range(READERS_PER_FILE)]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    for t in readers:
        t.join(60)
    assert not errors, errors[:5]

    for name, size in files.items():
        with open(os.path.join(mnt.mountpoint, name), "rb") as f:
            got = f.read()
        assert len(got) == ends[name], name
        cov = covered[name]
        base = old(0, size) + bytes(len(got) - size)
        fresh = new(0, len(got))
        want = bytes(fresh[p] if cov[p] else base[p] for p in range(len(got)))
        if got != want:
            first = next(i for i in range(len(got)) if got[i] != want[i])
            pytest.fail(f"{name}: first difference from the model at byte {first}")
    # The same after the kernel's caches are gone: what reached the backing files.
    mnt.remount()
    for name, size in files.items():
        with open(os.path.join(mnt.mountpoint, name), "rb") as f:
            got = f.read()
        cov = covered[name]
        base = old(0, size) + bytes(len(got) - size)
        fresh = new(0, len(got))
        assert got == bytes(fresh[p] if cov[p] else base[p] for p in range(len(got))), name
