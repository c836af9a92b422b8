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
