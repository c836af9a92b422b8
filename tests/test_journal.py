"""The intent journal: a crash between the steps of a change is finished by replay."""

import errno
import os
import subprocess

import pytest

from encfs.content import PWrite, Truncate
from encfs.journal import Journal, RENAME_EXCHANGE
from encfs.renameat2 import renameat2

S = b".sfskey"


@pytest.fixture
def tree(tmp_path):
    root = bytes(tmp_path)
    ctl = os.path.join(root, b".encfs")
    os.makedirs(ctl)
    return root, Journal(ctl)


def put(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_rename_over_existing(tree, crash_after):
    root, j = tree
    a, b = os.path.join(root, b"a"), os.path.join(root, b"b")
    put(a, b"A"), put(a + S, b"kA"), put(b, b"B"), put(b + S, b"kB")
    intent = j.rename(a, b, 0, a + S, b + S)
    if crash_after >= 1:
        os.rename(a, b)
    if crash_after >= 2:
        os.rename(a + S, b + S)
        j.done(intent)
    lines = j.replay()
    assert len(lines) == (0 if crash_after == 2 else 1)
    if crash_after == 0:
        assert (read(a), read(a + S), read(b), read(b + S)) == (b"A", b"kA", b"B", b"kB")
    else:
        assert (read(b), read(b + S)) == (b"A", b"kA")
        assert not os.path.exists(a) and not os.path.exists(a + S)
    assert j.pending() == []


def test_rename_of_a_file_without_key_drops_the_targets_sidecar(tree):
    root, j = tree
    a, b = os.path.join(root, b"a"), os.path.join(root, b"b")
    put(a, b""), put(b, b"B"), put(b + S, b"kB")
    j.rename(a, b, 0, None, b + S)
    os.rename(a, b)
    j.replay()
    assert read(b) == b"" and not os.path.exists(b + S)


def test_exchange(tree):
    root, j = tree
    a, b = os.path.join(root, b"a"), os.path.join(root, b"b")
    put(a, b"A"), put(a + S, b"kA"), put(b, b"B"), put(b + S, b"kB")
    j.rename(a, b, RENAME_EXCHANGE, a + S, b + S)
    renameat2(a, b, RENAME_EXCHANGE)
    j.replay()
    assert (read(a), read(a + S), read(b), read(b + S)) == (b"B", b"kB", b"A", b"kA")


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_file_steps_redo(tree, crash_after):
    root, j = tree
    f = os.path.join(root, b"f")
    put(f, b"x" * 100)
    steps = [Truncate(40), PWrite(30, b"NEW"), Truncate(33)]
    j.file_steps(f, os.lstat(f).st_ino, steps)
    fd = os.open(f, os.O_RDWR)
    for step in steps[:crash_after]:
        os.ftruncate(fd, step.size) if isinstance(step, Truncate) else os.pwrite(fd, step.data, step.offset)
    os.close(fd)
    j.replay()
    assert read(f) == b"x" * 30 + b"NEW"


def test_intent_for_another_inode_is_left_alone(tree):
    root, j = tree
    f = os.path.join(root, b"f")
    put(f, b"old")
    j.file_steps(f, os.lstat(f).st_ino, [Truncate(0)])
    other = os.path.join(root, b"other")
    put(other, b"a different file")
    os.rename(other, f)  # a new inode now holds the name
    [line] = j.replay()
    assert "left alone" in line and read(f) == b"a different file"


def test_damaged_intent_is_reported_not_fatal(tree):
    root, j = tree
    put(os.path.join(j.dir, b"9-9.json"), b"{not json")
    [line] = j.replay()
    assert "damaged" in line and j.pending() == []


@pytest.mark.parametrize("crash_after", ["record", "torn-write", "write"])
def test_undo_record_restores_the_old_state_of_an_interrupted_write(tree, crash_after):
    root, j = tree
    f = os.path.join(root, b"f")
    put(f, b"o" * 10000)
    old = read(f)
    # Overwrite 3000 bytes at 8000, growing the file to 11000: the undo record holds the
    # old bytes of the range and the old size.
    j.undo_before_write(f, os.lstat(f).st_ino, 8000, old[8000:], 10000)
    if crash_after == "torn-write":
        with open(f, "r+b") as fh:
            fh.seek(8000)
            fh.write(b"N" * 1000)  # the kill cut the pwrite after its first page
    elif crash_after == "write":
        with open(f, "r+b") as fh:
            fh.seek(8000)
            fh.write(b"N" * 3000)  # complete, but write_done() never ran
    assert len(j.pending()) == 1
    j.replay()
    assert read(f) == old


def test_finished_write_leaves_nothing_to_undo(tree):
    root, j = tree
    f = os.path.join(root, b"f")
    put(f, b"o" * 100)
    j.undo_before_write(f, os.lstat(f).st_ino, 100, b"", 100)
    put(f, b"new content")
    j.write_done()
    assert j.pending() == []
    assert j.replay() == [] and read(f) == b"new content"


def test_torn_undo_record_is_ignored(tree):
    root, j = tree
    f = os.path.join(root, b"f")
    put(f, b"o" * 100)
    j.undo_before_write(f, os.lstat(f).st_ino, 50, b"o" * 50, 100)
    rec = os.path.join(j.dir, b"inflight-write")
    raw = bytearray(read(rec))
    raw[-1] ^= 1  # the record's own pwrite was cut short: the data write never started
    put(rec, bytes(raw))
    [line] = j.replay()
    assert "torn" in line and read(f) == b"o" * 100


def test_intents_are_written_in_place_and_cleared(tree):
    root, j = tree
    a, b = os.path.join(root, b"a"), os.path.join(root, b"b")
    put(a, b"A"), put(a + S, b"kA")
    for _ in range(3):
        intent = j.rename(a, b, 0, a + S, None)
        assert j.pending() == [os.path.join(j.dir, b"inflight-change")]
        os.rename(a, b), os.rename(a + S, b + S)
        j.done(intent)
        assert j.pending() == []
        a, b = b, a
    assert os.listdir(j.dir) == [b"inflight-change"]  # no file per intent


def test_a_second_open_intent_gets_a_file_of_its_own(tree):
    root, j = tree
    a, b, c = (os.path.join(root, n) for n in (b"a", b"b", b"c"))
    put(a, b"A"), put(b, b"B")
    first = j.rename(a, c, 0, None, None)
    second = j.rename(b, a, 0, None, None)
    assert len(j.pending()) == 2 and first.path != second.path
    j.done(second), j.done(first)
    assert j.pending() == []


def test_a_torn_intent_is_reported_and_ignored(tree):
    root, j = tree
    a, b = os.path.join(root, b"a"), os.path.join(root, b"b")
    put(a, b"A"), put(a + S, b"kA")
    j.rename(a, b, 0, a + S, None)
    slot = os.path.join(j.dir, b"inflight-change")
    data = read(slot)
    put(slot, data[:-5] + b"XXXXX")  # as if a kill cut the pwrite after its first page
    lines = j.replay()
    assert len(lines) == 1 and "torn intent" in lines[0]
    assert read(a) == b"A" and not os.path.exists(b)
    assert j.pending() == []


def test_a_short_undo_record_after_a_long_one_is_still_replayed(tree):
    """The record is rewritten in place: a short one leaves the tail of a longer earlier
    one behind it, which must not make it look torn."""
    root, j = tree
    f = os.path.join(root, b"f")
    put(f, b"o" * 300_000)
    old = read(f)
    j.undo_before_write(f, os.lstat(f).st_ino, 0, old[:200_000], 300_000)
    j.write_done()
    j.undo_before_write(f, os.lstat(f).st_ino, 100, old[100:200], 300_000)
    with open(f, "r+b") as fh:
        fh.seek(100)
        fh.write(b"N" * 50)  # the kill cut this write short
    lines = j.replay()
    assert len(lines) == 1 and "ignored" not in lines[0], lines
    assert read(f) == old


def test_undo_records_are_stores_into_a_mapping_in_a_private_local_dir(tree):
    root, j = tree
    assert j.map_undo  # a journal dir of ours alone, on a local filesystem
    f = os.path.join(root, b"f")
    put(f, b"o" * 100)
    j.undo_before_write(f, os.lstat(f).st_ino, 0, b"o" * 99 + b"x", 100)
    assert os.path.getsize(os.path.join(j.dir, b"inflight-write")) >= 2 << 20
    put(f, b"N" * 100)  # the write, then a kill before write_done
    assert len(j.pending()) == 1
    j.replay()
    assert read(f) == b"o" * 99 + b"x"


def test_undo_records_use_pwrite_where_others_could_truncate_the_file(tmp_path):
    root = bytes(tmp_path)
    ctl = os.path.join(root, b".encfs")
    os.makedirs(os.path.join(ctl, b"journal"))
    os.chmod(os.path.join(ctl, b"journal"), 0o777)
    j = Journal(ctl)
    assert not j.map_undo
    f = os.path.join(root, b"f")
    put(f, b"o" * 100)
    j.undo_before_write(f, os.lstat(f).st_ino, 0, b"o" * 100, 100)
    assert len(j.pending()) == 1
    j.replay()
    assert read(f) == b"o" * 100


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_an_undo_record_on_a_full_filesystem_is_enospc_not_sigbus(tmp_path):
    """A store into an unallocated page of a mapped file is a SIGBUS when the filesystem
    is full: the mapping is allocated up front, so a full backing fs is ENOSPC at worst
    (the daemon died of SIGBUS in tests/test_faults.py before)."""
    root = bytes(tmp_path / "small")
    os.makedirs(root)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", root],
                   check=True)
    try:
        ctl = os.path.join(root, b".encfs")
        os.makedirs(ctl)
        f = os.path.join(root, b"f")
        put(f, b"o" * 100)
        child = os.fork()
        if child == 0:  # a SIGBUS must kill only this child
            code = 1
            try:
                j = Journal(ctl)
                assert j.map_undo
                j.undo_before_write(f, os.lstat(f).st_ino, 0, b"x", 100)  # maps the file
                j.write_done()
                filler = os.open(os.path.join(root, b"filler"), os.O_WRONLY | os.O_CREAT)
                try:
                    while True:
                        os.write(filler, b"\0" * 65536)
                except OSError:
                    pass
                try:
                    j.undo_before_write(f, os.lstat(f).st_ino, 0, os.urandom(1 << 20), 100)
                    code = 0
                except OSError as e:
                    code = 0 if e.errno == errno.ENOSPC else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert not os.WIFSIGNALED(status), f"killed by signal {os.WTERMSIG(status)}"
        assert os.WEXITSTATUS(status) == 0
    finally:
        subprocess.run(["umount", root], check=True)
