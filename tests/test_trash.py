"""Removed files freed by a background thread (encfs/trash.py), without FUSE."""

import errno
import os

from encfs.trash import TRASH_PREFIX, Trash, discards

MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict
30 27 0:25 / /tmp/small rw,nosuid - tmpfs tmpfs rw,size=8192k
31 27 254:16 / /data rw,discard - xfs /dev/vdb rw
"""


def test_discard_is_read_from_the_mount_of_the_device():
    assert discards(MOUNTINFO, os.makedev(254, 0))  # a super option
    assert discards(MOUNTINFO, os.makedev(254, 16))  # a mount option
    assert not discards(MOUNTINFO, os.makedev(0, 25))
    assert not discards(MOUNTINFO, os.makedev(8, 1))  # not in the table
    assert not discards("garbage\n\n", os.makedev(254, 0))


def test_a_file_put_in_the_trash_leaves_its_directory_at_once_and_is_freed(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    trash = Trash(bytes(tmp))
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10000)
    assert not trash.put(bytes(f))  # not started: the caller unlinks
    trash.start()
    try:
        assert trash.put(bytes(f))
        assert not f.exists()
        trash.drain()  # waits for what the thread is freeing too
        assert trash.pending == 0 and os.listdir(tmp) == []
        for i in range(50):
            (tmp_path / f"g{i}").write_bytes(b"y")
            assert trash.put(bytes(tmp_path / f"g{i}"))
    finally:
        trash.stop()  # frees what is left
    assert os.listdir(tmp) == [] and trash.moved == 51
    assert not any(n.startswith("g") for n in os.listdir(tmp_path))


def test_a_disabled_trash_never_takes_a_file(tmp_path):
    trash = Trash(bytes(tmp_path), enabled=False)
    trash.start()
    (tmp_path / "f").write_bytes(b"x")
    assert not trash.put(bytes(tmp_path / "f"))
    trash.stop()
    assert (tmp_path / "f").exists()


def test_leftovers_of_a_killed_daemon_are_trash_names_in_tmp(tmp_path):
    """What a kill leaves is garbage in tmp/ under its own prefix (the next mount's
    recovery removes everything in tmp/)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    trash = Trash(bytes(tmp))
    trash._thread = object()  # "running", but the thread never frees anything
    (tmp_path / "f").write_bytes(b"x")
    assert trash.put(bytes(tmp_path / "f"))
    [left] = os.listdir(tmp)
    assert left.encode().startswith(TRASH_PREFIX) and trash.pending == 1


def test_a_file_on_another_filesystem_is_left_to_the_caller(tmp_path, monkeypatch):
    """A mount inside the backing dir: the rename is EXDEV, and the caller unlinks (the
    rename's answer stood in for: a unit of the branch, not of the kernel)."""
    import encfs.trash as t
    trash = Trash(bytes(tmp_path))
    trash.start()
    (tmp_path / "f").write_bytes(b"x")

    def exdev(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(t.os, "rename", exdev)
    try:
        assert not trash.put(bytes(tmp_path / "f"))
    finally:
        monkeypatch.undo()
        trash.stop()
    assert (tmp_path / "f").exists() and trash.moved == 0
