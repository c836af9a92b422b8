"""After an unclean stop, after the journal's replay: remove what the step in flight
could leave in the backing tree by design, so that `encfs fsck` finds nothing.

Creates and unlinks are not journaled (a record per create would cost a write on the
busiest path): a create puts the key sidecar (and a long name's `.name` file) in place
before the data file, an unlink removes them after it (docs/CONSISTENCY.md). A kill in
between leaves a sidecar without its data file, or a long-name file without its entry,
which the mount never shows and fsck reports as `orphan-sidecar` / `orphan-long-name`.
Renames are journaled and replayed before this runs, so after the replay a sidecar
without its data file can only be such a leftover: it is removed (it holds a wrapped DEK
of a file that no longer exists), and so is a long-name file without its entry (it
holds nothing but a name).

One walk of the backing tree, listings only (no file is read), on directory fds (no
PATH_MAX limit, no symlink followed). Never raises: a directory it cannot read is
reported and skipped.
"""

from __future__ import annotations

import os
import stat

from . import backing as bk
from . import names as nm
from .text import printable

#: what fsck --repair keeps in the backing root; not ours to sweep
LOST_FOUND = b"lost+found"


def sweep(backing: bytes) -> list[str]:
    """Remove the leftovers of an interrupted create or unlink; one line per kind removed
    (counts only: no name reaches the log) and one per error."""
    done: list[str] = []
    sidecars = long_names = 0

    def onerror(e: OSError) -> None:
        done.append(f"could not list {printable(e.filename or b'')}: "
                    f"{e.strerror}")

    for dirpath, dirnames, filenames, dir_fd in os.fwalk(backing, onerror=onerror):
        at_root = dirpath == backing
        if at_root:
            dirnames[:] = [d for d in dirnames if d not in (bk.CONTROL_DIR, LOST_FOUND)]
        present = set(dirnames) | set(filenames)
        for name in filenames:
            kind = nm.classify(at_root, name)
            if kind is nm.Kind.SIDECAR:
                orphan = nm.data_of_sidecar(name) not in present
            elif kind is nm.Kind.LONG_NAME:
                orphan = nm.object_of(name) not in present
            else:
                continue
            if not orphan:
                continue
            try:
                if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    continue  # not made by encfs: fsck's to judge
                os.unlink(name, dir_fd=dir_fd)
            except OSError as e:
                done.append(f"could not remove {printable(os.path.join(dirpath, name))}: "
                            f"{e.strerror}")
                continue
            if kind is nm.Kind.SIDECAR:
                sidecars += 1
            else:
                long_names += 1
    if sidecars:
        done.append(f"removed {sidecars} key sidecar(s) of an interrupted create or unlink")
    if long_names:
        done.append(f"removed {long_names} long-name file(s) of an interrupted create, "
                    "rename or unlink")
    return done
