"""`encfs mount BACKING MOUNTPOINT`: the command line. Parsing and reporting only; what a
mount does is encfs/lifecycle.py (checks, lock, recovery), encfs/daemon.py (serving),
encfs/background.py (detaching), encfs/identity.py (--user); process tuning is
encfs/tuning.py and the local KMS launcher encfs/kmsconn.py. `encfs umount` is
encfs/umount.py."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kms.paths import default_data_dir

from . import kmsconn, lifecycle
from .keys import DEFAULT_TTL, POOL_SIZE
from .mountopts import MountOptions, UserError
from .tuning import READAHEAD_KB  # noqa: F401  (tests read it here)
from .umount import main as umount_main  # noqa: F401  (the `encfs umount` entry)

DEFAULT_KEY = "sfs/default"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encfs mount",
                                description="Mount BACKING (ciphertext) on MOUNTPOINT (plaintext).")
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--key", default=DEFAULT_KEY,
                   help=f"CMK (id or alias) for new files (default: {DEFAULT_KEY})")
    p.add_argument("--key-cache-ttl", type=float, default=DEFAULT_TTL, metavar="SECONDS",
                   help="how long a plaintext DEK stays cached after use (default: 60)")
    p.add_argument("--dek-pool", type=int, default=POOL_SIZE, metavar="N",
                   help=f"data keys prepared ahead for new files (default: {POOL_SIZE}; "
                   "0: each new file waits for the KMS)")
    p.add_argument("--user", metavar="USER",
                   help="(as root) mount, then serve as USER (name or uid): the KMS sees "
                   "that user, whose keys and grants decide access; add -o allow_other so "
                   "USER can use the mount")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground until unmounted")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="FUSE mount options, comma separated (e.g. allow_other)")
    p.add_argument("--shared-backing", action="store_true",
                   help="BACKING is shared: other mounts (on this or other hosts, through "
                   "a network filesystem) or programs use it at the same time; every mount "
                   "of it must say so (docs/SHARED.md)")
    p.add_argument("--encrypt-names", action="store_true",
                   help="encrypt file names, symlink targets and xattr names too (chosen "
                   "when BACKING is first used; later mounts follow its config)")
    p.add_argument("--log", help="log file when not in the foreground "
                   "(default: BACKING/.encfs/mount.log)")
    p.add_argument("--debug", action="store_true", help="log every request")
    kmsconn.add_options(p, local_hint="; a local KMS is started there if none answers",
                        default="$KMS_SOCKET, else the local socket")
    return p


def options_from_args(args: argparse.Namespace, argv: Sequence[str]) -> MountOptions:
    return MountOptions(
        backing=args.backing, mountpoint=args.mountpoint, key=args.key,
        key_cache_ttl=args.key_cache_ttl, dek_pool=args.dek_pool, user=args.user,
        foreground=args.foreground, fuse_options=tuple(args.options),
        shared_backing=args.shared_backing, encrypt_names=args.encrypt_names, log=args.log,
        debug=args.debug, resolve_kms=lambda: _kms_target(args), argv=tuple(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return lifecycle.run(options_from_args(args, sys.argv[2:] if argv is None else argv))
    except (UserError, kmsconn.KmsConnError) as e:
        print(f"encfs mount: {e}", file=sys.stderr)
        return 1


def _kms_target(args: argparse.Namespace) -> kmsconn.KmsTarget:
    """The KMS to use; with no KMS option and no $KMS_SOCKET, start a local KMS if none
    answers on the default socket (an explicitly named KMS must already run)."""
    target = kmsconn.target_from_args(args)
    if kmsconn.explicit(args):
        kmsconn.probe(target)
    elif not kmsconn.answers(target):
        kmsconn.start_local_kms(target, default_data_dir())
    return target
