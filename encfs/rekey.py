"""`encfs rekey PATH`: give a file, or every file of a tree, a new DEK and file id.

For when a DEK itself may have been exposed (rewrap only changes how the DEK is wrapped).
It works through the mount: each file is copied, with its mode, owner, times and
extended attributes, into a temporary file beside it (which gets a fresh DEK from the
KMS), fsynced, and renamed over the original. A crash leaves either the old or the new
file under the name (and, at worst, a `.encfs-rekey-*` temporary file to delete). Files
with several hard links are skipped: a copy would split them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from .mounts import encfs_mounts

TMP_PREFIX = ".encfs-rekey-"


@dataclass
class RekeySummary:
    rekeyed: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def files_under(top: str) -> Iterator[str]:
    if not os.path.isdir(top) or os.path.islink(top):
        yield top
        return
    for dirpath, _, filenames in os.walk(top):
        for name in sorted(filenames):
            if not name.startswith(TMP_PREFIX):
                yield os.path.join(dirpath, name)


def rekey_file(path: str) -> bool:
    """Re-create one file with a new DEK; False when it is skipped (not a regular file or
    hard-linked)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        return False
    tmp = os.path.join(os.path.dirname(path), TMP_PREFIX + secrets.token_hex(6))
    try:
        with open(path, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            shutil.copystat(path, tmp, follow_symlinks=False)  # mode, times, xattrs
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
                os.chmod(tmp, stat.S_IMODE(st.st_mode))  # chown clears set-id bits
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(dst.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def in_mount(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")
               for m in encfs_mounts())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs rekey", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="a file or directory in a mount")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    summary = RekeySummary()
    for top in args.paths:
        if not in_mount(top):
            print(f"encfs rekey: {top} is not inside a mounted encfs (mount it first: rekey "
                  "works through the mount)", file=sys.stderr)
            return 2
        paths = list(files_under(top))
        progress = sys.stderr.isatty() and not args.json
        for i, path in enumerate(paths, 1):
            try:
                if rekey_file(path):
                    summary.rekeyed += 1
                else:
                    summary.skipped.append(f"{path}: hard-linked or not a regular file")
            except OSError as e:
                summary.failed.append(f"{path}: {e.strerror or e}")
            if progress:
                print(f"\rrekey: {i}/{len(paths)} files", end="", file=sys.stderr, flush=True)
        if progress and paths:
            print(file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(summary), indent=1))
    else:
        for line in summary.skipped:
            print(f"skipped: {line}")
        for line in summary.failed:
            print(f"failed: {line}")
        print(f"{summary.rekeyed} rekeyed, {len(summary.skipped)} skipped, "
              f"{len(summary.failed)} failed")
    return 1 if summary.failed else 0
