"""Node identity (issue 13, item 1): the inode table alone (pure), and through the
Operations class at layer 2 with the backing filesystem's real inode reuse."""

from __future__ import annotations

import os
import stat

import pyfuse3
import pytest

from encfs.fs import ROOT, Node
from encfs.inodes import InodeTable
from test_ops_direct import CTX, create, run_ops  # noqa: F401 - fixture

ROOT_BACKING_INO = 2


def fake_st(ino: int, mode: int = stat.S_IFREG | 0o644) -> os.stat_result:
    return os.stat_result((mode, ino, 1, 1, 0, 0, 0, 0, 0, 0))


def test_table_new_generation_when_a_dead_number_comes_back():
    t = InodeTable(ROOT_BACKING_INO, Node)
    a = t.remember(fake_st(50), ROOT, b"a")
    t.unlinked(ROOT, b"a", 50, last=True)
    b = t.remember(fake_st(50), ROOT, b"b")  # ext4 gave the number to a new file
    assert b is not a and b.generation != a.generation
    assert b.lookups == 2  # the kernel forgets both references under the one id
    t.forget(50, 1)
    assert 50 in t
    t.forget(50, 1)
    assert 50 not in t


def test_table_hard_links_keep_one_node_and_generation():
    t = InodeTable(ROOT_BACKING_INO, Node)
    a = t.remember(fake_st(60), ROOT, b"a")
    t.unlinked(ROOT, b"a", 60, last=False)  # another link stays
    b = t.remember(fake_st(60), ROOT, b"b")
    assert b is a and b.generation == a.generation and b.links == {(ROOT, b"b")}


def test_table_type_change_behind_our_back_is_another_object():
    t = InodeTable(ROOT_BACKING_INO, Node)
    a = t.remember(fake_st(70), ROOT, b"x")
    b = t.remember(fake_st(70, stat.S_IFDIR | 0o755), ROOT, b"x")
    assert b is not a and b.generation > a.generation


def test_table_open_node_is_never_replaced():
    t = InodeTable(ROOT_BACKING_INO, Node)
    a = t.remember(fake_st(80), ROOT, b"x")
    a.opens = 1
    t.unlinked(ROOT, b"x", 80, last=True)
    assert t.resolve(fake_st(80)) is a  # its backing inode is held open: no reuse yet
    t.forget(80, 1)
    assert 80 in t  # open: stays until released
    a.opens = 0
    t.released(a)
    assert 80 not in t


def test_reused_backing_inode_gets_a_distinct_generation(run_ops):  # noqa: F811
    """A removed file's inode number given to the next new object while the kernel still
    holds the old node: same node id (st_ino stays the backing one), another generation."""
    async def body(ops, backing):
        seen = {}
        for round_ in range(40):  # ext4/tmpfs reuse a freed number at once, mostly
            await ops.release(await create(ops, b"f"))
            old = await ops.lookup(ROOT, b"f", CTX)  # the kernel holds it (not forgotten)
            await ops.unlink(ROOT, b"f", CTX)
            for make in ("file", "dir", "symlink"):
                if make == "file":
                    fi, new = await ops.create(ROOT, b"g", 0o644, os.O_RDWR, CTX)
                    await ops.release(fi.fh)
                elif make == "dir":
                    new = await ops.mkdir(ROOT, b"g", 0o755, CTX)
                else:
                    new = await ops.symlink(ROOT, b"g", b"t", CTX)
                assert new.st_ino == os.lstat(os.path.join(backing, b"g")).st_ino
                if new.st_ino == old.st_ino:
                    assert new.generation != old.generation
                    seen[make] = True
                again = await ops.lookup(ROOT, b"g", CTX)
                assert (again.st_ino, again.generation) == (new.st_ino, new.generation)
                await (ops.rmdir if make == "dir" else ops.unlink)(ROOT, b"g", CTX)
                old = new
        assert seen, "the backing filesystem never reused an inode number"
    run_ops(body)


def test_hard_link_keeps_node_id_and_generation(run_ops):  # noqa: F811
    async def body(ops, backing):
        await ops.release(await create(ops, b"a", b"data"))
        a = await ops.lookup(ROOT, b"a", CTX)
        b = await ops.link(a.st_ino, ROOT, b"b", CTX)
        assert (b.st_ino, b.generation) == (a.st_ino, a.generation)
        await ops.unlink(ROOT, b"a", CTX)
        c = await ops.lookup(ROOT, b"b", CTX)
        assert (c.st_ino, c.generation) == (a.st_ino, a.generation)
        assert c.st_ino == os.lstat(os.path.join(backing, b"b")).st_ino
    run_ops(body)


def test_lookup_counts_are_exact(run_ops):  # noqa: F811
    async def body(ops, backing):
        await ops.release(await create(ops, b"a"))  # create: 1
        ino = (await ops.lookup(ROOT, b"a", CTX)).st_ino  # 2
        await ops.lookup(ROOT, b"a", CTX)  # 3
        assert ops.nodes[ino].lookups == 3
        await ops.forget([(ino, 2)])
        assert ops.nodes[ino].lookups == 1
        await ops.forget([(ino, 1)])
        assert ino not in ops.nodes
        with pytest.raises(pyfuse3.FUSEError):
            await ops.getattr(ino, CTX)  # forgotten: no longer known
    run_ops(body)
