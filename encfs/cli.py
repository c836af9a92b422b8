"""The `encfs` command: one subcommand per tool, each a module with its own `main(argv)`."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from . import fsck, ls, mount, mounthelper, recovery, rekey, rewrap, status, systemd

COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "mount": (mount.main, "mount BACKING on MOUNTPOINT"),
    "umount": (mount.umount_main, "flush and unmount MOUNTPOINT"),
    "status": (status.main, "show every encfs mount: KMS, keys, caches, latencies, errors"),
    "systemd-units": (systemd.main, "write the systemd units (KMS service, mount template)"),
    "fsck": (fsck.main, "check (and --repair) an unmounted BACKING dir"),
    "rewrap": (rewrap.main, "re-wrap every DEK under the newest key version or --to-key"),
    "rekey": (rekey.main, "give files in a mount a new DEK (re-encrypts their content)"),
    "inspect": (recovery.inspect_main, "show a file's CMK, key version, file id (never the DEK)"),
    "decrypt": (recovery.decrypt_main, "write a backing file's plaintext to stdout (recovery)"),
    "ls": (ls.main, "list a backing dir with plaintext names, using only the KMS (recovery)"),
}


def usage() -> str:
    lines = ["usage: encfs COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n'encfs COMMAND --help' describes each command. As a mount(8) helper: "
                 "encfs BACKING MOUNTPOINT -o OPTIONS (README, fstab).")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    entry = COMMANDS.get(argv[0])
    if entry is None and len(argv) >= 2 and not argv[0].startswith("-") and "/" in argv[0]:
        # mount.fuse3's call for a fuse.encfs fstab line: encfs BACKING MOUNTPOINT -o ...
        return mounthelper.main(argv)
    if entry is None:
        print(f"encfs: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return entry[0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
