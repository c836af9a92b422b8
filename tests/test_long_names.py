"""Layer 3: the full name space (issue 13, item 2). 255-byte names and PATH_MAX paths through
every operation, long <-> short renames both ways, and the offline tools on long names.

A name whose sidecar would not fit NAME_MAX is stored as ``encfs.long.<hash>`` with the
plaintext in ``encfs.long.<hash>.name`` (docs/FORMAT.md, "Names"); these tests look in
the backing dir too, so a name stored as itself where it cannot be would fail them.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from encfs import format as fmt
from encfs import names as nm
from encfs.pytest_plugin import both_name_modes

pytestmark = pytest.mark.fuse

S = fmt.SIDECAR_SUFFIX
L255 = "L" * 255  # longest name: stored long
L249 = "m" * 249  # one byte too long to be stored as itself (its sidecar would be 256)
SHORT248 = "s" * 248  # the longest name stored as itself


def encfs(m, *args: str, rc: int | None = 0) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "encfs", *args], capture_output=True,
                         timeout=300)
    assert b"Traceback" not in res.stderr, res.stderr.decode()
    if rc is not None:
        assert res.returncode == rc, (res.stdout + res.stderr).decode()
    return res


def kms(m) -> list[str]:
    return ["--kms-socket", m.kms.socket_path, "--project-id", m.kms.project_id]


def backing_entries(path: str) -> list[str]:
    return sorted(os.listdir(path))


def long_form(name: str) -> str:
    """The hashed backing name of a long plaintext name in a plaintext-names root."""
    return os.fsdecode(nm.backing_names(b"", os.fsencode(name)).data)


def data_name(m, rel: str) -> str:
    """The backing name of plaintext ``rel``'s data file, in either name mode."""
    return os.path.basename(m.backing_path(rel))


def entries_of(m, rel: str, sidecar: bool = True) -> list[str]:
    """The backing entries plaintext ``rel`` takes: its data file (or directory), its
    sidecar, and its long-name file when its stored name is too long to be itself."""
    data = data_name(m, rel)
    out = [data] + ([data + S] if sidecar else [])
    if data.startswith(os.fsdecode(nm.LONG_PREFIX)):
        out.append(data + ".name")
    return out


def stored_name(m, rel: str) -> bytes:
    """What plaintext ``rel``'s long-name file holds: the name, or its encryption."""
    root = os.fsencode(m.backing)
    parent = os.fsencode(m.backing_path(os.path.dirname(rel)) if os.path.dirname(rel)
                         else m.backing)
    enc = nm.dir_names(root, parent, m.name_cipher())
    return nm.backing_names(parent, os.fsencode(os.path.basename(rel)), enc).stored


def read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def write(p: str, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)


def test_backing_names_pure():
    assert nm.backing_names(b"", b"a").data == b"a"
    assert nm.backing_names(b"", SHORT248.encode()).long_name is None
    for name in (L249, L255, "x" + S, "encfs.long.x"):
        b = nm.backing_names(b"", name.encode())
        assert b.data.startswith(b"encfs.long.") and len(b.data) == 54
        assert b.sidecar == b.data + S.encode() and b.long_name == b.data + b".name"
        assert nm.plain_of_long(b.data, name.encode()) == name.encode()
        assert nm.plain_of_long(b.data, b"other" * 60) is None
    assert nm.classify(True, b".encfs") is nm.Kind.CONTROL
    assert nm.classify(False, b".encfs") is nm.Kind.OBJECT
    with pytest.raises(nm.NameError_) as e:
        nm.check_name(False, b"n" * 256, creating=True)
    assert e.value.errno == errno.ENAMETOOLONG


