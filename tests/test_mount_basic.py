"""Layer 3: a real mount in a subprocess against a real `kms serve`, with ordinary tools."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
import subprocess
import time

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import both_name_modes

SUFFIX = fmt.SIDECAR_SUFFIX
BS = fmt.DEFAULT_BLOCK_SIZE  # new backing dirs get the default block size
MARKER = b"PLAINTEXT-MARKER-7f3a9c"


def sh(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, **kw)


def backing_files(m) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(m.backing):
        dirnames[:] = [d for d in dirnames if not (dirpath == m.backing and d == ".encfs")]
        out += [os.path.relpath(os.path.join(dirpath, f), m.backing) for f in filenames]
    return sorted(out)


def backing_files_of(m, *plain: str) -> list[str]:
    """What `backing_files` must show for plaintext paths ``plain`` (data files and
    sidecars), in either name mode."""
    return sorted(m.backing_rel(p) for p in plain)


def sidecar(m, rel: str) -> fmt.KeyRecord:
    with open(m.backing_path(rel + SUFFIX), "rb") as f:
        return fmt.decode_sidecar(f.read())


@both_name_modes
def test_echo_cat_and_backing_holds_ciphertext_and_sidecar(encrypted_mount):
    m = encrypted_mount
    sh(f"echo hi > {m.mountpoint}/a")
    assert sh(f"cat {m.mountpoint}/a").stdout == b"hi\n"
    assert backing_files(m) == backing_files_of(m, "a", "a" + SUFFIX)
    raw = open(m.backing_path("a"), "rb").read()
    assert raw.startswith(fmt.DATA_MAGIC) and b"hi" not in raw[fmt.HEADER_SIZE:]
    assert len(raw) == fmt.cipher_size(3, BS)
    rec = sidecar(m, "a")
    assert rec.key_id == m.key_id
    assert fmt.decode_header(raw).file_id == rec.file_id


def test_cp_roundtrip_large_unaligned(encrypted_mount, tmp_path):
    m = encrypted_mount
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    sh(f"cp {src} {m.mountpoint}/big.bin")
    sh(f"cp {m.mountpoint}/big.bin {tmp_path}/back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert os.path.getsize(f"{m.mountpoint}/big.bin") == src.stat().st_size


def test_dd_at_unaligned_offsets(encrypted_mount, tmp_path):
    m = encrypted_mount
    target = f"{m.mountpoint}/dd.bin"
    ref = bytearray()
    rnd = random.Random(7)
    for seek, count in [(0, 5000), (4090, 20), (12287, 2), (100, 9000), (30000, 1)]:
        chunk = bytes(rnd.randrange(256) for _ in range(count))
        (tmp_path / "chunk").write_bytes(chunk)
        sh(f"dd if={tmp_path}/chunk of={target} bs=1 seek={seek} conv=notrunc status=none")
        if len(ref) < seek:
            ref += bytes(seek - len(ref))
        ref[seek:seek + count] = chunk
    assert sh(f"cat {target}").stdout == bytes(ref)


def test_python_io_random_offsets_spanning_blocks(encrypted_mount):
    m = encrypted_mount
    path = f"{m.mountpoint}/py.bin"
    rnd = random.Random(42)
    ref = bytearray()
    with open(path, "w+b", buffering=0) as f:
        for _ in range(200):
            off = rnd.randrange(0, 40000)
            data = rnd.randbytes(rnd.randrange(1, 9000))
            f.seek(off)
            f.write(data)
            if len(ref) < off:
                ref += bytes(off - len(ref))
            ref[off:off + len(data)] = data
            roff = rnd.randrange(0, len(ref))
            size = rnd.randrange(1, 10000)
            f.seek(roff)
            assert f.read(size) == bytes(ref[roff:roff + size])
        f.seek(0)
        assert f.read() == bytes(ref)
    for _ in range(100):
        off = rnd.randrange(0, len(ref))
        size = rnd.randrange(1, 10000)
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(size) == bytes(ref[off:off + size])


@both_name_modes
def test_no_plaintext_anywhere_in_backing(encrypted_mount):
    m = encrypted_mount
    os.makedirs(f"{m.mountpoint}/d/e")
    for i in range(5):
        with open(f"{m.mountpoint}/d/e/f{i}", "wb") as f:
            f.write(MARKER * (1000 * i + 1))
    with open(f"{m.mountpoint}/d/e/f4", "r+b") as f:  # an overwrite: undo records
        f.seek(100)
        f.write(MARKER * 50)
        os.fsync(f.fileno())
    sh("sync")
    for rel in backing_files(m):
        assert MARKER not in open(os.path.join(m.backing, rel), "rb").read(), rel
    # The control dir too, all of it, while mounted and after: the journal (undo records,
    # intents), the temp dir (spare sidecars), the log, the config.
    for when in ("mounted", "unmounted"):
        scanned = []
        for dirpath, _, names in os.walk(os.path.join(m.backing, ".encfs")):
            for name in names:
                p = os.path.join(dirpath, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    assert MARKER not in open(p, "rb").read(), (when, p)
                    scanned.append(os.path.relpath(p, m.backing))
        assert any(p.startswith(".encfs/journal/") for p in scanned), (when, scanned)
        if when == "mounted":
            assert any(p.startswith(".encfs/tmp/") for p in scanned), scanned
            m.unmount()


@both_name_modes
def test_one_sidecar_per_file_hidden_from_mount(encrypted_mount):
    m = encrypted_mount
    for name in ("x", "y", "z"):
        open(f"{m.mountpoint}/{name}", "w").write(name)
    assert sorted(os.listdir(m.mountpoint)) == ["x", "y", "z"]
    assert backing_files(m) == backing_files_of(m, "x", "y", "z", *(n + SUFFIX for n in "xyz"))
    assert not os.path.exists(f"{m.mountpoint}/x{SUFFIX}")
    open(f"{m.mountpoint}/new{SUFFIX}", "w").write("a user's own")  # a long name
    assert sorted(os.listdir(m.mountpoint)) == ["new" + SUFFIX, "x", "y", "z"]
    assert not os.path.exists(f"{m.mountpoint}/.encfs")


@both_name_modes
def test_remount_reads_identical_bytes(encrypted_mount):
    m = encrypted_mount
    data = {f"f{i}": os.urandom(i * 3001) for i in range(6)}
    os.mkdir(f"{m.mountpoint}/sub")
    for name, content in data.items():
        open(f"{m.mountpoint}/sub/{name}", "wb").write(content)
    m.remount()
    for name, content in data.items():
        assert open(f"{m.mountpoint}/sub/{name}", "rb").read() == content


@both_name_modes
def test_files_get_distinct_deks_and_file_ids(encrypted_mount):
    m = encrypted_mount
    open(f"{m.mountpoint}/one", "w").write("same content")
    open(f"{m.mountpoint}/two", "w").write("same content")
    a, b = sidecar(m, "one"), sidecar(m, "two")
    assert a.file_id != b.file_id
    assert a.wrapped_dek != b.wrapped_dek
    assert open(m.backing_path("one"), "rb").read() != open(m.backing_path("two"), "rb").read()
    # Each wrapped DEK unwraps at the KMS only with its own file id as AAD.
    dek_a = m.kms.client.decrypt_datakey(a.key_id, a.cipher_text, aad=a.file_id.hex())
    dek_b = m.kms.client.decrypt_datakey(b.key_id, b.cipher_text, aad=b.file_id.hex())
    assert dek_a != dek_b and len(dek_a) == 32


@both_name_modes
def test_unlink_removes_both_halves(encrypted_mount):
    m = encrypted_mount
    open(f"{m.mountpoint}/gone", "w").write("x")
    os.unlink(f"{m.mountpoint}/gone")
    assert backing_files(m) == []
    with pytest.raises(FileNotFoundError):
        os.unlink(f"{m.mountpoint}/gone")


def test_truncate_down_and_up_unaligned(encrypted_mount):
    m = encrypted_mount
    path = f"{m.mountpoint}/t"
    data = os.urandom(20000)
    open(path, "wb").write(data)
    ref = bytearray(data)
    for size in (12345, 4096, 4097, 100, 9000, 0, 5000, 70001, 3):
        os.truncate(path, size)
        if size < len(ref):
            del ref[size:]
        else:
            ref += bytes(size - len(ref))
        assert os.path.getsize(path) == size
        assert open(path, "rb").read() == bytes(ref), size
        with open(path, "r+b") as f:  # write again after each truncate
            f.seek(size // 2)
            f.write(b"W" * 10)
        ref[size // 2:size // 2 + 10] = b"W" * 10
        del ref[max(size, size // 2 + 10):]
    m.remount()
    assert open(path, "rb").read() == bytes(ref)


def test_sparse_write_far_past_end_stays_sparse(encrypted_mount):
    m = encrypted_mount
    path = f"{m.mountpoint}/sparse"
    with open(path, "wb") as f:
        f.write(b"start")
        f.seek(512 * 1024 * 1024)
        f.write(b"end")
    assert os.path.getsize(path) == 512 * 1024 * 1024 + 3
    st = os.stat(m.backing_path("sparse"))
    assert st.st_blocks * 512 < 1024 * 1024  # holes, not 512 MiB of ciphertext
    with open(path, "rb") as f:
        assert f.read(5) == b"start"
        f.seek(100 * 1024 * 1024)
        assert f.read(8192) == bytes(8192)
        f.seek(512 * 1024 * 1024 - 2)
        assert f.read() == b"\0\0end"


@both_name_modes
def test_directories_rename_and_listing(encrypted_mount):
    m = encrypted_mount
    mp = m.mountpoint
    os.makedirs(f"{mp}/a/b")
    open(f"{mp}/a/b/file", "w").write("content")
    os.rename(f"{mp}/a", f"{mp}/c")
    assert open(f"{mp}/c/b/file").read() == "content"
    assert os.path.exists(m.backing_path("c/b/file" + SUFFIX))
    os.rename(f"{mp}/c/b/file", f"{mp}/moved")
    assert open(f"{mp}/moved").read() == "content"
    assert backing_files(m) == backing_files_of(m, "moved", "moved" + SUFFIX)
    with pytest.raises(OSError) as e:
        os.rmdir(f"{mp}/c")
    assert e.value.errno == errno.ENOTEMPTY
    os.rmdir(f"{mp}/c/b")
    os.rmdir(f"{mp}/c")
    assert os.listdir(mp) == ["moved"]
    names = [f"n{i:04d}" for i in range(300)]
    os.mkdir(f"{mp}/many")
    for n in names:
        open(f"{mp}/many/{n}", "w").close()
    assert sorted(os.listdir(f"{mp}/many")) == names


@both_name_modes
def test_rename_over_existing_file(encrypted_mount):
    m = encrypted_mount
    mp = m.mountpoint
    open(f"{mp}/src", "w").write("new")
    open(f"{mp}/dst", "w").write("old old old")
    src_id = sidecar(m, "src").file_id
    os.rename(f"{mp}/src", f"{mp}/dst")
    assert open(f"{mp}/dst").read() == "new"
    assert sidecar(m, "dst").file_id == src_id
    assert backing_files(m) == backing_files_of(m, "dst", "dst" + SUFFIX)
    m.remount()
    assert open(f"{mp}/dst").read() == "new"


@both_name_modes
def test_chmod_utimens_and_stat(encrypted_mount):
    m = encrypted_mount
    path = f"{m.mountpoint}/meta"
    open(path, "w").write("12345")
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_650_000_000_987_654_321))
    st = os.stat(path)
    assert oct(st.st_mode & 0o7777) == oct(0o640)
    assert st.st_mtime_ns == 1_650_000_000_987_654_321
    assert st.st_atime_ns == 1_600_000_000_123_456_789
    assert st.st_size == 5
    bst = os.stat(m.backing_path("meta"))
    assert bst.st_mtime_ns == st.st_mtime_ns and bst.st_mode == st.st_mode


@both_name_modes
def test_statfs_reports_the_full_name_limit(encrypted_mount):
    m = encrypted_mount
    assert os.statvfs(m.mountpoint).f_namemax == 255
    longest = "n" * 255  # stored as a long name (docs/FORMAT.md)
    open(f"{m.mountpoint}/{longest}", "w").write("ok")
    assert open(f"{m.mountpoint}/{longest}").read() == "ok"
    with pytest.raises(OSError) as e:
        open(f"{m.mountpoint}/{longest}x", "w")
    assert e.value.errno == errno.ENAMETOOLONG


@both_name_modes
def test_fsync_and_open_unlink_keeps_working(encrypted_mount):
    m = encrypted_mount
    path = f"{m.mountpoint}/tmpfile"
    f = open(path, "w+b")
    f.write(b"before unlink " * 1000)
    f.flush()
    os.fsync(f.fileno())
    os.unlink(path)
    assert not os.path.exists(path)
    f.write(b"after")
    f.flush()
    f.seek(0)
    assert f.read() == b"before unlink " * 1000 + b"after"
    f.close()
    assert backing_files(m) == []


@both_name_modes
def test_tampered_block_gives_eio_and_log_line(encrypted_mount):
    m = encrypted_mount
    path = f"{m.mountpoint}/victim"
    data = os.urandom(3 * BS)
    open(path, "wb").write(data)
    m.remount()  # drop the kernel's page cache of the file
    raw = bytearray(open(m.backing_path("victim"), "rb").read())
    raw[fmt.block_offset(1, BS) + 40] ^= 0xFF
    open(m.backing_path("victim"), "r+b").write(raw)
    with open(path, "rb", buffering=0) as f:
        assert f.read(BS) == data[:BS]
        f.seek(2 * BS)
        assert f.read(BS) == data[2 * BS:]
        f.seek(BS)
        with pytest.raises(OSError) as e:
            f.read(BS)
        assert e.value.errno == errno.EIO
    log = m.log()
    assert "block 1" in log and m.backing_path("victim") in log
    # the plaintext name too, unless names are encrypted (then no log line shows one)
    assert ("victim" in log) is not m.encrypted_names


@both_name_modes
def test_sha256_of_many_files_through_tar(encrypted_mount, tmp_path):
    m = encrypted_mount
    src = tmp_path / "tree"
    for i in range(40):
        d = src / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(i * 977))
    sh(f"tar -C {tmp_path} -cf {tmp_path}/t.tar tree")
    sh(f"tar -C {m.mountpoint} -xf {tmp_path}/t.tar")
    for i in range(40):
        rel = f"tree/d{i % 5}/f{i}"
        a = hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
        b = hashlib.sha256(open(f"{m.mountpoint}/{rel}", "rb").read()).hexdigest()
        assert a == b


def test_backing_dir_made_with_4k_blocks_keeps_them(kms_server):
    """The block size is fixed per backing dir: one made under the old 4 KiB default stays
    readable and writable with 4 KiB blocks after the default changed."""
    import json
    import shutil

    from encfs.pytest_plugin import short_tempdir, make_mount

    work = short_tempdir("encfs-")
    os.makedirs(f"{work}/backing/.encfs")
    with open(f"{work}/backing/.encfs/config.json", "w") as f:
        json.dump({"format_version": 1, "block_size": 4096}, f)
    m = make_mount(kms_server, work)
    try:
        data = os.urandom(3 * 4096 + 5)
        open(f"{m.mountpoint}/old", "wb").write(data)
        m.remount()
        assert open(f"{m.mountpoint}/old", "rb").read() == data
        assert os.path.getsize(f"{m.mountpoint}/old") == len(data)
        raw = open(m.backing_path("old"), "rb").read()
        assert fmt.decode_header(raw).block_size == 4096
        assert len(raw) == fmt.cipher_size(len(data), 4096)
    finally:
        m.unmount()
        shutil.rmtree(work, ignore_errors=True)


@both_name_modes
def test_torn_sidecar_beside_an_empty_file_gets_a_new_key(encrypted_mount):
    """A crash while a new file's sidecar was being written leaves a torn sidecar beside an
    empty data file: the file is usable, with a new key."""
    m = encrypted_mount
    open(f"{m.mountpoint}/fresh", "wb").close()
    m.unmount()
    with open(m.backing_path("fresh") + SUFFIX, "r+b") as f:
        f.truncate(100)
    m.mount()
    with open(f"{m.mountpoint}/fresh", "wb") as f:
        f.write(b"works")
    assert open(f"{m.mountpoint}/fresh", "rb").read() == b"works"
    assert sidecar(m, "fresh").file_id == fmt.decode_header(
        open(m.backing_path("fresh"), "rb").read()).file_id
    assert "replacing the damaged sidecar of an empty file" in m.log()


@both_name_modes
def test_sidecars_from_spares_and_recycled_ones_get_their_files_mode(encrypted_mount):
    """New sidecars come from the pool of spare inodes, and removed files' sidecars go back
    into it; either way the sidecar gets its data file's mode, and unmount leaves no spare."""
    m = encrypted_mount
    modes = {"p": 0o600, "g": 0o640, "x": 0o755}
    for rnd in range(2):  # the second round's last files reuse the first's sidecars
        for i in range(100):  # more than the pool creates ahead, and a recycling batch
            open(f"{m.mountpoint}/filler{i}", "wb").close()
            os.truncate(f"{m.mountpoint}/filler{i}", 1)
        for name, mode in modes.items():
            fd = os.open(f"{m.mountpoint}/{name}", os.O_WRONLY | os.O_CREAT, mode)
            os.write(fd, f"{name}{rnd}".encode())
            os.close(fd)
        for name, mode in modes.items():
            st = os.stat(m.backing_path(name + SUFFIX))
            assert stat.S_IMODE(st.st_mode) == mode & 0o644, name
            assert sidecar(m, name).file_id  # a whole, valid record
            assert open(f"{m.mountpoint}/{name}", "rb").read() == f"{name}{rnd}".encode()
        names = [*modes, *(f"filler{i}" for i in range(100))]
        inodes = {os.stat(m.backing_path(n + SUFFIX)).st_ino for n in names}
        if rnd == 0:
            old_inodes = inodes
            for name in names:
                os.unlink(f"{m.mountpoint}/{name}")
            assert backing_files(m) == []
        else:
            # Which of the 103 new sidecars get a recycled inode depends on how far the
            # pool's thread got on the other core (under load it may lag, and a create then
            # makes its own); that some do is the point.
            assert inodes & old_inodes, "no removed file's sidecar was reused"
    m.remount()
    for name in modes:
        assert open(f"{m.mountpoint}/{name}", "rb").read() == f"{name}1".encode()
    m.unmount()
    assert os.listdir(m.backing_path(".encfs/tmp")) == []


