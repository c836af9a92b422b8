#!/usr/bin/env python3
"""Side-by-side benchmark: plain backing directory, encfs and gocryptfs on the same workloads.

    .venv/bin/python bench/bench.py [--quick] [--out PATH] [--targets plain,encfs,gocryptfs]

Every target is set up once (a plain directory, an encfs mount with its own ``kms serve``, a
gocryptfs mount when the binary is installed), all under one temporary directory. Then each
workload runs ``--reps`` times on every target, interleaved (rep 1 on every target, then rep 2,
...; the target order rotates per rep) so that noise from other work on the machine spreads over
all targets instead of landing on one. The table shows medians and the literal ratios of the
medians (encfs / gocryptfs, encfs / plain); for MB/s, IOPS and req/s higher is better, for
seconds lower is better. Daemon CPU is utime+stime of the FUSE daemon from /proc/PID/stat.

Every timed step is checked cheaply afterwards (CRC of the sequential file before and after the
remount, file counts and sizes, sample contents, ``git fsck``, sqlite row counts), so a broken
mount fails the cell (shown as ERR, details in the JSON) instead of producing a fast number.

``--profile DIR`` instead runs every workload once on encfs only with py-spy attached to the
daemon for each timed step (raw collapsed stacks + a top-frames summary per step).
See docs/PERFORMANCE.md for the method.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: stdlib top-level entries left out of the tree in quick mode
SMALL_TREE_SKIP = {"test", "idlelib", "tkinter", "lib2to3", "ensurepip", "turtledemo",
                   "lib-dynload", "distutils", "pydoc_data"}
CMD_TIMEOUT = 900  # no single command of a workload may take longer than this (seconds)


# --------------------------------------------------------------------------- configuration

@dataclass
class Config:
    reps: int
    seq_size: int          # bytes, fio sequential write/read
    rand_size: int         # bytes, file for 4 KiB random I/O
    rand_runtime: int      # seconds per random fio run
    nfiles: int            # small-file create/stat/rm
    sqlite_rows: int
    sqlite_batch: int      # rows per transaction
    kms_seconds: float     # per (operation, clients) cell of kms.bench
    quick: bool = False
    small_tree: bool = False  # leave the stdlib's big packages (test, idlelib, ...) out


FULL = Config(reps=3, seq_size=GiB, rand_size=256 * MiB, rand_runtime=10, nfiles=5000,
              sqlite_rows=100_000, sqlite_batch=100, kms_seconds=3.0)
QUICK = Config(reps=2, seq_size=256 * MiB, rand_size=256 * MiB, rand_runtime=2, nfiles=1000,
               sqlite_rows=20_000, sqlite_batch=100, kms_seconds=1.0, quick=True,
               small_tree=True)


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    goal: tuple[str, float] | None = None   # (">=" or "<=", ratio vs gocryptfs) from issue 7
    abs_goal: float | None = None            # absolute goal on encfs (req/s)
    cpu_per_gib: bool = False


def metrics(cfg: Config) -> list[Metric]:
    seq = _size(cfg.seq_size)
    rnd = _size(cfg.rand_size)
    n = f"{cfg.nfiles:,}"
    rows = f"{cfg.sqlite_rows:,}"
    tree = " (small subset)" if cfg.small_tree else ""
    return [
        Metric("seq_write", f"seq write {seq} (1 MiB, end_fsync)", "MB/s", True, (">=", 1.0),
               cpu_per_gib=True),
        Metric("seq_read", f"seq read {seq} after remount", "MB/s", True, (">=", 1.0),
               cpu_per_gib=True),
        Metric("seq_read_cold", f"seq read {seq}, remount + drop_caches", "MB/s", True,
               cpu_per_gib=True),
        Metric("randread", f"4 KiB randread, {rnd} file, {cfg.rand_runtime} s", "IOPS", True,
               (">=", 1.0)),
        Metric("randwrite", f"4 KiB randwrite, {rnd} file, {cfg.rand_runtime} s", "IOPS", True,
               (">=", 1.0)),
        Metric("randread_cold", f"4 KiB randread, {rnd} file, remount + drop_caches, no "
               "warm-up", "IOPS", True, (">=", 1.0)),
        Metric("randwrite_cold", f"4 KiB randwrite, {rnd} file, remount + drop_caches",
               "IOPS", True, (">=", 1.0)),
        Metric("create", f"create {n} 4 KiB files", "s", False, ("<=", 1.5)),
        Metric("stat", f"stat {n} files after remount", "s", False, ("<=", 1.5)),
        Metric("rm", f"rm {n} files", "s", False, ("<=", 1.5)),
        Metric("untar", f"untar Python stdlib{tree}", "s", False, ("<=", 1.5)),
        Metric("git_commit", "git init + add + commit that tree", "s", False, ("<=", 1.5)),
        Metric("git_gc", "git gc", "s", False, ("<=", 1.5)),
        Metric("git_fsck", "git fsck", "s", False, ("<=", 1.5)),
        Metric("rm_tree", "rm -rf the stdlib tree + .git", "s", False),
        Metric("sqlite_wal", f"sqlite {rows} inserts, {cfg.sqlite_batch}/txn, WAL", "s", False,
               ("<=", 1.5)),
        Metric("sqlite_rollback", f"sqlite {rows} inserts, {cfg.sqlite_batch}/txn, rollback",
               "s", False, ("<=", 1.5)),
        Metric("rsync", "rsync -a stdlib tree in", "s", False),
        # #16 item 7's goals, on a KMS of its own with --workers 2 (see wl_kms)
        Metric("kms_create_1", "KMS create-datakey, 1 client", "req/s", True, abs_goal=5000),
        Metric("kms_create_16", "KMS create-datakey, 16 clients", "req/s", True, abs_goal=10000),
        Metric("kms_decrypt_1", "KMS decrypt-datakey, 1 client", "req/s", True, abs_goal=5000),
        Metric("kms_decrypt_16", "KMS decrypt-datakey, 16 clients", "req/s", True, abs_goal=10000),
        *(Metric(f"kms_{op}_{alg}_{n}", f"KMS {op} {alg.upper()}, {n} client{'s' if n > 1 else ''}", "req/s", True)
          for op in ("sign", "verify") for alg in ("rsa2048", "ecp256") for n in (1, 16)),
    ]


def _size(n: int) -> str:
    return f"{n // GiB} GiB" if n % GiB == 0 else f"{n // MiB} MiB"


# --------------------------------------------------------------------------- helpers

class BenchError(Exception):
    """A workload failed or its result did not check out."""


def run(cmd: list[str], cwd: str | None = None, env: dict | None = None,
        timeout: float = CMD_TIMEOUT) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited with {res.returncode}: "
                         f"{(res.stderr or res.stdout).strip()[-2000:]}")
    return res.stdout


def proc_cpu(pid: int | None) -> float | None:
    """utime + stime (all threads) of a process in seconds, None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def crc_file(path: str) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(MiB)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return crc, size


