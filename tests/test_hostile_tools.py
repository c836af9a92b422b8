"""A hostile backing dir under the offline tools and at mount time (issue 8, item 2).

`encfs fsck`, `inspect`, `decrypt` and `rewrap` read a backing dir that anyone with storage
access may have edited; `encfs mount` reads its control files (config, lock, dirty marker,
journal dir). Malformed input must give a clear exit code and a one-line message: never a
traceback, never a hang, never a symlink followed out of the backing dir, and names with
newlines or invalid UTF-8 printed escaped on one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from encfs import backing as bk
from encfs import format as fmt
from encfs import mount as encfs_mount
from encfs.pytest_plugin import short_tempdir, make_mount, start_kms_server

S = fmt.SIDECAR_SUFFIX
NL = b"nl\nforged: line"
BAD = b"bad\xffname"


def run(w, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "encfs", *args, "--kms-socket",
                          w.kms.socket_path, "--project-id", w.kms.project_id],
                         capture_output=True, timeout=timeout)
    assert b"Traceback" not in res.stderr + res.stdout, res.stderr.decode(errors="replace")
    return res


class World:
    pass


@pytest.fixture(scope="module")
def world():
    w = World()
    work = short_tempdir("encfs-hostile-tools-")
    w.kms = start_kms_server(os.path.join(work, "kms"))
    m = None
    try:
        w.outside = os.path.join(work, "outside")
        os.makedirs(w.outside)
        m = make_mount(w.kms, work)
        w.backing, w.mnt = m.backing, m.mountpoint
        mp = os.fsencode(m.mountpoint)
        w.data = {}
        for name in [b"good", b"hdr_bad", b"side_fifo", b"side_dir", b"side_link",
                     b"data_link", NL, BAD, b"seq_max"]:
            w.data[name] = os.urandom(5000)
            with open(os.path.join(mp, name), "wb") as f:
                f.write(w.data[name])
        m.unmount()
        m = None
        b = os.fsencode(w.backing)
        p = lambda n: os.path.join(b, n)  # noqa: E731
        with open(p(b"hdr_bad"), "r+b") as f:
            f.write(b"XXXX")
        os.unlink(p(b"side_fifo" + S.encode()))
        os.mkfifo(p(b"side_fifo" + S.encode()))
        os.unlink(p(b"side_dir" + S.encode()))
        os.mkdir(p(b"side_dir" + S.encode()))
        shutil.move(p(b"side_link" + S.encode()), os.path.join(w.outside, "side_link" + S))
        os.symlink(os.path.join(w.outside, "side_link" + S), p(b"side_link" + S.encode()))
        for sfx in (b"", S.encode()):
            shutil.move(p(b"data_link" + sfx), os.path.join(os.fsencode(w.outside), b"data_link" + sfx))
        os.symlink(os.path.join(w.outside, "data_link"), p(b"data_link"))
        # A record whose sequence number is exhausted: rewrap must refuse, not overflow.
        raw = bytearray(open(p(b"seq_max" + S.encode()), "rb").read())
        slot = bytearray(raw[16:16 + fmt.SLOT_SIZE])
        slot[0:8] = b"\xff" * 8
        slot[-4:] = fmt.struct.pack(">I", fmt.zlib.crc32(bytes(slot[:-4])))
        raw[16:16 + fmt.SLOT_SIZE] = slot
        open(p(b"seq_max" + S.encode()), "wb").write(raw)
        # A damaged data file under a newline / invalid UTF-8 name: fsck must report it.
        with open(p(NL), "r+b") as f:
            f.write(b"YYYY")
        with open(p(BAD), "r+b") as f:
            f.write(b"ZZZZ")
        os.mkfifo(os.path.join(b, b"fifo\nname"))
        w.outside_before = {n: open(os.path.join(w.outside, n), "rb").read()
                            for n in os.listdir(w.outside)}
        yield w
    finally:
        if m is not None:
            m.unmount()
        w.kms.stop()
        shutil.rmtree(work, ignore_errors=True)


def one_line(res: subprocess.CompletedProcess) -> str:
    err = res.stderr.decode()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.fuse
def test_fsck_reports_every_hostile_entry_without_following_or_hanging(world):
    res = run(world, "fsck", world.backing, "--json")
    assert res.returncode == 4, res.stderr.decode()
    problems = {p["path"]: p for p in json.loads(res.stdout)["problems"]}
    assert problems["hdr_bad"]["kind"] == "bad-header"
    assert "bad magic" in problems["hdr_bad"]["detail"]
    assert "not a regular file" in problems["side_fifo"]["detail"]
    assert "not a regular file" in problems["side_dir"]["detail"]
    assert "symlink (not followed)" in problems["side_link"]["detail"]
    assert os.fsdecode(NL) in problems and os.fsdecode(BAD) in problems
    assert "data_link" not in problems  # a symlink is a symlink, not a data file
    assert "good" not in problems


@pytest.mark.fuse
def test_fsck_text_output_escapes_hostile_names_one_line_each(world):
    res = run(world, "fsck", world.backing)
    assert res.returncode == 4
    out = res.stdout.decode("utf-8")  # strict: invalid UTF-8 never reaches stdout
    lines = out.splitlines()
    assert not any(ln.startswith("forged: line") for ln in lines), out
    assert any(ln.startswith("bad-header: nl\\nforged: line:") for ln in lines), out
    assert any(ln.startswith("bad-header: bad\\xffname:") for ln in lines), out


@pytest.mark.fuse
def test_inspect_and_decrypt_refuse_hostile_files_in_one_line(world):
    b = world.backing
    for name, rc, msg in [("side_fifo", 1, "not a regular file"),
                          ("side_dir", 1, "not a regular file"),
                          ("side_link", 1, "symlink (not followed)"),
                          ("data_link", 1, "symlink (not followed)"),
                          ("hdr_bad", 1, "bad magic"),
                          ("fifo\nname", 1, "not a regular file")]:
        for tool in ("inspect", "decrypt"):
            res = run(world, tool, os.path.join(b, name), timeout=30)
            assert res.returncode == rc, (tool, name, res.stderr)
            err = one_line(res)
            assert msg in err, (tool, name, err)
            assert res.stdout == b"" or tool == "inspect"
    res = run(world, "inspect", os.fsdecode(os.path.join(os.fsencode(b), NL)))
    assert res.returncode == 1 and "nl\\nforged: line" in one_line(res)
    assert run(world, "decrypt", os.path.join(b, "good")).stdout == world.data[b"good"]


@pytest.mark.fuse
def test_inspect_text_output_of_an_invalid_utf8_name(world):
    # A healthy file whose name is not UTF-8 (rewrite the header to be valid again).
    b = os.fsencode(world.backing)
    src = os.path.join(b, b"good")
    dst = os.path.join(b, b"copy\xfe\nx")
    shutil.copy(src, dst)
    shutil.copy(src + S.encode(), dst + S.encode())
    try:
        res = run(world, "inspect", os.fsdecode(dst))
        assert res.returncode == 0, res.stderr
        out = res.stdout.decode("utf-8")
        assert "copy\\xfe\\nx" in out and "\nx\n" not in out
        js = json.loads(run(world, "inspect", os.fsdecode(dst), "--json").stdout)
        assert os.fsencode(js["backing_path"]) == dst
    finally:
        os.unlink(dst)
        os.unlink(dst + S.encode())


@pytest.mark.fuse
def test_rewrap_skips_hostile_sidecars_and_reports_them(world):
    with world.kms.client as c:
        c.create_key("hostile/other")
    res = run(world, "rewrap", world.backing, "--to-key", "hostile/other", "--json")
    summary = json.loads(res.stdout)
    assert res.returncode == 1, res.stdout
    failed = "\n".join(summary["failed"])
    assert "seq_max" in failed and "exhausted" in failed
    assert summary["rewrapped"] == 4  # good, hdr_bad, and the two odd names
    # never through the planted symlink, never into the FIFO
    assert all(open(os.path.join(world.outside, n), "rb").read() == data
               for n, data in world.outside_before.items())
    assert run(world, "decrypt", os.path.join(world.backing, "good")).stdout == world.data[b"good"]


@pytest.mark.fuse
def test_fsck_repair_moves_hostile_entries_and_stays_inside(world):
    res = run(world, "fsck", world.backing, "--repair", "--json")
    assert res.returncode in (1, 4), res.stderr
    for n, data in world.outside_before.items():
        assert open(os.path.join(world.outside, n), "rb").read() == data
    assert os.path.islink(os.path.join(world.backing, "data_link"))
    assert run(world, "decrypt", os.path.join(world.backing, "good")).stdout == world.data[b"good"]


# --- control files at mount time (no mount happens: refused before) --------------------

def _mount_fails(tmp_path, capsys, prepare) -> str:
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    bk.open_backing(str(backing))  # a healthy control dir first
    prepare(os.path.join(str(backing), ".encfs"), tmp_path)
    rc = encfs_mount.main([str(backing), str(mnt), "--kms-socket", str(tmp_path / "none.sock"),
                           "--foreground"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def _write(name, data):
    def prepare(ctl, tmp):
        if os.path.exists(os.path.join(ctl, name)):
            os.unlink(os.path.join(ctl, name))
        with open(os.path.join(ctl, name), "wb") as f:
            f.write(data)
    return prepare


def _replace(name, kind):
    def prepare(ctl, tmp):
        path = os.path.join(ctl, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        if kind == "dir":
            os.mkdir(path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "file":
            open(path, "w").close()
        elif kind == "symlink":
            target = tmp / ("outside-" + name)
            target.mkdir() if name in ("tmp", "journal") else target.write_text("{}")
            os.symlink(target, path)
    return prepare


@pytest.mark.parametrize("prepare, msg", [
    (_write("config.json", b"{not json"), "damaged (not valid JSON)"),
    (_write("config.json", b"[" * 60000), "damaged (not valid JSON)"),
    (_write("config.json", b"[1, 2]"), "not a JSON object"),
    (_write("config.json", b" " * (bk.CONFIG_MAX + 1)), "larger than"),
    (_write("config.json", b'{"format_version": 1, "block_size": 1e999}'), "not an integer"),
    (_write("config.json", b'{"format_version": 1, "block_size": 3000}'), "block size"),
    (_write("config.json", b'{"format_version": 1, "block_size": 99999999999999999999999}'),
     "block size"),
    (_write("config.json", b'{"format_version": 7, "block_size": 4096}'), "format_version 7"),
    (_write("config.json", b'\xff\xfe'), "not valid JSON"),
    (_replace("config.json", "dir"), "not a regular file"),
    (_replace("config.json", "fifo"), "not a regular file"),
    (_replace("config.json", "symlink"), "not a regular file"),
    (_replace("lock", "dir"), "not a regular file"),
    (_replace("lock", "fifo"), "not a regular file"),
    (_replace("lock", "symlink"), "not a regular file"),
    (_replace("dirty", "dir"), "not a regular file"),
    (_replace("dirty", "symlink"), "not a regular file"),
    (_replace("mount.log", "symlink"), "not a regular file"),
    (_replace("journal", "symlink"), "not a directory"),
    (_replace("tmp", "symlink"), "not a directory"),
    (_replace("journal", "file"), "not a directory"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hostile_control_files_refuse_the_mount_in_one_line(tmp_path, capsys, prepare, msg):
    assert msg in _mount_fails(tmp_path, capsys, prepare)


def test_control_dir_replaced_by_a_symlink_is_refused(tmp_path, capsys):
    def prepare(ctl, tmp):
        shutil.rmtree(ctl)
        (tmp / "elsewhere").mkdir()
        os.symlink(tmp / "elsewhere", ctl)
    assert "not a directory" in _mount_fails(tmp_path, capsys, prepare)
    assert os.listdir(tmp_path / "elsewhere") == []  # nothing was created through it


def test_lock_holder_garbage_is_not_echoed(tmp_path):
    backing = os.fsencode(str(tmp_path))
    bk.open_backing(backing)
    first = bk.MountLock(backing)
    first.acquire()
    try:
        os.pwrite(first.fd, b"12\nforged\x1b[2J", 0)
        with pytest.raises(bk.BackingInUse) as e:
            bk.MountLock(backing).acquire()
        assert "(pid ?)" in str(e.value) and "\n" not in str(e.value)
    finally:
        first.release()


def test_fsck_on_a_hostile_lock_is_one_line_exit_8(tmp_path):
    bk.open_backing(str(tmp_path))
    os.mkdir(tmp_path / ".encfs" / "lock")
    res = subprocess.run([sys.executable, "-m", "encfs", "fsck", str(tmp_path), "--no-kms"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 8 and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and "lock" in res.stderr
