"""Layer 3: real tools on the mount: git, sqlite3, tar, rsync, python -m compileall.

One mount serves the module; every tool works in its own directory. Sources are made by
the tests themselves in plain temp dirs, so nothing depends on the network.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import sysconfig

import pytest

from encfs.pytest_plugin import NAME_MODES, names_args, short_tempdir, mount_with_own_kms

pytestmark = pytest.mark.fuse
GIT_FILES = 2500
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


@pytest.fixture(scope="module", params=NAME_MODES)
def mnt(request):
    """Every test once with plaintext names and once with encrypted names (#18)."""
    with mount_with_own_kms("encfs-tools-", names_args(request.param)) as m:
        yield m


@pytest.fixture
def scratch():
    path = short_tempdir("tools-src-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(*cmd: str, cwd: str | None = None, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=GIT_ENV, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stderr[-2000:]}"
    return res


def tree_digest(root: str) -> dict[str, tuple]:
    """Everything tar and rsync -aHAX promise to keep, per relative path."""
    out = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            entry: tuple = (stat.filemode(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    entry += (hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns // 10**9)
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                entry += (first if st.st_nlink > 1 else None,)
                entry += (tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p))),)
            elif stat.S_ISDIR(st.st_mode):
                entry += (st.st_mtime_ns // 10**9,)
            out[rel] = entry
    return out


def make_tree(root: str, seed: int = 5) -> None:
    """Files of many sizes, hard links, symlinks, xattrs, a sparse file, odd modes."""
    rnd = random.Random(seed)
    for i in range(60):
        d = os.path.join(root, f"dir{i % 6}", f"sub{i % 3}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"file{i}.bin")
        with open(p, "wb") as f:
            f.write(rnd.randbytes(rnd.choice([0, 1, 100, 4095, 4096, 4097, 70000, 300001])))
        os.chmod(p, rnd.choice([0o644, 0o600, 0o755, 0o444]))
        if i % 5 == 0:
            os.setxattr(p, f"user.tag{i}", rnd.randbytes(40))
    os.link(os.path.join(root, "dir0/sub0/file0.bin"), os.path.join(root, "hard-a"))
    os.link(os.path.join(root, "dir0/sub0/file0.bin"), os.path.join(root, "dir1/hard-b"))
    os.symlink("dir0/sub0/file0.bin", os.path.join(root, "rel-link"))
    os.symlink("/nonexistent/target", os.path.join(root, "dangling"))
    with open(os.path.join(root, "sparse.img"), "wb") as f:
        f.write(b"begin")
        f.seek(64 << 20)
        f.write(b"end")
    os.mkfifo(os.path.join(root, "fifo"))
    os.utime(os.path.join(root, "dir2"), (1_500_000_000, 1_500_000_000))


# --- git ------------------------------------------------------------------------------------

def test_git_clone_gc_fsck(mnt, scratch):
    src = os.path.join(scratch, "repo")
    os.mkdir(src)
    run("git", "init", "-q", cwd=src)
    rnd = random.Random(1)
    words = [rnd.randbytes(6).hex() for _ in range(500)]
    for i in range(GIT_FILES):
        d = os.path.join(src, f"pkg{i % 37}", f"mod{i % 5}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}.txt"), "w") as f:
            f.write(" ".join(rnd.choices(words, k=rnd.randrange(5, 400))))
    run("git", "add", "-A", cwd=src)
    run("git", "commit", "-q", "-m", "first", cwd=src)
    for i in range(0, GIT_FILES, 50):  # a second commit touching some files
        p = os.path.join(src, f"pkg{i % 37}", f"mod{i % 5}", f"f{i}.txt")
        with open(p, "a") as f:
            f.write("\nchanged\n")
    run("git", "commit", "-q", "-am", "second", cwd=src)
    dst = os.path.join(mnt.mountpoint, "clone")
    run("git", "clone", "-q", "--no-hardlinks", src, dst)
    run("git", "gc", "-q", "--prune=now", cwd=dst)
    run("git", "fsck", "--full", "--strict", cwd=dst)
    assert run("git", "status", "--porcelain", cwd=dst).stdout == ""
    # New work in the clone: commit, repack, and compare trees with the source.
    with open(os.path.join(dst, "new.txt"), "w") as f:
        f.write("made on the mount\n")
    run("git", "add", "new.txt", cwd=dst)
    run("git", "commit", "-q", "-m", "third", cwd=dst)
    run("git", "repack", "-a", "-d", "-q", cwd=dst)
    run("git", "fsck", "--full", "--strict", cwd=dst)
    src_tree = run("git", "rev-parse", "HEAD~1^{tree}", cwd=dst).stdout
    assert src_tree == run("git", "rev-parse", "HEAD^{tree}", cwd=src).stdout
    files = run("git", "ls-files", cwd=dst).stdout.split()
    assert len(files) == GIT_FILES + 1


# --- sqlite3 -------------------------------------------------------------------------------

SQL_ROWS = 50_000


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_sqlite_journal_modes(mnt, journal):
    path = os.path.join(mnt.mountpoint, f"db-{journal}.sqlite")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute(f"PRAGMA journal_mode={journal}").fetchone()[0] == journal
        db.execute("PRAGMA mmap_size=67108864")  # reads through a shared mapping too
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB)")
        rnd = random.Random(3)
        for start in range(0, SQL_ROWS, 2500):
            db.execute("BEGIN")
            db.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                           ((f"key-{i}", rnd.randbytes(rnd.randrange(10, 200)))
                            for i in range(start, start + 2500)))
            db.execute("COMMIT")
        db.execute("BEGIN")
        db.execute("UPDATE t SET v = zeroblob(300) WHERE id % 11 = 0")
        db.execute("ROLLBACK")  # the journal must restore the pages
        db.execute("DELETE FROM t WHERE id % 7 = 0")
        # A second connection (another process) reads while this one holds the db open.
        count = subprocess.run(["sqlite3", path, "SELECT count(*) FROM t;"], check=True,
                               capture_output=True, text=True).stdout.strip()
        assert int(count) == SQL_ROWS - SQL_ROWS // 7
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM t WHERE length(v) = 300").fetchone()[0] == 0
    finally:
        db.close()
    out = subprocess.run(["sqlite3", path, "PRAGMA integrity_check; VACUUM; "
                          "PRAGMA integrity_check;"], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["ok", "ok"]


# --- tar, rsync ----------------------------------------------------------------------------

def test_tar_in_and_out_identical(mnt, scratch):
    src = os.path.join(scratch, "src")
    make_tree(src)
    os.unlink(os.path.join(src, "fifo"))
    archive = os.path.join(scratch, "in.tar")
    run("tar", "--xattrs", "--xattrs-include=user.*", "-C", src, "-cf", archive, ".")
    into = os.path.join(mnt.mountpoint, "tar")
    os.mkdir(into)
    run("tar", "--xattrs", "--xattrs-include=user.*", "-C", into, "-xpf", archive)
    out_archive = os.path.join(scratch, "out.tar")
    run("tar", "--xattrs", "--xattrs-include=user.*", "-C", into, "-cf", out_archive, ".")
    back = os.path.join(scratch, "back")
    os.mkdir(back)
    run("tar", "--xattrs", "--xattrs-include=user.*", "-C", back, "-xpf", out_archive)
    expected = tree_digest(src)
    assert tree_digest(into) == expected
    assert tree_digest(back) == expected


def test_rsync_ahax_round_trip(mnt, scratch):
    src = os.path.join(scratch, "src")
    make_tree(src)
    into = os.path.join(mnt.mountpoint, "rsync")
    run("rsync", "-aHAXS", src + "/", into + "/")
    back = os.path.join(scratch, "back")
    run("rsync", "-aHAXS", into + "/", back + "/")
    expected = tree_digest(src)
    assert tree_digest(into) == expected
    assert tree_digest(back) == expected
    # Hard links stayed links, sparse files stayed sparse (also in the backing dir).
    assert os.stat(f"{into}/hard-a").st_ino == os.stat(f"{into}/dir1/hard-b").st_ino
    assert os.stat(f"{into}/hard-a").st_nlink == 3
    for p in (f"{back}/sparse.img", mnt.backing_path("rsync/sparse.img")):
        assert os.stat(p).st_blocks * 512 < (1 << 20)
    assert stat.S_ISFIFO(os.lstat(f"{back}/fifo").st_mode)
    # A second run finds nothing to do (sizes and mtimes match exactly).
    res = run("rsync", "-aHAXS", "--itemize-changes", src + "/", into + "/")
    assert res.stdout.strip() == ""


# --- python -m compileall -----------------------------------------------------------------

def test_compileall_stdlib_copy(mnt, scratch):
    """Byte-compile a copy of the standard library (without its test suites) on the mount
    and in a plain dir: the same files compiled, with equal headers (source mtime and size)
    and equal code objects (marshal output itself is not byte-reproducible: it depends on
    reference counts)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    rsync_filter = ["--exclude", "__pycache__", "--exclude", "site-packages",
                    "--exclude", "test", "--exclude", "tests", "--exclude", "idle_test",
                    "--include", "*/", "--include", "*.py", "--exclude", "*"]
    into = os.path.join(mnt.mountpoint, "stdlib")
    plain = os.path.join(scratch, "stdlib")
    for dst in (into, plain):
        run("rsync", "-a", *rsync_filter, stdlib + "/", dst + "/")
    for dst in (into, plain):
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "2", dst],
                       capture_output=True, check=False)
    def pycs(root):
        found = {}
        for dirpath, _, files in os.walk(root):
            for n in files:
                if n.endswith(".pyc"):
                    with open(os.path.join(dirpath, n), "rb") as f:
                        data = f.read()
                    found[os.path.relpath(os.path.join(dirpath, n), root)] = \
                        (data[:16], marshal.loads(data[16:]))
        return found
    expected = pycs(plain)
    assert len(expected) > 500
    assert pycs(into) == expected
    # The compiled stdlib copy is importable from the mount.
    res = subprocess.run([sys.executable, "-S", "-c", "import json, email.parser, "
                          "json.decoder as d; print(d.__cached__)"],
                         env={"PYTHONPATH": into, "PYTHONDONTWRITEBYTECODE": "1"},
                         capture_output=True, text=True, check=True)
    assert res.stdout.startswith(into)
