"""`encfs inspect PATH [--json]` and `encfs decrypt BACKING_FILE`: offline views of a file.

inspect never shows a DEK; decrypt writes plaintext to stdout using only the KMS, for
recovery without a mount.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Sequence

from kms.client import KmsClient, KmsError, KmsUnavailable

from . import format as fmt
from . import names as nm
from . import kmsconn
from .backing import CONTROL_DIR, BackingError, printable, read_sidecar_file
from .cipher import BlockAuthError
from .keys import key_version
from .mounts import backing_path_of
from .namekey import CipherSource
from .offline import plaintext_chunks, read_pair, unwrap


def _when(ns: int) -> str:
    try:
        return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"invalid ({ns} ns)"


def _target(args: argparse.Namespace, backing_file: bytes) -> kmsconn.KmsTarget:
    """The KMS for a backing file: the options, else what its backing dir's mount uses."""
    return kmsconn.target_from_args(args, kmsconn.backing_root_of(backing_file))


def _names(args: argparse.Namespace) -> CipherSource:
    """Name ciphers of backing dirs with encrypted names, from the KMS the options (or the
    backing dir's record) name; asked only for such dirs."""
    return CipherSource(lambda root: kmsconn.connect(kmsconn.target_from_args(args, root)))


def plaintext_of(backing: bytes, names: CipherSource) -> str | None:
    """The plaintext path (from the mount's root) of a backing path, for the tools."""
    root = kmsconn.backing_root_of(backing)
    if root is None:
        return None
    plain = nm.plain_path(root, backing, names(root))
    return None if plain is None else "/" + os.fsdecode(plain)


def resolve(path: str, names: CipherSource, inside: str | None = None) -> bytes:
    """The backing path of a tool's argument: a path in a mount, a backing path, or with
    ``inside`` (a backing dir) a plaintext path from its root."""
    if inside is not None:
        root = os.fsencode(os.path.abspath(inside))
        return nm.backing_path(root, os.fsencode(path), names(root))
    return os.fsencode(backing_path_of(path, names))


def describe(path: str, client: KmsClient | None = None, names: CipherSource | None = None,
             inside: str | None = None) -> dict:
    """What the sidecar and header of ``path`` say; the CMK's alias and state from the KMS
    when a ``client`` is given (KmsUnavailable propagates: the caller says it once); the
    plaintext name through ``names`` (encrypted names)."""
    names = names if names is not None else CipherSource(None)
    backing = resolve(path, names, inside)
    pair = read_pair(backing)
    info: dict = {"path": path, "backing_path": os.fsdecode(backing),
                  "name": plaintext_of(backing, names), "data_file_bytes": pair.size}
    if pair.header is not None:
        info.update(format_version=pair.header.version, block_size=pair.header.block_size,
                    plaintext_size=fmt.plain_size(pair.size, pair.header.block_size),
                    header_file_id=pair.header.file_id.hex())
    else:
        info.update(plaintext_size=0)
    rec = pair.record
    if rec is None:
        info["sidecar"] = None
        return info
    info.update(file_id=rec.file_id.hex(), cmk_id=rec.key_id, key_version=key_version(rec),
                record_sequence=rec.seq, dek_bits=rec.dek_bytes * 8,
                created=_when(rec.created_ns),
                wrapped=_when(rec.wrapped_ns) if rec.wrapped_ns else None)
    if pair.header is not None and pair.header.file_id != rec.file_id:
        info["problem"] = "the sidecar's file id differs from the data file's"
    if client is not None:
        try:
            key = client.describe_key(rec.key_id)
            info.update(cmk_alias=key.get("key_alias"), cmk_state=key.get("key_state"))
        except KmsUnavailable:
            raise
        except KmsError as e:
            info["cmk_error"] = str(e)
    return info


