"""The mount daemon in the foreground: builds the filesystem whole (key manager, content
executor, journal, EncFS), mounts it, serves requests until unmounted or signalled, and
unmounts it again, marking the backing dir clean only after a clean stop."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys

import pyfuse3
import trio

from . import backing as bk
from . import control, dispatch, kmsconn, namekey, sharedmount, tuning
from .executor import ContentExecutor
from .fs import EncFS
from .identity import back_to_root, serve_as
from .journal import Journal
from .keys import KeyManager
from .mountopts import MountOptions, UserError

log = logging.getLogger("encfs")


def check_name_key(backing: bytes, kms: kmsconn.KmsTarget, key_id: str) -> None:
    """Encrypted names: make the name key on first use, and check that it unwraps now (a
    clear error before mounting rather than a mount whose every name fails)."""
    try:
        with kmsconn.connect(kms) as c:
            namekey.ensure_record(backing, c, key_id)
            namekey.offline_cipher(backing, c)
    except (bk.BackingError, kmsconn.KmsConnError) as e:
        raise UserError(str(e)) from None


def fuse_options(backing: bytes, given: tuple[str, ...]) -> set[str]:
    """The FUSE options before the filesystem's own choice (EncFS.mount_options)."""
    options = set(pyfuse3.default_options)
    # fsname shows the backing dir in mount(8) and df; libfuse splits options on commas.
    options |= {"fsname=" + os.fsdecode(backing).replace(",", "\\,"), "subtype=encfs"}
    for opt in given:
        options |= {o for o in opt.split(",") if o}
    if "allow_other" in options:
        options.add("default_permissions")
    return options


def serve_foreground(opts: MountOptions, backing: bytes, config: bk.BackingConfig,
                     mountpoint: str, kms: kmsconn.KmsTarget, key_id: str,
                     claim: sharedmount.MountClaim) -> int:
    _setup_logging(opts.debug)
    faulthandler.enable()
    tuning.keep_freed_memory()
    os.umask(0)  # modes come from the caller's request, already masked by the kernel
    # Built whole before the mount exists; the KMS client connects at its first request,
    # so after serve_as its requests carry the serving user's uid.
    keys = KeyManager(kms.async_client(), key_id, ttl=opts.key_cache_ttl,
                      pool_size=max(0, opts.dek_pool))
    # A shared mount journals into an area of its own (encfs/sharedmount.py).
    try:
        area = claim.open_area() if opts.shared_backing else None
    except bk.BackingError as e:
        raise UserError(str(e)) from None
    content = ContentExecutor(Journal(area.journal_parent, root=backing) if area
                              else Journal(bk.control_path(backing)))
    ops = EncFS(backing, config, keys, mountpoint=mountpoint,
                shared_backing=opts.shared_backing, content=content,
                spare_dir=area.tmp if area else None)
    options = ops.mount_options(fuse_options(backing, opts.fuse_options),
                                {o for opt in opts.fuse_options for o in opt.split(",")},
                                serving_user=bool(opts.user))
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        raise UserError(f"cannot mount on {mountpoint}: {e}") from None
    clean = False
    try:
        if opts.user:
            # The mount needed root (/dev/fuse); from here on we are the user, and every
            # KMS request carries the user's uid (SO_PEERCRED).
            serve_as(opts.user, backing)
            if kmsconn.check_key(kms, opts.key) != key_id:  # the user may use it too
                raise UserError(f"key {opts.key} names another key for {opts.user}")
            if config.encrypt_names:
                check_name_key(backing, kms, key_id)
        log.info("mounted %s on %s (key %s)", os.fsdecode(backing), mountpoint, key_id)
        tuning.quiet_cycle_collector()
        trio.run(_serve, ops, keys, kms)
        clean = True
    finally:
        ops.close_all()
        back_to_root()  # unmounting a mount made by root needs root
        pyfuse3.close(unmount=True)
        if opts.shared_backing:
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


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
