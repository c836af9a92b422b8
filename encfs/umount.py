"""`encfs umount MOUNTPOINT`: unmount an encfs mount and wait for its daemon to end."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Sequence


def _unescape_mounts(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_encfs_mount(mountpoint: str) -> bool:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if _unescape_mounts(fields[1]) == mountpoint and fields[2] == "fuse.encfs":
                return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs umount", description="Flush and unmount.")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    mountpoint = os.path.abspath(args.mountpoint)
    if not is_encfs_mount(mountpoint):
        print(f"encfs umount: {mountpoint} is not an encfs mount", file=sys.stderr)
        return 1
    pid = _daemon_pid(mountpoint)
    res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
        print(f"encfs umount: {msg}", file=sys.stderr)
        return 1
    if pid:
        _wait_gone(pid, 15.0)
    return 0


def _daemon_pid(mountpoint: str) -> int | None:
    """The pid of the daemon serving ``mountpoint``: the mount daemon answers the
    control xattr with it."""
    try:
        return int(os.getxattr(mountpoint, "user.encfs.pid"))
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.02)
