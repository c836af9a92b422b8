"""The mount(8) helper: ``encfs BACKING MOUNTPOINT -o OPTIONS`` (as mount.fuse3 runs it for
a ``fuse.encfs`` fstab line) and ``mount.fuse.encfs BACKING MOUNTPOINT -o OPTIONS`` (as
mount(8) runs /sbin/mount.fuse.encfs). The options become `encfs mount` flags
(encfs/fstab.py); the mount itself is `encfs mount`'s, in the background: the helper
returns once the mountpoint is live, and `umount MOUNTPOINT` ends the daemon.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from . import fstab, mount


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mount.fuse.encfs BACKING MOUNTPOINT [-sfnv] [-o OPTIONS]\n"
              "options: " + ", ".join(f"{k}=..." for k in fstab.VALUE_OPTIONS) + ", "
              + ", ".join(fstab.FLAG_OPTIONS) + ", and FUSE's: "
              + ", ".join(sorted(fstab.FUSE_OPTIONS)) + " (docs: README, fstab section)")
        return 0 if argv else 2
    try:
        call = fstab.parse_helper_args(argv)
        mount_argv = fstab.translate(call)
    except fstab.OptionError as e:
        print(f"encfs: {e}", file=sys.stderr)
        return 1
    if call.verbose or call.fake:
        print("encfs mount " + shlex.join(mount_argv), file=sys.stderr)
    if call.fake:
        return 0
    return mount.main(mount_argv)