def tree_summary(root: str) -> tuple[int, int]:
    """(number of regular files, total bytes) under root."""
    files = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if not os.path.islink(os.path.join(dirpath, n)):
                files += 1
                total += st.st_size
    return files, total


def rmtree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


def fio(args: list[str]) -> dict:
    out = run(["fio", "--output-format=json", "--ioengine=psync", *args])
    # fio may print warnings before the JSON document
    return json.loads(out[out.index("{"):])["jobs"][0]


def tool_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


# --------------------------------------------------------------------------- targets

class Target:
    name = "?"
    fuse = True

    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, self.name)
        os.makedirs(self.root)
        self.dir = ""

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def remount(self) -> None:
        """Drop the FUSE kernel state (dentries, attributes, page cache of the mount)."""

    def daemon_pid(self) -> int | None:
        return None

    def kms_pid(self) -> int | None:
        return None

    def alive(self) -> str | None:
        """None when healthy, else what is wrong."""
        return None

    def recover(self) -> None:
        """Bring a dead mount back for the next workloads."""

    def daemon_log(self) -> str:
        return ""

    def backing_bytes(self) -> int:
        """Apparent size of everything in the backing directory (ciphertext + metadata)."""
        return sum(os.lstat(os.path.join(d, n)).st_size
                   for d, _dirs, names in os.walk(self.backing_dir()) for n in names)

    def backing_dir(self) -> str:
        return self.dir


class PlainTarget(Target):
    name = "plain"
    fuse = False

    def start(self) -> None:
        self.dir = os.path.join(self.root, "dir")
        os.makedirs(self.dir)

    def remount(self) -> None:
        os.sync()


class MountedEncfs:
    """What the bench asks of an encfs target with `mount` (an EncryptedMount) and `kms`
    (a KmsServer): shared by the single mount and the shared-backing pair."""

    def backing_dir(self) -> str:
        return self.mount.backing

    def remount(self) -> None:
        self.mount.remount()

    def daemon_pid(self) -> int | None:
        p = self.mount.process
        return p.pid if p is not None else None

    def kms_pid(self) -> int | None:
        return self.kms.process.pid

    def alive(self) -> str | None:
        p = self.mount.process
        if self.kms.process.poll() is not None:
            return f"kms serve exited with {self.kms.process.returncode}"
        if p is None or p.poll() is not None:
            return f"encfs daemon exited with {None if p is None else p.returncode}"
        if not os.path.ismount(self.dir):
            return "mountpoint is not mounted"
        return None

    def recover(self) -> None:
        if self.kms.process.poll() is not None:
            self.kms.start()
        self.mount.unmount()
        if os.path.ismount(self.dir) or _stale_mount(self.dir):
            subprocess.run(["fusermount3", "-u", "-z", self.dir], capture_output=True)
        self.mount.mount()

    def daemon_log(self) -> str:
        try:
            return self.mount.log()[-4000:]
        except OSError:
            return ""


class EncfsTarget(MountedEncfs, Target):
    name = "encfs"
    mount_args: list[str] = []

    def start(self) -> None:
        from encfs.pytest_plugin import make_mount, start_kms_server
        kms_dir = os.path.join(self.root, "kms")
        os.makedirs(kms_dir)
        # The bench measures the KMS's capacity, not its per-caller throttle (default 2000/s).
        help_text = subprocess.run([sys.executable, "-m", "kms", "serve", "--help"],
                                   capture_output=True, text=True).stdout
        self.kms_args = ["--rate-limit", "0"] if "--rate-limit" in help_text else []
        self.kms = start_kms_server(kms_dir, extra_args=self.kms_args)
        self.mount = make_mount(self.kms, os.path.join(self.root, "fs"),
                                extra_args=list(self.mount_args))
        self.dir = self.mount.mountpoint

    def stop(self) -> None:
        try:
            if getattr(self, "mount", None) is not None:
                self.mount.unmount()
        finally:
            if getattr(self, "kms", None) is not None:
                self.kms.stop()


def _stale_mount(path: str) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return True


