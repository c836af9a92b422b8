"""Property tests over every parser of on-disk data (issue 8, item 4, encfs side).

Random and mutated inputs (bit flips, truncation, extension, splices of valid encodings)
for the data-file header, the sidecar and its slots, in-place slot rewrites, the block
decoder, the xattr value decoder, config.json and journal intents. Only the documented
exceptions may escape: fmt.FormatError, BlockAuthError, XattrAuthError, JournalError.

Bounded: a few seconds in the normal run. ENCFS_FUZZ_EXAMPLES=20000 for a long run. The
coverage-guided fuzzer for the same parsers is tests/fuzz/fuzz_encfs_parsers.py (atheris,
not in CI; see docs/SECURITY.md).
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encfs import backing as bk
from encfs import format as fmt
from encfs import journal as jn
from encfs import journal_codec as codec
from encfs.cipher import BlockAuthError, BlockCipher
from encfs.xattrs import XattrAuthError, XattrCipher

EXAMPLES = int(os.environ.get("ENCFS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DEK = bytes(range(32))
FID = bytes(range(100, 116))
BS = 4096


def _record(seq: int = 1) -> fmt.KeyRecord:
    return fmt.KeyRecord(file_id=FID, key_id="0d0466b0-e727-4d9c-b35d-f84bb474a37f",
                         wrapped_dek=bytes(range(200)), created_ns=1_700_000_000 * 10**9,
                         seq=seq)


VALID_SIDECAR = fmt.encode_sidecar(_record())
_, _SLOT_B, _ = fmt.next_slot_write(VALID_SIDECAR, _record())
VALID_SIDECAR_2 = VALID_SIDECAR[:16 + fmt.SLOT_SIZE] + _SLOT_B
VALID_HEADER = fmt.encode_header(FID, BS)
CIPHER = BlockCipher(DEK, FID, BS)
VALID_BLOCKS = CIPHER.encrypt(0, os.urandom(2 * BS + 77))
XCIPHER = XattrCipher(DEK, FID)
VALID_XATTR = XCIPHER.encrypt(b"user.test", b"a value")


@st.composite
def mutated(draw, valid: bytes, max_extra: int = 64) -> bytes:
    """A valid encoding with random bit flips, byte sets, truncation, extension and splices."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "splice", "zero"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from([0, 1, 0x7f, 0x80, 0xff]))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(max_size=max_extra))
        elif op == "splice" and data:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "zero" and data:
            i = draw(st.integers(0, len(data) - 1))
            n = draw(st.integers(1, 64))
            data[i:i + n] = bytes(len(data[i:i + n]))
    return bytes(data)


def _forged_slot(draw) -> bytes:
    """A slot with random fields and a correct CRC: what a forger with write access makes."""
    body = bytearray(draw(st.binary(min_size=fmt.SLOT_SIZE - 4, max_size=fmt.SLOT_SIZE - 4)))
    body[34] = draw(st.integers(0, 255))
    body[35:37] = draw(st.integers(0, 0xffff)).to_bytes(2, "big")
    body[32:34] = draw(st.integers(0, 0xffff)).to_bytes(2, "big")
    return bytes(body) + fmt.struct.pack(">I", fmt.zlib.crc32(bytes(body)))


forged_slots = st.composite(lambda draw: _forged_slot(draw))()
sidecars = st.one_of(st.binary(max_size=fmt.SIDECAR_SIZE + 16),
                     mutated(VALID_SIDECAR), mutated(VALID_SIDECAR_2),
                     st.tuples(forged_slots, forged_slots).map(
                         lambda ab: VALID_SIDECAR[:16] + ab[0] + ab[1]))


@FUZZ
@given(st.one_of(st.binary(max_size=64), mutated(VALID_HEADER)))
def test_decode_header(data):
    try:
        h = fmt.decode_header(data)
    except fmt.FormatError:
        return
    assert h.version == fmt.FORMAT_VERSION and len(h.file_id) == 16
    fmt.check_block_size(h.block_size)


@FUZZ
@given(sidecars)
def test_decode_sidecar(data):
    try:
        rec = fmt.decode_sidecar(data)
    except fmt.FormatError:
        return
    assert 0 < len(rec.key_id) <= fmt.KEY_ID_MAX and rec.key_id.isprintable()
    assert 0 < len(rec.wrapped_dek) <= fmt.WRAPPED_MAX
    assert fmt.DEK_BYTES_MIN <= rec.dek_bytes <= fmt.DEK_BYTES_MAX
    assert fmt.decode_slot(fmt.encode_slot(rec)) == rec  # what we accept, we can write back


@FUZZ
@given(st.one_of(forged_slots, mutated(VALID_SIDECAR[16:16 + fmt.SLOT_SIZE]),
                 st.binary(max_size=fmt.SLOT_SIZE + 4)))
