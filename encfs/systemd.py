"""`encfs systemd-units`: the systemd units shipped in encfs/units/, with this install's
interpreter filled in, written where systemd finds them.

- encfs-kms.service: `kms serve` on /run/encfs-kms/kms.sock (root's default socket), as a
  dynamic user, with its keys in /var/lib/encfs-kms, hardened.
- encfs-mount@.service: one mount per instance (the escaped mountpoint), configured in
  /etc/encfs/mounts/INSTANCE.conf, ordered after the KMS.

fstab lines are the other way to mount at boot (README: "fstab"); `x-systemd.requires=
encfs-kms.service` orders them after the KMS the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources
from typing import Sequence

UNITS = ("encfs-kms.service", "encfs-mount@.service")
DEFAULT_DIR = "/etc/systemd/system"


def render(name: str, python: str | None = None, fusermount: str | None = None) -> str:
    """The text of unit ``name`` for an encfs run by ``python``."""
    text = resources.files("encfs").joinpath("units", name).read_text()
    fusermount = fusermount or shutil.which("fusermount3") or "/usr/bin/fusermount3"
    return text.replace("@PYTHON@", python or sys.executable).replace("@FUSERMOUNT@",
                                                                       fusermount)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs systemd-units",
                                description="Write the systemd units of encfs (the KMS "
                                "service and the mount template) for this install.")
    p.add_argument("--output", "-d", default=DEFAULT_DIR, metavar="DIR",
                   help=f"where to write them (default: {DEFAULT_DIR})")
    p.add_argument("--print", action="store_true", help="print them instead")
    args = p.parse_args(argv)
    if args.print:
        for name in UNITS:
            print(f"# --- {name}\n{render(name)}")
        return 0
    if not os.path.isdir(args.output):
        print(f"encfs systemd-units: {args.output} is not a directory", file=sys.stderr)
        return 1
    for name in UNITS:
        path = os.path.join(args.output, name)
        try:
            with open(path, "w") as f:
                f.write(render(name))
        except OSError as e:
            print(f"encfs systemd-units: cannot write {path}: {e.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    if args.output == DEFAULT_DIR:
        print("next: systemctl daemon-reload && systemctl enable --now encfs-kms.service")
    return 0
