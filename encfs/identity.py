"""`encfs mount --user`: the daemon mounts as root, then serves as the user."""

from __future__ import annotations

import os
import pwd

from . import backing as bk
from .mountopts import UserError


def serve_as(user: str, backing: bytes) -> None:
    """Take on ``user``'s identity for everything from here on (all threads: nothing else
    runs yet). The effective uid is what the KMS sees (SO_PEERCRED) and what owns new
    backing files; the saved uid stays root so that the mount can be undone at the end
    (`back_to_root`). The control dir must stay writable (journal, markers)."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        if not user.isdigit():
            raise UserError(f"no such user {user!r}") from None
        uid = gid = int(user)
    ctl = bk.control_path(backing)
    for dirpath, dirnames, filenames in os.walk(ctl):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, uid, gid, follow_symlinks=False)
    os.setgroups([gid])
    os.setresgid(gid, gid, 0)
    os.setresuid(uid, uid, 0)


def back_to_root() -> None:
    """Undo `serve_as` (unmounting a mount made by root needs root)."""
    if os.getresuid()[2] == 0 and os.geteuid() != 0:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)
