"""docs/SECURITY.md: "on any other backing dir (a journal dir others can write) the undo
record is written with pwrite, and nothing planted or truncated there can crash the mount".

Through a real mount whose `.encfs/journal` is writable by others: its undo file is never
mapped; truncating it and planting garbage in it and in the intent file while files are
being written neither kills the daemon nor changes what the files hold; and after a
SIGKILL, planted, torn and truncated undo records are refused by the recovery, which
leaves every file as it was.

The same tampering of a private journal (mapped undo file) kills the daemon with SIGBUS:
that is the case SECURITY.md leaves to the daemon's uid and root, and the mutation that
shows this test can fail (see docs/TESTING.md).
"""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from encfs.journal_codec import UNDO_BODY, UNDO_MAGIC
from encfs.pytest_plugin import temporary_mount

pytestmark = pytest.mark.fuse

ROUNDS = 40


def undo_file_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(line.rstrip().endswith("/journal/inflight-write") for line in f)


def tamper(journal: str, rnd: int) -> None:
    """Truncate the undo and intent files under the daemon, and plant garbage in them."""
    for name in ("inflight-write", "inflight-change"):
        path = os.path.join(journal, name)
        if not os.path.exists(path):
            continue
        with open(path, "r+b") as f:
            f.truncate(0 if rnd % 2 else 7)
            if rnd % 3 == 0:
                f.write(UNDO_MAGIC + os.urandom(64))


def forged_undo(path: str, ino: int, cut: int | None) -> bytes:
    """An undo record that would write zeros over ``path``: valid, or cut to ``cut`` bytes."""
    body = UNDO_BODY.pack(ino, 0, 10, len(path), 4096) + path.encode() + bytes(4096)
    record = UNDO_MAGIC + struct.pack(">I", zlib.crc32(body)) + body
    return record if cut is None else record[:cut]


def write_round(mnt: str, files: dict[str, bytes], i: int) -> None:
    name = f"f{i % 5}"
    data = os.urandom(3 * 4096 + i * 37)
    with open(f"{mnt}/{name}", "r+b" if name in files else "wb") as f:
        f.seek(0)
        f.write(data)
        f.truncate(len(data))
    files[name] = data


def check(mnt: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(f"{mnt}/{name}", "rb") as f:
            assert f.read() == data, name


def test_pwrite_undo_records_survive_planted_and_truncated_records(kms_server):
    with temporary_mount(kms_server, prefix="encfs-undo-") as m:
        journal = m.backing_path(".encfs/journal")
        m.unmount()
        os.chmod(journal, 0o777)  # others can write: pwrite (0700: mapped, and SIGBUS below)
        m.mount()
        files: dict[str, bytes] = {}
        write_round(m.mountpoint, files, 0)
        assert not undo_file_mapped(m.process.pid)
        for i in range(1, ROUNDS):
            tamper(journal, i)
            write_round(m.mountpoint, files, i)
            assert m.process.poll() is None, f"the daemon died: {m.process.returncode}"
        check(m.mountpoint, files)
        assert m.process.poll() is None

        # A crash, then records planted for the recovery: torn, cut short, unchecked.
        victim = f"{m.backing}/f0"
        ino = os.stat(victim).st_ino
        m.process.kill()
        m.process.wait()
        m.unmount()
        for cut in (None, 5, 16, 40, 100):
            record = forged_undo(victim, ino, cut)
            if cut is None:  # valid lengths, but the checksum of another body
                record = record[:8] + b"\0\0\0\0" + record[12:]
            with open(os.path.join(journal, "inflight-write"), "wb") as f:
                f.write(record)
            m.mount()
            check(m.mountpoint, files)
            assert m.process.poll() is None
            m.process.kill()  # stay "dirty": the next mount recovers again
            m.process.wait()
            m.unmount()
        m.mount()
        check(m.mountpoint, files)
        assert "Traceback" not in m.log()
