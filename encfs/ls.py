"""`encfs ls BACKING [PATH] [-R] [--json]`: a backing directory's entries with their
plaintext names, for recovery without a mount (encrypted names: the name key is unwrapped
by the KMS; nothing else is needed).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Iterator, Sequence

from kms.client import KmsError

from . import backing as bk
from . import kmsconn
from . import names as nm
from .namecrypt import NameCipher
from .namekey import offline_cipher

_TYPES = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "link",
          stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block"}


def entries(root: bytes, dirpath: bytes, rel: bytes, cipher: NameCipher | None,
            recursive: bool) -> Iterator[dict]:
    """One dict per entry of backing ``dirpath`` (plaintext path ``rel``): its plaintext
    path (None when its name cannot be read), backing path, type and, for a symlink, its
    plaintext target."""
    try:
        enc = nm.dir_names(root, dirpath, cipher)
    except nm.NameError_:
        yield {"path": None, "backing_path": os.fsdecode(dirpath), "type": "dir",
               "problem": "directory without an id: its names cannot be read"}
        return
    found, unnamed = nm.list_dir(dirpath, dirpath == root, enc=enc)
    rows = [(e.name, e.backing) for e in found] + [(None, b) for b in unnamed]
    rows.sort(key=lambda r: (r[0] is None, r[0] or r[1]))
    for plain, b in rows:
        path = os.path.join(dirpath, b)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        row = {"path": None if plain is None else os.fsdecode(os.path.join(rel, plain)),
               "backing_path": os.fsdecode(path),
               "type": _TYPES.get(stat.S_IFMT(st.st_mode), "other")}
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            try:
                row["target"] = os.fsdecode(target if cipher is None
                                            else cipher.decrypt_target(target))
            except nm.NameDecryptError:
                row["target"] = None
        if plain is None:
            row["problem"] = "name cannot be read (not ours, or damaged)"
        yield row
        if recursive and plain is not None and stat.S_ISDIR(st.st_mode):
            yield from entries(root, path, os.path.join(rel, plain), cipher, recursive)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs ls", description="List a backing directory "
                                "with plaintext names (no mount needed; the KMS unwraps "
                                "the name key of a backing dir with encrypted names).")
    p.add_argument("backing")
    p.add_argument("path", nargs="?", default="",
                   help="a plaintext path from the mount's root (default: the root)")
    p.add_argument("-R", "--recursive", action="store_true")
    p.add_argument("--json", action="store_true")
    kmsconn.add_options(p)
    args = p.parse_args(argv)
    root = os.fsencode(os.path.abspath(args.backing))
    client = None
    try:
        cfg = bk.read_config(bk.control_path(root, bk.CONFIG_NAME))
        if cfg.encrypt_names:
            client = kmsconn.connect(kmsconn.target_from_args(args, root))
        cipher = offline_cipher(root, client)
        rel = os.fsencode(args.path).strip(b"/")
        top = nm.backing_path(root, rel, cipher)
        if not os.path.isdir(top):
            raise bk.BackingError(f"{args.path!r} is not a directory in {bk.printable(root)}")
        rows = list(entries(root, top, b"/" + rel if rel else b"/", cipher, args.recursive))
    except (OSError, bk.BackingError, KmsError, kmsconn.KmsConnError, nm.NameError_) as e:
        where = getattr(e, "filename", None)
        print(f"encfs ls: {bk.printable(where) + ': ' if where else ''}"
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a damaged config.json (fmt.FormatError)
        print(f"encfs ls: {bk.printable(root)}: {e}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        name = bk.printable(r["path"]) if r["path"] is not None else "?"
        extra = f" -> {bk.printable(r['target'])}" if r.get("target") else ""
        print(f"{r['type']:<6} {name}{extra}  [{bk.printable(os.path.relpath(r['backing_path'], os.fsdecode(root)))}]")
    return 0
