"""Runs last (files run in name order): no test may leave a mount or a daemon behind."""

import os

from conftest import fuse_mounts_of_this_run


def _proc_info(pid: str) -> tuple[str, str, str] | None:
    """(state, ppid, command line) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return state, ppid, cmd


def _our_live_daemons() -> list[str]:
    """Live children of this pytest process that are a KMS or an encfs mount."""
    me = str(os.getpid())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        info = _proc_info(pid)
        if info is None:
            continue
        state, ppid, cmd = info
        if ppid == me and state != "Z" and ("kms serve" in cmd or "encfs mount" in cmd):
            found.append(f"{pid}: {cmd}")
    return found


def test_no_fuse_mount_left_behind():
    assert fuse_mounts_of_this_run() == []


def test_no_daemon_left_behind():
    assert _our_live_daemons() == []
