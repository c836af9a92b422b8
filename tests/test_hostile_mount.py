"""A hostile backing dir under a real mount (issue 8, item 2).

Anyone with write access to the backing storage can plant anything there while the
filesystem is unmounted. One backing dir is populated through a mount, tampered with in
every way below while unmounted, then mounted again (with the dirty marker set, so that the
journal is replayed). Every damaged file must fail with a clear errno and one log line,
never a traceback or a hang; nothing outside the backing dir may be read or changed; and
the mount must keep serving the files that were left alone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import short_tempdir, make_mount, start_kms_server

pytestmark = pytest.mark.fuse

S = fmt.SIDECAR_SUFFIX
BS = 4096
NL_NAME = "nl\nERROR forged line"
BAD_UTF8 = b"bad\xffname"

#: name -> how its backing files are damaged while unmounted
CASES = ["hdr_truncated", "hdr_magic", "hdr_version", "hdr_shift", "hdr_reserved_ok",
         "side_truncated", "side_oversized", "side_magic", "side_both_slots", "side_dir",
         "side_fifo", "side_symlink_out", "side_missing", "data_symlink_out",
         "data_fifo", "side_overflow_lengths"]

_CHILD_READ = r"""
import os, sys
p = sys.argv[1].encode("utf-8", "surrogateescape")
try:
    fd = os.open(p, os.O_RDONLY | (os.O_NOFOLLOW if sys.argv[2] == "nofollow" else 0)
                 | (os.O_NONBLOCK if sys.argv[2] == "nonblock" else 0))
    data = os.read(fd, 1 << 20)
    print("OK", data.hex())
except OSError as e:
    print("ERR", e.errno)