class GocryptfsTarget(Target):
    name = "gocryptfs"
    PASSWORD_CMD = "echo pw"

    def start(self) -> None:
        self.cipher = os.path.join(self.root, "cipher")
        self.dir = os.path.join(self.root, "mnt")
        self.log_path = os.path.join(self.root, "gocryptfs.log")
        os.makedirs(self.cipher)
        os.makedirs(self.dir)
        run(["gocryptfs", "-init", "-q", "-extpass", self.PASSWORD_CMD, "-scryptn", "10",
             self.cipher])
        self.proc: subprocess.Popen | None = None
        self._mount()

    def _mount(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["gocryptfs", "-fg", "-extpass", self.PASSWORD_CMD,
                                      self.cipher, self.dir],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.dir):
            if self.proc.poll() is not None:
                raise BenchError(f"gocryptfs exited with {self.proc.returncode}: "
                                 f"{self.daemon_log()}")
            if time.monotonic() > deadline:
                self._unmount()
                raise BenchError("gocryptfs mount not ready in 20 s")
            time.sleep(0.02)

    def _unmount(self) -> None:
        if os.path.ismount(self.dir):
            if subprocess.run(["fusermount3", "-u", self.dir], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-u", "-z", self.dir], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def backing_dir(self) -> str:
        return self.cipher

    def stop(self) -> None:
        if hasattr(self, "proc"):
            self._unmount()

    def remount(self) -> None:
        self._unmount()
        self._mount()

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> str | None:
        if self.proc is None or self.proc.poll() is not None:
            return "gocryptfs exited"
        if not os.path.ismount(self.dir):
            return "mountpoint is not mounted"
        return None

    def recover(self) -> None:
        self._unmount()
        if _stale_mount(self.dir):
            subprocess.run(["fusermount3", "-u", "-z", self.dir], capture_output=True)
        self._mount()

    def daemon_log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class EncfsNamesTarget(EncfsTarget):
    """encfs with --encrypt-names (#18): its own column and the ratio to plain-name encfs."""
    name = "encfs-names"
    mount_args = ["--encrypt-names"]


class GlusterTarget(Target):
    """A plain GlusterFS client mount (a one-brick volume on this machine, set up for
    shared encfs as docs/SHARED.md says): the reference of the shared column."""
    name = "gluster"

    def _volume(self, hosts: int):
        import contextlib
        sys.path.insert(0, str(REPO / "tests"))
        from gluster import gluster_volume  # tests/gluster.py: the tested fixture
        self._stack = contextlib.ExitStack()
        return self._stack.enter_context(gluster_volume(self.root, hosts=hosts, shared=True))

    def start(self) -> None:
        self.vol = self._volume(1)
        self.dir = os.path.join(self.vol.clients[0], "dir")
        os.makedirs(self.dir)

    def stop(self) -> None:
        if getattr(self, "_stack", None) is not None:
            self._stack.close()


class EncfsSharedTarget(MountedEncfs, GlusterTarget):
    """Two `encfs mount --shared-backing` of one backing dir on two clients of one
    GlusterFS volume ("hosts" a and b), one KMS; the workloads run on a while b is
    mounted (docs/SHARED.md)."""
    name = "encfs-shared"

    def start(self) -> None:
        from encfs.pytest_plugin import EncryptedMount, start_kms_server
        self.vol = self._volume(2)
        kms_dir = os.path.join(self.root, "kms")
        os.makedirs(kms_dir)
        help_text = subprocess.run([sys.executable, "-m", "kms", "serve", "--help"],
                                   capture_output=True, text=True).stdout
        self.kms = start_kms_server(kms_dir, extra_args=["--rate-limit", "0"]
                                    if "--rate-limit" in help_text else [])
        self.mounts = []
        for i, client in enumerate(self.vol.clients):
            backing = os.path.join(client, "backing")
            os.makedirs(backing, exist_ok=True)
            mnt = os.path.join(self.root, f"mnt-{'ab'[i]}")
            os.makedirs(mnt)
            m = EncryptedMount(mountpoint=mnt, backing=backing, key_id="sfs/default",
                               kms=self.kms, extra_args=["--shared-backing"],
                               log_path=os.path.join(self.root, f"encfs-{'ab'[i]}.log"))
            m.mount()
            self.mounts.append(m)
        self.mount = self.mounts[0]
        self.dir = self.mount.mountpoint

    def stop(self) -> None:
        try:
            for m in getattr(self, "mounts", []):
                m.unmount()
            if getattr(self, "kms", None) is not None:
                self.kms.stop()
        finally:
            super().stop()


TARGETS: dict[str, type[Target]] = {"plain": PlainTarget, "encfs": EncfsTarget,
                                    "gocryptfs": GocryptfsTarget,
                                    "encfs-names": EncfsNamesTarget,
                                    "gluster": GlusterTarget, "encfs-shared": EncfsSharedTarget}


# --------------------------------------------------------------------------- measuring

class Profiler:
    """py-spy attached to the encfs daemon around each timed step (``--profile`` mode)."""

    def __init__(self, out_dir: str, rate: int) -> None:
        self.out_dir = out_dir
        self.rate = rate
        self.exe = shutil.which("py-spy", path=os.path.dirname(sys.executable) + ":" +
                                os.environ.get("PATH", ""))
        if not self.exe:
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        os.makedirs(out_dir, exist_ok=True)

    def start(self, pid: int, name: str) -> tuple[subprocess.Popen, str]:
        raw = os.path.join(self.out_dir, f"{name}.collapsed.txt")
        p = subprocess.Popen([self.exe, "record", "--pid", str(pid), "--rate", str(self.rate),
                              "--nonblocking", "--format", "raw", "--output", raw],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.7)  # py-spy needs a moment to attach
        return p, raw

    def stop(self, handle: tuple[subprocess.Popen, str], name: str, seconds: float) -> None:
        p, raw = handle
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if os.path.exists(raw):
            summary = summarize_collapsed(raw, seconds, self.rate)
            Path(os.path.join(self.out_dir, f"{name}.top.txt")).write_text(summary)


def summarize_collapsed(path: str, seconds: float, rate: int) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_count[frames[-1]] += count
        for fr in set(frames):
            incl[fr] += count
    out = [f"samples {total} over {seconds:.2f} s at {rate} Hz "
           f"(daemon busy about {100 * total / max(seconds * rate, 1):.0f} % of the step)", "",
           "self (leaf frame):"]
    out += [f"  {100 * c / max(total, 1):5.1f}%  {fr}" for fr, c in self_count.most_common(25)]
    out += ["", "inclusive:"]
    out += [f"  {100 * c / max(total, 1):5.1f}%  {fr}" for fr, c in incl.most_common(40)]
    return "\n".join(out) + "\n"


class Runner:
    def __init__(self, cfg: Config, targets: list[Target], work: str,
                 profiler: Profiler | None = None) -> None:
        self.cfg = cfg
        self.targets = targets
        self.work = work
        self.profiler = profiler
        self.samples: dict[str, dict[str, list[dict]]] = {t.name: {} for t in targets}
        self.errors: list[dict] = []
        self.notes: list[str] = []
        self.src_tar = ""
        self.src_tree = ""
        self.src_summary = (0, 0)
        self.elapsed: dict[str, float] = {}

    # one timed step: wall time, and daemon / KMS CPU over exactly that step
    def timed(self, t: Target, key: str, fn: Callable[[], Any]) -> tuple[float, Any, dict]:
        pid, kpid = t.daemon_pid(), t.kms_pid()
        prof = self.profiler.start(pid, key) if (self.profiler and pid) else None
        c0, k0 = proc_cpu(pid), proc_cpu(kpid)
        t0 = time.perf_counter()
        try:
            value = fn()
        finally:
            wall = time.perf_counter() - t0
            c1, k1 = proc_cpu(pid), proc_cpu(kpid)
            if prof:
                self.profiler.stop(prof, key, wall)
        cpu = {"daemon_cpu_s": None if c0 is None or c1 is None else round(c1 - c0, 3),
               "kms_cpu_s": None if k0 is None or k1 is None else round(k1 - k0, 3)}
        return wall, value, cpu

    def record(self, t: Target, key: str, value: float, rep: int, **extra: Any) -> None:
        self.samples[t.name].setdefault(key, []).append({"rep": rep, "value": value,
                                                         "load1": _load1(), **extra})

    # ----------------------------------------------------------------- workloads

    def wl_seq(self, t: Target, rep: int) -> None:
        size = self.cfg.seq_size
        path = os.path.join(t.dir, "seq.bin")
        if os.path.exists(path):
            os.unlink(path)
        os.sync()
        common = [f"--filename={path}", "--bs=1M", f"--size={size}"]
        _, job, cpu = self.timed(t, "seq_write", lambda: fio(
            ["--name=seqwrite", "--rw=write", "--end_fsync=1", "--refill_buffers=1", *common]))
        w = job["write"]
        if w["io_bytes"] != size:
            raise BenchError(f"seq write moved {w['io_bytes']} of {size} bytes")
        self.record(t, "seq_write", w["bw_bytes"] / 1e6, rep, bytes=size,
                    backing_bytes=t.backing_bytes(), **cpu)
        crc_written = crc_file(path)  # from the page cache, i.e. what fio wrote
        if crc_written[1] != size:
            raise BenchError(f"seq file has {crc_written[1]} bytes, expected {size}")

        if t.fuse:
            t.remount()
        elif not drop_caches():
            self.note("plain seq read: /proc/sys/vm/drop_caches not writable, page cache warm")
        _, job, cpu = self.timed(t, "seq_read", lambda: fio(
            ["--name=seqread", "--rw=read", *common]))
        r = job["read"]
        if r["io_bytes"] != size:
            raise BenchError(f"seq read moved {r['io_bytes']} of {size} bytes")
        crc_read = crc_file(path)
        if crc_read != crc_written:
            raise BenchError(f"seq file CRC after remount {crc_read} != written {crc_written}")
        self.record(t, "seq_read", r["bw_bytes"] / 1e6, rep, bytes=size, **cpu)

        if can_drop_caches():
            t.remount()
            drop_caches()
            _, job, cpu = self.timed(t, "seq_read_cold", lambda: fio(
                ["--name=seqreadcold", "--rw=read", *common]))
            r = job["read"]
            if r["io_bytes"] != size:
                raise BenchError(f"cold seq read moved {r['io_bytes']} of {size} bytes")
            self.record(t, "seq_read_cold", r["bw_bytes"] / 1e6, rep, bytes=size, **cpu)
        os.unlink(path)
        os.sync()

    def prep_rand(self, t: Target) -> None:
        path = os.path.join(t.dir, "rand.bin")
        job = fio(["--name=layout", f"--filename={path}", "--rw=write", "--bs=1M",
                   f"--size={self.cfg.rand_size}", "--end_fsync=1"])
        self.record(t, "rand_layout_MBps", job["write"]["bw_bytes"] / 1e6, 0)

    def wl_rand(self, t: Target, rep: int) -> None:
        path = os.path.join(t.dir, "rand.bin")
        if not os.path.exists(path):
            self.prep_rand(t)
        for key, rw in (("randread", "randread"), ("randwrite", "randwrite"),
                        ("randread_cold", "randread"), ("randwrite_cold", "randwrite")):
            os.sync()
            if key == "randread":  # measure cached reads on every target (as issue 7 did)
                crc_file(path)
            elif key.endswith("_cold"):
                # A file opened after mounting (a database, an image): every first 4 KiB
                # read is a miss of the mount's page cache, and of the backing's.
                if t.fuse:
                    t.remount()
                drop_caches()
            _, job, cpu = self.timed(t, key, lambda: fio(
                [f"--name={key}", f"--filename={path}", f"--rw={rw}", "--bs=4k",
                 f"--size={self.cfg.rand_size}", f"--runtime={self.cfg.rand_runtime}",
                 "--time_based", "--invalidate=0"]))
            side = job["read" if rw == "randread" else "write"]
            if side["total_ios"] <= 0 or job.get("error"):
                raise BenchError(f"{key}: no I/O completed (error {job.get('error')})")
            self.record(t, key, side["iops"], rep, ios=side["total_ios"], **cpu)
        if os.path.getsize(path) != self.cfg.rand_size:
            raise BenchError(f"rand file size {os.path.getsize(path)} != {self.cfg.rand_size}")
        os.sync()

    def wl_files(self, t: Target, rep: int) -> None:
        n = self.cfg.nfiles
        d = os.path.join(t.dir, f"files-{rep}")
        os.mkdir(d)
        base = os.urandom(4096)
        names = [f"f{i:05d}" for i in range(n)]

        def create() -> None:
            for i, name in enumerate(names):
                with open(os.path.join(d, name), "wb") as f:
                    f.write(b"%08d" % i + base[8:])

        wall, _, cpu = self.timed(t, "create", create)
        self.record(t, "create", wall, rep, **cpu)
        t.remount()

        def stat() -> list[os.stat_result]:
            return [os.stat(os.path.join(d, name)) for name in os.listdir(d)]

        wall, sts, cpu = self.timed(t, "stat", stat)
        if len(sts) != n or any(st.st_size != 4096 for st in sts):
            raise BenchError(f"stat: {len(sts)} entries, sizes {sorted({s.st_size for s in sts})}")
        self.record(t, "stat", wall, rep, **cpu)
        for i in range(0, n, max(n // 50, 1)):  # sample contents
            with open(os.path.join(d, names[i]), "rb") as f:
                if f.read() != b"%08d" % i + base[8:]:
                    raise BenchError(f"content of {names[i]} differs after remount")

        def rm() -> None:
            for name in names:
                os.unlink(os.path.join(d, name))
            os.rmdir(d)

        wall, _, cpu = self.timed(t, "rm", rm)
        self.record(t, "rm", wall, rep, **cpu)
        os.sync()

    def check_tree(self, path: str, what: str) -> None:
        got = tree_summary(path)
        if got != self.src_summary:
            raise BenchError(f"{what}: {got[0]} files / {got[1]} bytes, expected "
                             f"{self.src_summary[0]} / {self.src_summary[1]}")

    def wl_tree(self, t: Target, rep: int) -> None:
        """untar the stdlib, commit it to git, git gc, git fsck, rm -rf the tree."""
        d = os.path.join(t.dir, f"tree-{rep}")
        os.mkdir(d)
        wall, _, cpu = self.timed(t, "untar", lambda: run(["tar", "-xf", self.src_tar, "-C", d]))
        self.check_tree(d, "untar")
        self.record(t, "untar", wall, rep, **cpu)
        env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
               "HOME": self.work, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@x",
               "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@x"}
        git = ["git", "-c", "gc.auto=0", "-c", "init.defaultBranch=main"]
        os.sync()

        def commit() -> None:
            run([*git, "init", "-q"], cwd=d, env=env)
            run([*git, "add", "-A"], cwd=d, env=env)
            run([*git, "commit", "-q", "-m", "bench"], cwd=d, env=env)

        wall, _, cpu = self.timed(t, "git_commit", commit)
        self.record(t, "git_commit", wall, rep, **cpu)
        wall, _, cpu = self.timed(t, "git_gc", lambda: run([*git, "gc", "-q"], cwd=d, env=env))
        self.record(t, "git_gc", wall, rep, **cpu)
        wall, _, cpu = self.timed(t, "git_fsck", lambda: run(
            [*git, "fsck", "--full", "--strict", "--no-progress"], cwd=d, env=env))
        self.record(t, "git_fsck", wall, rep, **cpu)
        tracked = run([*git, "ls-files"], cwd=d, env=env).count("\n")
        if tracked != self.src_summary[0]:
            raise BenchError(f"git tracks {tracked} files, expected {self.src_summary[0]}")
        os.sync()
        wall, _, cpu = self.timed(t, "rm_tree", lambda: rmtree(d))
        self.record(t, "rm_tree", wall, rep, **cpu)
        os.sync()

    def wl_sqlite(self, t: Target, rep: int) -> None:
        for key, mode in (("sqlite_wal", "WAL"), ("sqlite_rollback", "DELETE")):
            path = os.path.join(t.dir, f"bench-{rep}-{mode}.db")
            payload = os.urandom(50).hex()
            rows, batch = self.cfg.sqlite_rows, self.cfg.sqlite_batch

            def inserts() -> int:
                con = sqlite3.connect(path, isolation_level=None)
                try:
                    got = con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
                    if got.upper() != mode:
                        raise BenchError(f"journal_mode {mode} refused (got {got})")
                    con.execute("PRAGMA synchronous=FULL")
                    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, s TEXT)")
                    for start in range(0, rows, batch):
                        con.execute("BEGIN")
                        for i in range(start, min(start + batch, rows)):
                            con.execute("INSERT INTO t (n, s) VALUES (?, ?)", (i, payload))
                        con.execute("COMMIT")
                    return con.execute("SELECT count(*), sum(n) FROM t").fetchone()
                finally:
                    con.close()

            wall, got, cpu = self.timed(t, key, inserts)
            if tuple(got) != (rows, rows * (rows - 1) // 2):
                raise BenchError(f"{key}: table has {got}, expected {rows} rows")
            self.record(t, key, wall, rep, **cpu)
            for suffix in ("", "-wal", "-shm", "-journal"):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
        os.sync()

    def wl_rsync(self, t: Target, rep: int) -> None:
        d = os.path.join(t.dir, f"rsync-{rep}")
        wall, _, cpu = self.timed(t, "rsync", lambda: run(
            ["rsync", "-a", self.src_tree + "/", d + "/"]))
        self.check_tree(d, "rsync")
        self.record(t, "rsync", wall, rep, **cpu)
        rmtree(d)
        os.sync()

    def wl_kms(self, t: Target, rep: int) -> None:
        if not isinstance(t, EncfsTarget):
            return
        secs = self.cfg.kms_seconds
        how = "kms.bench"
        kms = t.kms
        own = None
        if "--workers" in subprocess.run([sys.executable, "-m", "kms", "serve", "--help"], cwd=str(REPO),
                                         capture_output=True, text=True).stdout:
            # A KMS of its own, as one serving many hosts would run: both cores (kms serve --workers 2)
            from encfs.pytest_plugin import start_kms_server
            own = start_kms_server(os.path.join(t.root, f"kms-bench-{rep}"),
                                   extra_args=[*t.kms_args, "--workers", "2", "--log-level", "warning"])
            kms, how = own, "kms.bench, kms serve --workers 2"
        try:
            out = run([sys.executable, "-m", "kms.bench", "--socket", kms.socket_path,
                       "--project-id", kms.project_id, "--seconds", str(secs),
                       "--clients", "1,16", "--ops", "all", "--json"], cwd=str(REPO))
            rows = json.loads(out)
            rates = {(r["operation"], int(r["clients"])): float(r["requests_per_second"])
                     for r in rows}
        except (BenchError, ValueError, KeyError, TypeError) as e:
            self.note(f"python -m kms.bench unusable ({str(e)[:200]}); used bench's own loop")
            how = "bench.kms_rate"
            rates = {(op, n): kms_rate(kms.socket_path, kms.project_id, op, n, secs)
                     for op in ("create-datakey", "decrypt-datakey") for n in (1, 16)}
        finally:
            if own is not None:
                own.stop()
                shutil.rmtree(os.path.join(t.root, f"kms-bench-{rep}"), ignore_errors=True)
        for (op, n), rate in rates.items():
            # "create-datakey" -> kms_create_N; "sign RSA_2048" -> kms_sign_rsa2048_N
            name = {"create-datakey": "create", "decrypt-datakey": "decrypt"}.get(op) or \
                op.lower().replace(" ", "_").replace("rsa_2048", "rsa2048").replace("ec_p256", "ecp256")
            key = f"kms_{name}_{n}"
            self.record(t, key, rate, rep, tool=how)

    WORKLOADS = ("seq", "rand", "files", "tree", "sqlite", "rsync", "kms")

    # ----------------------------------------------------------------- driving

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            log(f"note: {msg}")

    def prepare_sources(self) -> None:
        import sysconfig
        stdlib = sysconfig.get_paths()["stdlib"]
        src = os.path.join(self.work, "src")
        os.makedirs(src)
        self.src_tar = os.path.join(src, "stdlib.tar")
        parent, name = os.path.split(stdlib.rstrip("/"))

        def keep(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
            parts = ti.name.split("/")
            if ("site-packages" in parts or "__pycache__" in parts
                    or any(p.startswith("config-") for p in parts[1:2])
                    or (self.cfg.small_tree and parts[1:2] and parts[1] in SMALL_TREE_SKIP)):
                return None
            return ti

        with tarfile.open(self.src_tar, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(stdlib, arcname=name, filter=keep)
        self.src_tree = os.path.join(src, "tree")
        os.mkdir(self.src_tree)
        run(["tar", "-xf", self.src_tar, "-C", self.src_tree])
        self.src_summary = tree_summary(self.src_tree)
        self.source_info = {"stdlib": stdlib, "files": self.src_summary[0],
                            "bytes": self.src_summary[1],
                            "tar_bytes": os.path.getsize(self.src_tar),
                            "excluded": ["site-packages", "__pycache__", "config-*"]
                            + (sorted(SMALL_TREE_SKIP) if self.cfg.small_tree else [])}
        log(f"source tree: {stdlib} without {', '.join(self.source_info['excluded'])}: "
            f"{self.src_summary[0]} files, {self.src_summary[1] / 1e6:.0f} MB")

    def run_all(self, workloads: list[str]) -> None:
        for wl in workloads:
            wl_t0 = time.perf_counter()
            fn = getattr(self, f"wl_{wl}")
            reps = self.cfg.reps
            for rep in range(reps):
                k = rep % len(self.targets)
                order = self.targets[k:] + self.targets[:k]
                for t in order:
                    if wl == "kms" and not isinstance(t, EncfsTarget):
                        continue
                    problem = t.alive()
                    if problem:
                        self.fail(t, wl, rep, f"before the run: {problem}")
                        if not self.try_recover(t):
                            continue
                    t0 = time.perf_counter()
                    try:
                        fn(t, rep)
                        log(f"{wl:<7} rep {rep + 1}/{reps} {t.name:<10} "
                            f"{time.perf_counter() - t0:6.1f} s  {self.brief(t, wl, rep)}")
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # noqa: BLE001 - recorded and shown as ERR
                        problem = t.alive()
                        self.fail(t, wl, rep, f"{type(e).__name__}: {e}"
                                  + (f" [mount: {problem}]" if problem else ""),
                                  traceback.format_exc())
                        if problem:
                            self.try_recover(t)
                        self.cleanup_after_failure(t)
            self.elapsed[wl] = round(time.perf_counter() - wl_t0, 1)
            log(f"{wl}: {self.elapsed[wl]:.0f} s in all")
            if wl == "rand":
                for t in self.targets:
                    p = os.path.join(t.dir, "rand.bin")
                    try:
                        if os.path.exists(p):
                            os.unlink(p)
                    except OSError:
                        pass

    def brief(self, t: Target, wl: str, rep: int) -> str:
        parts = []
        for key, vals in self.samples[t.name].items():
            for v in vals:
                if v["rep"] == rep and key in METRIC_UNITS:
                    parts.append(f"{key}={fmt_value(v['value'], METRIC_UNITS[key])}")
        keys = {"seq": ("seq_",), "rand": ("rand",), "files": ("create", "stat", "rm"),
                "tree": ("untar", "git_", "rm_tree"), "sqlite": ("sqlite_",),
                "rsync": ("rsync",), "kms": ("kms_",)}[wl]
        return " ".join(p for p in parts if p.startswith(keys))

    def fail(self, t: Target, wl: str, rep: int, msg: str, tb: str = "") -> None:
        log(f"ERROR {wl} rep {rep + 1} on {t.name}: {msg}")
        self.errors.append({"target": t.name, "workload": wl, "rep": rep, "error": msg,
                            "traceback": tb, "daemon_log_tail": t.daemon_log()[-2000:]})

    def try_recover(self, t: Target) -> bool:
        try:
            t.recover()
            log(f"{t.name}: remounted after failure")
            return True
        except Exception as e:  # noqa: BLE001
            log(f"{t.name}: could not recover: {e}")
            return False

    def cleanup_after_failure(self, t: Target) -> None:
        if not t.dir or not os.path.isdir(t.dir):
            return
        for name in os.listdir(t.dir):
            p = os.path.join(t.dir, name)
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
            except OSError:
                pass


def kms_rate(socket_path: str, project_id: str, op: str, clients: int, seconds: float) -> float:
    """Fallback when ``python -m kms.bench`` is missing: requests/s with keep-alive clients."""
    from kms.client import KmsClient
    with KmsClient(socket_path, project_id) as c:
        key_id = c.resolve_key("sfs/default")["key_id"]
        _dek, ct = c.create_datakey(key_id)
    counts = [0] * clients
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        try:
            with KmsClient(socket_path, project_id) as c:
                c.describe_key(key_id)
                barrier.wait()
                while time.perf_counter() < stop_at[0]:
                    if op == "create-datakey":
                        c.create_datakey(key_id)
                    else:
                        c.decrypt_datakey(key_id, ct)
                    counts[i] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    stop_at[0] = time.perf_counter() + 3600
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- report

METRIC_UNITS: dict[str, str] = {m.key: m.unit for m in metrics(FULL)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    if unit in ("MB/s", "req/s"):
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def summarize(samples: list[dict]) -> dict:
    vals = [s["value"] for s in samples]
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals), "n": len(vals),
            "spread_pct": round(100 * (max(vals) - min(vals)) / (2 * med), 1) if med else None,
            "values": vals}


def cell(summary: dict | None, unit: str, error: bool) -> str:
    if summary is None:
        return "ERR" if error else "–"
    s = fmt_value(summary["median"], unit)
    if summary["n"] > 1 and summary["spread_pct"] is not None:
        s += f" ±{summary['spread_pct']:.0f}%"
    if error:
        s += " (ERR)"
    return s


def build_report(runner: Runner, cfg: Config) -> tuple[dict, str]:
    names = [t.name for t in runner.targets]
    err_keys = collections.defaultdict(set)
    wl_of = {"seq_write": "seq", "seq_read": "seq", "seq_read_cold": "seq", "randread": "rand",
             "randread_cold": "rand", "randwrite_cold": "rand",
             "randwrite": "rand", "create": "files", "stat": "files", "rm": "files",
             "untar": "tree", "git_commit": "tree", "git_gc": "tree", "git_fsck": "tree",
             "rm_tree": "tree",
             "sqlite_wal": "sqlite", "sqlite_rollback": "sqlite", "rsync": "rsync"}
    for e in runner.errors:
        err_keys[e["target"]].add(e["workload"])

    summaries: dict[str, dict[str, dict]] = {}
    for t in names:
        summaries[t] = {k: summarize(v) for k, v in runner.samples[t].items() if v}

    def med(t: str, key: str) -> float | None:
        s = summaries.get(t, {}).get(key)
        return s["median"] if s else None

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a is not None and b else "–"

    names_col = "encfs-names" in names  # --encrypt-names: its own column and ratio
    shared_col = "encfs-shared" in names  # docs/SHARED.md: on GlusterFS, against GlusterFS
    lines = ["| workload | unit | plain | encfs | gocryptfs | encfs/gocryptfs | encfs/plain "
             "| issue-7 goal |" + (" encfs-names | names/encfs |" if names_col else "")
             + (" gluster | encfs-shared | shared/gluster |" if shared_col else ""),
             "|---|---|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if names_col else "")
             + ("---:|---:|---:|" if shared_col else "")]
    rows = []
    for m in metrics(cfg):
        present = any(m.key in summaries.get(t, {}) for t in names)
        wl = wl_of.get(m.key, "kms")
        errored = {t: wl in err_keys.get(t, set())
                   for t in ("plain", "encfs", "gocryptfs", "encfs-names", "gluster",
                             "encfs-shared")}
        if not present and not any(errored.values()):
            continue
        e, g, p = med("encfs", m.key), med("gocryptfs", m.key), med("plain", m.key)
        goal = ""
        if m.goal and e is not None and g:
            op, want = m.goal
            r = e / g
            ok = r >= want if op == ">=" else r <= want
            goal = f"{'≥' if op == '>=' else '≤'}{want:.1f}x: {'ok' if ok else 'MISS'}"
        elif m.abs_goal and e is not None:
            goal = f"≥{m.abs_goal:,.0f}/s: {'ok' if e >= m.abs_goal else 'MISS'}"
        arrow = "↑" if m.higher_better else "↓"
        cells = [cell(summaries.get(t, {}).get(m.key), m.unit,
                      errored[t] and t in names) if t in names else "n/a"
                 for t in ("plain", "encfs", "gocryptfs")]
        extra = ""
        if names_col:
            en = med("encfs-names", m.key)
            extra = (f" {cell(summaries.get('encfs-names', {}).get(m.key), m.unit, errored['encfs-names'])}"
                     f" | {ratio(en, e)} |")
        if shared_col:
            gl, sh = med("gluster", m.key), med("encfs-shared", m.key)
            extra += " " + " | ".join(
                cell(summaries.get(t, {}).get(m.key), m.unit, errored[t]) if t in names
                else "n/a" for t in ("gluster", "encfs-shared")) + f" | {ratio(sh, gl)} |"
        lines.append(f"| {m.label} | {m.unit} {arrow} | {' | '.join(cells)} | {ratio(e, g)} "
                     f"| {ratio(e, p)} | {goal} |" + extra)
        rows.append({"key": m.key, "label": m.label, "unit": m.unit,
                     "higher_is_better": m.higher_better,
                     "median": {t: med(t, m.key) for t in names},
                     "encfs_over_gocryptfs": e / g if e is not None and g else None,
                     "encfs_over_plain": e / p if e is not None and p else None,
                     "goal": goal or None})

    cpu_lines = ["| daemon CPU s/GiB (utime+stime) | encfs | gocryptfs | encfs/gocryptfs |",
                 "|---|---:|---:|---:|"]
    cpu_rows = {}
    for m in metrics(cfg):
        if not m.cpu_per_gib:
            continue
        vals = {}
        for t in ("encfs", "gocryptfs"):
            ss = [s for s in runner.samples.get(t, {}).get(m.key, [])
                  if s.get("daemon_cpu_s") is not None]
            vals[t] = (statistics.median(s["daemon_cpu_s"] / (s["bytes"] / GiB) for s in ss)
                       if ss else None)
        if all(v is None for v in vals.values()):
            continue
        cpu_rows[m.key] = vals
        cpu_lines.append(f"| {m.label} | {fmt_cpu(vals['encfs'])} | {fmt_cpu(vals['gocryptfs'])}"
                         f" | {ratio(vals['encfs'], vals['gocryptfs'])} |")

    text = "\n".join(lines) + "\n"
    if cpu_rows:
        text += "\n" + "\n".join(cpu_lines) + "\n"
    report = {"rows": rows, "cpu_s_per_gib": cpu_rows, "summaries": summaries}
    return report, text


def fmt_cpu(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def code_fingerprint() -> dict:
    h = hashlib.sha256()
    for p in sorted((REPO / "encfs").glob("*.py")) + sorted((REPO / "kms").glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    info = {"encfs_kms_sources_sha256": h.hexdigest()[:16]}
    try:
        info["git_head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
        info["uncommitted_changes_in_encfs_or_kms"] = bool(subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "encfs", "kms"],
            capture_output=True).returncode)
    except OSError:
        pass
    return info


def environment(cfg: Config, work: str) -> dict:
    def mod_version(name: str) -> str | None:
        try:
            import importlib.metadata as md
            return md.version(name)
        except Exception:  # noqa: BLE001
            return None

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    st = os.statvfs(work)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(), "cpu": cpu,
        "cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                 * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "python": platform.python_version(),
        "versions": {"pyfuse3": mod_version("pyfuse3"), "trio": mod_version("trio"),
                     "cryptography": mod_version("cryptography"),
                     "fio": tool_version(["fio", "--version"]),
                     "gocryptfs": tool_version(["gocryptfs", "--version"]),
                     "git": tool_version(["git", "--version"]),
                     "rsync": tool_version(["rsync", "--version"]),
                     "sqlite": sqlite3.sqlite_version},
        "code": code_fingerprint(),
        "workdir": work,
        "workdir_fs": _fs_of(work), "workdir_free_gib": round(st.f_bavail * st.f_frsize / GiB),
        "drop_caches_writable": can_drop_caches(),
        "config": asdict(cfg),
    }


def _fs_of(path: str) -> str:
    best = ("", "")
    try:
        for line in open("/proc/mounts"):
            dev, mnt, fstype = line.split()[:3]
            if path.startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, f"{fstype} on {dev} mounted at {mnt}")
    except OSError:
        pass
    return best[1]


def _load1() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()
    except OSError:
        return "?"


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes, 2 runs each (about 2 minutes)")
    ap.add_argument("--out", help="JSON result path (default bench/results/<timestamp>.json)")
    ap.add_argument("--targets", default="plain,encfs,gocryptfs",
                    help="comma-separated subset of plain,encfs,gocryptfs,encfs-names,"
                    "gluster,encfs-shared (the last two: the shared column, as root, "
                    "docs/SHARED.md)")
    ap.add_argument("--workloads", default=",".join(Runner.WORKLOADS),
                    help="comma-separated subset of " + ",".join(Runner.WORKLOADS))
    ap.add_argument("--reps", type=int, help="runs per workload and target (default 3, quick 2)")
    ap.add_argument("--workdir", default="/tmp",
                    help="parent of the temporary directory (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--profile", metavar="DIR",
                    help="profile the encfs daemon with py-spy per timed step; no table")
    ap.add_argument("--profile-rate", type=int, default=250)
    a = ap.parse_args(argv)

    cfg = QUICK if a.quick else FULL
    profiler = None
    if a.profile:
        profiler = Profiler(os.path.abspath(a.profile), a.profile_rate)
        cfg = Config(**{**asdict(cfg), "reps": 1})
        a.targets = "encfs"
    if a.reps:
        cfg = Config(**{**asdict(cfg), "reps": a.reps})
    names = [n.strip() for n in a.targets.split(",") if n.strip()]
    for n in names:
        if n not in TARGETS:
            ap.error(f"unknown target {n!r}")
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in Runner.WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    if "gocryptfs" in names and not shutil.which("gocryptfs"):
        log("gocryptfs is not installed: skipping that target")
        names.remove("gocryptfs")
    if not shutil.which("fio") and ({"seq", "rand"} & set(workloads)):
        ap.error("fio is not installed (make bench installs it)")

    # Ctrl-C and SIGTERM both end up in the finally blocks below.
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="encfs-bench-", dir=a.workdir)
    env = environment(cfg, work)
    log(f"workdir {work} ({env['workdir_fs']}); mode {'quick' if cfg.quick else 'full'}, "
        f"{cfg.reps} reps; targets {','.join(names)}; load {loadavg()}")
    targets: list[Target] = []
    runner: Runner | None = None
    interrupted = False
    try:
        for n in names:
            t = TARGETS[n](work)
            targets.append(t)
            t.start()
        runner = Runner(cfg, targets, work, profiler)
        if not can_drop_caches():
            runner.note("/proc/sys/vm/drop_caches is not writable: no cold-cache rows; "
                        "plain seq read is from the page cache")
        if {"tree", "rsync"} & set(workloads):
            runner.prepare_sources()
        load_start = loadavg()
        runner.run_all(workloads)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        for t in reversed(targets):
            try:
                t.stop()
            except Exception as e:  # noqa: BLE001
                log(f"stopping {t.name}: {e}")
        mounted = [t.dir for t in targets if t.dir and os.path.ismount(t.dir)]
        if mounted:
            log(f"still mounted, leaving {work} in place: {mounted}")
        elif not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if runner is None or interrupted:
        return 130 if interrupted else 1

    elapsed = time.monotonic() - started
    code_end = code_fingerprint()
    if code_end.get("encfs_kms_sources_sha256") != env["code"].get("encfs_kms_sources_sha256"):
        runner.note("encfs/kms sources changed during the run: every remount loads the code on "
                    "disk at that moment, so rows may mix code versions (rerun on a quiet tree)")
        env["code_at_end"] = code_end
    if profiler:
        log(f"profiles in {profiler.out_dir} ({elapsed:.0f} s)")
        for e in runner.errors:
            log(f"error: {e['target']} {e['workload']}: {e['error']}")
        return 1 if runner.errors else 0

    report, text = build_report(runner, cfg)
    header = (f"encfs bench, {'quick' if cfg.quick else 'full'} mode: medians of {cfg.reps} "
              f"interleaved runs (±: half the min-max range, in % of the median); "
              f"{env['date']}, {env['cpus']} CPUs, kernel {env['kernel']}, "
              f"workdir on {env['workdir_fs'].split(' mounted')[0]}; code "
              f"{env['code'].get('git_head', '?')[:7]}"
              f"{'+changes' if env['code'].get('uncommitted_changes_in_encfs_or_kms') else ''} "
              f"(sources {env['code']['encfs_kms_sources_sha256']}); "
              f"load avg start {load_start} end {loadavg()}; {elapsed:.0f} s")
    print(header)
    print()
    print(text)
    for n in runner.notes:
        print(f"note: {n}")
    for e in runner.errors:
        print(f"ERROR {e['target']} {e['workload']} rep {e['rep'] + 1}: {e['error']}")

    out = a.out or str(RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc = {"environment": env, "elapsed_s": round(elapsed, 1), "targets": names,
           "workloads": workloads, "workload_elapsed_s": runner.elapsed,
           "source_tree": getattr(runner, "source_info", None),
           "load_avg": {"start": load_start, "end": loadavg()},
           "table_markdown": text, "header": header, **report,
           "samples": runner.samples, "errors": runner.errors, "notes": runner.notes}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nJSON: {out}")
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
