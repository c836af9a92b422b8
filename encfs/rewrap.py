"""`encfs rewrap BACKING [--to-key K] [--path SUBTREE]`: re-wrap every file's DEK.

The KMS's `re-encrypt` moves each wrapped DEK to the newest version of its CMK, or to
another CMK, without the plaintext DEK ever leaving the KMS and without touching any data
block. Each sidecar is rewritten in place (the other slot, then fsync), so a crash at any
instant leaves every file readable, and running the command again finishes the job:
files already under the target key version are skipped. Works on a mounted or unmounted
backing dir.

Wrapped DEKs are opaque: which version of its CMK wrapped one is recorded in the sidecar
(docs/FORMAT.md), and the CMK's current version comes from Huawei's public
get-key-rotation-status. Where the KMS does not say (a grantee may not ask), every DEK is
re-encrypted: never skipped on a guess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

from kms.client import KmsClient, KmsError, KmsUnavailable

from . import backing as bk
from . import format as fmt
from . import kmsconn
from . import names as nm
from . import namekey
from .keys import ROTATION_STATUS, file_aad, version_of
from .mounts import backing_path_of
from .xattrs import DIR_RECORD_XATTR


@dataclass
class RewrapSummary:
    rewrapped: int = 0
    current: int = 0
    failed: list[str] = field(default_factory=list)


def sidecars_under(backing: bytes, top: bytes) -> Iterator[bytes]:
    """Every sidecar below ``top``, once per inode (hard links share one)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == backing:
            dirnames[:] = [d for d in dirnames if d != bk.CONTROL_DIR]
        for name in filenames:
            if not nm.is_sidecar(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                yield path


def dirs_with_records(backing: bytes, top: bytes) -> Iterator[bytes]:
    """Every directory below ``top`` (itself included) that has a key record for its
    ``user.*`` values (docs/FORMAT.md, "Directory keys")."""
    for dirpath, dirnames, _ in os.walk(top):
        if dirpath == backing:
            dirnames[:] = [d for d in dirnames if d != bk.CONTROL_DIR]
        try:
            if os.fsdecode(DIR_RECORD_XATTR) in os.listxattr(dirpath, follow_symlinks=False):
                yield dirpath
        except OSError:
            continue


def rewrite_dir_record(dirpath: bytes,
                       update: Callable[[fmt.KeyRecord], fmt.KeyRecord | None]) -> fmt.KeyRecord | None:
    """`rewrite_record` for a directory's record: the new value (old record kept in the
    other slot) replaces the attribute in one setxattr, which is atomic."""
    data = os.getxattr(dirpath, DIR_RECORD_XATTR, follow_symlinks=False)
    new = update(fmt.decode_sidecar(data))
    if new is None:
        return None
    off, slot, written = fmt.next_slot_write(data, new)
    value = bytearray(data)
    value[off:off + len(slot)] = slot
    upgrade = fmt.upgrade_head(data)  # one setxattr: slot and head change together
    if upgrade is not None:
        value[upgrade[0]:upgrade[0] + len(upgrade[1])] = upgrade[1]
    os.setxattr(dirpath, DIR_RECORD_XATTR, bytes(value), os.XATTR_REPLACE, follow_symlinks=False)
    return written


def rewrite_record(side: bytes,
                   update: Callable[[fmt.KeyRecord], fmt.KeyRecord | None]) -> fmt.KeyRecord | None:
    """Rewrite a sidecar's record in place: ``update(record)`` gives the new record, or
    None to leave it. Writes the other slot and fsyncs, so a torn write keeps the old."""
    fd = bk.open_regular(side, os.O_RDWR, what="sidecar")  # no links, no FIFOs
    try:
        data = os.pread(fd, fmt.SIDECAR_SIZE + 1, 0)
        new = update(fmt.decode_sidecar(data))
        if new is None:
            return None
        off, slot, written = fmt.next_slot_write(data, new)
        os.pwrite(fd, slot, off)
        os.fsync(fd)
        upgrade = fmt.upgrade_head(data)
        if upgrade is not None:  # only once the new slot is durable (see fmt.upgrade_head)
            os.pwrite(fd, upgrade[1], upgrade[0])
            os.fsync(fd)
        return written
    finally:
        os.close(fd)


class Rewrapper:
    def __init__(self, client: KmsClient, to_key: str | None):
        self.client = client
        self.to_key = to_key
        #: CMK id -> its current version (0: the KMS does not say), asked once per run.
        #: A rotation during the run only makes records claim an older version than the
        #: true one: the next run re-encrypts those again, nothing is skipped wrongly.
        self.versions: dict[str, int] = {}

    def version(self, key_id: str) -> int:
        if key_id not in self.versions:
            try:
                self.versions[key_id] = version_of(
                    self.client.call(ROTATION_STATUS, {"key_id": key_id}))
            except KmsUnavailable:
                raise
            except KmsError:
                self.versions[key_id] = 0
        return self.versions[key_id]

    def rewrap(self, rec: fmt.KeyRecord) -> fmt.KeyRecord | None:
        dest = self.to_key or rec.key_id
        version = self.version(dest)
        if rec.key_id == dest and version and rec.key_version == version:
            return None
        reply = self.client.call("re-encrypt", {
            "cipher_text": rec.cipher_text, "source_key_id": rec.key_id,
            "destination_key_id": dest, "datakey_cipher_length": str(rec.dek_bytes),
            "source_additional_authenticated_data": file_aad(rec.file_id),
            "destination_additional_authenticated_data": file_aad(rec.file_id)})
        return dataclasses.replace(rec, key_id=reply["key_id"],
                                   wrapped_dek=bytes.fromhex(reply["cipher_text"]),
                                   wrapped_ns=time.time_ns(), key_version=version)


def run(backing: bytes, top: bytes, client: KmsClient, to_key: str | None,
        progress: bool = False) -> RewrapSummary:
    summary = RewrapSummary()
    rewrapper = Rewrapper(client, to_key)
    paths = list(sidecars_under(backing, top))
    if top == backing and os.path.lexists(namekey.record_path(backing)):
        paths.append(namekey.record_path(backing))  # encrypted names: the name key too
    dirs = list(dirs_with_records(backing, top))
    for i, side in enumerate(paths + dirs, 1):
        rel = bk.printable(os.path.relpath(side, backing))
        rewrite = rewrite_record if i <= len(paths) else rewrite_dir_record
        try:
            if rewrite(side, rewrapper.rewrap) is None:
                summary.current += 1
            else:
                summary.rewrapped += 1
        except FileNotFoundError:
            pass  # removed or renamed through the mount while we walked
        except KmsUnavailable:
            if progress:
                print(file=sys.stderr)
            raise  # one line from main, not one per remaining file
        except (KmsError, fmt.FormatError) as e:
            summary.failed.append(f"{rel}: {e}")
        except OSError as e:
            summary.failed.append(f"{rel}: {e.strerror or e}")
        except (ValueError, KeyError, TypeError) as e:  # a reply we cannot use
            summary.failed.append(f"{rel}: unexpected KMS reply: {type(e).__name__}")
        if progress:
            print(f"\rrewrap: {i}/{len(paths)} files", end="", file=sys.stderr, flush=True)
    if progress and paths:
        print(file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs rewrap", description=__doc__.split("\n\n")[0])
    p.add_argument("backing")
    p.add_argument("--to-key", help="move every DEK to this CMK (id or alias); default: "
                   "the newest version of each file's own CMK")
    p.add_argument("--path", help="only this subtree (a backing or mounted path)")
    p.add_argument("--json", action="store_true")
    kmsconn.add_options(p)
    args = p.parse_args(argv)
    backing = os.fsencode(os.path.abspath(args.backing))
    top = backing
    if args.path:
        # a mounted path with encrypted names is mapped with the name key (from the KMS)
        names = namekey.CipherSource(
            lambda root: kmsconn.connect(kmsconn.target_from_args(args, root)))
        try:
            top = os.fsencode(os.path.abspath(backing_path_of(args.path, names)))
        except (bk.BackingError, KmsError, kmsconn.KmsConnError, nm.NameError_,
                OSError) as e:
            print(f"encfs rewrap: {bk.printable(args.path)}: "
                  f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
    if not os.path.isdir(backing) or not os.path.isdir(top):
        print(f"encfs rewrap: {bk.printable(top)} is not a directory", file=sys.stderr)
        return 2
    if not (top + b"/").startswith(backing + b"/"):
        print("encfs rewrap: --path must lie inside BACKING", file=sys.stderr)
        return 2
    try:
        target = kmsconn.target_for_tool(args, backing)
        with kmsconn.connect(target) as client:
            to_key = client.resolve_key(args.to_key)["key_id"] if args.to_key else None
            summary = run(backing, top, client, to_key,
                          progress=sys.stderr.isatty() and not args.json)
    except kmsconn.KmsConnError as e:
        print(f"encfs rewrap: {e}", file=sys.stderr)
        return 2
    except KmsError as e:
        print(f"encfs rewrap: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(summary), indent=1))
    else:
        for line in summary.failed:
            print(f"failed: {line}")
        print(f"{summary.rewrapped} rewrapped, {summary.current} already current, "
              f"{len(summary.failed)} failed")
    return 1 if summary.failed else 0
