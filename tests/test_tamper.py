"""Tampering with the backing dir: every case reads as EIO with one log line naming the
plaintext path, the backing path and the block; untouched blocks stay readable."""

from __future__ import annotations

import errno
import os
import zlib

import pytest

from encfs import format as fmt

BS = fmt.DEFAULT_BLOCK_SIZE
CBS = BS + fmt.BLOCK_OVERHEAD
S = fmt.SIDECAR_SUFFIX


@pytest.fixture
def two_files(encrypted_mount):
    m = encrypted_mount
    data = {name: os.urandom(4 * BS) for name in ("one", "two")}
    for name, content in data.items():
        with open(f"{m.mountpoint}/{name}", "wb") as f:
            f.write(content)
    m.unmount()  # tamper offline, then mount fresh (no page cache)
    return m, data


def block(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(fmt.block_offset(n, BS))
        return f.read(CBS)


def put_block(path: str, n: int, raw: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(fmt.block_offset(n, BS))
        f.write(raw)


def read_block(m, name: str, n: int) -> bytes:
    with open(f"{m.mountpoint}/{name}", "rb", buffering=0) as f:
        f.seek(n * BS)
        return f.read(BS)


def assert_eio(m, name: str, n: int) -> None:
    with pytest.raises(OSError) as e:
        read_block(m, name, n)
    assert e.value.errno == errno.EIO


def assert_logged(m, name: str, what: str) -> None:
    lines = [ln for ln in m.log().splitlines() if "ERROR" in ln and what in ln]
    assert lines, m.log()
    line = lines[0]
    assert f"{m.mountpoint}/{name}" in line and f"{m.backing}/{name}" in line


def test_modified_block(two_files):
    m, data = two_files
    raw = bytearray(block(m.backing_path("one"), 2))
    raw[100] ^= 0x01
    put_block(m.backing_path("one"), 2, bytes(raw))
    m.mount()
    assert_eio(m, "one", 2)
    assert_logged(m, "one", "block 2")
    for n in (0, 1, 3):
        assert read_block(m, "one", n) == data["one"][n * BS:(n + 1) * BS]


def test_blocks_swapped_inside_a_file(two_files):
    m, data = two_files
    p = m.backing_path("one")
    b0, b1 = block(p, 0), block(p, 1)
    put_block(p, 0, b1)
    put_block(p, 1, b0)
    m.mount()
    assert_eio(m, "one", 0)
    assert_eio(m, "one", 1)
    assert_logged(m, "one", "block 0")
    assert read_block(m, "one", 3) == data["one"][3 * BS:]


def test_block_from_another_file(two_files):
    m, data = two_files
    put_block(m.backing_path("one"), 1, block(m.backing_path("two"), 1))
    m.mount()
    assert_eio(m, "one", 1)
    assert_logged(m, "one", "block 1")
    assert read_block(m, "one", 0) == data["one"][:BS]
    assert read_block(m, "two", 1) == data["two"][BS:2 * BS]


def test_ciphertext_truncated_mid_block(two_files):
    m, data = two_files
    os.truncate(m.backing_path("one"), fmt.block_offset(3, BS) + 10)
    m.mount()
    assert_eio(m, "one", 3)
    assert_logged(m, "one", "block 3")
    assert read_block(m, "one", 2) == data["one"][2 * BS:3 * BS]


def test_edited_sidecar(two_files):
    m, data = two_files
    side = m.backing_path("one") + S
    raw = bytearray(open(side, "rb").read())
    slot = fmt.SIDECAR_HEAD.size
    raw[slot + 101 + 5] ^= 0x40  # a byte of the wrapped DEK, with a valid checksum after
    raw[slot + fmt.SLOT_SIZE - 4:slot + fmt.SLOT_SIZE] = \
        zlib.crc32(bytes(raw[slot:slot + fmt.SLOT_SIZE - 4])).to_bytes(4, "big")
    open(side, "wb").write(raw)
    m.mount()
    assert_eio(m, "one", 0)
    assert_logged(m, "one", "data key")
    assert read_block(m, "two", 0) == data["two"][:BS]  # other files unaffected


def test_damaged_sidecar_checksum(two_files):
    m, _ = two_files
    side = m.backing_path("one") + S
    raw = bytearray(open(side, "rb").read())
    raw[fmt.SIDECAR_HEAD.size + 50] ^= 0xFF
    open(side, "wb").write(raw)
    m.mount()
    assert_eio(m, "one", 0)
    assert_logged(m, "one", "sidecar")


def test_swapped_sidecars(two_files):
    m, _ = two_files
    a, b = m.backing_path("one") + S, m.backing_path("two") + S
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    m.mount()
    assert_eio(m, "one", 0)
    assert_eio(m, "two", 0)
    assert_logged(m, "one", "file id mismatch")
