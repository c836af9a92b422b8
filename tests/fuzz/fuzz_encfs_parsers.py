"""Coverage-guided fuzzing (atheris) of every encfs parser of on-disk data. Not in CI.

Targets, chosen by the first input byte: the data-file header (format.decode_header), the
sidecar (format.decode_sidecar, and next_slot_write on what it accepts), one slot
(format.decode_slot), the block decoder (cipher.BlockCipher.decrypt), the xattr value
decoder (xattrs.XattrCipher.decrypt), journal intents (journal.parse_intent), config.json
(backing.read_config, through a temp file) and the log/CLI name escaper (backing.printable).
Only documented outcomes are allowed: FormatError, BlockAuthError, XattrAuthError,
JournalError; anything else is a crash that atheris reports with its input.

    make fuzz FUZZ_SECONDS=600      # installs atheris into the venv, corpus in .fuzz-corpus
    .venv/bin/python tests/fuzz/fuzz_encfs_parsers.py -atheris_runs=500000

Run from the repository root (`make fuzz` installs atheris; it is not a project dependency).
The bounded property tests over the same parsers are tests/test_fuzz_encfs.py.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from encfs import backing as bk
    from encfs import format as fmt
    from encfs import journal_codec as codec
    from encfs.cipher import BlockAuthError, BlockCipher
    from encfs.xattrs import XattrAuthError, XattrCipher

DEK = bytes(range(32))
FID = bytes(range(100, 116))
CIPHER = BlockCipher(DEK, FID, 4096)
XCIPHER = XattrCipher(DEK, FID)
RECORD = fmt.KeyRecord(file_id=FID, key_id="k", wrapped_dek=b"w" * 100, created_ns=1)
_TMP = tempfile.mkdtemp(prefix="encfs-fuzz-")
_CFG = os.path.join(_TMP, "config.json").encode()
atexit.register(shutil.rmtree, _TMP, True)


def header(data: bytes) -> None:
    try:
        h = fmt.decode_header(data)
    except fmt.FormatError:
        return
    fmt.check_block_size(h.block_size)


def sidecar(data: bytes) -> None:
    try:
        rec = fmt.decode_sidecar(data)
    except fmt.FormatError:
        return
    assert fmt.decode_slot(fmt.encode_slot(rec)) == rec
    try:
        off, slot, new = fmt.next_slot_write(data, RECORD)
    except fmt.FormatError:
        return
    assert fmt.decode_sidecar(data[:off] + slot + data[off + fmt.SLOT_SIZE:]) == new


def slot(data: bytes) -> None:
    fmt.decode_slot(data)


def block(data: bytes) -> None:
    try:
        CIPHER.decrypt(data[0] if data else 0, data[1:])
    except BlockAuthError:
        pass


def xattr(data: bytes) -> None:
    try:
        XCIPHER.decrypt(b"user.x", data)
    except XattrAuthError:
        pass


def intent(data: bytes) -> None:
    try:
        codec.decode(data)
    except codec.JournalError:
        pass


def config(data: bytes) -> None:
    with open(_CFG, "wb") as f:
        f.write(data)
    try:
        bk.read_config(_CFG)
    except fmt.FormatError:
        pass


def printable(data: bytes) -> None:
    text = bk.printable(data)
    assert "\n" not in text and "\r" not in text
    text.encode("utf-8")


TARGETS = [header, sidecar, slot, block, xattr, intent, config, printable]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](data[1:])


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
