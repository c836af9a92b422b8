"""Layer 3: concurrent create/remove churn from several processes and uids (issue 13).

ext4 hands a freed inode number to the next new file at once. When node ids were backing
inode numbers with generation 0, the kernel could meet a new file under the node id of one
it still held, and mkdir/rmdir/creat failed with ESTALE, EIO or a wrong EEXIST. Every
worker here creates and removes files, directories and symlinks, each under its own names,
some in a directory of its own and some in one directory all share, as root and as two
other uids; every call must succeed and every new object must belong to its creator.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest

from encfs.pytest_plugin import (NAME_MODES, make_mount, names_args, short_tempdir,
                                 start_as_uid, start_kms_server)

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")]

UIDS = (0, 60011, 60012)
ITERATIONS = int(os.environ.get("ENCFS_CHURN_ITERATIONS", "150"))  # 600: about 20 s here


def _churn(top: str, tag: str, uid: int, iterations: int) -> tuple[Counter, list[str]]:
    """The workload of one process: returns failed calls by (call, errno) and the first
    few failures in words."""
    failed: Counter = Counter()
    detail: list[str] = []

    def call(what: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except OSError as e:
            failed[(what, e.errno)] += 1
            if len(detail) < 5:
                detail.append(f"{what} {args[0]}: {os.strerror(e.errno or 0)}")
            return False

    def owned(path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as e:
            failed[("lstat", e.errno)] += 1
            return
        if st.st_uid != uid:
            failed[("owner", 0)] += 1

    for i in range(iterations):
        d, f, s = (os.path.join(top, f"{tag}-{k}{i % 7}") for k in "dfs")
        if call("mkdir", os.mkdir, d, 0o755):
            owned(d)
            call("mkdir-child", os.mkdir, os.path.join(d, "c"))
            call("rmdir-child", os.rmdir, os.path.join(d, "c"))
            call("rmdir", os.rmdir, d)
        if call("mkdir-again", os.mkdir, d, 0o755):
            call("rmdir-again", os.rmdir, d)
        try:
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            failed[("creat", e.errno)] += 1
            detail.append(f"creat {f}: {os.strerror(e.errno or 0)}")
        else:
            call("write", os.write, fd, b"x" * (i % 5000))
            os.close(fd)
            owned(f)
            call("unlink", os.unlink, f)
        if call("symlink", os.symlink, f"target-{i}", s):
            owned(s)
            call("unlink-symlink", os.unlink, s)
    return failed, detail


def run_churn(mnt: str, iterations: int = ITERATIONS) -> tuple[Counter, list[str]]:
    """Two processes per uid: one in a directory of its own, one in a shared one."""
    shared = os.path.join(mnt, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    jobs = []
    for uid in UIDS:
        own = os.path.join(mnt, f"own-{uid}")
        os.mkdir(own)
        os.chown(own, uid, uid)
        jobs.append(start_as_uid(uid, lambda own=own, uid=uid: _churn(own, "w", uid, iterations)))
        jobs.append(start_as_uid(uid, lambda uid=uid: _churn(shared, f"u{uid}", uid, iterations)))
    total: Counter = Counter()
    details: list[str] = []
    for job in jobs:
        kind, value = job.result()
        assert kind == "ok", value
        total.update(value[0])
        details += value[1]
    return total, details


@pytest.fixture(params=NAME_MODES)
def shared_mount(request):
    """Plaintext names and encrypted names (#18)."""
    work = short_tempdir("encfs-churn-")
    os.chmod(work, 0o711)
    kms = start_kms_server(os.path.join(work, "kms"))
    m = None
    try:
        m = make_mount(kms, work, extra_args=["-o", "allow_other", *names_args(request.param)])
        os.chmod(m.mountpoint, 0o755)
        os.chmod(os.path.dirname(m.mountpoint), 0o755)
        yield m
    finally:
        if m is not None:
            m.unmount()
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_churn_from_three_uids_has_no_failed_call(shared_mount):
    failed, details = run_churn(shared_mount.mountpoint)
    assert not failed, (dict(failed), details)
    # Everything removed: nothing but the work directories is left, in the mount and in
    # the backing dir (no sidecar or long-name file of a removed name stays behind).
    for d in ["shared"] + [f"own-{u}" for u in UIDS]:
        assert os.listdir(os.path.join(shared_mount.mountpoint, d)) == []
        assert os.listdir(shared_mount.backing_path(d)) == []
