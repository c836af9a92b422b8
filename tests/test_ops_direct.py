"""Layer 2: the Operations class called directly under trio, without FUSE, against a real
KMS. Fast checks of handler logic that a mount would hide behind the kernel's caches."""

from __future__ import annotations

import errno
import os
import shutil

import pyfuse3
import pytest
import trio

from encfs import backing as bk
from encfs import format as fmt
from encfs.fs import ROOT, EncFS
from encfs.keys import KeyManager
from kms.client import AsyncKmsClient
from encfs.pytest_plugin import short_tempdir

CTX = pyfuse3.RequestContext()
BS = fmt.DEFAULT_BLOCK_SIZE


@pytest.fixture
def run_ops(kms_server):
    """Call ``run_ops(async_fn)``: async_fn(ops, backing) runs with a fresh EncFS."""
    work = short_tempdir("encfs-ops-")
    os.makedirs(os.path.join(work, "b"))
    backing, config = bk.open_backing(os.path.join(work, "b"))
    key_id = kms_server.client.resolve_key("sfs/default")["key_id"]

    def run(fn):
        async def main():
            kms = AsyncKmsClient(kms_server.socket_path, project_id=kms_server.project_id)
            ops = EncFS(backing, config, KeyManager(kms, key_id), mountpoint="/mnt")
            try:
                return await fn(ops, backing)
            finally:
                ops.close_all()
                await kms.aclose()
        return trio.run(main)

    try:
        yield run
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def create(ops, name: bytes, data: bytes = b"") -> int:
    fi, attr = await ops.create(ROOT, name, 0o644, os.O_RDWR, CTX)
    if data:
        assert await ops.write(fi.fh, 0, data) == len(data)
    return fi.fh


def test_create_write_read_release(run_ops):
    async def body(ops, backing):
        fh = await create(ops, b"f", b"hello world" * 1000)
        assert await ops.read(fh, 6, 5) == b"world"
        assert await ops.read(fh, 11000, 100) == b""
        await ops.release(fh)
        attr = await ops.lookup(ROOT, b"f", CTX)
        assert attr.st_size == 11000
        fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
        assert (await ops.read(fi.fh, 0, 11)) == b"hello world"
        await ops.release(fi.fh)
        assert os.path.exists(os.path.join(backing, b"f" + fmt.SIDECAR_SUFFIX.encode()))
    run_ops(body)


def test_unaligned_overwrite_and_gap_write(run_ops):
    async def body(ops, backing):
        fh = await create(ops, b"g", b"a" * 5000)
        await ops.write(fh, 4090, b"B" * 20)  # across the block boundary
        await ops.write(fh, 20000, b"tail")  # past the end: pads block 1, leaves a hole
        got = await ops.read(fh, 0, 30000)
        want = bytearray(b"a" * 5000)
        want[4090:4110] = b"B" * 20
        want += bytes(20000 - len(want)) + b"tail"
        assert got == bytes(want)
        assert ops.journal.pending() == []  # intents finished, no write left to undo
        await ops.release(fh)
    run_ops(body)


def test_reserved_names_and_name_limit(run_ops):
    async def body(ops, backing):
        for name, err in [(bk.CONTROL_DIR, errno.EINVAL), (b"n" * 256, errno.ENAMETOOLONG)]:
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.create(ROOT, name, 0o644, os.O_RDWR, CTX)
            assert e.value.errno == err
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(ROOT, bk.CONTROL_DIR, CTX)
        assert e.value.errno == errno.ENOENT
    run_ops(body)


def test_rename_moves_sidecar_and_leaves_no_intent(run_ops):
    async def body(ops, backing):
        for name in (b"src", b"dst"):
            await ops.release(await create(ops, name, name * 100))
        src_rec = fmt.decode_sidecar(open(os.path.join(backing, b"src.sfskey"), "rb").read())
        await ops.rename(ROOT, b"src", ROOT, b"dst", 0, CTX)
        dst_rec = fmt.decode_sidecar(open(os.path.join(backing, b"dst.sfskey"), "rb").read())
        assert dst_rec.file_id == src_rec.file_id
        assert sorted(os.listdir(backing)) == [b".encfs", b"dst", b"dst.sfskey"]
        assert ops.journal.pending() == []
        await ops.release(await create(ops, b"other"))
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.rename(ROOT, b"dst", ROOT, b"other", pyfuse3.RENAME_NOREPLACE, CTX)
        assert e.value.errno == errno.EEXIST
    run_ops(body)


def test_readdir_hides_sidecars_and_control_dir(run_ops):
    async def body(ops, backing):
        for name in (b"a", b"b"):
            await ops.release(await create(ops, name))
        fh = await ops.opendir(ROOT, CTX)
        names = []
        orig = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = lambda token, name, attr, next_id: names.append(name) or True
        try:
            await ops.readdir(fh, 0, None)
        finally:
            pyfuse3.readdir_reply = orig
        await ops.releasedir(fh)
        assert sorted(names) == [b"a", b"b"]
    run_ops(body)


def test_statfs_name_limit(run_ops):
    async def body(ops, backing):
        sv = await ops.statfs(CTX)
        assert sv.f_namemax == 255  # long names fit whatever the backing's limit
    run_ops(body)


