"""The mount lifecycle, before the daemon serves: check the backing dir and the
mountpoint, take the backing dir's lock, check the CMK with the KMS, finish what an
unclean stop left (journal recovery), then serve in the foreground (encfs/daemon.py) or
hand over to a detached daemon (encfs/background.py)."""

from __future__ import annotations

import os
import sys

from . import background, daemon, kmsconn, namekey, sharedmount
from . import backing as bk
from .journal_replay import recover
from .mountopts import MountOptions, UserError


def run(opts: MountOptions) -> int:
    """Mount as ``opts`` say; UserError (or kmsconn.KmsConnError) for a user mistake."""
    try:
        backing, config = bk.open_backing(opts.backing)
        config = namekey.choose(backing, config, opts.encrypt_names)
    except bk.BackingError as e:
        raise UserError(str(e)) from None
    mountpoint = os.path.abspath(opts.mountpoint)
    _check_mountpoint(backing, mountpoint)
    lock = sharedmount.MountClaim(backing, shared=opts.shared_backing)
    try:
        lock.acquire()
    except bk.BackingError as e:
        raise UserError(str(e)) from None
    try:
        kms = opts.resolve_kms()
        key_id = kmsconn.check_key(kms, opts.key)
        kmsconn.record(backing, kms)  # tools run on BACKING without options use this KMS
        if config.encrypt_names and not opts.user:  # (with --user: as the user, later)
            daemon.check_name_key(backing, kms, key_id)
        if opts.shared_backing:
            _recover_shared(lock)
        else:
            _recover_if_unclean(backing)
    except BaseException:
        lock.release()
        raise
    if not opts.foreground:
        if not opts.shared_backing:
            bk.mark_clean(backing)  # the daemon marks it again
        lock.release()  # the daemon takes it over
        return background.spawn(opts, backing, mountpoint)
    try:
        return daemon.serve_foreground(opts, backing, config, mountpoint, kms, key_id, lock)
    finally:
        lock.release()


def _check_mountpoint(backing: bytes, mountpoint: str) -> None:
    if not os.path.isdir(mountpoint):
        raise UserError(f"mountpoint {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise UserError(f"mountpoint {mountpoint} is busy (something is already mounted there)")
    if os.path.commonpath([os.fsdecode(backing), mountpoint]) in (os.fsdecode(backing),
                                                                  mountpoint):
        raise UserError("backing directory and mountpoint must not contain each other")


def _recover_if_unclean(backing: bytes) -> None:
    """The dirty marker survives an unclean stop: finish what it interrupted, and say so."""
    if not bk.mark_dirty(backing):
        return
    done = recover(backing)
    msg = "the last mount of this backing dir did not stop cleanly; recovered: " + \
        ("; ".join(done) if done else "nothing was left unfinished")
    print(f"encfs mount: {msg}", file=sys.stderr)  # in the log file when in background


def _recover_shared(claim: sharedmount.MountClaim) -> None:
    """A shared mount recovers the areas of dead mounts; when no other mount is up, also
    what an exclusive mount left (its dirty marker) and the shared temp files."""
    done = []
    if claim.alone():  # also the temp files a dead shared mount left in .encfs/tmp
        done += recover(claim.backing)
        bk.mark_clean(claim.backing)
    done += claim.recover()
    if done:
        print("encfs mount: recovered what dead mounts of this backing dir left: "
              + "; ".join(done), file=sys.stderr)
