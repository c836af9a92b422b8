"""A real GlusterFS volume in a test's own temp dir, mounted by two clients ("hosts").

Debian's glusterd keeps its state in /var/lib/glusterd for the whole machine, so the
volume gets a name unique to this process and is deleted at teardown; a glusterd that
was already running (someone else's) is used and left running, and one we started is
stopped by the PID in our own pid file. Traffic stays on this machine: the brick's host
name is this machine's own (it resolves to 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

READY_TIMEOUT = 60.0

#: What encfs --shared-backing needs of a GlusterFS volume (docs/SHARED.md): no client-side
#: caching or delaying of data and metadata, so that what one client wrote and closed is
#: what the next open on another client reads.
SHARED_VOLUME_OPTIONS = {
    "performance.write-behind": "off", "performance.flush-behind": "off",
    "performance.read-ahead": "off", "performance.io-cache": "off",
    "performance.quick-read": "off", "performance.stat-prefetch": "off",
    "performance.open-behind": "off", "performance.readdir-ahead": "off",
}
#: ... and of its client mounts: no kernel attribute, entry or page caching.
SHARED_MOUNT_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0,direct-io-mode=enable"


@dataclass
class GlusterVolume:
    name: str
    brick: str
    #: one client mount per simulated host
    clients: list[str]


def _gluster(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"gluster {' '.join(args)} failed ({res.returncode}): "
                           f"{res.stdout}{res.stderr}")
    return res


def _glusterd_answers() -> bool:
    return _gluster("pool", "list", check=False, timeout=30).returncode == 0


@contextlib.contextmanager
def _glusterd(workdir: str) -> Iterator[None]:
    """A glusterd that answers: the machine's own if one runs, else one of ours."""
    if _glusterd_answers():
        yield
        return
    pidfile = os.path.join(workdir, "glusterd.pid")
    subprocess.run(["glusterd", "-p", pidfile, f"--log-file={workdir}/glusterd.log"],
                   check=True, timeout=60)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _glusterd_answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"glusterd did not answer within {READY_TIMEOUT}s")
            time.sleep(0.2)
        yield
    finally:
        _stop_pidfile(pidfile)


def _stop_pidfile(pidfile: str) -> None:
    try:
        pid = int(open(pidfile).read().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _mount_client(name: str, path: str, shared: bool) -> None:
    """Mount the volume at ``path``. A volume just started may not serve its brick yet
    (mount.glusterfs then fails at once): tried again until READY_TIMEOUT."""
    cmd = ["mount", "-t", "glusterfs", *(["-o", SHARED_MOUNT_OPTIONS] if shared else []),
           f"{socket.gethostname()}:/{name}", path]
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode == 0 and _in_mount_table(path):
            return
        _unmount(path)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                               f"{res.stdout}{res.stderr}")
        time.sleep(0.5)


def _unmount(path: str) -> None:
    if os.path.ismount(path) or _in_mount_table(path):
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def _in_mount_table(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


@contextlib.contextmanager
def gluster_volume(workdir: str, hosts: int = 2, shared: bool = False) -> Iterator[GlusterVolume]:
    """A one-brick volume under ``workdir``, mounted ``hosts`` times; all of it gone on
    exit (client mounts, the volume, and glusterd if this call started it). ``shared``:
    set up as docs/SHARED.md says for encfs --shared-backing."""
    name = f"encfs-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    brick = os.path.join(workdir, "brick")
    os.makedirs(brick, exist_ok=True)
    clients = [os.path.join(workdir, f"host-{chr(ord('a') + i)}") for i in range(hosts)]
    with _glusterd(workdir):
        # force: the brick is on the root filesystem, which gluster warns about
        _gluster("volume", "create", name, f"{socket.gethostname()}:{brick}", "force")
        try:
            for key, value in (SHARED_VOLUME_OPTIONS.items() if shared else ()):
                _gluster("volume", "set", name, key, value)
            _gluster("volume", "start", name)
            try:
                for c in clients:
                    os.makedirs(c, exist_ok=True)
                    _mount_client(name, c, shared)
                yield GlusterVolume(name=name, brick=brick, clients=clients)
            finally:
                for c in clients:
                    _unmount(c)
                _gluster("volume", "stop", name, "force", check=False)
        finally:
            _gluster("volume", "delete", name, check=False)
            shutil.rmtree(brick, ignore_errors=True)