def test_tampered_block_is_eio(run_ops, caplog):
    async def body(ops, backing):
        fh = await create(ops, b"t", os.urandom(3 * BS))
        await ops.release(fh)
        path = os.path.join(backing, b"t")
        raw = bytearray(open(path, "rb").read())
        raw[fmt.block_offset(1, BS) + 30] ^= 1
        open(path, "wb").write(raw)
        attr = await ops.lookup(ROOT, b"t", CTX)
        fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
        assert len(await ops.read(fi.fh, 0, BS)) == BS
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fi.fh, BS, BS)
        assert e.value.errno == errno.EIO
        await ops.release(fi.fh)
    run_ops(body)
    assert any("/mnt/t" in r.message and "block 1" in r.message for r in caplog.records)


def test_a_removed_files_blocks_are_freed_in_the_background(run_ops):
    """unlink takes the data file out of its directory at once (into tmp/) and the trash
    thread frees it there; files that free nothing now are unlinked in place."""
    async def body(ops, backing):
        from encfs.trash import Trash
        tmp = bk.control_path(backing, bk.TMP_DIR)
        ops.trash = Trash(tmp)  # as on a discard-mounted backing fs, whatever this one is
        ops.trash.start()
        await ops.release(await create(ops, b"data", os.urandom(3 * BS)))
        await ops.release(await create(ops, b"empty"))
        await ops.release(await create(ops, b"linked", b"x" * 100))
        attr = await ops.lookup(ROOT, b"linked", CTX)
        await ops.link(attr.st_ino, ROOT, b"other", CTX)
        held = await create(ops, b"held", b"y" * 100)  # still open
        for name in (b"data", b"empty", b"linked", b"held"):
            await ops.unlink(ROOT, name, CTX)
            assert not os.path.lexists(os.path.join(backing, name))
        # "data" (its last link, with blocks, not open) and, the spare pool not running,
        # the sidecars of the three files with one link
        assert ops.trash.moved == 4
        assert await ops.read(held, 0, 100) == b"y" * 100
        await ops.release(held)
        ops.trash.drain()
        assert not [n for n in os.listdir(tmp) if n.startswith(b"d-")]
        assert sorted(n for n in os.listdir(backing) if not n.startswith(b".")) == \
            [b"other", b"other.sfskey"]
        # Directories: emptiness checked first; orphan sidecars do not count.
        for d in (b"empty", b"full", b"orphans"):
            await ops.mkdir(ROOT, d, 0o755, CTX)
        full = (await ops.lookup(ROOT, b"full", CTX)).st_ino
        await ops.release((await ops.create(full, b"x", 0o644, os.O_RDWR, CTX))[0].fh)
        open(os.path.join(backing, b"orphans", b"gone.sfskey"), "wb").write(b"k")
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.rmdir(ROOT, b"full", CTX)
        assert e.value.errno == errno.ENOTEMPTY
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.rmdir(ROOT, b"other", CTX)
        assert e.value.errno == errno.ENOTDIR
        for d in (b"empty", b"orphans"):
            await ops.rmdir(ROOT, d, CTX)
            assert not os.path.lexists(os.path.join(backing, d))
        ops.trash.stop()
        assert not [n for n in os.listdir(tmp) if n.startswith(b"d-")]
        assert os.path.isdir(os.path.join(backing, b"full"))
    run_ops(body)


def test_exclusive_mounts_let_the_kernel_cache_for_long_shared_ones_not(run_ops):
    async def body(ops, backing):
        await ops.release(await create(ops, b"f"))
        assert ops.exclusive and ops.timeout >= 600  # far beyond gocryptfs's 1 s
        attr = await ops.lookup(ROOT, b"f", CTX)
        assert attr.entry_timeout == attr.attr_timeout == ops.timeout
        missing = await ops.lookup(ROOT, b"missing", CTX)
        assert missing.st_ino == 0 and missing.entry_timeout == ops.timeout
        shared = EncFS(backing, ops.config, ops.keys, shared_backing=True)
        assert not shared.exclusive and shared.timeout == 0
        assert (await shared.lookup(ROOT, b"f", CTX)).attr_timeout == 0
        shared.close_all()
    run_ops(body)


def test_kernel_permission_checks_are_left_out_only_where_only_root_gets_in(run_ops):
    async def body(ops, backing):
        base = {"default_permissions", "fsname=x"}
        cases = [({"allow_other", "default_permissions"}, {"allow_other"}, False, True),
                 ({"allow_root"}, {"allow_root"}, False, True),
                 (set(), {"default_permissions"}, False, True),  # asked for
                 (set(), set(), True, True),  # --user: the caller is not the daemon
                 (set(), set(), False, os.geteuid() != 0)]
        for extra, explicit, serving_user, kept in cases:
            fs = EncFS(backing, ops.config, ops.keys)
            opts = fs.mount_options(base | extra, explicit, serving_user)
            assert ("default_permissions" in opts) == kept
            assert fs.enable_acl == fs.kernel_permissions == kept
            fs.close_all()
    run_ops(body)


def test_access_answers_for_root_where_the_kernel_does_not_check(run_ops):
    async def body(ops, backing):
        ops.kernel_permissions = False  # as `mount_options` sets it on a root-only mount
        await ops.release(await create(ops, b"plain"))
        fi, attr = await ops.create(ROOT, b"tool", 0o755, os.O_RDWR, CTX)
        await ops.release(fi.fh)
        plain = (await ops.lookup(ROOT, b"plain", CTX)).st_ino
        assert await ops.access(plain, os.R_OK | os.W_OK, CTX)
        assert await ops.access(attr.st_ino, os.X_OK, CTX)
        assert await ops.access(ROOT, os.X_OK, CTX)
        if os.geteuid() == 0:  # root may read and write anything, but not run a non-program
            assert not await ops.access(plain, os.X_OK, CTX)
    run_ops(body)