def test_decode_slot(slot):
    rec = fmt.decode_slot(slot)  # None, or a record; never an exception
    assert rec is None or isinstance(rec, fmt.KeyRecord)


@FUZZ
@given(sidecars, st.text(max_size=80), st.binary(max_size=500),
       st.integers(-1, 1 << 65), st.integers(0, 1 << 17))
def test_next_slot_write(data, key_id, wrapped, created, dek_bytes):
    rec = fmt.KeyRecord(file_id=FID, key_id=key_id, wrapped_dek=wrapped, created_ns=created,
                        dek_bytes=dek_bytes)
    try:
        off, slot, new = fmt.next_slot_write(data, rec)
    except fmt.FormatError:
        return
    assert off in (16, 16 + fmt.SLOT_SIZE) and len(slot) == fmt.SLOT_SIZE
    patched = data[:off] + slot + data[off + fmt.SLOT_SIZE:]
    assert fmt.decode_sidecar(patched) == new


@FUZZ
@given(st.one_of(st.binary(max_size=3 * (BS + 28)), mutated(VALID_BLOCKS, 200)),
       st.integers(0, 3))
def test_block_decoder(data, first):
    try:
        plain = CIPHER.decrypt(first, data)
    except BlockAuthError as e:
        assert e.block_no >= first
        return
    # Only unmodified blocks (at their own position) or all-zero holes decrypt.
    assert len(plain) == fmt.plain_size(fmt.HEADER_SIZE + len(data), BS) or not data


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(VALID_XATTR)),
       st.sampled_from([b"user.test", b"user.other", b""]))
def test_xattr_value_decoder(blob, name):
    try:
        value = XCIPHER.decrypt(name, blob)
    except XattrAuthError:
        return
    assert blob == VALID_XATTR and name == b"user.test" and value == b"a value"


_VALID_INTENTS = [
    json.dumps({"op": "steps", "path": "/b/f", "ino": 5,
                "steps": [["pwrite", 24, "00ff"], ["truncate", 100]]}).encode(),
    json.dumps({"op": "rename", "old": "/b/a", "new": "/b/c", "flags": 2, "old_ino": 1,
                "new_ino": None, "old_side_ino": 3, "new_side_ino": None}).encode(),
]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12)
_intent_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["steps", "rename", "x"])},
    optional={k: _json_values for k in ("path", "ino", "steps", "old", "new", "flags",
                                        "old_ino", "new_ino", "old_side_ino",
                                        "new_side_ino")}).map(lambda d: json.dumps(d).encode())


@FUZZ
@given(st.one_of(st.binary(max_size=300), *(mutated(v) for v in _VALID_INTENTS),
                 _intent_like))
def test_journal_intent_parser(data):
    try:
        r = codec.decode(data)
    except codec.JournalError:
        return
    assert isinstance(r, (codec.StepsIntent, codec.RenameIntent, codec.UndoRecord))


@settings(max_examples=max(20, EXAMPLES // 5), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), *(mutated(v) for v in _VALID_INTENTS), _intent_like))
def test_journal_replay_of_random_intents(tmp_path_factory, data):
    """Replay end to end: whatever the intent says, replay reports one line and removes it;
    nothing outside the backing dir changes."""
    root = tmp_path_factory.mktemp("j")
    outside = root / "outside"
    outside.write_bytes(b"keep")
    backing = root / "b"
    (backing / ".encfs").mkdir(parents=True)
    j = jn.Journal(os.fsencode(backing / ".encfs"))
    try:
        (backing / ".encfs" / "journal" / "1-1.json").write_bytes(
            data.replace(b"/b/", os.fsencode(backing) + b"/"))
        lines = j.replay()
    finally:
        j.close()
    assert len(lines) == 1 and "\n" not in lines[0]
    assert os.listdir(backing / ".encfs" / "journal") == []
    assert outside.read_bytes() == b"keep"


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 mutated(b'{"format_version": 1, "block_size": 4096}'),
                 _json_values.map(lambda v: json.dumps(v).encode())))
def test_config_parser(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("c") / "config.json"
    path.write_bytes(data)
    try:
        cfg = bk.read_config(os.fsencode(path))
    except fmt.FormatError:
        return
    fmt.check_block_size(cfg.block_size)
    assert cfg.format_version == fmt.FORMAT_VERSION


@FUZZ
@given(st.binary(max_size=64))
def test_printable_is_one_line_and_lossless_for_utf8(name):
    text = bk.printable(name)
    assert "\n" not in text and "\r" not in text and text.isprintable() or text == ""
    text.encode("utf-8")  # strict: always printable to any UTF-8 stream
    try:
        plain = name.decode("utf-8")
    except UnicodeDecodeError:
        return
    if plain.isprintable() and "\\" not in plain:
        assert text == plain