@both_name_modes
def test_255_byte_names_through_every_operation(encrypted_mount):
    m = encrypted_mount
    mp, bd = m.mountpoint, m.backing
    data = os.urandom(20000)
    # create, open, read
    write(f"{mp}/{L255}", data)
    assert read(f"{mp}/{L255}") == data
    h = data_name(m, L255)
    assert backing_entries(bd) == sorted([".encfs", h, h + S, h + ".name"])
    assert h == long_form(L255) or m.encrypted_names
    assert read(f"{bd}/{h}.name") == stored_name(m, L255)
    assert read(f"{bd}/{h}.name") == L255.encode() or m.encrypted_names
    assert read(f"{bd}/{h}") != data[:100]  # encrypted like any file
    # readdir and stat
    assert os.listdir(mp) == [L255]
    assert os.stat(f"{mp}/{L255}").st_size == len(data)
    # xattrs on a long-named file
    os.setxattr(f"{mp}/{L255}", "user.k", b"v")
    assert os.getxattr(f"{mp}/{L255}", "user.k") == b"v"
    # rename long -> short, short -> long, long -> long
    os.rename(f"{mp}/{L255}", f"{mp}/short")
    assert backing_entries(bd) == sorted([".encfs", *entries_of(m, "short")])
    assert len(entries_of(m, "short")) == 2  # stored as itself
    os.rename(f"{mp}/short", f"{mp}/{L249}")
    h249 = data_name(m, L249)
    assert backing_entries(bd) == sorted([".encfs", h249, h249 + S, h249 + ".name"])
    os.rename(f"{mp}/{L249}", f"{mp}/{L255}")
    assert read(f"{mp}/{L255}") == data
    assert os.getxattr(f"{mp}/{L255}", "user.k") == b"v"
    # rename over an existing long name, and RENAME_EXCHANGE-free replace of a short one
    write(f"{mp}/{L249}", b"victim")
    os.rename(f"{mp}/{L255}", f"{mp}/{L249}")
    assert os.listdir(mp) == [L249] and read(f"{mp}/{L249}") == data
    assert backing_entries(bd) == sorted([".encfs", h249, h249 + S, h249 + ".name"])
    # hard links between long and short names
    os.link(f"{mp}/{L249}", f"{mp}/{L255}")
    os.link(f"{mp}/{L249}", f"{mp}/plain")
    assert os.stat(f"{mp}/{L255}").st_nlink == 3
    assert os.stat(f"{mp}/{L255}").st_ino == os.stat(f"{mp}/plain").st_ino
    os.unlink(f"{mp}/{L249}")
    assert read(f"{mp}/{L255}") == data and read(f"{mp}/plain") == data
    os.unlink(f"{mp}/{L255}")
    assert backing_entries(bd) == sorted([".encfs", *entries_of(m, "plain")])
    # directories, nested, and symlinks with long names
    os.mkdir(f"{mp}/{L255}")
    os.mkdir(f"{mp}/{L255}/{L249}")
    write(f"{mp}/{L255}/{L249}/{L255}", b"deep")
    os.symlink(L255, f"{mp}/{L249}")
    assert os.readlink(f"{mp}/{L249}") == L255
    assert sorted(os.listdir(mp)) == sorted([L249, L255, "plain"])
    os.rename(f"{mp}/{L255}", f"{mp}/dir")  # a directory long -> short keeps its content
    assert read(f"{mp}/dir/{L249}/{L255}") == b"deep"
    os.rename(f"{mp}/dir", f"{mp}/{L255}")
    assert read(f"{mp}/{L255}/{L249}/{L255}") == b"deep"
    os.mkfifo(f"{mp}/{L255}/fifo{'f' * 240}")
    os.unlink(f"{mp}/{L255}/fifo{'f' * 240}")
    os.unlink(f"{mp}/{L255}/{L249}/{L255}")
    os.rmdir(f"{mp}/{L255}/{L249}")
    assert os.listdir(f"{mp}/{L255}") == []
    assert backing_entries(m.backing_path(L255)) == []
    os.rmdir(f"{mp}/{L255}")
    os.unlink(f"{mp}/{L249}")
    assert backing_entries(bd) == sorted([".encfs", *entries_of(m, "plain")])
    # names over 255 bytes stay refused, names up to 248 are stored as themselves
    with pytest.raises(OSError) as e:
        write(f"{mp}/{'n' * 256}", b"")
    assert e.value.errno == errno.ENAMETOOLONG
    write(f"{mp}/{SHORT248}", b"s")
    assert sorted(entries_of(m, SHORT248)) == sorted(set(backing_entries(bd))
                                                     - {".encfs", *entries_of(m, "plain")})
    if not m.encrypted_names:  # an encrypted name is longer: 248 bytes make a long one
        assert entries_of(m, SHORT248) == [SHORT248, SHORT248 + S]
    # everything survives a remount
    write(f"{mp}/{L255}", data)
    m.remount()
    assert read(f"{m.mountpoint}/{L255}") == data
    assert sorted(os.listdir(m.mountpoint)) == sorted([L255, SHORT248, "plain"])


