"""Layer 3: `encfs mount --shared-backing` on two clients of one real GlusterFS volume,
standing in for two hosts, against one KMS: docs/SHARED.md claim by claim (each test
names the claim it checks).

One volume for the module (set up as docs/SHARED.md says); each test works in its own
backing dir on it, so tests never see each other's files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from encfs.pytest_plugin import EncryptedMount, running_kms, short_tempdir
from gluster import gluster_volume

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting GlusterFS needs root"),
]


@pytest.fixture(scope="module")
def volume():
    assert shutil.which("glusterd"), "glusterfs-server is not installed (the Makefile installs it)"
    work = short_tempdir("gshared-")
    try:
        with gluster_volume(work, shared=True) as vol, running_kms("kms-gshared-") as kms:
            yield vol, kms, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Hosts:
    """Two shared mounts ("hosts" a and b) of one backing dir on the volume."""

    def __init__(self, vol, kms, work: str, name: str):
        self.vol, self.kms, self.work, self.name = vol, kms, work, name
        os.makedirs(os.path.join(vol.clients[0], name, "backing"))
        self.mounts: dict[str, EncryptedMount] = {}

    def backing(self, host: str) -> str:
        return os.path.join(self.vol.clients["ab".index(host)], self.name, "backing")

    def mount(self, host: str, *extra: str) -> EncryptedMount:
        mnt = os.path.join(self.work, f"mnt-{self.name}-{host}")
        os.makedirs(mnt, exist_ok=True)
        m = EncryptedMount(mountpoint=mnt, backing=self.backing(host), key_id="sfs/default",
                           kms=self.kms, extra_args=["--shared-backing", *extra],
                           log_path=os.path.join(self.work, f"encfs-{self.name}-{host}.log"))
        m.mount()
        self.mounts[host] = m
        return m

    def unmount(self, host: str) -> int | None:
        return self.mounts.pop(host).unmount()

    def close(self) -> None:
        for host in list(self.mounts):
            self.unmount(host)


@pytest.fixture
def hosts(volume, request):
    vol, kms, work = volume
    h = Hosts(vol, kms, work, request.node.name.replace("[", "-").replace("]", ""))
    try:
        yield h
    finally:
        h.close()


def _fsck(backing: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encfs", "fsck", backing],
                          capture_output=True, text=True, timeout=300)


def _assert_fsck_clean(backing: str) -> None:
    res = _fsck(backing)
    assert res.returncode == 0, res.stdout + res.stderr


SIZES = [0, 1, 100, 4095, 4096, 16383, 16384, 16385, 100_000, 1 << 20, 3 * (1 << 20) + 7]


def test_close_to_open_both_ways(hosts):
    """Claim "close-to-open": what one host wrote and closed, the other reads at its next
    open, for files of many sizes, both ways, while both stay mounted."""
    a, b = hosts.mount("a"), hosts.mount("b")
    for i, size in enumerate(SIZES):
        data = os.urandom(size)
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        with open(os.path.join(src.mountpoint, f"f{size}"), "wb") as f:
            f.write(data)
        with open(os.path.join(dst.mountpoint, f"f{size}"), "rb") as f:
            assert f.read() == data, size
    # Overwritten in place on one host, read again on the other.
    path = "f100000"
    with open(os.path.join(b.mountpoint, path), "r+b") as f:
        f.seek(50_000)
        f.write(b"X" * 20_000)
    got = open(os.path.join(a.mountpoint, path), "rb").read()
    assert got[50_000:70_000] == b"X" * 20_000 and len(got) == 100_000
    assert sorted(os.listdir(a.mountpoint)) == sorted(os.listdir(b.mountpoint))
    hosts.close()
    _assert_fsck_clean(hosts.backing("a"))


def test_exclusive_and_shared_mounts_exclude_each_other(hosts):
    """Claim "every mount says --shared-backing": a default mount is refused while shared
    ones run, and a shared one while a default one runs; one line, no traceback."""
    hosts.mount("a")
    mnt, other = (os.path.join(hosts.work, f"mnt-{hosts.name}-{x}") for x in "xy")
    os.makedirs(mnt)
    os.makedirs(other)

    def try_mount(backing: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "encfs", "mount", backing, other, "--kms-socket",
             hosts.kms.socket_path, "--project-id", hosts.kms.project_id, "--foreground",
             *extra], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    res = try_mount(hosts.backing("b"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "in use by encfs mounts with --shared-backing" in res.stderr
    hosts.unmount("a")
    excl = EncryptedMount(mountpoint=mnt, backing=hosts.backing("a"), key_id="sfs/default",
                          kms=hosts.kms, log_path=os.path.join(hosts.work, "excl.log"))
    excl.mount()
    try:
        res = try_mount(hosts.backing("b"), "--shared-backing")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert "mounted without --shared-backing" in res.stderr
    finally:
        assert excl.unmount() == 0


def _kms_audit(kms, file_id: bytes) -> list[tuple[str, str, str]]:
    import json
    res = subprocess.run([sys.executable, "-m", "kms", "--socket", kms.socket_path,
                          "--project-id", kms.project_id, "--json", "audit", "--aad",
                          file_id.hex()], capture_output=True, text=True, check=True)
    return [(r["operation"], r["outcome"], r["key_id"]) for r in json.loads(res.stdout)["records"]]


def _sidecar(backing: str, rel: str):
    from encfs import format as fmt
    return fmt.decode_sidecar(open(os.path.join(backing, rel + ".sfskey"), "rb").read())


def _hammer(workers, seconds_of_work: int) -> list[str]:
    """Run ``workers`` (callables taking a stop event) in threads; their failures."""
    failures: list[str] = []
    stop = threading.Event()

    def run(fn):
        try:
            fn(stop)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failures.append(f"{fn.__name__}: {e!r}")
            stop.set()

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def _creator(mnt: str, names: list[str], rounds: int, tag: bytes, wins: list[str]):
    """Create (O_EXCL), read back and remove files; only ENOENT/EEXIST are expected
    answers when the other host works on the same names."""
    def work(stop):
        for r in range(rounds):
            for n in names:
                p = os.path.join(mnt, n)
                body = tag * (100 + 37 * r)
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    pass
                else:
                    try:
                        os.write(fd, body)
                    finally:
                        os.close(fd)
                    wins.append(n)
                try:
                    with open(p, "rb") as f:
                        got = f.read()
                    # Whole content of one creator, or a file another host created and
                    # has not written yet (empty): never a mix, never EIO.
                    assert got == b"" or len(set(got)) == 1, (n, got[:40])
                except FileNotFoundError:
                    pass
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
    work.__name__ = f"creator-{tag.decode()}"
    return work


@pytest.mark.parametrize("names", ["distinct", "same"])
def test_both_hosts_create_and_remove_in_one_directory(hosts, names):
    """Claims "creation is exclusive across hosts" and "no host sees half a pair": two
    hosts creating, reading and removing files in one directory at once, under distinct
    and under the same names: no EIO, no mixed file, fsck clean afterwards."""
    a, b = hosts.mount("a"), hosts.mount("b")
    os.mkdir(os.path.join(a.mountpoint, "d"))
    common = [f"n{i}" for i in range(8)]
    na = common if names == "same" else [f"a{i}" for i in range(8)]
    nb = common if names == "same" else [f"b{i}" for i in range(8)]
    wins_a: list[str] = []
    wins_b: list[str] = []
    failures = _hammer([_creator(os.path.join(a.mountpoint, "d"), na, 6, b"A", wins_a),
                        _creator(os.path.join(b.mountpoint, "d"), nb, 6, b"B", wins_b)], 0)
    assert failures == []
    assert wins_a and wins_b
    assert os.listdir(os.path.join(a.mountpoint, "d")) == []
    hosts.close()
    _assert_fsck_clean(hosts.backing("a"))


def test_one_name_created_on_both_hosts_at_once(hosts):
    """Claim "creation is exclusive across hosts": one success and one EEXIST per name,
    and the winner's content is what both hosts read."""
    a, b = hosts.mount("a"), hosts.mount("b")
    results: dict[str, dict[str, str]] = {"a": {}, "b": {}}
    barrier = threading.Barrier(2)

    def race(host, mnt):
        def work(stop):
            for i in range(20):
                barrier.wait()
                try:
                    fd = os.open(os.path.join(mnt, f"r{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                except FileExistsError:
                    results[host][f"r{i}"] = "EEXIST"
                    continue
                os.write(fd, host.encode() * 5000)
                os.close(fd)
                results[host][f"r{i}"] = "created"
        work.__name__ = f"race-{host}"
        return work

    assert _hammer([race("a", a.mountpoint), race("b", b.mountpoint)], 0) == []
    for i in range(20):
        outcome = sorted([results["a"][f"r{i}"], results["b"][f"r{i}"]])
        assert outcome == ["EEXIST", "created"], (i, outcome)
        winner = "a" if results["a"][f"r{i}"] == "created" else "b"
        for m in (a, b):
            assert open(os.path.join(m.mountpoint, f"r{i}"), "rb").read() == \
                winner.encode() * 5000


def test_disjoint_writes_to_one_file_lose_nothing(hosts):
    """Claim "block read-modify-write under a lock": both hosts write interleaved
    1000-byte pieces of one file (sharing blocks, growing it) at once: every byte of both
    is there."""
    a, b = hosts.mount("a"), hosts.mount("b")
    open(os.path.join(a.mountpoint, "shared.bin"), "wb").close()
    piece, count = 1000, 200  # 200 kB: pieces of both hosts in every 16 KiB block

    def writer(mnt, parity, tag):
        def work(stop):
            fd = os.open(os.path.join(mnt, "shared.bin"), os.O_WRONLY)
            try:
                for i in range(parity, count, 2):
                    os.pwrite(fd, tag * piece, i * piece)
            finally:
                os.close(fd)
        work.__name__ = f"writer-{tag.decode()}"
        return work

    assert _hammer([writer(a.mountpoint, 0, b"a"), writer(b.mountpoint, 1, b"b")], 0) == []
    expected = b"".join((b"a" if i % 2 == 0 else b"b") * piece for i in range(count))
    for m in (a, b):
        assert open(os.path.join(m.mountpoint, "shared.bin"), "rb").read() == expected


def test_renames_on_one_host_while_the_other_lists_and_reads(hosts):
    """Claim "renames are locked pair changes": B lists and reads while A renames files
    back and forth: every read gives the whole content or ENOENT, never EIO."""
    a, b = hosts.mount("a"), hosts.mount("b")
    contents = {f"f{i}": bytes([65 + i]) * (5000 + 1000 * i) for i in range(6)}
    for n, data in contents.items():
        with open(os.path.join(a.mountpoint, n), "wb") as f:
            f.write(data)
    done = threading.Event()
    reads = []

    def renamer(stop):
        try:
            for r in range(30):
                for n in contents:
                    src, dst = (n, n + ".moved") if r % 2 == 0 else (n + ".moved", n)
                    os.rename(os.path.join(a.mountpoint, src), os.path.join(a.mountpoint, dst))
        finally:
            done.set()

    def reader(stop):
        while not done.is_set():
            for n in os.listdir(b.mountpoint):
                try:
                    with open(os.path.join(b.mountpoint, n), "rb") as f:
                        got = f.read()
                except FileNotFoundError:
                    continue
                assert got == contents[n.removesuffix(".moved")], n
                reads.append(n)

    assert _hammer([renamer, reader], 0) == []
    assert reads
    assert sorted(os.listdir(b.mountpoint)) == sorted(contents)
    hosts.close()
    _assert_fsck_clean(hosts.backing("a"))


def test_rewrap_and_rekey_on_one_host_seen_by_the_other_at_next_open(hosts):
    """Claim "a key or sidecar changed by another host is noticed at the next open":
    rewrap (to another CMK) and rekey (a new DEK) run on A; B's next open unwraps the new
    record at the KMS and reads the same content."""
    a, b = hosts.mount("a"), hosts.mount("b")
    for n in ("wrap.txt", "key.txt"):
        with open(os.path.join(a.mountpoint, n), "wb") as f:
            f.write(n.encode() * 1000)
        assert open(os.path.join(b.mountpoint, n), "rb").read() == n.encode() * 1000
    before = _sidecar(hosts.backing("b"), "wrap.txt").key_id
    hosts.kms.client.create_key("other-cmk")
    res = subprocess.run([sys.executable, "-m", "encfs", "rewrap", hosts.backing("a"),
                          "--to-key", "other-cmk", "--kms-socket", hosts.kms.socket_path,
                          "--project-id", hosts.kms.project_id],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = _sidecar(hosts.backing("b"), "wrap.txt")
    assert rec.key_id != before
    assert open(os.path.join(b.mountpoint, "wrap.txt"), "rb").read() == b"wrap.txt" * 1000
    assert ("decrypt-datakey", "ok", rec.key_id) in _kms_audit(hosts.kms, rec.file_id)
    old_id = _sidecar(hosts.backing("b"), "key.txt").file_id  # (rewrapped too)
    res = subprocess.run([sys.executable, "-m", "encfs", "rekey",
                          os.path.join(a.mountpoint, "key.txt")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    new = _sidecar(hosts.backing("b"), "key.txt")
    assert new.file_id != old_id
    assert open(os.path.join(b.mountpoint, "key.txt"), "rb").read() == b"key.txt" * 1000
    assert ("decrypt-datakey", "ok", new.key_id) in _kms_audit(hosts.kms, new.file_id)


_WORKLOAD = r"""
import hashlib, os, sys
mnt, progress = sys.argv[1], sys.argv[2]
log = open(progress, "a", buffering=1)
os.makedirs(os.path.join(mnt, "w"), exist_ok=True)
open(os.path.join(mnt, "r0"), "wb").write(b"renamed around")
i = 0
while True:
    data = hashlib.sha256(b"%d" % i).digest() * (500 + 97 * (i % 50))
    with open(os.path.join(mnt, "w", "f%d" % (i % 40)), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    log.write("f%d %d\n" % (i % 40, i))  # durable from here on
    with open(os.path.join(mnt, "big"), "ab") as f:
        f.write(os.urandom(70000))  # multi-block writes in flight at the kill
    os.rename(os.path.join(mnt, "r%d" % i), os.path.join(mnt, "r%d" % (i + 1)))
    i += 1
"""


def _areas(backing: str) -> list[str]:
    return sorted(os.listdir(os.path.join(backing, ".encfs", "mounts")))


@pytest.mark.parametrize("recoverer", ["b", "a"])
def test_kill_of_one_host_recovered(hosts, recoverer):
    """Claims "a crash of one host leaves its area" and "whoever takes its lock recovers
    it": A's daemon is killed (-9) in the middle of writes and renames; B keeps working;
    the next mount of B (or of A) replays A's journal and removes A's area; nothing A
    fsynced is lost; fsck is clean."""
    import hashlib
    a, b = hosts.mount("a"), hosts.mount("b")
    progress = os.path.join(hosts.work, f"{hosts.name}.progress")
    writer = subprocess.Popen([sys.executable, "-c", _WORKLOAD, a.mountpoint, progress],
                              stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(progress) or len(open(progress).read().splitlines()) < 25:
            assert writer.poll() is None, "the workload stopped early"
            time.sleep(0.05)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
    finally:
        writer.kill()
        writer.wait()
    hosts.unmount("a")  # the dead FUSE mount
    # B keeps working, next to A's dead area.
    with open(os.path.join(b.mountpoint, "after"), "wb") as f:
        f.write(b"B goes on")
    assert open(os.path.join(b.mountpoint, "after"), "rb").read() == b"B goes on"
    assert len(_areas(hosts.backing("b"))) == 2
    if recoverer == "b":
        assert hosts.unmount("b") == 0
        b = hosts.mount("b")
        assert "recovered the area of the dead mount" in b.log(), b.log()
        assert len(_areas(hosts.backing("b"))) == 1  # B's own
        a = hosts.mount("a")
    else:
        a = hosts.mount("a")
        assert "recovered the area of the dead mount" in a.log(), a.log()
        assert len(_areas(hosts.backing("b"))) == 2  # B's and A's new one
    durable: dict[str, int] = {}
    for line in open(progress).read().splitlines():
        name, i = line.split()
        durable[name] = int(i)
    in_flight = f"f{(max(durable.values()) + 1) % 40}"  # its write was not acknowledged
    for name, i in durable.items():
        data = hashlib.sha256(b"%d" % i).digest() * (500 + 97 * (i % 50))
        for m in (a, b):
            got = open(os.path.join(m.mountpoint, "w", name), "rb").read()
            if name == in_flight:
                assert got == data or got == b"" or got.startswith(
                    hashlib.sha256(b"%d" % (i + 40)).digest()), name
            else:
                assert got == data, name
    renamed = [n for n in os.listdir(a.mountpoint) if n.startswith("r")]
    assert len(renamed) == 1, renamed  # the rename in flight happened or did not: one name
    assert open(os.path.join(a.mountpoint, renamed[0]), "rb").read() == b"renamed around"
    os.path.getsize(os.path.join(b.mountpoint, "big"))
    open(os.path.join(b.mountpoint, "big"), "rb").read()  # every block authenticates
    hosts.close()
    _assert_fsck_clean(hosts.backing("a"))


def test_application_locks_hold_on_one_host_only(hosts):
    """Claim "flock/fcntl locks are not forwarded" (pyfuse3 has no lock handlers, so the
    kernel keeps them local to each mount): they exclude processes of one host, not of
    two hosts."""
    import fcntl
    a, b = hosts.mount("a"), hosts.mount("b")
    with open(os.path.join(a.mountpoint, "locked"), "wb") as f:
        f.write(b"x")
    fa = os.open(os.path.join(a.mountpoint, "locked"), os.O_RDWR)
    fa2 = os.open(os.path.join(a.mountpoint, "locked"), os.O_RDWR)
    fb = os.open(os.path.join(b.mountpoint, "locked"), os.O_RDWR)
    try:
        fcntl.flock(fa, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fa2, fcntl.LOCK_EX | fcntl.LOCK_NB)  # same host: excluded
        fcntl.flock(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)  # other host: granted (documented)
    finally:
        for fd in (fa, fa2, fb):
            os.close(fd)


def test_reader_meets_a_pair_left_half_renamed_by_a_dead_host(hosts):
    """Claim "a reader that meets a half-done pair retries": A dies between the two steps
    of a rename (data moved, sidecar not; the state made here by hand, in A's area and
    under A's path of the backing dir, as tests/test_journal.py makes every crash point);
    B's open of the new name finds no sidecar, recovers A's area (moving the paths of
    A's journal under B's path of the backing dir) and reads the file: no EIO."""
    from encfs.journal import Journal
    a, b = hosts.mount("a"), hosts.mount("b")
    content = b"half renamed " * 3000
    with open(os.path.join(a.mountpoint, "moving"), "wb") as f:
        f.write(content)
    assert open(os.path.join(b.mountpoint, "moving"), "rb").read() == content
    a_pid = a.process.pid
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    hosts.unmount("a")
    [area] = [n for n in _areas(hosts.backing("b")) if f"-{a_pid}-" in n]
    backing_a = os.fsencode(hosts.backing("a"))
    journal = Journal(os.path.join(backing_a, b".encfs", b"mounts", os.fsencode(area)),
                      root=backing_a)
    old, new = backing_a + b"/moving", backing_a + b"/moved"
    journal.rename(old, new, 0, old + b".sfskey", None)
    journal.close()
    os.rename(old, new)
    assert open(os.path.join(b.mountpoint, "moved"), "rb").read() == content
    assert "recovered the area of the dead mount" in b.log(), b.log()
    assert "finished moving the sidecar" in b.log(), b.log()
    assert sorted(os.listdir(b.mountpoint)) == ["moved"]
    assert area not in _areas(hosts.backing("b"))
    hosts.close()
    _assert_fsck_clean(hosts.backing("a"))


def test_reads_during_another_hosts_rewrites_see_whole_blocks(hosts):
    """Claim "reads take no lock; a block caught mid-rewrite is read again under the
    lock": A rewrites a 10-block file over and over, each pass with one byte value; B
    reads it meanwhile: every 16 KiB block B gets is of one pass (never torn), no EIO."""
    a, b = hosts.mount("a"), hosts.mount("b")
    bs, blocks = 16384, 10
    path_a, path_b = (os.path.join(m.mountpoint, "rewritten") for m in (a, b))
    with open(path_a, "wb") as f:
        f.write(bytes([0]) * bs * blocks)
    done = threading.Event()
    seen = []

    def rewriter(stop):
        try:
            fd = os.open(path_a, os.O_WRONLY)
            try:
                for v in range(1, 60):
                    os.pwrite(fd, bytes([v]) * bs * blocks, 0)
            finally:
                os.close(fd)
        finally:
            done.set()

    def reader(stop):
        while not done.is_set():
            with open(path_b, "rb") as f:
                data = f.read()
            assert len(data) == bs * blocks
            for i in range(blocks):
                assert len(set(data[i * bs:(i + 1) * bs])) == 1, i
            seen.append(data[0])

    assert _hammer([rewriter, reader], 0) == []
    assert seen
    assert open(path_b, "rb").read() == bytes([59]) * bs * blocks
