"""mount(8) and /etc/fstab: the `-o` options of a `fuse.encfs` mount as `encfs mount` flags.

Pure translation, no I/O (the helper that runs it is encfs/mounthelper.py). mount(8)
hands a ``fuse.TYPE`` mount to mount.fuse3, which runs ``TYPE SOURCE MOUNTPOINT -o
OPTIONS`` (``encfs``, found on the standard PATH, or the absolute path of
``fuse./path/to/encfs``); /sbin/mount.fuse.encfs, when installed, is called by mount(8)
itself as ``mount.fuse.encfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]``. Either way the
options arrive as one comma-separated string, mixing ours, FUSE's, and those meant for
mount(8) and systemd only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: -o NAME=VALUE -> `encfs mount` flag taking VALUE.
VALUE_OPTIONS = {
    "key": "--key",
    "kms_socket": "--kms-socket",
    "kms_url": "--kms-url",
    "kms_ca_file": "--kms-ca-file",
    "credentials": "--credentials",
    "project_id": "--project-id",
    "key_cache_ttl": "--key-cache-ttl",
    "dek_pool": "--dek-pool",
    "user": "--user",
    "log": "--log",
}

#: -o NAME -> `encfs mount` flag without a value. `foreground` makes mount(8) wait until
#: the filesystem is unmounted: for service managers that want the daemon as their child.
FLAG_OPTIONS = {
    "shared_backing": "--shared-backing",
    "encrypt_names": "--encrypt-names",
    "debug": "--debug",
    "foreground": "--foreground",
}

#: Passed to FUSE (`encfs mount -o`): the options libfuse's mount accepts.
FUSE_OPTIONS = {"rw", "ro", "exec", "noexec", "nosuid", "nodev", "atime", "noatime",
                "sync", "async", "dirsync", "allow_other", "allow_root",
                "default_permissions", "auto_unmount"}

#: For mount(8), systemd and fstab bookkeeping, not for the filesystem: dropped, as
#: mount.fuse3 drops them. `suid` and `dev` are dropped too: mount.fuse3 adds them to every
#: mount made by root, but an encfs mount is always nosuid,nodev (as with `encfs mount`):
#: anyone who can obtain data keys from the KMS could otherwise plant a setuid program or
#: a device node in the backing dir. `relatime` is the kernel's default anyway.
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users",
                   "nouser", "owner", "group", "suid", "dev", "relatime", "loop"}
IGNORED_PREFIXES = ("x-", "comment=")


class OptionError(ValueError):
    """An option encfs does not know, or a malformed one; the message names it."""


@dataclass(frozen=True)
class HelperCall:
    """A mount helper's command line, parsed."""

    source: str
    mountpoint: str
    options: list[str] = field(default_factory=list)
    fake: bool = False  # -f: do everything but the mount
    sloppy: bool = False  # -s: ignore options we do not know
    verbose: bool = False


def split_options(text: str) -> list[str]:
    """Split ``a,b=c,d="e,f"`` on the commas outside double quotes (libmount's quoting);
    the quotes around a value are removed."""
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise OptionError(f"unbalanced double quote in options {text!r}")
    out.append("".join(cur))
    return [o for o in out if o]


def parse_helper_args(argv: list[str]) -> HelperCall:
    """``SOURCE MOUNTPOINT [-sfnv] [-N NS] [-t TYPE] [-o OPTIONS]...``, the calling
    convention of mount(8) helpers and of mount.fuse3."""
    positional: list[str] = []
    options: list[str] = []
    fake = sloppy = verbose = False
    it = iter(argv)
    for arg in it:
        if arg == "-o" or arg == "-t" or arg == "-N":
            value = next(it, None)
            if value is None:
                raise OptionError(f"{arg} needs a value")
            if arg == "-o":
                options += split_options(value)
        elif arg.startswith("-o") and len(arg) > 2:
            options += split_options(arg[2:])
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnvi"):
            fake |= "f" in arg
            sloppy |= "s" in arg
            verbose |= "v" in arg
        elif arg.startswith("-"):
            raise OptionError(f"unknown argument {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise OptionError("expected BACKING MOUNTPOINT [-o OPTIONS]")
    source, mountpoint = positional
    if source.startswith("encfs#"):  # the old `-t fuse` spelling: encfs#BACKING
        source = source[len("encfs#"):]
    return HelperCall(source, mountpoint, options, fake, sloppy, verbose)


def translate(call: HelperCall) -> list[str]:
    """The `encfs mount` argument list for a helper call (raises OptionError)."""
    args = [call.source, call.mountpoint]
    fuse: list[str] = []
    for opt in call.options:
        name, eq, value = opt.partition("=")
        if name in VALUE_OPTIONS:
            if not eq or not value:
                raise OptionError(f"option {name} needs a value: {name}=...")
            args += [VALUE_OPTIONS[name], value]
        elif name in FLAG_OPTIONS and not eq:
            args.append(FLAG_OPTIONS[name])
        elif opt in FUSE_OPTIONS:
            fuse.append(opt)
        elif opt in IGNORED_OPTIONS or opt.startswith(IGNORED_PREFIXES):
            continue
        elif not call.sloppy:
            known = sorted(set(VALUE_OPTIONS) | set(FLAG_OPTIONS) | FUSE_OPTIONS)
            raise OptionError(f"unknown mount option {opt!r} (encfs knows: {', '.join(known)})")
    if fuse:
        args += ["-o", ",".join(fuse)]
    return args
