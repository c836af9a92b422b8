"""Layer 1: block encryption, pure."""

import os

import pytest
from hypothesis import given, strategies as st

from encfs import format as fmt
from encfs.cipher import BlockAuthError, BlockCipher

BS = 4096
CBS = BS + fmt.BLOCK_OVERHEAD


def cipher(fid=None):
    return BlockCipher(b"k" * 32, fid or b"f" * 16, BS)


@given(st.binary(min_size=1, max_size=3 * BS + 7), st.integers(min_value=0, max_value=2**40))
def test_roundtrip(plain, first):
    c = cipher()
    assert c.decrypt(first, c.encrypt(first, plain)) == plain


def test_fresh_nonce_per_write():
    c = cipher()
    assert c.encrypt(0, b"same") != c.encrypt(0, b"same")


def test_all_zero_full_block_is_a_hole():
    assert cipher().decrypt(3, bytes(CBS)) == bytes(BS)


def test_block_moved_within_file_fails():
    c = cipher()
    ct = c.encrypt(0, os.urandom(2 * BS))
    swapped = ct[CBS:] + ct[:CBS]
    with pytest.raises(BlockAuthError) as e:
        c.decrypt(0, swapped)
    assert e.value.block_no == 0


def test_block_from_other_file_fails():
    ct = cipher(b"a" * 16).encrypt(0, b"x" * 100)
    with pytest.raises(BlockAuthError):
        cipher(b"b" * 16).decrypt(0, ct)


def test_flipped_bit_fails_and_names_block():
    c = cipher()
    ct = bytearray(c.encrypt(0, os.urandom(3 * BS)))
    ct[CBS + 50] ^= 1
    with pytest.raises(BlockAuthError) as e:
        c.decrypt(0, bytes(ct))
    assert e.value.block_no == 1
    assert c.decrypt(2, bytes(ct[2 * CBS:])) is not None  # other blocks still decrypt


def test_torn_block_and_zero_nonce_rejected():
    c = cipher()
    with pytest.raises(BlockAuthError, match="torn"):
        c.decrypt(0, os.urandom(fmt.BLOCK_OVERHEAD))
    ct = bytearray(c.encrypt(0, b"hello"))
    ct[:fmt.NONCE_SIZE] = bytes(fmt.NONCE_SIZE)
    with pytest.raises(BlockAuthError, match="nonce"):
        c.decrypt(0, bytes(ct))
