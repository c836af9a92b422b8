"""A SIGKILL inside a multi-page pwrite of a data file: the torn block it leaves is put
back by the undo record at the next mount (docs/CONSISTENCY.md).

tests/test_crash.py's kills land at random moments, which almost never fall inside the one
pwrite that overwrites blocks in place: with the undo record dropped, its seeds still pass
(docs/TESTING.md). Here tests/torn_write.py makes the kill land there every time, as the
kernel would: the call stopped at a page boundary inside its first block, the daemon dead
before it returned. After the remount every byte must read as before the write or as after
it; without the undo record block 1 would be torn and its read an EIO.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import temporary_mount

pytestmark = pytest.mark.fuse

BS = fmt.DEFAULT_BLOCK_SIZE
TRACER = os.path.join(os.path.dirname(__file__), "torn_write.py")


def fsck(m) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encfs", "fsck", m.backing, "--kms-socket",
                           m.kms.socket_path, "--project-id", m.kms.project_id],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("journal", ["mapped", "pwrite"])
def test_sigkill_inside_a_multi_page_pwrite_leaves_no_torn_block(kms_server, journal):
    """``journal``: the undo record stored into a mapping of its file (a private journal
    dir) or written with pwrite (a journal dir others can write, docs/SECURITY.md)."""
    old, new = os.urandom(4 * BS), os.urandom(2 * BS)
    with temporary_mount(kms_server, prefix="encfs-torn-") as m:
        path = f"{m.mountpoint}/f"
        with open(path, "wb") as f:
            f.write(old)
        m.unmount()  # also: nothing of the file in the kernel's cache, the write goes to encfs
        if journal == "pwrite":
            os.chmod(m.backing_path(".encfs/journal"), 0o777)
        m.mount()
        f = open(path, "r+b", buffering=0)
        try:
            tracer = subprocess.Popen([sys.executable, TRACER, str(m.process.pid),
                                       m.backing_path("f")], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            try:
                assert tracer.stdout.readline() == "attached\n", tracer.stderr.read()
                # Blocks 1 and 2 in place: one pwrite of two blocks, after an undo record.
                with pytest.raises(OSError) as e:
                    f.seek(BS)
                    f.write(new)
                    os.fsync(f.fileno())  # the writeback cache sends it here at the latest
                assert e.value.errno in (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO)
                out, err = tracer.communicate(timeout=60)
            finally:
                if tracer.poll() is None:
                    tracer.kill()
                    tracer.wait()
            assert tracer.returncode == 0, (tracer.returncode, out, err)
            torn = json.loads(out)
        finally:
            try:
                f.close()
            except OSError:
                pass  # its flush meets the dead daemon
        m.process.wait()
        # The kill came inside the pwrite of blocks 1-2: part of block 1 written, not all.
        cbs = fmt.cipher_block_size(BS)
        # (one pwrite of both blocks; of block 1 alone if the kernel sent two requests)
        assert torn["offset"] == fmt.block_offset(1, BS) and torn["count"] in (cbs, 2 * cbs), torn
        assert 0 < torn["written"] == torn["cut"] < cbs, torn
        m.unmount()
        m.mount()  # recovery
        with open(path, "rb") as f:
            got = f.read()  # EIO here: block 1 still torn
        assert got in (old, old[:BS] + new + old[3 * BS:]), "neither before nor after the write"
        m.unmount()
        res = fsck(m)
        assert res.returncode == 0, res.stdout + res.stderr
