"""Claiming a backing dir for a mount: alone (the default) or shared with other mounts on
other hosts (`--shared-backing`, docs/SHARED.md).

``.encfs/lock`` is flocked by every mount: exclusively by a default mount (and by
`encfs fsck`), shared by a shared mount, so shared mounts coexist with each other but not
with an exclusive one. GlusterFS, CephFS and NFSv4 carry flock between clients.

A shared mount works in an **area** of its own, ``.encfs/mounts/<id>/``: its journal
(``journal/``), its spare sidecar inodes and temp files (``tmp/``), and ``lock``, flocked
for the mount's life. The area is removed at a clean unmount. An area whose lock can be
taken belongs to a mount that died (the lock went with its process, or its host): the
mount that takes the lock replays the area's journal, empties it and removes it. Two
mounts can never recover one area: only one gets the lock, and the other finds the area
gone when it gets it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import stat
import time
from dataclasses import dataclass

from . import backing as bk
from . import format as fmt
from .journal_replay import JOURNAL_DIR, pending, replay_dir
from .sharedlock import NAME_SPACE, setlk
from .text import printable

MOUNTS_DIR = "mounts"
AREA_LOCK = "lock"
AREA_ROOT = "root"  # the backing dir's path on the mount's host
NAMES_LOCK = "names.lock"


def mounts_dir(backing: bytes) -> bytes:
    return bk.control_path(backing, MOUNTS_DIR)


@dataclass
class Area:
    """A shared mount's own part of the control dir."""

    path: bytes
    fd: int  # of its flocked lock file

    @property
    def journal_parent(self) -> bytes:
        """Where the journal's ``journal/`` dir lives (journal.Journal's control_dir)."""
        return self.path

    @property
    def tmp(self) -> bytes:
        return os.path.join(self.path, bk.TMP_DIR.encode())


class MountClaim:
    """The claim of one mount on a backing dir; ``shared`` chooses the kind."""

    def __init__(self, backing: bytes, shared: bool):
        self.backing = backing
        self.shared = shared
        self.lock = bk.MountLock(backing)
        self.area: Area | None = None
        self._alone = False

    def acquire(self) -> None:
        """Take ``.encfs/lock``; BackingInUse when a mount of the other kind holds it."""
        if not self.shared:
            self.lock.acquire()
            return
        self._alone = self.lock.acquire_shared()

    def alone(self) -> bool:
        """True if no other mount of any kind used the backing dir when we took the lock.
        Then whatever was left by earlier mounts is garbage."""
        return self._alone

    def recover(self) -> list[str]:
        """Shared mounts: recover the areas of dead mounts. One line per thing done."""
        return recover_dead_areas(self.backing)

    def open_area(self) -> Area:
        """Make this mount's own area and lock it (the serving daemon does this), and
        check the name lock file. BackingError (one line) for anything planted."""
        try:
            return self._open_area()
        except OSError as e:
            raise bk.BackingError(f"cannot make this mount's area in "
                                  f"{printable(mounts_dir(self.backing))}: {e.strerror}") from None

    def _open_area(self) -> Area:
        base = mounts_dir(self.backing)
        os.makedirs(base, mode=0o700, exist_ok=True)
        _check_dir(base)
        names = names_lock_path(self.backing)
        fd = os.open(names, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise bk.BackingError(f"{printable(names)} is not a regular file (something "
                                      "was put in its place); remove it")
        finally:
            os.close(fd)
        ident = f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(base, ident.encode())
        os.mkdir(path, 0o700)
        for sub in (JOURNAL_DIR, bk.TMP_DIR):
            os.mkdir(os.path.join(path, sub.encode()), 0o700)
        fd = os.open(os.path.join(path, AREA_LOCK.encode()),
                     os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{_host()} pid {os.getpid()}\n".encode())
        # The journal names files by absolute path, under this host's path of the backing
        # dir; whoever recovers the area on another host moves them under its own.
        bk.write_file_atomic(self.backing, os.path.join(path, AREA_ROOT.encode()),
                             self.backing)
        self.area = Area(path, fd)
        return self.area

    def release(self, clean: bool = True) -> None:
        """Give up the claim; a clean stop of a shared mount removes its area (its journal
        is empty, its spares are garbage)."""
        if self.area is not None:
            if clean:
                _remove_area(self.area.path)
            os.close(self.area.fd)
            self.area = None
        self.lock.release()


def names_lock_path(backing: bytes) -> bytes:
    return bk.control_path(backing, NAMES_LOCK)


def recover_dead_areas(backing: bytes) -> list[str]:
    """Replay and remove every area whose lock can be taken (its mount is dead)."""
    base = mounts_dir(backing)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    except OSError as e:
        return [f"could not list {printable(base)}: {e.strerror}"]
    done: list[str] = []
    for name in names:
        area = os.path.join(base, name)
        lock_path = os.path.join(area, AREA_LOCK.encode())
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if _older_than_a_start(area):
                _remove_area(area)  # died before it could lock (or half removed)
            continue
        except OSError as e:
            done.append(f"could not open {printable(lock_path)}: {e.strerror}")
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive, or being recovered by another mount
            try:
                if os.lstat(lock_path).st_ino != os.fstat(fd).st_ino:
                    continue  # recovered and removed by another mount meanwhile
            except FileNotFoundError:
                continue
            lines = _replay_alone(backing, os.path.join(area, JOURNAL_DIR.encode()),
                                  _written_under(area))
            ident = name.decode(errors="replace")
            done += [f"mount {ident}: {line}" for line in lines]
            _remove_area(area)
            done.append(f"recovered the area of the dead mount {ident}")
        finally:
            os.close(fd)
    return done


def _written_under(area: bytes) -> bytes | None:
    """The backing dir's path on the host of the area's mount (None: unknown, or ours)."""
    try:
        fd = bk.open_regular(os.path.join(area, AREA_ROOT.encode()), what="area root")
    except (OSError, fmt.FormatError):
        return None
    try:
        root = os.read(fd, 4097)
    finally:
        os.close(fd)
    return root if root.startswith(b"/") and len(root) <= 4096 else None


def _replay_alone(backing: bytes, jdir: bytes, written_under: bytes | None) -> list[str]:
    """Replay a dead mount's journal while no live mount changes any pair: the records
    name pairs that the dead mount had locked, and its locks died with it. All name locks
    at once (the whole lock range of ``names.lock``, waited for): recovery is rare and
    short, pair changes on every host wait for it."""
    if not os.path.isdir(jdir) or not pending(jdir):
        return []
    fd = os.open(names_lock_path(backing), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        setlk(fd, fcntl.F_WRLCK, 0, NAME_SPACE, wait=True)
        return replay_dir(jdir, backing, written_under)
    finally:
        os.close(fd)  # drops the lock


def _older_than_a_start(area: bytes) -> bool:
    """An area without a lock file: a mount between its mkdir and its lock, or one that
    died there. Only an old one is removed (the window is a few syscalls)."""
    try:
        return time.time() - os.lstat(area).st_mtime > 60
    except OSError:
        return False


def _remove_area(path: bytes) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)  # never follows symlinks inside


def _check_dir(path: bytes) -> None:
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise bk.BackingError(f"{printable(path)} is not a directory (a symlink or a file "
                              "was put in its place); remove it")


def host_name() -> str:
    """This host's name as used in area and log names (no '/')."""
    return _host()


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())[:64]