def test_readahead_of_the_mount_is_raised_for_large_read_requests(encrypted_mount):
    """A root mount sets its readahead window to 1 MiB once the kernel finished INIT (which
    resets it), so sequential reads arrive as 1 MiB requests (docs/PERFORMANCE.md)."""
    from encfs.mount import READAHEAD_KB
    from encfs.mounts import device_of_mountpoint

    m = encrypted_mount
    dev = device_of_mountpoint(m.mountpoint)
    st = os.stat(m.mountpoint)
    assert dev == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    deadline = time.monotonic() + 10
    while int(open(path).read()) != READAHEAD_KB:
        assert time.monotonic() < deadline, open(path).read()
        time.sleep(0.05)


@pytest.mark.parametrize("size", [1, 4096, 16384 + 5, 100_000])
def test_backing_file_holds_no_space_beyond_its_ciphertext(encrypted_mount, size):
    """Space is reserved before each write (a full disk gives ENOSPC, never a torn block),
    but only for the bytes the write puts there: a small file must not keep a whole
    reserved block past its end."""
    m = encrypted_mount
    with open(f"{m.mountpoint}/f", "wb") as f:
        f.write(os.urandom(size))
    sh("sync")
    st = os.stat(m.backing_path("f"))
    assert st.st_size == fmt.cipher_size(size, fmt.DEFAULT_BLOCK_SIZE)
    assert st.st_blocks * 512 <= -(-st.st_size // 4096) * 4096
