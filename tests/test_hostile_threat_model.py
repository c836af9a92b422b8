"""The claims of docs/SECURITY.md that no other test pins down: what an attacker with write
access to the backing dir can do *undetected* (whole-file rollback, deletion, swapping
whole files, holes, truncation at block boundaries), what the backing dir shows in the
clear, and what the KMS audit log does not see (reads served from cached DEKs).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import running_kms, temporary_mount

pytestmark = pytest.mark.fuse

S = fmt.SIDECAR_SUFFIX
BS = fmt.DEFAULT_BLOCK_SIZE
CBS = BS + fmt.BLOCK_OVERHEAD


@pytest.fixture(scope="module")
def kms():
    with running_kms("encfs-tm-kms-") as server:
        yield server


@pytest.fixture
def m(kms):
    with temporary_mount(kms, "encfs-tm-") as mount:
        yield mount


def put(m, name: str, data: bytes) -> None:
    with open(os.path.join(m.mountpoint, name), "wb") as f:
        f.write(data)


def get(m, name: str) -> bytes:
    with open(os.path.join(m.mountpoint, name), "rb") as f:
        return f.read()


def save(m, name: str) -> tuple[bytes, bytes]:
    return (open(m.backing_path(name), "rb").read(), open(m.backing_path(name + S), "rb").read())


def restore(m, name: str, halves: tuple[bytes, bytes]) -> None:
    for suffix, data in zip(("", S), halves):
        with open(m.backing_path(name + suffix), "wb") as f:
            f.write(data)


def test_metadata_visible_in_the_backing_dir(m):
    os.makedirs(f"{m.mountpoint}/projects/2024")
    put(m, "projects/2024/salaries.xlsx", b"s" * 10000)
    os.link(f"{m.mountpoint}/projects/2024/salaries.xlsx", f"{m.mountpoint}/hardlink")
    os.symlink("/home/alice/secret-plans.txt", f"{m.mountpoint}/link")
    os.setxattr(f"{m.mountpoint}/hardlink", "user.classification", b"confidential")
    os.utime(f"{m.mountpoint}/hardlink", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    b = m.backing
    # names and tree shape
    assert os.path.isfile(f"{b}/projects/2024/salaries.xlsx")
    # sizes, up to the per-block overhead
    size = os.path.getsize(f"{b}/projects/2024/salaries.xlsx")
    assert fmt.plain_size(size, BS) == 10000
    # link structure: hard links are hard links of both halves
    assert os.stat(f"{b}/hardlink").st_ino == os.stat(f"{b}/projects/2024/salaries.xlsx").st_ino
    assert os.stat(f"{b}/hardlink{S}").st_ino == \
        os.stat(f"{b}/projects/2024/salaries.xlsx{S}").st_ino
    # symlink targets in the clear
    assert os.readlink(f"{b}/link") == "/home/alice/secret-plans.txt"
    # xattr names in the clear, values encrypted
    assert "user.classification" in os.listxattr(f"{b}/hardlink")
    assert b"confidential" not in os.getxattr(f"{b}/hardlink", "user.classification")
    # timestamps and modes
    assert os.stat(f"{b}/hardlink").st_mtime_ns == 1_600_000_000 * 10**9
    assert os.stat(f"{b}/hardlink").st_mode == os.stat(f"{m.mountpoint}/hardlink").st_mode
    # but not the contents
    assert b"s" * 64 not in open(f"{b}/hardlink", "rb").read()


def test_whole_file_rollback_with_its_sidecar_is_not_detected(m):
    put(m, "ledger", b"balance: 100\n")
    old = save(m, "ledger")
    put(m, "ledger", b"balance: 0 (paid out)\n")
    m.unmount()
    restore(m, "ledger", old)
    m.mount()
    assert get(m, "ledger") == b"balance: 100\n"


def test_rollback_of_the_data_file_alone_is_not_detected(m):
    # The DEK and file id stay the same across writes, so an older data file still
    # authenticates under the current sidecar.
    put(m, "doc", b"version 1 " * 1000)
    old_data = open(m.backing_path("doc"), "rb").read()
    put(m, "doc", b"version 2 " * 1000)
    m.unmount()
    with open(m.backing_path("doc"), "wb") as f:
        f.write(old_data)
    m.mount()
    assert get(m, "doc") == b"version 1 " * 1000


def test_deleting_a_file_with_its_sidecar_is_not_detected(m):
    put(m, "evidence", b"x" * 100)
    m.unmount()
    os.unlink(m.backing_path("evidence"))
    os.unlink(m.backing_path("evidence" + S))
    m.mount()
    assert "evidence" not in os.listdir(m.mountpoint)
    m.unmount()
    res = subprocess.run([sys.executable, "-m", "encfs", "fsck", m.backing, "--no-kms"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout  # nothing records that the file existed
    m.mount()


def test_swapping_two_whole_files_with_their_sidecars_is_not_detected(m):
    put(m, "approved", b"yes")
    put(m, "rejected", b"no")
    m.unmount()
    a, r = save(m, "approved"), save(m, "rejected")
    restore(m, "approved", r)
    restore(m, "rejected", a)
    m.mount()
    assert (get(m, "approved"), get(m, "rejected")) == (b"no", b"yes")


def test_zeroed_block_reads_as_a_hole(m):
    put(m, "f", b"\xaa" * (3 * BS))
    m.unmount()
    with open(m.backing_path("f"), "r+b") as f:
        f.seek(fmt.block_offset(1, BS))
        f.write(bytes(CBS))
    m.mount()
    data = get(m, "f")
    assert data[BS:2 * BS] == bytes(BS)
    assert data[:BS] == data[2 * BS:] == b"\xaa" * BS


def test_truncation_at_a_block_boundary_is_not_detected_mid_block_is(m):
    put(m, "log", b"\xbb" * (3 * BS))
    put(m, "log2", b"\xbb" * (3 * BS))
    m.unmount()
    os.truncate(m.backing_path("log"), fmt.block_offset(2, BS))
    os.truncate(m.backing_path("log2"), fmt.block_offset(2, BS) + 10)
    m.mount()
    assert get(m, "log") == b"\xbb" * (2 * BS)  # silently shorter
    with pytest.raises(OSError) as e:
        get(m, "log2")
    assert e.value.errno == errno.EIO


def test_reads_from_cached_deks_are_not_audited(m, kms):
    put(m, "audited", b"a" * 100)
    m.remount()  # the first open after mount unwraps at the KMS
    fid = fmt.decode_sidecar(open(m.backing_path("audited" + S), "rb").read()).file_id.hex()

    def unwraps() -> int:
        res = subprocess.run([sys.executable, "-m", "kms", "--socket", kms.socket_path,
                              "--project-id", kms.project_id, "--json", "audit", "--aad", fid],
                             capture_output=True, text=True, check=True)
        return sum(r["operation"] == "decrypt-datakey"
                   for r in json.loads(res.stdout)["records"])
    for _ in range(3):
        assert get(m, "audited") == b"a" * 100
        with open(os.path.join(m.mountpoint, "audited"), "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert unwraps() == 1  # three opens within the key cache TTL: one audit record
