"""The content planner (encfs/content.py): unit tests, and property tests that run random
writes and truncates through plan + realize against a bytearray backing file and compare
with a plain bytearray model of the plaintext. No I/O: the backing file is a bytearray."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encfs import content as ct
from encfs import format as fmt
from encfs.cipher import BlockCipher

BS = 4096  # the smallest block size: more block boundaries per byte of test data
FID = bytes(range(16))
CIPHER = BlockCipher(bytes(32), FID, BS)


def pread(backing: bytearray, r: ct.ReadBlocks) -> bytes:
    return bytes(backing[r.offset:r.offset + r.length])


def apply(backing: bytearray, steps: list[ct.Step]) -> None:
    for s in steps:
        if isinstance(s, ct.PWrite):
            if len(backing) < s.offset:
                backing.extend(bytes(s.offset - len(backing)))
            backing[s.offset:s.offset + len(s.data)] = s.data
        else:
            del backing[s.size:]
            backing.extend(bytes(s.size - len(backing)))


def run(backing: bytearray, plan: ct.ContentPlan, data: bytes = b"") -> ct.Realized:
    done = ct.realize(plan, BS, [pread(backing, r) for r in plan.reads], data,
                      CIPHER.decrypt, CIPHER.encrypt, lambda: fmt.encode_header(FID, BS))
    return done


def plaintext(backing: bytearray) -> bytes:
    plan = ct.plan_read(len(backing), BS, 0, 1 << 40)
    if plan.blocks is None:
        return b""
    return ct.read_result(plan, BS, pread(backing, plan.blocks), CIPHER.decrypt)


def covered(ranges, start: int, end: int) -> bool:
    return all(any(s <= b < e for s, e in ranges) for b in range(start, end))


ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 5 * BS), st.integers(1, 2 * BS + 7)),
    st.tuples(st.just("t"), st.integers(0, 5 * BS), st.just(0))), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_writes_and_truncates_match_a_bytearray_model(seq):
    backing, model = bytearray(), bytearray()
    for kind, off, n in seq:
        before = bytes(backing)
        if kind == "w":
            data = bytes((off + i) % 251 for i in range(n))
            plan = ct.plan_write(len(backing), BS, off, n)
            model.extend(bytes(max(0, off - len(model))))
            model[off:off + n] = data
        else:
            data = b""
            plan = ct.plan_truncate(len(backing), BS, off)
            del model[off:]
            model.extend(bytes(off - len(model)))
        done = run(backing, plan, data)
        # Each plan is a redo intent, one pwrite covered by an undo record, or one
        # truncate (atomic by itself).
        assert plan.journal or plan.undo is not None or len(done.steps) <= 1
        if plan.undo is not None:
            assert [type(s) for s in done.steps][-1] is ct.PWrite
            assert sum(isinstance(s, ct.PWrite) and s.offset > 0 for s in done.steps) == 1
        if kind == "w":
            for s in done.steps:  # a full disk fails before anything is written
                assert covered(plan.reserve, s.offset, s.offset + len(s.data))
        apply(backing, done.steps)
        assert plaintext(backing) == bytes(model)
        assert len(backing) == fmt.cipher_size(len(model), BS)
        if plan.undo is not None:
            # A kill at any point of the pwrite: the undo record gives the old state back.
            torn = bytearray(backing)
            apply(torn, [ct.PWrite(plan.undo.offset, done.undo_old),
                         ct.Truncate(plan.undo.old_size)])
            assert bytes(torn) == before
        if plan.journal:
            # Replaying the redo intent from any point ends in the new state.
            for k in range(len(done.steps)):
                partial = bytearray(before)
                apply(partial, done.steps[:k])
                apply(partial, done.steps)
                assert plaintext(partial) == bytes(model)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 4 * BS), st.integers(0, 5 * BS), st.integers(0, 3 * BS))
def test_read_plan_returns_the_requested_range(size, off, n):
    model = bytes(i % 253 for i in range(size))
    backing = bytearray()
    if size:
        apply(backing, run(backing, ct.plan_write(0, BS, 0, size), model).steps)
    plan = ct.plan_read(len(backing), BS, off, n)
    got = b"" if plan.blocks is None else \
        ct.read_result(plan, BS, pread(backing, plan.blocks), CIPHER.decrypt)
    assert got == model[off:off + n]
    if plan.blocks is not None:  # only the blocks the range touches
        assert plan.blocks.first == off // BS
        assert plan.blocks.count == (min(off + n, size) - 1) // BS - off // BS + 1


def test_append_to_a_short_block_pads_it_under_a_redo_intent():
    backing = bytearray()
    apply(backing, run(backing, ct.plan_write(0, BS, 0, 100), b"a" * 100).steps)
    plan = ct.plan_write(len(backing), BS, 2 * BS, 10)
    assert plan.journal and plan.undo is None
    assert plan.steps[0] == ct.EncryptBlocks(0, (ct.Old(0, 0, 100), ct.Zeros(BS - 100)))
    assert plan.reads == (ct.ReadBlocks(0, 1, fmt.HEADER_SIZE, 100 + fmt.BLOCK_OVERHEAD),)


def test_whole_block_write_of_a_new_file_reads_nothing():
    plan = ct.plan_write(0, BS, 0, 2 * BS)
    assert plan.reads == ()
    assert plan.steps == (ct.WriteHeader(), ct.EncryptBlocks(0, (ct.New(0, 2 * BS),)))
    assert plan.undo == ct.Undo(fmt.HEADER_SIZE, 0, 0)


def test_unaligned_overwrite_reads_only_its_own_blocks_once():
    csize = fmt.cipher_size(10 * BS, BS)
    plan = ct.plan_write(csize, BS, BS + 10, BS)
    assert plan.reads == (ct.ReadBlocks(1, 2, fmt.block_offset(1, BS),
                                        2 * fmt.cipher_block_size(BS)),)
    assert plan.steps == (ct.EncryptBlocks(1, (ct.Old(1, 0, 10), ct.New(0, BS),
                                               ct.Old(2, 10, BS))),)
    assert plan.undo == ct.Undo(fmt.block_offset(1, BS), 2 * fmt.cipher_block_size(BS), csize)


@pytest.mark.parametrize("csize", [0, fmt.cipher_size(5000, BS)])
def test_truncate_to_zero_is_one_step(csize):
    plan = ct.plan_truncate(csize, BS, 0)
    assert plan.steps == (() if csize == 0 else (ct.Truncate(0),))


def test_truncate_to_the_same_size_does_nothing_unless_the_tail_is_torn():
    csize = fmt.cipher_size(5000, BS)
    assert ct.plan_truncate(csize, BS, 5000) == ct.ContentPlan()
    torn = fmt.block_offset(2, BS) + 3  # a fragment shorter than nonce and tag
    assert ct.plan_truncate(torn, BS, fmt.plain_size(torn, BS)).steps


def test_a_damaged_block_stops_realize():
    backing = bytearray()
    apply(backing, run(backing, ct.plan_write(0, BS, 0, BS), b"x" * BS).steps)
    backing[40] ^= 1
    with pytest.raises(Exception, match="block 0"):
        run(backing, ct.plan_write(len(backing), BS, 10, 5), b"yyyyy")