def inspect_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs inspect",
                                description="Show what a file's sidecar and header say "
                                            "(never the DEK).")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a file in a mount, or a backing data file; with --file-id, the "
                        "backing dir or mountpoint to search")
    p.add_argument("--file-id", metavar="HEX",
                   help="list the files with this file id (as `kms audit` shows it)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--in", dest="inside", metavar="BACKING",
                   help="PATH is a plaintext path from the root of backing dir BACKING")
    kmsconn.add_options(p)
    args = p.parse_args(argv)
    if args.file_id:
        return _find_file_id(args.paths, args.file_id, args.json, _names(args))
    out, rc = [], 0
    names = _names(args)
    client: KmsClient | None = None
    try:
        first = (os.path.join(args.inside, "x") if args.inside
                 else backing_path_of(args.paths[0], names))
        client = kmsconn.connect(_target(args, os.fsencode(first)))
    except (kmsconn.KmsConnError, BackingError, KmsError, nm.NameError_) as e:
        print(f"encfs inspect: {e}; showing what the files say without the KMS", file=sys.stderr)
    for path in args.paths:
        try:
            try:
                out.append(describe(path, client, names, args.inside))
            except KmsUnavailable as e:  # said once; the rest without the KMS
                print(f"encfs inspect: {e}; showing what the files say without the KMS",
                      file=sys.stderr)
                client.close()
                client = None
                out.append(describe(path, None, names, args.inside))
        except (BackingError, KmsError, kmsconn.KmsConnError, nm.NameError_) as e:
            print(f"encfs inspect: {printable(path)}: {e}", file=sys.stderr)
            rc = 1
        except (OSError, fmt.FormatError) as e:
            print(f"encfs inspect: {printable(path)}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            rc = 1
    if client is not None:
        client.close()
    if args.json:
        print(json.dumps(out if len(args.paths) > 1 else (out[0] if out else None),
                         indent=1))
    else:
        for info in out:
            width = max(len(k) for k in info)
            print("\n".join(f"{k:<{width}}  {printable(v) if isinstance(v, str) else v}"
                            for k, v in info.items()))
            if len(out) > 1:
                print()
    return rc


def files_with_id(top: str, file_id: bytes, names: CipherSource | None = None) -> list[str]:
    """Backing paths of the data files whose sidecar holds ``file_id`` (hard links: all)."""
    found = []
    backing = os.fsencode(backing_path_of(top, names))
    for dirpath, dirnames, filenames in os.walk(backing):
        dirnames[:] = [d for d in dirnames if d != CONTROL_DIR]
        for name in filenames:
            if not nm.is_sidecar(name):
                continue
            side = os.path.join(dirpath, name)
            try:
                rec = read_sidecar_file(side)  # never follows a link, never blocks
            except (OSError, fmt.FormatError):
                continue
            if rec.file_id == file_id:
                found.append(os.fsdecode(nm.data_of_sidecar(side)))
    return sorted(found)


def _find_file_id(tops: list[str], hex_id: str, as_json: bool, names: CipherSource) -> int:
    try:
        file_id = bytes.fromhex(hex_id)
        if len(file_id) != fmt.FILE_ID_SIZE:
            raise ValueError
    except ValueError:
        print(f"encfs inspect: --file-id takes 32 hex digits, not {printable(hex_id)!r}",
              file=sys.stderr)
        return 2
    try:
        found = [p for top in tops for p in files_with_id(top, file_id, names)]
        # with encrypted names, each with its plaintext path too (from the KMS)
        plain = {p: plaintext_of(os.fsencode(p), names) for p in found}
    except (BackingError, KmsError, kmsconn.KmsConnError, nm.NameError_) as e:
        print(f"encfs inspect: {e}", file=sys.stderr)
        return 2
    shown = {p: n for p, n in plain.items() if n is not None and not p.endswith(n)}
    if as_json:
        print(json.dumps([{"backing_path": p, "name": plain[p]} for p in found]
                         if shown else found, indent=1))
    else:
        print("\n".join(printable(p) + (f"  ({printable(shown[p])})" if p in shown else "")
                        for p in found))
    return 0 if found else 1


def decrypt_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs decrypt",
                                description="Write the plaintext of a backing data file to "
                                            "stdout, using only the KMS (no mount).")
    p.add_argument("backing_file", help="a backing data file, or a file in a mount")
    p.add_argument("--in", dest="inside", metavar="BACKING",
                   help="the file is given by its plaintext path from the root of BACKING "
                        "(encrypted names: found with the KMS)")
    kmsconn.add_options(p)
    args = p.parse_args(argv)
    try:
        path = resolve(args.backing_file, _names(args), args.inside)
    except (BackingError, KmsError, kmsconn.KmsConnError, nm.NameError_, OSError) as e:
        print(f"encfs decrypt: {printable(args.backing_file)}: "
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    try:
        pair = read_pair(path)
        if pair.header is None:
            return 0
        if pair.record is None:
            raise fmt.FormatError(f"no sidecar {os.fsdecode(nm.sidecar_of(path))}")
        if pair.record.file_id != pair.header.file_id:
            raise fmt.FormatError("the sidecar belongs to another file (file id mismatch)")
        with kmsconn.connect(_target(args, path)) as c:
            dek = unwrap(c, pair.record)
        out = sys.stdout.buffer
        for chunk in plaintext_chunks(pair, dek):
            out.write(chunk)
        out.flush()
    except kmsconn.KmsConnError as e:
        print(f"encfs decrypt: {e}", file=sys.stderr)
        return 1
    except (OSError, fmt.FormatError, KmsError) as e:
        print(f"encfs decrypt: {printable(args.backing_file)}: "
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    except BlockAuthError as e:
        print(f"encfs decrypt: {printable(args.backing_file)}: {e}; output stops before it",
              file=sys.stderr)
        return 1
    return 0
