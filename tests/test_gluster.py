"""Layer 3 on a real GlusterFS volume mounted by two clients, standing in for two hosts.

What holds today in the default (exclusive) mode: the backing dir's lock is a POSIX lock,
which GlusterFS carries between clients, so a second host's `encfs mount` of the same
backing dir is refused with one clear line instead of corrupting the first host's files;
and what one host wrote through encfs (then unmounted) the other host reads back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from encfs.pytest_plugin import EncryptedMount, running_kms, short_tempdir
from gluster import gluster_volume

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting GlusterFS needs root"),
]


@pytest.fixture(scope="module")
def two_hosts():
    assert shutil.which("glusterd"), "glusterfs-server is not installed (the Makefile installs it)"
    work = short_tempdir("gluster-")
    try:
        with gluster_volume(work) as vol, running_kms("kms-gluster-") as kms:
            yield vol, kms, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mount(kms, client: str, work: str, host: str) -> EncryptedMount:
    backing = os.path.join(client, "backing")
    os.makedirs(backing, exist_ok=True)
    mnt = os.path.join(work, f"mnt-{host}")
    os.makedirs(mnt, exist_ok=True)
    m = EncryptedMount(mountpoint=mnt, backing=backing, key_id="sfs/default", kms=kms,
                       log_path=os.path.join(work, f"encfs-{host}.log"))
    m.mount()
    return m


def test_written_on_one_host_read_on_the_other(two_hosts):
    vol, kms, work = two_hosts
    a = _mount(kms, vol.clients[0], work, "a")
    try:
        with open(os.path.join(a.mountpoint, "report.txt"), "wb") as f:
            f.write(b"quarterly numbers\n" * 1000)
    finally:
        assert a.unmount() == 0
    # The ciphertext reached the other client; the plaintext did not.
    raw = open(os.path.join(vol.clients[1], "backing", "report.txt"), "rb").read()
    assert b"quarterly" not in raw and len(raw) > 18000
    b = _mount(kms, vol.clients[1], work, "b")
    try:
        assert open(os.path.join(b.mountpoint, "report.txt"), "rb").read() == \
            b"quarterly numbers\n" * 1000
    finally:
        assert b.unmount() == 0


def test_second_host_refused_while_first_is_mounted(two_hosts):
    vol, kms, work = two_hosts
    os.makedirs(os.path.join(vol.clients[0], "locked"), exist_ok=True)
    a = _mount(kms, os.path.join(vol.clients[0], "locked"), work, "a2")
    try:
        mnt_b = os.path.join(work, "mnt-b2")
        os.makedirs(mnt_b, exist_ok=True)
        res = subprocess.run(
            [sys.executable, "-m", "encfs", "mount", os.path.join(vol.clients[1], "locked", "backing"),
             mnt_b, "--kms-socket", kms.socket_path, "--project-id", kms.project_id,
             "--key", "sfs/default", "--foreground"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode != 0
        assert "Traceback" not in res.stderr
        assert "already in use by another encfs process" in res.stderr
        assert not os.path.ismount(mnt_b)
        # The first host's mount is untouched.
        with open(os.path.join(a.mountpoint, "still-here"), "w") as f:
            f.write("yes")
        assert open(os.path.join(a.mountpoint, "still-here")).read() == "yes"
    finally:
        assert a.unmount() == 0
