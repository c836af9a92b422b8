"""What `encfs mount` was asked to do, as the mount lifecycle needs it (no argparse), and
the one kind of error it reports to the user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import kmsconn


class UserError(Exception):
    """A mistake or a missing precondition; printed as one line, exit code 1."""


@dataclass(frozen=True)
class MountOptions:
    backing: str
    mountpoint: str
    #: CMK (id or alias) for new files
    key: str
    key_cache_ttl: float
    dek_pool: int
    #: serve as this user (name or uid) once mounted as root
    user: str | None
    foreground: bool
    #: FUSE mount options, as given (each may hold several, comma separated)
    fuse_options: tuple[str, ...]
    shared_backing: bool
    encrypt_names: bool
    #: log file of a background mount (None: BACKING/.encfs/mount.log)
    log: str | None
    debug: bool
    #: the KMS to use, resolved when the lifecycle gets there (it may start a local KMS)
    resolve_kms: Callable[[], kmsconn.KmsTarget]
    #: the command line after `encfs mount`, for the background daemon's own
    argv: tuple[str, ...] = field(default=())
