"""Layer 1: the on-disk format, pure."""

import os

import pytest
from hypothesis import given, strategies as st

from encfs import format as fmt


def record(**kw):
    base = dict(file_id=os.urandom(16), key_id="0d0466b0-e727-4d9c-b35d-f84bb474a37f",
                wrapped_dek=os.urandom(120), created_ns=1_700_000_000_000_000_000)
    base.update(kw)
    return fmt.KeyRecord(**base)


def test_header_roundtrip():
    fid = os.urandom(16)
    h = fmt.decode_header(fmt.encode_header(fid, 4096))
    assert (h.file_id, h.block_size, h.version) == (fid, 4096, fmt.FORMAT_VERSION)
    assert len(fmt.encode_header(fid)) == fmt.HEADER_SIZE == 24


@pytest.mark.parametrize("data, msg", [
    (b"", "truncated"), (b"XXXX" + bytes(20), "magic"),
    (fmt.HEADER.pack(b"ENCF", 99, 12, 0, bytes(16)), "version"),
    (fmt.HEADER.pack(b"ENCF", 1, 40, 0, bytes(16)), "block size"),
])
def test_header_rejects_malformed(data, msg):
    with pytest.raises(fmt.FormatError, match=msg):
        fmt.decode_header(data)


@given(st.integers(min_value=0, max_value=1 << 44), st.sampled_from([4096, 65536]))
def test_size_mapping_roundtrip(plain, bs):
    c = fmt.cipher_size(plain, bs)
    assert fmt.plain_size(c, bs) == plain
    assert not fmt.torn_tail(c, bs)


def test_size_mapping_examples():
    assert fmt.cipher_size(0, 4096) == 0
    assert fmt.cipher_size(1, 4096) == 24 + 1 + 28
    assert fmt.cipher_size(4096, 4096) == 24 + 4124
    assert fmt.cipher_size(5000, 4096) == 24 + 4124 + 904 + 28
    assert fmt.plain_size(24, 4096) == 0  # header only: empty
    assert fmt.torn_tail(24 + 4124 + 10, 4096)  # fragment shorter than nonce+tag


def test_sidecar_roundtrip():
    rec = record()
    data = fmt.encode_sidecar(rec)
    assert len(data) == fmt.SIDECAR_SIZE
    assert fmt.decode_sidecar(data) == rec


def test_sidecar_in_place_rewrite_uses_other_slot_and_survives_torn_write():
    rec = record()
    data = bytearray(fmt.encode_sidecar(rec))
    off, slot, new = fmt.next_slot_write(bytes(data), record(file_id=rec.file_id,
                                                             key_id="other"))
    assert off == fmt.SIDECAR_HEAD.size + fmt.SLOT_SIZE and new.seq == 2
    torn = bytearray(data)
    torn[off:off + 100] = slot[:100]  # crash in the middle of the slot write
    assert fmt.decode_sidecar(bytes(torn)) == rec
    data[off:off + fmt.SLOT_SIZE] = slot
    assert fmt.decode_sidecar(bytes(data)).key_id == "other"
    # The third write goes back to slot A.
    off3, _, new3 = fmt.next_slot_write(bytes(data), rec)
    assert off3 == fmt.SIDECAR_HEAD.size and new3.seq == 3


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d[:-1], "bytes"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:16] + bytes(len(d) - 16), "no valid key record"),
])
def test_sidecar_rejects_malformed(mutate, msg):
    with pytest.raises(fmt.FormatError, match=msg):
        fmt.decode_sidecar(mutate(fmt.encode_sidecar(record())))


@given(st.binary(min_size=0, max_size=fmt.SIDECAR_SIZE + 8))
def test_sidecar_parser_only_raises_format_error(data):
    try:
        fmt.decode_sidecar(data)
    except fmt.FormatError:
        pass


def test_sidecar_names():
    assert fmt.is_sidecar_name(b"a.txt" + fmt.SIDECAR_SUFFIX.encode())
    assert not fmt.is_sidecar_name(b"a.txt")
    assert fmt.sidecar_name(b"x") == b"x" + fmt.SIDECAR_SUFFIX.encode()
