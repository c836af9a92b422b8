"""`encfs mount BACKING MOUNTPOINT` and `encfs umount MOUNTPOINT`."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from typing import Sequence

import pyfuse3
import trio

from kms.paths import default_data_dir

from . import backing as bk
from . import control, dispatch, kmsconn, namekey, sharedmount, tuning
from .executor import ContentExecutor
from .fs import EncFS
from .journal import Journal
from .journal_replay import recover
from .keys import DEFAULT_TTL, POOL_SIZE, KeyManager
from .tuning import READAHEAD_KB  # noqa: F401  (tests read it here)

log = logging.getLogger("encfs")

DEFAULT_KEY = "sfs/default"
READY_TIMEOUT = 30.0
LOG_FILE = "mount.log"


class UserError(Exception):
    """A mistake or a missing precondition; printed as one line, exit code 1."""


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _mount(args, argv)
    except (UserError, kmsconn.KmsConnError) as e:
        print(f"encfs mount: {e}", file=sys.stderr)
        return 1


def _mount(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    try:
        backing, config = bk.open_backing(args.backing)
        config = namekey.choose(backing, config, args.encrypt_names)
    except bk.BackingError as e:
        raise UserError(str(e)) from None
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise UserError(f"mountpoint {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise UserError(f"mountpoint {mountpoint} is busy (something is already mounted there)")
    if os.path.commonpath([os.fsdecode(backing), mountpoint]) in (os.fsdecode(backing),
                                                                  mountpoint):
        raise UserError("backing directory and mountpoint must not contain each other")
    lock = sharedmount.MountClaim(backing, shared=args.shared_backing)
    try:
        lock.acquire()
    except bk.BackingError as e:
        raise UserError(str(e)) from None
    try:
        kms = _kms_target(args)
        key_id = kmsconn.check_key(kms, args.key)
        kmsconn.record(backing, kms)  # tools run on BACKING without options use this KMS
        if config.encrypt_names and not args.user:  # (with --user: as the user, later)
            _name_key(backing, kms, key_id)
        if args.shared_backing:
            _recover_shared(lock)
        else:
            _recover_if_unclean(backing)
    except BaseException:
        lock.release()
        raise
    if not args.foreground:
        if not args.shared_backing:
            bk.mark_clean(backing)  # the daemon marks it again
        lock.release()  # the daemon takes it over
        return _spawn_background(args, argv, backing, mountpoint)
    try:
        return _serve_foreground(args, backing, config, mountpoint, kms, key_id, lock)
    finally:
        lock.release()


def _name_key(backing: bytes, kms: kmsconn.KmsTarget, key_id: str) -> None:
    """Encrypted names: make the name key on first use, and check that it unwraps now (a
    clear error before mounting rather than a mount whose every name fails)."""
    try:
        with kmsconn.connect(kms) as c:
            namekey.ensure_record(backing, c, key_id)
            namekey.offline_cipher(backing, c)
    except (bk.BackingError, kmsconn.KmsConnError) as e:
        raise UserError(str(e)) from None


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


def _serve_foreground(args: argparse.Namespace, backing: bytes, config: bk.BackingConfig,
                      mountpoint: str, kms: kmsconn.KmsTarget, key_id: str,
                      claim: sharedmount.MountClaim) -> int:
    _setup_logging(args.debug)
    faulthandler.enable()
    tuning.keep_freed_memory()
    os.umask(0)  # modes come from the caller's request, already masked by the kernel
    # Built whole before the mount exists; the KMS client connects at its first request,
    # so after serve_as its requests carry the serving user's uid.
    keys = KeyManager(kms.async_client(), key_id, ttl=args.key_cache_ttl,
                      pool_size=max(0, args.dek_pool))
    # A shared mount journals into an area of its own (encfs/sharedmount.py).
    try:
        area = claim.open_area() if args.shared_backing else None
    except bk.BackingError as e:
        raise UserError(str(e)) from None
    content = ContentExecutor(Journal(area.journal_parent, root=backing) if area
                              else Journal(bk.control_path(backing)))
    ops = EncFS(backing, config, keys, mountpoint=mountpoint,
                shared_backing=args.shared_backing, content=content,
                spare_dir=area.tmp if area else None)
    options = set(pyfuse3.default_options)
    # fsname shows the backing dir in mount(8) and df; libfuse splits options on commas.
    options |= {"fsname=" + os.fsdecode(backing).replace(",", "\\,"), "subtype=encfs"}
    for opt in args.options:
        options |= {o for o in opt.split(",") if o}
    if "allow_other" in options:
        options.add("default_permissions")
    options = ops.mount_options(options, {o for opt in args.options for o in opt.split(",")},
                                serving_user=bool(args.user))
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        raise UserError(f"cannot mount on {mountpoint}: {e}") from None
    clean = False
    try:
        if args.user:
            # The mount needed root (/dev/fuse); from here on we are the user, and every
            # KMS request carries the user's uid (SO_PEERCRED).
            serve_as(args.user, backing)
            if kmsconn.check_key(kms, args.key) != key_id:  # the user may use it too
                raise UserError(f"key {args.key} names another key for {args.user}")
            if config.encrypt_names:
                _name_key(backing, kms, key_id)
        log.info("mounted %s on %s (key %s)", os.fsdecode(backing), mountpoint, key_id)
        tuning.quiet_cycle_collector()
        trio.run(_serve, ops, keys, kms)
        clean = True
    finally:
        ops.close_all()
        back_to_root()  # unmounting a mount made by root needs root
        pyfuse3.close(unmount=True)
        if args.shared_backing:
            claim.release(clean)  # a clean stop removes the mount's area
        elif clean:
            bk.mark_clean(backing)
        log.info("unmounted %s%s; %s", mountpoint, "" if clean else " after an error",
                 dispatch.Stats.line())
    return 0


async def _serve(ops: EncFS, keys: KeyManager, target: kmsconn.KmsTarget) -> None:
    if ops.config.encrypt_names:
        await ops.load_names()  # before the first request is served
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal)
            nursery.start_soon(keys.watch, ops.open_key_ids, ops.drop_cached_pages)
            nursery.start_soon(keys.fill_pool)
            ops.spares.start()  # after serve_as: spares belong to the serving uid
            nursery.start_soon(tuning.raise_readahead, ops.mountpoint)
            nursery.start_soon(control.serve, ops, target)  # encfs status
            dispatch.install()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await keys.kms.aclose()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("signal received, unmounting")
            pyfuse3.terminate()
            return


def serve_as(user: str, backing: bytes) -> None:
    """Take on ``user``'s identity for everything from here on (all threads: nothing else
    runs yet). The effective uid is what the KMS sees (SO_PEERCRED) and what owns new
    backing files; the saved uid stays root so that the mount can be undone at the end
    (`back_to_root`). The control dir must stay writable (journal, markers)."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        if not user.isdigit():
            raise UserError(f"no such user {user!r}") from None
        uid = gid = int(user)
    ctl = bk.control_path(backing)
    for dirpath, dirnames, filenames in os.walk(ctl):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, uid, gid, follow_symlinks=False)
    os.setgroups([gid])
    os.setresgid(gid, gid, 0)
    os.setresuid(uid, uid, 0)


