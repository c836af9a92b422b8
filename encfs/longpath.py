"""Backing paths longer than PATH_MAX.

The kernel hands the mount paths of up to PATH_MAX-1 bytes below the mount point; the
backing path of the same file is longer by the backing dir's own prefix (and shorter by
every long name, docs/FORMAT.md "Names"), so it can pass PATH_MAX, where every path
syscall fails with ENAMETOOLONG. Such a path is given to the syscalls as
``/proc/self/fd/N/rest``: N an O_PATH descriptor of an ancestor directory whose own path
fits, which the kernel follows like the directory itself. The descriptors are cached by
the ancestor's path and dropped whenever a directory is renamed or removed (a cached one
would then name a directory that moved). Paths that fit, all but the rarest, pass through
untouched.
"""

from __future__ import annotations

import os

PATH_MAX = 4096
#: the longest ancestor path we open; the rest after it must fit behind /proc/self/fd/N/
_HEAD_MAX = PATH_MAX - 64


class LongPaths:
    def __init__(self, limit: int = PATH_MAX):
        self._limit = limit
        self._fds: dict[bytes, int] = {}

    def short(self, path: bytes) -> bytes:
        """A path naming what ``path`` names that fits in PATH_MAX."""
        while len(path) >= self._limit:
            cut = path.rfind(b"/", 0, min(_HEAD_MAX, self._limit - 64))
            if cut <= 0:
                raise OSError(36, "File name too long", path[:64])
            head, rest = path[:cut], path[cut + 1:]
            fd = self._fds.get(head)
            if fd is None:
                fd = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._fds[head] = fd
            path = b"/proc/self/fd/%d/%s" % (fd, rest)
        return path

    def invalidate(self) -> None:
        """A directory moved or went away: no cached ancestor may be trusted."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
