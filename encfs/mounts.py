"""Which encfs mounts exist: read from /proc/self/mounts (fsname = backing dir), and the
device number of one (from /proc/self/mountinfo)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

FSTYPE = "fuse.encfs"


@dataclass(frozen=True)
class MountEntry:
    backing: str
    mountpoint: str
    options: str = ""  # as the kernel reports them (mount and FUSE options)


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def encfs_mounts() -> list[MountEntry]:
    with open("/proc/self/mounts") as f:
        rows = [line.split() for line in f]
    return [MountEntry(_unescape(r[0]), _unescape(r[1]), r[3]) for r in rows if r[2] == FSTYPE]


def mount_of_mountpoint(mountpoint: str) -> MountEntry | None:
    mountpoint = os.path.abspath(mountpoint)
    return next((m for m in encfs_mounts() if m.mountpoint == mountpoint), None)


def mount_of_backing(backing: str) -> MountEntry | None:
    backing = os.path.realpath(backing)
    return next((m for m in encfs_mounts() if os.path.realpath(m.backing) == backing), None)


def backing_path_of(path: str, cipher_of=None) -> str:
    """Map a path inside an encfs mount to its backing path; other paths are returned as
    they are (already a backing path). ``cipher_of(backing_root)`` gives the name cipher
    of a backing dir with encrypted names (None: plaintext names)."""
    real = os.path.realpath(path)
    best = None
    for m in encfs_mounts():
        if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/"):
            if best is None or len(m.mountpoint) > len(best.mountpoint):
                best = m
    if best is None:
        return path
    from .names import backing_path  # each name through the name layer (long names)
    rel = os.path.relpath(real, best.mountpoint)
    root = os.fsencode(best.backing)
    cipher = cipher_of(root) if cipher_of is not None else None
    return os.fsdecode(backing_path(root, os.fsencode(rel), cipher))


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, "major:minor") of every mount, oldest first."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]  # optional fields end with a lone "-"
            rows.append((_unescape(fields[4]), fstype, fields[2]))
    return rows


def device_of_mountpoint(mountpoint: str) -> str | None:
    """The "major:minor" of the newest encfs mount on ``mountpoint``, found without a
    stat(2), which a daemon cannot do on its own mount before it serves requests."""
    mountpoint = os.path.abspath(mountpoint)
    found = [dev for point, fstype, dev in _mountinfo()
             if point == mountpoint and fstype == FSTYPE]
    return found[-1] if found else None


#: Filesystems whose files only processes on this machine can change.
LOCAL_FSTYPES = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "jfs", "reiserfs",
                 "bcachefs", "zfs"}


def fs_type_of(path: str | bytes) -> str | None:
    """The type of the filesystem that holds ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(os.fsdecode(path))
    best, best_type = "", None
    for point, fstype, _ in _mountinfo():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type