"""


def read_via_child(path: str | bytes, how: str = "plain", timeout: float = 20) -> tuple[str, str]:
    """Read a file in a child process, so that a hang fails the test instead of freezing it."""
    arg = os.fsdecode(path)
    res = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD_READ, arg, how],
                         capture_output=True, text=True, timeout=timeout)
    kind, _, value = res.stdout.strip().partition(" ")
    return kind, value


class World:
    pass


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _tamper(w: World) -> None:
    b, out = w.m.backing, w.outside
    bp = lambda name: os.path.join(b, name)  # noqa: E731
    # --- data file headers ---
    os.truncate(bp("hdr_truncated"), 10)
    _patch(bp("hdr_magic"), 0, b"XXXX")
    _patch(bp("hdr_version"), 4, (99).to_bytes(2, "big"))
    _patch(bp("hdr_shift"), 6, bytes([40]))
    _patch(bp("hdr_reserved_ok"), 7, bytes([0xff]))  # reserved: ignored by the spec
    # --- sidecars ---
    os.truncate(bp("side_truncated" + S), 100)
    with open(bp("side_oversized" + S), "ab") as f:
        f.write(b"\0" * 5000)
    _patch(bp("side_magic" + S), 0, b"XXXX")
    _patch(bp("side_both_slots" + S), fmt.SIDECAR_HEAD.size, b"\xff" * 8)  # CRC fails
    for name in ("side_dir", "side_fifo", "side_symlink_out", "side_missing"):
        shutil.copy(bp(name + S), os.path.join(out, name + S))  # a valid copy, outside
        os.unlink(bp(name + S))
    os.mkdir(bp("side_dir" + S))
    os.mkfifo(bp("side_fifo" + S))
    os.symlink(os.path.join(out, "side_symlink_out" + S), bp("side_symlink_out" + S))
    # Lengths that overflow the slot, with a correct CRC (a forger can compute CRCs).
    raw = bytearray(open(bp("side_overflow_lengths" + S), "rb").read())
    slot = bytearray(raw[16:16 + fmt.SLOT_SIZE])
    slot[34] = 0xff  # key id length 255 > 64
    slot[35:37] = b"\xff\xff"  # wrapped length 65535 > 407
    slot[-4:] = fmt.struct.pack(">I", fmt.zlib.crc32(bytes(slot[:-4])))
    raw[16:16 + fmt.SLOT_SIZE] = slot
    open(bp("side_overflow_lengths" + S), "wb").write(raw)
    # --- data files replaced by a symlink out of the backing dir, or by a FIFO ---
    for suffix in ("", S):
        shutil.move(bp("data_symlink_out" + suffix), os.path.join(out, "data_symlink_out" + suffix))
    os.symlink(os.path.join(out, "data_symlink_out"), bp("data_symlink_out"))
    os.unlink(bp("data_fifo"))
    os.mkfifo(bp("data_fifo"))
    # --- a name with a newline whose block is damaged: the log line must stay one line ---
    _patch(bp(NL_NAME), fmt.HEADER_SIZE + 40, b"\x00\x01\x02")
    # --- the journal and temp dir of an "unclean" stop, full of hostile entries ---
    ctl = os.path.join(b, ".encfs")
    jdir = os.path.join(ctl, "journal")
    os.makedirs(jdir, exist_ok=True)
    victim_ino = os.stat(w.victim).st_ino
    good_ino = os.stat(bp("good")).st_ino
    os.makedirs(os.path.join(out, "dir"), exist_ok=True)
    os.symlink(os.path.join(out, "dir"), bp("linkdir"))
    shutil.copy(w.victim, os.path.join(out, "dir", "victim"))
    intents = {
        "1-1.json": {"op": "steps", "path": w.victim, "ino": victim_ino,
                     "steps": [["truncate", 0]]},
        "1-2.json": {"op": "steps", "path": bp("linkdir/victim"),
                     "ino": os.stat(os.path.join(out, "dir", "victim")).st_ino,
                     "steps": [["truncate", 0]]},
        "1-3.json": {"op": "steps", "path": bp("../" + os.path.basename(out) + "/victim"),
                     "ino": victim_ino, "steps": [["truncate", 0]]},
        "1-4.json": {"op": "steps", "path": bp("good"), "ino": good_ino,
                     "steps": [["pwrite", 2 ** 70, "00"]]},
        "1-5.json": {"op": "steps", "path": bp("good"), "ino": "abc", "steps": []},
        "1-6.json": {"op": "rename", "old": w.victim, "new": bp("stolen"), "flags": 0,
                     "old_ino": victim_ino, "new_ino": None, "old_side_ino": None,
                     "new_side_ino": None},
        "1-7.json": 42,
    }
    for name, rec in intents.items():
        open(os.path.join(jdir, name), "w").write(json.dumps(rec))
    open(os.path.join(jdir, "2-1.json"), "w").write("[" * 200000)
    open(os.path.join(jdir, "2-2.json"), "wb").write(b"\xff\xfe{\x00")
    open(os.path.join(jdir, "2-3.json\nERROR forged journal line"), "w").write("{")
    os.mkfifo(os.path.join(jdir, "3-1.json"))
    os.mkdir(os.path.join(jdir, "3-2.json"))
    # A valid intent that would truncate "good", reachable only by following a symlink.
    open(os.path.join(out, "evil-intent.json"), "w").write(json.dumps(
        {"op": "steps", "path": bp("good"), "ino": good_ino, "steps": [["truncate", 0]]}))
    os.symlink(os.path.join(out, "evil-intent.json"), os.path.join(jdir, "3-3.json"))
    tmp = os.path.join(ctl, "tmp")
    os.mkfifo(os.path.join(tmp, "t-fifo"))
    os.makedirs(os.path.join(tmp, "t-dir", "sub"))
    os.symlink(os.path.join(out, "dir"), os.path.join(tmp, "t-link"))
    open(os.path.join(ctl, "dirty"), "w").close()


@pytest.fixture(scope="module")
def world():
    w = World()
    work = short_tempdir("encfs-hostile-")
    kms = start_kms_server(os.path.join(work, "kms"))
    w.m = None
    try:
        w.outside = os.path.join(work, "outside")
        os.makedirs(w.outside)
        w.victim = os.path.join(w.outside, "victim")
        with open(w.victim, "wb") as f:
            f.write(b"must never change " * 100)
        w.m = m = make_mount(kms, work)
        w.data = {}
        for name in CASES + ["good", NL_NAME]:
            w.data[name] = os.urandom(3 * BS + 100)
            with open(os.path.join(m.mountpoint, name), "wb") as f:
                f.write(w.data[name])
        with open(os.path.join(os.fsencode(m.mountpoint), BAD_UTF8), "wb") as f:
            f.write(b"bytes name")
        m.unmount()
        _tamper(w)
        m.mount()
        yield w
    finally:
        if w.m is not None:
            w.m.unmount()
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)


def mnt(w: World, name: str) -> str:
    return os.path.join(w.m.mountpoint, name)


@pytest.mark.parametrize("name", ["hdr_truncated", "hdr_magic", "hdr_version", "hdr_shift",
                                  "side_truncated", "side_oversized", "side_magic",
                                  "side_both_slots", "side_dir", "side_fifo",
                                  "side_symlink_out", "side_missing",
                                  "side_overflow_lengths"])
def test_damaged_header_or_sidecar_is_eio_with_one_log_line(world, name):
    kind, value = read_via_child(mnt(world, name))
    assert (kind, value) == ("ERR", str(errno.EIO))
    lines = [ln for ln in world.m.log().splitlines()
             if "ERROR" in ln and f"{world.m.backing}/{name}" in ln]
    assert lines, world.m.log()
    assert f"{world.m.mountpoint}/{name}" in lines[0]


def test_reserved_header_byte_is_ignored(world):
    kind, value = read_via_child(mnt(world, "hdr_reserved_ok"))
    assert kind == "OK" and bytes.fromhex(value) == world.data["hdr_reserved_ok"]


def test_sidecar_symlink_out_of_the_backing_dir_is_not_followed(world):
    # The link points at the file's own valid sidecar: following it would have worked.
    assert os.path.islink(os.path.join(world.m.backing, "side_symlink_out" + S))
    assert read_via_child(mnt(world, "side_symlink_out")) == ("ERR", str(errno.EIO))
    assert "symlink (not followed)" in world.m.log()


def test_fifo_sidecar_does_not_hang(world):
    assert read_via_child(mnt(world, "side_fifo"), timeout=15) == ("ERR", str(errno.EIO))
    assert "sidecar is not a regular file" in world.m.log()


def test_data_file_replaced_by_symlink_out_is_never_decrypted(world):
    p = mnt(world, "data_symlink_out")
    assert os.path.islink(p)  # a plain symlink through the mount, as in the backing dir
    assert read_via_child(p, "nofollow") == ("ERR", str(errno.ELOOP))
    # Following it (the kernel does, in the reader's own name) reaches the raw outside
    # file: ciphertext, never decrypted by encfs.
    kind, value = read_via_child(p)
    raw = open(os.path.join(world.outside, "data_symlink_out"), "rb").read()
    assert kind == "OK" and bytes.fromhex(value) == raw[:1 << 20]
    assert world.data["data_symlink_out"][:64] not in bytes.fromhex(value)


def test_data_file_replaced_by_fifo_does_not_hang(world):
    p = mnt(world, "data_fifo")
    import stat
    assert stat.S_ISFIFO(os.lstat(p).st_mode)
    # The kernel serves a FIFO itself, never through encfs's read: no writer, so an
    # immediate end of file (and nothing of the backing dir decrypted or read).
    assert read_via_child(p, "nonblock", timeout=15) == ("OK", "")


def test_hostile_journal_and_temp_files_are_contained(world):
    # Nothing outside the backing dir changed, whatever the intents said.
    assert open(world.victim, "rb").read() == b"must never change " * 100
    assert open(os.path.join(world.outside, "dir", "victim"), "rb").read() == \
        b"must never change " * 100
    assert not os.path.exists(os.path.join(world.m.backing, "stolen"))
    # The symlinked "intent" was not followed: "good" is intact.
    assert read_via_child(mnt(world, "good")) == ("OK", world.data["good"].hex())
    log = world.m.log()
    assert "outside the backing dir" in log and "leads through a symlink" in log
    assert "not a regular file" in log and "not valid JSON" in log
    ctl = os.path.join(world.m.backing, ".encfs")
    # Every planted intent is gone; only the (cleared) slots of the mount's own intents stay.
    left = os.listdir(os.path.join(ctl, "journal"))
    assert set(left) <= {"inflight-write", "inflight-change"}
    assert all(open(os.path.join(ctl, "journal", n), "rb").read(8) == bytes(8) for n in left)
    # Only the mount's spare files (empty) are in tmp/.
    for name in os.listdir(os.path.join(ctl, "tmp")):
        assert name.startswith("s-"), name
        assert not any(open(os.path.join(ctl, "tmp", name), "rb").read()), name
    assert os.path.isdir(os.path.join(world.outside, "dir"))  # t-link removed, not followed


def test_names_with_newlines_and_invalid_utf8_are_served(world):
    names = os.listdir(os.fsencode(world.m.mountpoint))
    assert BAD_UTF8 in names and NL_NAME.encode() in names
    with open(os.path.join(os.fsencode(world.m.mountpoint), BAD_UTF8), "rb") as f:
        assert f.read() == b"bytes name"
    # The recovery report names the journal file with a newline, escaped on one line.
    assert not any(ln.startswith("ERROR forged journal line") for ln in world.m.log().splitlines())
    assert "2-3.json\\nERROR forged journal line" in world.m.log()


def test_log_line_for_a_name_with_a_newline_stays_one_line(world):
    with open(mnt(world, NL_NAME), "rb", buffering=0) as f:
        with pytest.raises(OSError) as e:
            f.read()
    assert e.value.errno == errno.EIO
    lines = world.m.log().splitlines()
    assert not any(ln.startswith("ERROR forged line") for ln in lines), world.m.log()
    assert any("nl\\nERROR forged line" in ln and "block 0" in ln for ln in lines)


def test_mount_keeps_serving_and_no_traceback(world):
    # Run last in this module: after every hostile read above.
    for _ in range(2):
        assert read_via_child(mnt(world, "good")) == ("OK", world.data["good"].hex())
    with open(mnt(world, "new-after-attacks"), "wb") as f:
        f.write(b"still works")
    assert open(mnt(world, "new-after-attacks"), "rb").read() == b"still works"
    assert "Traceback" not in world.m.log()
    assert world.m.process.poll() is None
