"""`encfs fsck BACKING [--repair] [--json] [--no-kms]`: check, and repair, a backing dir offline.

Exit codes, as fsck(8): 0 clean; 1 problems were found and all repaired; 4 problems
remain; 8 fsck could not run (mounted, no such directory, KMS unreachable).

Repairs never delete user data: halves are re-paired by file id, leftover temporary files
are removed, and what cannot be repaired is moved to ``lost+found/`` in the backing dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from kms.client import KmsClient, KmsError, KmsUnavailable

from . import backing as bk
from . import format as fmt
from . import names as nm
from . import namekey
from .namecrypt import DIR_ID_SIZE, ROOT_DIR_ID, NameCipher
from .mounts import mount_of_backing
from .spares import SPARE_PREFIX
from . import kmsconn
from .offline import Pair, bad_blocks, read_data_header, read_record, unwrap

EXIT_CLEAN, EXIT_REPAIRED, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 4, 8
LOST_FOUND = b"lost+found"
REPORT_DIR = "fsck-reports"


@dataclass
class Problem:
    kind: str
    path: str  # relative to the backing dir
    detail: str
    repaired: str | None = None


@dataclass
class Report:
    backing: str
    files: int = 0
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Encrypted names: each problem's plaintext path, for the printed output only.
        # Not fields, so never in the saved report (it is in the backing dir, which must
        # not show names). Taken when the problem is found, before a repair moves it.
        self.namer: Callable[[bytes], str | None] | None = None
        self.names: dict[int, str | None] = {}

    def add(self, kind: str, path: bytes | str, detail: str) -> Problem:
        p = Problem(kind, os.fsdecode(path), detail)
        self.problems.append(p)
        if self.namer is not None:
            self.names[id(p)] = self.namer(os.fsencode(path))
        return p

    @property
    def exit_code(self) -> int:
        if not self.problems:
            return EXIT_CLEAN
        return EXIT_REPAIRED if all(p.repaired for p in self.problems) else EXIT_PROBLEMS


class Fsck:
    def __init__(self, backing: bytes, client: KmsClient | None, repair: bool,
                 progress: bool = False, encrypted: bool = False,
                 names: NameCipher | None = None):
        self.backing = backing
        #: encrypted names: the name cipher (None with --no-kms: names are then only
        #: checked for what needs no key, the long-name files' hashes)
        self.encrypted = encrypted
        self.names = names
        self.client = client
        self.repair = repair
        self.progress = progress
        self.report = Report(os.fsdecode(backing))
        if names is not None:
            self.report.namer = self._plain
        #: lost+found's backing name in the root (encrypted with the name key)
        self._lost_found_name = (LOST_FOUND if names is None else nm.backing_names(
            backing, LOST_FOUND, nm.DirNames(names, ROOT_DIR_ID)).data)
        self._pair_problems: dict[bytes, Problem] = {}  # data path -> its pairing problem
        self._parked_paths: set[bytes] = set()

    # --- walking ------------------------------------------------------------------------

    def run(self) -> Report:
        data_files: list[bytes] = []
        sidecars: list[bytes] = []
        for dirpath, dirnames, filenames in os.walk(self.backing):
            if dirpath == self.backing:
                dirnames[:] = [d for d in dirnames if d not in (bk.CONTROL_DIR, LOST_FOUND,
                                                                self._lost_found_name)]
            self._check_long_names(dirpath, dirnames + filenames)
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                kind = nm.classify(dirpath == self.backing, name)
                if kind is nm.Kind.SIDECAR:
                    sidecars.append(path)
                elif (kind in (nm.Kind.OBJECT, nm.Kind.LONG_OBJECT) and name in filenames
                      and _is_regular(path)):
                    data_files.append(path)
        total = len(data_files)
        self.report.files = total
        pairs: list[Pair] = []
        for i, path in enumerate(data_files, 1):
            pair = self._check_data_file(path)
            if pair is not None:
                pairs.append(pair)
            if self.progress and (i % 50 == 0 or i == total):
                print(f"\rfsck: {i}/{total} files", end="", file=sys.stderr, flush=True)
        if self.progress and total:
            print(file=sys.stderr)
        self._check_pairing(pairs, sidecars)
        self._check_temp_files()
        self._check_keys(pairs)
        return self.report

    def _plain(self, rel: bytes) -> str | None:
        plain = nm.plain_path(self.backing, os.path.join(self.backing, rel), self.names)
        return None if plain is None else "/" + os.fsdecode(plain)

    def _rel(self, path: bytes) -> bytes:
        return os.path.relpath(path, self.backing)

    def _check_long_names(self, dirpath: bytes, entries: list[bytes]) -> None:
        """Every long-form entry needs its long-name file (else the mount cannot show
        it); a long-name file without its entry is a harmless leftover of a crash."""
        present = set(entries)
        enc = None
        if self.names is not None:
            try:
                enc = nm.dir_names(self.backing, dirpath, self.names)
            except nm.NameError_:
                if any(nm.classify(dirpath == self.backing, n) in
                       (nm.Kind.OBJECT, nm.Kind.LONG_OBJECT) for n in entries):
                    self.report.add("missing-dir-id", self._rel(dirpath),
                                    f"directory without its {os.fsdecode(nm.DIR_ID_XATTR)} "
                                    "(copied without xattrs?): the names in it cannot be "
                                    "read; restore the attribute from a backup")
                return
        for name in entries:
            kind = nm.classify(dirpath == self.backing, name)
            path = os.path.join(dirpath, name)
            if kind is nm.Kind.LONG_OBJECT and (
                    nm.read_long_stored(path, True) is None if self.encrypted and enc is None
                    else nm.read_long_name(path, enc) is None):
                p = self.report.add("missing-long-name", self._rel(path),
                                    "long-name entry without a valid long-name file "
                                    f"{os.fsdecode(name + nm.LONG_NAME_SUFFIX)}: the mount "
                                    "does not show it")
                self._to_lost_found(p, path)
            elif (kind is nm.Kind.OBJECT and enc is not None
                  and nm.plain_of_stored(name, enc) is None):
                self.report.add("undecryptable-name", self._rel(path),
                                "a name that does not decrypt with this backing dir's name "
                                "key (not made by encfs, or damaged): the mount does not "
                                "show it")
            elif kind is nm.Kind.LONG_NAME and nm.object_of(name) not in present:
                p = self.report.add("orphan-long-name", self._rel(path),
                                    "long-name file whose entry is gone (an interrupted "
                                    "create, rename or unlink)")
                if self.repair:
                    os.unlink(path)
                    p.repaired = "removed (it holds nothing but the name)"

    def _check_data_file(self, path: bytes) -> Pair | None:
        rel = self._rel(path)
        try:
            size, header = read_data_header(path)
        except fmt.FormatError as e:
            self._to_lost_found(self.report.add("bad-header", rel, str(e)), path)
            return None
        except OSError as e:
            self.report.add("unreadable", rel, f"cannot read the data file: {e.strerror}")
            return None
        pair = Pair(path, size, header, None)
        if header is not None and fmt.torn_tail(size, header.block_size):
            p = self.report.add("torn-block", rel, "data file ends in a fragment shorter "
                                "than a block's nonce and tag (an interrupted write)")
            self._cut_torn_tail(p, pair)
        try:
            pair.record = read_record(path)
        except fmt.FormatError as e:
            self._pair_problems[path] = self.report.add("bad-sidecar", rel, str(e))
        except OSError as e:
            self._pair_problems[path] = self.report.add(
                "bad-sidecar", rel, f"cannot read the sidecar: {e.strerror}")
        return pair

    # --- pairing ------------------------------------------------------------------------

    def _check_pairing(self, pairs: list[Pair], sidecars: list[bytes]) -> None:
        """Every data file with content needs the sidecar with its file id beside it."""
        available: dict[bytes, bytes] = {}  # file id -> a sidecar path holding it
        for side in sidecars + self._temp_files():
            if not os.path.lexists(side):
                continue  # moved to lost+found with its data file already
            rec = self._parse_sidecar(side)
            if rec is not None:
                available.setdefault(rec.file_id, side)
            elif side not in self._pair_problems and not self._is_temp(side):
                self._to_lost_found(self.report.add(
                    "bad-sidecar", self._rel(side), "damaged or not a regular file"), side)
        claimed: set[bytes] = set()
        for pair in pairs:
            if pair.header is None:
                continue  # empty: needs no key
            dest = bk.sidecar_path(pair.data_path)
            if pair.record is not None and pair.record.file_id == pair.header.file_id:
                claimed.add(dest)
                continue
            problem = self._pair_problems.get(pair.data_path) or self.report.add(
                "missing-sidecar" if pair.record is None else "file-id-mismatch",
                self._rel(pair.data_path), "data file has no sidecar" if pair.record is None
                else "its sidecar belongs to another file")
            src = available.get(pair.header.file_id)
            if src is None:
                problem.detail += "; no sidecar with its file id exists"
                self._to_lost_found(problem, pair.data_path)
                continue
            if not self.repair:
                problem.detail += f"; its sidecar is {os.fsdecode(self._rel(src))}"
                claimed.add(src)
                continue
            if src != dest and os.path.lexists(dest):
                self._park(dest, available)
            os.rename(available[pair.header.file_id], dest)
            available[pair.header.file_id] = dest
            claimed.add(dest)
            problem.repaired = "re-paired with its own sidecar (by file id)"
        for fid, side in available.items():
            if side in claimed or self._is_temp(side) and not self._parked(side):
                continue
            data = nm.data_of_sidecar(side) if nm.is_sidecar(side) else None
            if data is not None and os.path.lexists(data):
                continue  # the sidecar of an empty file, or reported with its data file
            p = self.report.add("orphan-sidecar", self._rel(side),
                                f"sidecar of file id {fid.hex()} has no data file")
            self._to_lost_found(p, side)

    def _parse_sidecar(self, side: bytes) -> fmt.KeyRecord | None:
        try:
            return bk.read_sidecar_file(side)  # never follows a link, never blocks
        except (fmt.FormatError, OSError):
            return None

    def _park(self, side: bytes, available: dict[bytes, bytes]) -> None:
        """Move a wrong sidecar out of the way, where pairing can still find it."""
        rec = self._parse_sidecar(side)
        if rec is None:
            problem = self._pair_problems.get(nm.data_of_sidecar(side))
            self._to_lost_found(problem or self.report.add(
                "bad-sidecar", self._rel(side), "damaged"), side)
            return
        parked = bk.tmp_path(self.backing)
        os.rename(side, parked)
        self._parked_paths.add(parked)
        if available.get(rec.file_id) == side:
            available[rec.file_id] = parked

    def _parked(self, path: bytes) -> bool:
        return path in self._parked_paths

    def _temp_files(self) -> list[bytes]:
        tmp = bk.control_path(self.backing, bk.TMP_DIR)
        try:
            return [os.path.join(tmp, n) for n in os.listdir(tmp)]
        except FileNotFoundError:
            return []

    def _is_temp(self, path: bytes) -> bool:
        return os.path.dirname(path) == bk.control_path(self.backing, bk.TMP_DIR)

    def _check_temp_files(self) -> None:
        paths = self._temp_files()
        spares = [p for p in paths if os.path.basename(p).startswith(SPARE_PREFIX)
                  and stat.S_ISREG(os.lstat(p).st_mode)]
        if spares:
            # Hundreds or thousands of them after an unclean stop: one line, not one each.
            p = self.report.add("spare-files", self._rel(os.path.dirname(spares[0])),
                                f"{len(spares)} spare sidecar file(s) of a mount that did not "
                                "stop cleanly (harmless; the next mount removes them too)")
            if self.repair:
                failed = 0
                for path in spares:
                    try:
                        os.unlink(path)
                    except OSError:
                        failed += 1
                if failed:
                    p.detail += f"; cannot remove {failed} of them"
                else:
                    p.repaired = "removed"
        for path in paths:
            if path in spares:
                continue
            p = self.report.add("temp-file", self._rel(path), "leftover temporary file of "
                                "an interrupted write")
            if self.repair:
                try:
                    if stat.S_ISDIR(os.lstat(path).st_mode):
                        shutil.rmtree(path)  # never follows symlinks inside
                    else:
                        os.unlink(path)
                except OSError as e:
                    p.detail += f"; cannot remove it: {e.strerror}"
                    continue
                p.repaired = "removed"

    # --- keys and blocks ----------------------------------------------------------------

    def _check_keys(self, pairs: list[Pair]) -> None:
        if self.client is None:
            return
        for pair in pairs:
            rec, header = pair.record, pair.header
            if rec is None or header is None or rec.file_id != header.file_id:
                continue
            rel = self._rel(pair.data_path)
            try:
                dek = unwrap(self.client, rec)
            except KmsUnavailable as e:
                # One line for the rest of the walk, not one per file.
                self.report.add("key-unusable", rel, f"{e}; the DEKs of this and the files "
                                "after it were not checked")
                return
            except KmsError as e:
                self.report.add("key-unusable", rel, f"cannot unwrap its DEK with CMK "
                                f"{rec.key_id}: {e}")
                continue
            try:
                bad = bad_blocks(pair, dek)
            except (OSError, fmt.FormatError) as e:
                self.report.add("unreadable", rel, f"cannot read its blocks: "
                                f"{getattr(e, 'strerror', None) or e}")
                continue
            if bad:
                detail = ", ".join(f"block {n}: {why}" for n, why in bad[:10])
                if len(bad) > 10:
                    detail += f", and {len(bad) - 10} more"
                p = self.report.add("bad-block", rel, detail)
                self._to_lost_found(p, pair.data_path)

    # --- repairs ------------------------------------------------------------------------

    def _to_lost_found(self, problem: Problem, path: bytes) -> None:
        """Move a file (and its sidecar) out of the tree, keeping every byte."""
        if not self.repair:
            return
        if self.names is not None:
            self._to_named_lost_found(problem, path)
            return
        lf = os.path.join(self.backing, LOST_FOUND)
        os.makedirs(lf, mode=0o700, exist_ok=True)
        flat = self._rel(path).replace(b"/", b"%")
        if flat.startswith(nm.LONG_PREFIX):  # keep it visible in the mount's lost+found
            flat = b"unnamed-" + flat
        dest = os.path.join(lf, flat)
        n = 1
        while os.path.lexists(dest):
            n += 1
            dest = os.path.join(lf, flat + b"~%d" % n)
        os.rename(path, dest)
        if not nm.is_sidecar(path) and os.path.lexists(bk.sidecar_path(path)):
            os.rename(bk.sidecar_path(path), bk.sidecar_path(dest))
        if nm.long_name_of(path) is not None and nm.long_name_of(dest) is None:
            nm.remove_long_name(path)  # its name went with it (or was never there)
        problem.repaired = f"moved to {os.fsdecode(self._rel(dest))}"

    # Encrypted names: lost+found is a directory of the mount like any other (its name
    # encrypted in the root, an id of its own, its entries' names encrypted under it), so
    # the mount shows /lost+found and what fsck put there under readable names: the
    # plaintext path flattened (``a%b%c``) when it could be read, else ``unnamed-`` and
    # the backing path flattened. A plaintext-named lost+found would be hidden by the mount.

    def _lost_found_dir(self) -> tuple[bytes, nm.DirNames]:
        assert self.names is not None
        lf = nm.data_path(self.backing, LOST_FOUND, nm.DirNames(self.names, ROOT_DIR_ID))
        try:
            os.mkdir(lf, 0o700)
        except FileExistsError:
            pass
        dir_id = nm.read_dir_id(lf)
        if dir_id is None:
            dir_id = os.urandom(DIR_ID_SIZE)
            os.setxattr(lf, nm.DIR_ID_XATTR, dir_id)
        return lf, nm.DirNames(self.names, dir_id)

    def _lost_found_names(self, plain: bytes) -> tuple[bytes, nm.BackingNames]:
        """A free entry of the encrypted lost+found for plaintext name ``plain`` (``~N``
        added until it is free); its long-name file written when it needs one."""
        lf, enc = self._lost_found_dir()
        plain = plain[-(nm.NAME_MAX - 8):]  # room for "~N"; a deep path keeps its tail
        cand, n = plain, 1
        while True:
            names = nm.backing_names(lf, cand, enc)
            if not os.path.lexists(os.path.join(lf, names.data)):
                break
            n += 1
            cand = plain + b"~%d" % n
        if names.long_name is not None:  # first: a leftover long-name file is harmless
            with open(os.path.join(lf, names.long_name), "wb") as f:
                f.write(names.stored)
        return lf, names

    def _flat_plain(self, obj: bytes) -> bytes:
        plain = self._plain(self._rel(obj))
        if plain:
            return os.fsencode(plain).lstrip(b"/").replace(b"/", b"%")
        return b"unnamed-" + self._rel(obj).replace(b"/", b"%")

    def _to_named_lost_found(self, problem: Problem, path: bytes) -> None:
        side = nm.is_sidecar(path)
        obj = nm.data_of_sidecar(path) if side else path
        lf, names = self._lost_found_names(self._flat_plain(obj))
        dest = os.path.join(lf, names.data)
        if side:
            os.rename(path, os.path.join(lf, names.sidecar))
        else:
            os.rename(path, dest)
            if os.path.lexists(bk.sidecar_path(path)):
                os.rename(bk.sidecar_path(path), bk.sidecar_path(dest))
            nm.remove_long_name(path)  # its name went with it (or was never there)
        problem.repaired = f"moved to {os.fsdecode(self._rel(dest))}"

    def _cut_torn_tail(self, problem: Problem, pair: Pair) -> None:
        """Drop the fragment of an interrupted block write, after saving a full copy."""
        if not self.repair:
            return
        if self.names is not None:
            lf, names = self._lost_found_names(self._flat_plain(pair.data_path) + b".torn")
            copy = os.path.join(lf, names.data)
        else:
            lf = os.path.join(self.backing, LOST_FOUND)
            os.makedirs(lf, mode=0o700, exist_ok=True)
            copy = os.path.join(lf, self._rel(pair.data_path).replace(b"/", b"%") + b".torn")
        src_fd = bk.open_regular(pair.data_path, what="data file")
        with os.fdopen(src_fd, "rb") as src, open(copy, "xb") as dst:
            dst.write(src.read())
        if os.path.lexists(bk.sidecar_path(pair.data_path)):  # keep the copy readable
            os.link(bk.sidecar_path(pair.data_path), bk.sidecar_path(copy))
        cbs = fmt.cipher_block_size(pair.header.block_size)
        keep = fmt.HEADER_SIZE + (pair.size - fmt.HEADER_SIZE) // cbs * cbs
        os.truncate(pair.data_path, keep)
        pair.size = keep
        problem.repaired = f"cut to {keep} bytes; the original is {os.fsdecode(self._rel(copy))}"


def _is_regular(path: bytes) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encfs fsck", description=__doc__.split("\n\n")[0])
    p.add_argument("backing")
    p.add_argument("--repair", action="store_true", help="repair what can be repaired")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-kms", action="store_true",
                   help="skip the checks that need the KMS (DEK unwrap, block tags)")
    kmsconn.add_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backing = os.path.abspath(args.backing)
    if not os.path.isdir(backing):
        print(f"encfs fsck: {bk.printable(backing)} is not a directory", file=sys.stderr)
        return EXIT_ERROR
    lock = bk.MountLock(os.fsencode(backing))
    if os.path.isdir(bk.control_path(os.fsencode(backing))):
        try:
            lock.acquire()  # held while we run: no mount can start under us
        except bk.BackingInUse:
            print(f"encfs fsck: {bk.printable(backing)} is in use by a running encfs mount; "
                  "unmount it first", file=sys.stderr)
            return EXIT_ERROR
        except bk.BackingError as e:
            print(f"encfs fsck: {e}", file=sys.stderr)
            return EXIT_ERROR
    try:
        return _fsck(args, backing)
    finally:
        lock.release()


def _fsck(args: argparse.Namespace, backing: str) -> int:
    mounted = mount_of_backing(backing)
    if mounted is not None:
        print(f"encfs fsck: {bk.printable(backing)} is mounted on "
              f"{bk.printable(mounted.mountpoint)}; unmount it first (encfs umount "
              f"{bk.printable(mounted.mountpoint)})", file=sys.stderr)
        return EXIT_ERROR
    client = None
    if not args.no_kms:
        try:
            target = kmsconn.target_for_tool(args, os.fsencode(backing))
            client = kmsconn.connect(target)
        except kmsconn.KmsConnError as e:
            print(f"encfs fsck: {e} (or run with --no-kms)", file=sys.stderr)
            return EXIT_ERROR
    started = time.time()
    root = os.fsencode(backing)
    try:
        cfg = bk.read_config(bk.control_path(root, bk.CONFIG_NAME))
        encrypted = cfg.encrypt_names
        names = namekey.offline_cipher(root, client) if encrypted and client else None
    except FileNotFoundError:
        encrypted, names = False, None
    except (bk.BackingError, fmt.FormatError, OSError) as e:
        print(f"encfs fsck: {e}", file=sys.stderr)
        return EXIT_ERROR
    fsck = Fsck(root, client, args.repair, progress=sys.stderr.isatty() and not args.json,
                encrypted=encrypted, names=names)
    report = fsck.run()
    # Plaintext names for the user only: never in the saved report (it is in the backing
    # dir, which must not show them)
    shown = {k: v for k, v in report.names.items() if v is not None}
    if client is not None:
        client.close()
    _save_report(fsck.backing, report, started)
    if args.json:
        out = asdict(report)
        for p, row in zip(report.problems, out["problems"]):
            row["name"] = shown.get(id(p))
        print(json.dumps({**out, "exit_code": report.exit_code}, indent=1))
    else:
        for p in report.problems:
            fixed = f"  [repaired: {p.repaired}]" if p.repaired else ""
            fixed = bk.printable(fixed)
            name = f" ({bk.printable(shown[id(p)])})" if id(p) in shown else ""
            print(f"{p.kind}: {bk.printable(p.path)}{name}: {bk.printable(p.detail)}{fixed}")
        left = sum(1 for p in report.problems if not p.repaired)
        print(f"{report.files} files checked, {len(report.problems)} problems, "
              f"{left} left" + ("" if args.repair or not left else
                                " (run with --repair to repair what can be)"))
    return report.exit_code


def _save_report(backing: bytes, report: Report, started: float) -> None:
    """Keep a record of what a repairing run changed, beside the control files."""
    if not any(p.repaired for p in report.problems):
        return
    d = bk.control_path(backing, REPORT_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(d).st_mode):  # a planted symlink: never write through it
        print(f"encfs fsck: {bk.printable(d)} is not a directory; report not saved",
              file=sys.stderr)
        return
    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + ".json"
    fd = os.open(os.path.join(d, name.encode()),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(report), f, indent=1)
