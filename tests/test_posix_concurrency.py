"""Layer 3: several processes (and several uids) on the same file and directory at once.

Each test runs on a default mount (writeback cache: the kernel sends dirty pages in
parallel) and on a --shared-backing mount (no writeback cache: every write reaches encfs
as the process made it, so unaligned writes to one block race in encfs itself). The
directory tests run with encrypted names too (both ways): the name layer is what they
race; the content tests do not depend on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import mount_with_own_kms, python_for_other_uids

pytestmark = pytest.mark.fuse
PY = python_for_other_uids()  # other uids may not reach our venv's interpreter
UIDS = (65534, 4242)


CONTENT_MOUNTS = ["default", "shared-backing"]
NAME_MOUNTS = [*CONTENT_MOUNTS, "encrypted-names", "shared-backing+encrypted-names"]
content_mounts = pytest.mark.parametrize("mnt", CONTENT_MOUNTS, indirect=True)
name_mounts = pytest.mark.parametrize("mnt", NAME_MOUNTS, indirect=True)


@pytest.fixture(scope="module")
def mnt(request):
    """A mount of the kind the test's parameter names ("+"-joined options)."""
    extra = ["-o", "allow_other"]
    kinds = request.param.split("+")
    if "shared-backing" in kinds:
        extra.append("--shared-backing")
    names_mode = "encrypted-names" if "encrypted-names" in kinds else "plain-names"
    with mount_with_own_kms("encfs-conc-", extra, shared=True, names_mode=names_mode) as m:
        yield m


@pytest.fixture
def d(mnt, request):
    path = os.path.join(mnt.mountpoint, request.node.name.split("[")[0])
    os.mkdir(path)
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spawn(code: str, *args: str, uid: int | None = None) -> subprocess.Popen:
    def drop():
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return subprocess.Popen([PY, "-c", textwrap.dedent(code), *args], preexec_fn=drop,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_all(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, errs = p.communicate(timeout=120)
        assert p.returncode == 0, errs
        outs.append(out)
    return outs


STRIPE_WRITER = """
import os, random, sys
path, k, n, rounds, stripe = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fd = os.open(path, os.O_RDWR)
mine = [i for i in range(n) if i % 4 == k]
rnd = random.Random(k)
for r in range(rounds):
    rnd.shuffle(mine)
    for i in mine:
        os.pwrite(fd, bytes([(k * 16 + r) % 256]) * stripe, i * stripe)
os.close(fd)
"""

READER = """
import os, sys
path, loops = sys.argv[1], int(sys.argv[2])
for _ in range(loops):
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == int(sys.argv[3]), len(data)
"""


@content_mounts
def test_unaligned_writes_to_one_file_lose_nothing(d):
    """Four writers own interleaved 1000-byte stripes: every 4 KiB block is shared by
    several writers, so a read-modify-write that interleaved would lose someone's bytes."""
    n, stripe, rounds = 300, 1000, 3
    path = f"{d}/shared.bin"
    with open(path, "wb") as f:
        f.truncate(n * stripe)
    procs = [spawn(STRIPE_WRITER, path, str(k), str(n), str(rounds), str(stripe))
             for k in range(4)]
    procs.append(spawn(READER, path, "20", str(n * stripe)))
    wait_all(procs)
    with open(path, "rb") as f:
        data = f.read()
    expected = b"".join(bytes([((i % 4) * 16 + rounds - 1) % 256]) * stripe for i in range(n))
    assert data == expected


APPENDER = """
import os, sys
path, k, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
for i in range(count):
    os.write(fd, b"<%d:%d:%s>\\n" % (k, i, b"x" * ((k * 31 + i * 17) % 300)))
os.close(fd)
"""


@content_mounts
def test_concurrent_o_append_keeps_every_record(d):
    path = f"{d}/log"
    open(path, "wb").close()
    count = 300
    wait_all([spawn(APPENDER, path, str(k), str(count)) for k in range(4)])
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b""
    recs = sorted(lines[:-1])
    expected = sorted(b"<%d:%d:%s>" % (k, i, b"x" * ((k * 31 + i * 17) % 300))
                      for k in range(4) for i in range(count))
    assert recs == expected


DIR_WORKER = """
import errno, os, sys
d, k, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    p = f"{d}/w{k}-{r}"
    with open(p, "wb") as f:
        f.write(b"%d-%d" % (k, r))
    os.rename(p, f"{d}/v{k}-{r}")
    os.link(f"{d}/v{k}-{r}", f"{d}/h{k}-{r}")
    if r % 2:
        os.unlink(f"{d}/v{k}-{r}")
    os.mkdir(f"{d}/dir{k}-{r}")
    os.rmdir(f"{d}/dir{k}-{r}")
    # contended names: everyone renames over and unlinks the same target
    with open(f"{d}/tmp{k}", "wb") as f:
        f.write(b"shared by %d" % k)
    os.rename(f"{d}/tmp{k}", f"{d}/common")
    try:
        os.unlink(f"{d}/common")
    except FileNotFoundError:
        pass
    os.listdir(d)
"""


@name_mounts
def test_processes_share_one_directory(d):
    rounds = 60
    wait_all([spawn(DIR_WORKER, d, str(k), str(rounds)) for k in range(4)])
    names = set(os.listdir(d))
    expected = set()
    for k in range(4):
        for r in range(rounds):
            expected.add(f"h{k}-{r}")
            if not r % 2:
                expected.add(f"v{k}-{r}")
    assert names - {"common"} == expected
    for k in range(4):
        for r in range(0, rounds, 2):
            assert open(f"{d}/h{k}-{r}", "rb").read() == b"%d-%d" % (k, r)
            assert os.stat(f"{d}/v{k}-{r}").st_nlink == 2


UID_WORKER = """
import os, sys
d, uid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    base = f"{d}/u{uid}-{i}"
    with open(base + ".f", "wb") as f:
        f.write(os.urandom(100 + i))
    os.mkdir(base + ".d")
    os.symlink("target", base + ".l")
    os.mkfifo(base + ".p")
    for suffix in (".f", ".d", ".l", ".p"):
        st = os.lstat(base + suffix)
        assert (st.st_uid, st.st_gid) == (uid, uid), (base + suffix, st.st_uid, st.st_gid)
    if i % 2:
        os.unlink(base + ".f")
        os.rmdir(base + ".d")
        os.unlink(base + ".l")
        os.unlink(base + ".p")
print(os.getuid(), os.getgid())
"""


@name_mounts
def test_two_uids_create_and_delete_in_one_directory(d, mnt):
    """Ownership is set with fchown/lchown per object, never by switching the daemon's
    uid (which, in Python, would switch every thread at once)."""
    count = 80
    outs = wait_all([spawn(UID_WORKER, d, str(uid), str(count), uid=uid) for uid in UIDS])
    assert [o.split() for o in outs] == [[str(u), str(u)] for u in UIDS]
    names = os.listdir(d)
    assert len(names) == 2 * 4 * count // 2
    bdir = os.path.basename(d)
    for name in names:
        uid = int(name[1:].split("-")[0])
        assert os.lstat(f"{d}/{name}").st_uid == uid
        assert os.lstat(mnt.backing_path(f"{bdir}/{name}")).st_uid == uid
        if name.endswith(".f"):
            assert os.stat(mnt.backing_path(f"{bdir}/{name}{fmt.SIDECAR_SUFFIX}")).st_uid == uid
    # The daemon itself still runs as root.
    with open(f"/proc/{mnt.process.pid}/status") as f:
        assert any(line.split()[1:] == ["0"] * 4 for line in f if line.startswith("Uid:"))