def test_path_max_paths(encrypted_mount):
    """A path of PATH_MAX-1 bytes below the mount point works for every operation even
    where the backing path (a longer prefix) would pass PATH_MAX."""
    m = encrypted_mount
    base = m.mountpoint
    comp = "p" * 200  # stored as itself: the backing path is as long plus its prefix
    parts, cur = [], base
    # Directories until the next component would pass PATH_MAX-1 (4095) in the mount.
    while len(cur) + 1 + len(comp) + 1 + 20 < 4095:
        cur = f"{cur}/{comp}"
        os.mkdir(cur)
        parts.append(comp)
    last = "q" * (4095 - len(cur) - 1)
    leaf = f"{cur}/{last}"
    assert len(leaf) == 4095
    write(leaf, b"at PATH_MAX")
    assert read(leaf) == b"at PATH_MAX"
    os.rename(leaf, f"{cur}/r")
    os.rename(f"{cur}/r", leaf)
    os.link(leaf, f"{cur}/hl")
    os.unlink(f"{cur}/hl")
    os.setxattr(leaf, "user.x", b"1")
    assert os.getxattr(leaf, "user.x") == b"1"
    assert os.listdir(cur) == [last]
    os.unlink(leaf)
    os.symlink("t", leaf)
    os.unlink(leaf)
    os.mkdir(leaf)
    os.rmdir(leaf)
    for _ in parts:
        os.rmdir(cur)
        cur = os.path.dirname(cur)
    assert os.listdir(base) == []


@both_name_modes
def test_tools_follow_long_names(encrypted_mount):
    m = encrypted_mount
    mp = m.mountpoint
    data = os.urandom(50000)
    os.mkdir(f"{mp}/{L249}")
    write(f"{mp}/{L249}/{L255}", data)
    write(f"{mp}/{L255}", b"top")
    # inspect and decrypt take the mount path (mapped through the name layer) ...
    info = json.loads(encfs(m, "inspect", f"{mp}/{L249}/{L255}", "--json", *kms(m)).stdout)
    assert info["plaintext_size"] == len(data)
    assert info["backing_path"] == m.backing_path(f"{L249}/{L255}")
    if not m.encrypted_names:
        assert info["backing_path"] == f"{m.backing}/{long_form(L249)}/{long_form(L255)}"
    assert encfs(m, "decrypt", f"{mp}/{L249}/{L255}", *kms(m)).stdout == data
    # ... rekey works through the mount, rewrap on the backing dir
    assert json.loads(encfs(m, "rekey", f"{mp}/{L249}", "--json").stdout)["rekeyed"] == 1
    assert read(f"{mp}/{L249}/{L255}") == data
    assert sorted(os.listdir(f"{mp}/{L249}")) == [L255]  # no rekey temp file left
    res = json.loads(encfs(m, "rewrap", m.backing, "--json", *kms(m)).stdout)
    assert not res["failed"]
    m.unmount()
    # fsck: clean; then a leftover long-name file (a crash before the create) is
    # reported and removed, and an entry whose name file is gone goes to lost+found
    assert json.loads(encfs(m, "fsck", m.backing, "--json", *kms(m)).stdout)["problems"] == []
    orphan = nm.backing_names(b"", b"z" * 250).long_name
    write(os.path.join(m.backing, os.fsdecode(orphan)), b"z" * 250)
    h = data_name(m, L255)
    os.unlink(f"{m.backing}/{h}.name")
    rep = json.loads(encfs(m, "fsck", m.backing, "--json", "--repair", *kms(m), rc=1).stdout)
    kinds = sorted(p["kind"] for p in rep["problems"])
    assert kinds == ["missing-long-name", "orphan-long-name"], rep
    assert not os.path.exists(os.path.join(m.backing, os.fsdecode(orphan)))
    # lost+found holds it under a name the mount shows (encrypted names: lost+found is
    # itself an encrypted name, and so are its entries)
    assert backing_entries(m.backing_path("lost+found")) == \
        sorted(entries_of(m, f"lost+found/unnamed-{h}"))
    if not m.encrypted_names:
        assert backing_entries(f"{m.backing}/lost+found") == [f"unnamed-{h}", f"unnamed-{h}{S}"]
    assert json.loads(encfs(m, "fsck", m.backing, "--json", *kms(m)).stdout)["problems"] == []
    m.mount()
    assert os.listdir(f"{m.mountpoint}/lost+found") == [f"unnamed-{h}"]
    assert read(f"{m.mountpoint}/lost+found/unnamed-{h}") == b"top"