def back_to_root() -> None:
    if os.getresuid()[2] == 0 and os.geteuid() != 0:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _kms_target(args: argparse.Namespace) -> kmsconn.KmsTarget:
    """The KMS to use; with no KMS option and no $KMS_SOCKET, start a local KMS if none
    answers on the default socket (an explicitly named KMS must already run)."""
    target = kmsconn.target_from_args(args)
    if kmsconn.explicit(args):
        kmsconn.probe(target)
    elif not kmsconn.answers(target):
        kmsconn.start_local_kms(target, default_data_dir())
    return target


# --- background mode --------------------------------------------------------------------

def _spawn_background(args: argparse.Namespace, argv: Sequence[str] | None, backing: bytes,
                      mountpoint: str) -> int:
    """Run the mount in a detached child and return once the mountpoint is live."""
    argv = list(sys.argv[2:] if argv is None else argv)
    # Shared mounts of one backing dir run on many hosts: a log file for each host.
    default_log = f"mount-{sharedmount.host_name()}.log" if args.shared_backing else LOG_FILE
    log_path = args.log or os.fsdecode(bk.control_path(backing, default_log))
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    with os.fdopen(log_fd, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "encfs", "mount", *argv, "--foreground"],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            tail = _last_line(log_path)
            raise UserError(f"mount failed: {tail}" if tail else "mount failed")
        if time.monotonic() > deadline:
            proc.kill()
            raise UserError(f"mount did not become ready in {READY_TIMEOUT:.0f}s "
                            f"(see {log_path})")
        time.sleep(0.02)
    print(f"mounted {os.fsdecode(backing)} on {mountpoint} (pid {proc.pid}, log {log_path})")
    return 0


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# --- umount -----------------------------------------------------------------------------

def _unescape_mounts(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_encfs_mount(mountpoint: str) -> bool:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if _unescape_mounts(fields[1]) == mountpoint and fields[2] == "fuse.encfs":
                return True
    return False


def umount_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs umount", description="Flush and unmount.")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    mountpoint = os.path.abspath(args.mountpoint)
    if not is_encfs_mount(mountpoint):
        print(f"encfs umount: {mountpoint} is not an encfs mount", file=sys.stderr)
        return 1
    pid = _daemon_pid(mountpoint)
    res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
        print(f"encfs umount: {msg}", file=sys.stderr)
        return 1
    if pid:
        _wait_gone(pid, 15.0)
    return 0


def _daemon_pid(mountpoint: str) -> int | None:
    """The pid of the daemon serving ``mountpoint``: the mount daemon answers the
    control xattr with it."""
    try:
        return int(os.getxattr(mountpoint, "user.encfs.pid"))
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.02)
