"""Layer 3: `encfs mount --shared-backing` on two clients of one real GlusterFS volume,
standing in for two hosts, against one KMS: docs/SHARED.md claim by claim (each test
names the claim it checks).

One volume for the module (set up as docs/SHARED.md says); each test works in its own
backing dir on it, so tests never see each other's files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from encfs.pytest_plugin import EncryptedMount, running_kms, short_tempdir
from gluster import gluster_volume

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting GlusterFS needs root"),
]


@pytest.fixture(scope="module")
def volume():
    assert shutil.which("glusterd"), "glusterfs-server is not installed (the Makefile installs it)"
    work = short_tempdir("gshared-")
    try:
        with gluster_volume(work, shared=True) as vol, running_kms("kms-gshared-") as kms:
            yield vol, kms, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Hosts:
    """Two shared mounts ("hosts" a and b) of one backing dir on the volume."""

    def __init__(self, vol, kms, work: str, name: str):
        self.vol, self.kms, self.work, self.name = vol, kms, work, name
        os.makedirs(os.path.join(vol.clients[0], name, "backing"))
        self.mounts: dict[str, EncryptedMount] = {}

    def backing(self, host: str) -> str:
        return os.path.join(self.vol.clients["ab".index(host)], self.name, "backing")

    def mount(self, host: str, *extra: str) -> EncryptedMount:
        mnt = os.path.join(self.work, f"mnt-{self.name}-{host}")
        os.makedirs(mnt, exist_ok=True)
        m = EncryptedMount(mountpoint=mnt, backing=self.backing(host), key_id="sfs/default",
                           kms=self.kms, extra_args=["--shared-backing", *extra],
                           log_path=os.path.join(self.work, f"encfs-{self.name}-{host}.log"))
        m.mount()
        self.mounts[host] = m
        return m

    def unmount(self, host: str) -> int | None:
        return self.mounts.pop(host).unmount()

    def close(self) -> None:
        for host in list(self.mounts):
            self.unmount(host)


@pytest.fixture
def hosts(volume, request):
    vol, kms, work = volume
    h = Hosts(vol, kms, work, request.node.name.replace("[", "-").replace("]", ""))
    try:
        yield h
    finally:
        h.close()


def _fsck(backing: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encfs", "fsck", backing],
                          capture_output=True, text=True, timeout=300)


def _assert_fsck_clean(backing: str) -> None:
    res = _fsck(backing)
    assert res.returncode == 0, res.stdout + res.stderr


SIZES = [0, 1, 100, 4095, 4096, 16383, 16384, 16385, 100_000, 1 << 20, 3 * (1 << 20) + 7]


def test_close_to_open_both_ways(hosts):
    """Claim "close-to-open": what one host wrote and closed, the other reads at its next
    open, for files of many sizes, both ways, while both stay mounted."""
    a, b = hosts.mount("a"), hosts.mount("b")
    for i, size in enumerate(SIZES):
        data = os.urandom(size)
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        with open(os.path.join(src.mountpoint, f"f{size}"), "wb") as f:
            f.write(data)
        with open(os.path.join(dst.mountpoint, f"f{size}"), "rb") as f:
            assert f.read() == data, size
    # Overwritten in place on one host, read again on the other.
    path = "f100000"
    with open(os.path.join(b.mountpoint, path), "r+b") as f:
        f.seek(50_000)
        f.write(b"X" * 20_000)
    got = open(os.path.join(a.mountpoint, path), "rb").read()
    assert got[50_000:70_000] == b"X" * 20_000 and len(got) == 100_000
    assert sorted(os.listdir(a.mountpoint)) == sorted(os.listdir(b.mountpoint))
    hosts.close()
    _assert_fsck_clean(hosts.backing("a"))


def test_exclusive_and_shared_mounts_exclude_each_other(hosts):
    """Claim "every mount says --shared-backing": a default mount is refused while shared
    ones run, and a shared one while a default one runs; one line, no traceback."""
    hosts.mount("a")
    mnt, other = (os.path.join(hosts.work, f"mnt-{hosts.name}-{x}") for x in "xy")
    os.makedirs(mnt)
    os.makedirs(other)

    def try_mount(backing: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "encfs", "mount", backing, other, "--kms-socket",
             hosts.kms.socket_path, "--project-id", hosts.kms.project_id, "--foreground",
             *extra], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    res = try_mount(hosts.backing("b"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "in use by encfs mounts with --shared-backing" in res.stderr
    hosts.unmount("a")
    excl = EncryptedMount(mountpoint=mnt, backing=hosts.backing("a"), key_id="sfs/default",
                          kms=hosts.kms, log_path=os.path.join(hosts.work, "excl.log"))
    excl.mount()
    try:
        res = try_mount(hosts.backing("b"), "--shared-backing")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert "mounted without --shared-backing" in res.stderr
    finally:
        assert excl.unmount() == 0
