"""`encfs mount` without --foreground: the daemon runs detached; the command returns once
the mountpoint is live, or with the daemon's last log line when it failed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from . import backing as bk
from . import sharedmount
from .mountopts import MountOptions, UserError

READY_TIMEOUT = 30.0
LOG_FILE = "mount.log"


def spawn(opts: MountOptions, backing: bytes, mountpoint: str) -> int:
    """Run the mount in a detached child (the same command with --foreground) and return
    once the mountpoint is live."""
    # Shared mounts of one backing dir run on many hosts: a log file for each host.
    default_log = f"mount-{sharedmount.host_name()}.log" if opts.shared_backing else LOG_FILE
    log_path = opts.log or os.fsdecode(bk.control_path(backing, default_log))
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    with os.fdopen(log_fd, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "encfs", "mount", *opts.argv,
                                 "--foreground"],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            tail = _last_line(log_path)
            raise UserError(f"mount failed: {tail}" if tail else "mount failed")
        if time.monotonic() > deadline:
            proc.kill()
            raise UserError(f"mount did not become ready in {READY_TIMEOUT:.0f}s "
                            f"(see {log_path})")
        time.sleep(0.02)
    print(f"mounted {os.fsdecode(backing)} on {mountpoint} (pid {proc.pid}, log {log_path})")
    return 0


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
