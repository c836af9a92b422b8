"""fsync through the mount makes a new file durable: its data, its sidecar (the wrapped DEK)
and its directory entries survive a power cut.

The backing dir is on an ext4 image, loop-mounted with data=writeback (so that no journal
commit writes file data for us: only encfs's own fsyncs do). After the fsyncs, the image is
copied while everything is still mounted: the copy holds what the disk held, i.e. what a
power cut at that moment would leave. The copy, mounted (its journal replayed), must
decrypt to exactly what was written. A SIGKILL test cannot see a missing fsync (the page
cache survives a killed process); this one does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from encfs.pytest_plugin import make_mount, short_tempdir

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounting an image needs root")]

IMAGE_MB = 64


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_disk(image: str, where: str) -> None:
    with open(image, "wb") as f:
        f.truncate(IMAGE_MB << 20)
    sh("mkfs.ext4", "-q", "-F", image)
    os.makedirs(where)
    sh("mount", "-o", "loop,data=writeback", image, where)


def test_fsynced_new_files_survive_a_power_cut(kms_server):
    work = short_tempdir("encfs-power-")
    disk, copy = os.path.join(work, "disk"), os.path.join(work, "copy")
    mounted = []
    m = None
    try:
        make_disk(os.path.join(work, "disk.img"), disk)
        mounted.append(disk)
        m = make_mount(kms_server, disk)
        files = {f"f{i}": os.urandom(5000 + 7777 * i) for i in range(6)}
        os.mkdir(f"{m.mountpoint}/sub")
        files["sub/g"] = os.urandom(30000)
        for name, data in files.items():
            with open(f"{m.mountpoint}/{name}", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        # The power cut: what the disk holds now (the loop device's writes are in the
        # image file), taken while encfs and the ext4 are still mounted.
        shutil.copyfile(os.path.join(work, "disk.img"), os.path.join(work, "copy.img"))
        m.unmount()
        m = None
        sh("umount", disk)
        mounted.remove(disk)
        os.makedirs(copy)
        sh("mount", "-o", "loop", os.path.join(work, "copy.img"), copy)  # replays its journal
        mounted.append(copy)
        for name, data in files.items():
            res = subprocess.run([sys.executable, "-m", "encfs", "decrypt",
                                  os.path.join(copy, "backing", name), "--kms-socket",
                                  kms_server.socket_path, "--project-id", kms_server.project_id],
                                 capture_output=True, timeout=60)
            assert res.returncode == 0, (name, res.stderr.decode(errors="replace"))
            assert res.stdout == data, (name, len(res.stdout), len(data))
    finally:
        if m is not None:
            m.unmount()
        for point in reversed(mounted):
            subprocess.run(["umount", point], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
