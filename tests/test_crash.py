"""Crash tests: SIGKILL the filesystem (or the KMS) at a random moment of a mixed workload.

After each kill: remount; every file must be readable; a file whose last completed step
was an fsync has exactly that content; any other file holds, page by page, one of the
states it went through since its last fsync; `encfs fsck` then finds nothing. Each kill
waits until the workload has begun a seeded number of steps, the workload must have been
stopped by an error of the kill (exit code and errno), and at least one file must have
been verified. ENCFS_CRASH_RUNS sets the number of seeds per test (30 by default; 1,000 for a
long run: `ENCFS_CRASH_RUNS=1000 make test PYTEST_ARGS=tests/test_crash.py`).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from encfs.pytest_plugin import NAME_MODES, short_tempdir, make_mount
from crash_workload import STOPPED_BY_ERROR

RUNS = int(os.environ.get("ENCFS_CRASH_RUNS", "30"))
WORKLOAD = os.path.join(os.path.dirname(__file__), "crash_workload.py")
PAGE = 4096
STEP_WAIT = 120.0  # for the workload's first steps on a loaded machine: never reached


def replay(log_path: str) -> tuple[dict[str, list[bytes]], set[str]]:
    """What each file may hold after the crash, and the names of the step in flight."""
    candidates: dict[str, list[bytes]] = {}
    inflight: set[str] = set()
    with open(log_path) as f:
        lines = f.read().splitlines()
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            break  # a line torn by the crash of the writer: never happens, but be strict
        op, name = e["op"], e["name"]
        if op == "begin":
            inflight.add(name)
            continue
        if op == "write":
            content = bytes.fromhex(e["content"])
            candidates.setdefault(name, [b""]).append(content)
        elif op == "fsync":
            candidates[name] = [bytes.fromhex(e["content"])]
        elif op == "rename":
            candidates[name] = candidates.pop(e["src"])
            inflight.discard(e["src"])
        elif op == "unlink":
            candidates.pop(name, None)
        inflight.discard(name)
    return candidates, inflight


def page_member(actual: bytes, cands: list[bytes]) -> bool:
    if len(actual) > max(len(c) for c in cands):
        return False
    for p in range(0, len(actual), PAGE):
        page = actual[p:p + PAGE]
        if not any(c[p:p + PAGE] == page for c in cands):
            return False
    return True


def check_after_crash(mnt: str, log_path: str) -> int:
    """Check every file against the log; return how many files had states to verify."""
    candidates, inflight = replay(log_path)
    present = set(os.listdir(mnt)) - {"lost+found"}  # where fsck --repair puts orphans
    contents = {}
    for name in present:
        with open(f"{mnt}/{name}", "rb") as f:  # EIO here is the failure we look for
            contents[name] = f.read()
    assert present - set(candidates) - inflight == set(), "files that never existed"
    verified = 0
    for name, cands in candidates.items():
        if name in inflight:
            continue
        assert name in present, f"{name} vanished"
        assert page_member(contents[name], cands), \
            f"{name}: {len(contents[name])} bytes match none of its {len(cands)} states"
        verified += 1
    return verified


def run_fsck(m, log_path: str | None = None) -> None:
    """After recovery (a remount, then a clean unmount) fsck must find nothing at all: the
    leftovers an interrupted create or unlink leaves by design (a sidecar or a long-name
    file without its entry) are swept by the recovery itself (encfs/journal_sweep.py).
    ``log_path``: the workload's step log, to name the steps in flight in a failure."""
    base = [sys.executable, "-m", "encfs", "fsck", m.backing, "--kms-socket",
            m.kms.socket_path, "--project-id", m.kms.project_id]
    res = subprocess.run(base + ["--json"], capture_output=True, text=True)
    inflight = sorted(replay(log_path)[1]) if log_path and res.returncode else []
    assert res.returncode == 0, (f"fsck after recovery: rc {res.returncode} (steps in flight: "
                                 f"{inflight})\n{res.stdout}{res.stderr}")


def start_workload(mnt: str, log_path: str, seed: int, kind: str = "mixed") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKLOAD, mnt, log_path, str(seed), kind],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def begun_steps(log_path: str) -> int:
    try:
        with open(log_path) as f:
            return sum(1 for line in f if '"op": "begin"' in line)
    except FileNotFoundError:
        return 0


def wait_for_steps(proc: subprocess.Popen, log_path: str, n: int) -> None:
    """Until the workload has begun ``n`` steps (so the kill lands in the middle of work);
    the workload still running then, so no error of its own came before the kill."""
    deadline = time.monotonic() + STEP_WAIT
    while begun_steps(log_path) < n:
        assert proc.poll() is None, f"workload ended before the kill: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"fewer than {n} steps in {STEP_WAIT}s"
        time.sleep(0.01)
    assert proc.poll() is None, f"workload ended before the kill: {proc.stderr.read()}"


def assert_stopped_by(proc: subprocess.Popen, errnos: set[int], killed_at: float) -> None:
    """The workload ended on an OSError caused by the kill: exit code 3 and, as the last
    line of its stderr, one of ``errnos``, raised after ``killed_at``. Anything else (a
    traceback, another errno, an error before the kill) is a failure."""
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == STOPPED_BY_ERROR, f"workload rc {proc.returncode}: {err}"
    last = json.loads(err.strip().splitlines()[-1])
    assert last["stopped"] in errnos, f"workload stopped by {last}, not by the kill"
    assert last["at"] >= killed_at, f"workload stopped by {last} before the kill"


def sigkill_daemon_runs(kms_server, names_mode: str, seeds: range, kind: str,
                        steps: tuple[int, int], check_log=None) -> None:
    """Per seed: a fresh mount in ``names_mode``, the workload ``kind``, a SIGKILL of the
    daemon once a seeded number of steps (within ``steps``) were begun, then the checks
    after recovery (``check_log(log_path)`` first, on the log of what was done)."""
    for seed in seeds:
        work = short_tempdir("encfs-crash-")
        log_path = os.path.join(work, "steps.jsonl")
        m = make_mount(kms_server, work, names_mode=names_mode)
        proc = None
        try:
            proc = start_workload(m.mountpoint, log_path, seed, kind)
            wait_for_steps(proc, log_path, random.Random(seed).randint(*steps))
            killed_at = time.monotonic()
            m.process.kill()  # SIGKILL the filesystem daemon mid-workload
            m.process.wait()
            # A dead FUSE daemon: ENOTCONN for new requests, ECONNABORTED for pending ones,
            # EIO for an fsync or close whose writeback of cached pages it cut off.
            assert_stopped_by(proc, {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}, killed_at)
            if check_log is not None:
                check_log(log_path)
            m.unmount()
            m.mount()  # recovery
            assert check_after_crash(m.mountpoint, log_path) > 0, "nothing was verified"
            m.unmount()
            run_fsck(m, log_path)
            m.mount()
            check_after_crash(m.mountpoint, log_path)
        except BaseException:
            print(f"seed {seed}; log {m.log()[-3000:]}")
            raise
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            m.unmount()
            shutil.rmtree(work, ignore_errors=True)


@pytest.mark.fuse
@pytest.mark.parametrize("names_mode", NAME_MODES)
def test_sigkill_filesystem_at_random_moments(kms_server, names_mode):
    """The content workload in each name mode; the RUNS seeds are shared out between the
    two (what the name layer adds to a crash, the long/short renames, is
    tests/test_crash_long_names.py's), so the test costs what it did in one mode."""
    sigkill_daemon_runs(kms_server, names_mode, range(NAME_MODES.index(names_mode), RUNS, 2),
                        "mixed", (8, 80))


@pytest.mark.fuse
def test_sigkill_kms_at_random_moments(kms_server):
    work = short_tempdir("encfs-crash-")
    # No DEK cache and no prepared DEKs: every open and create needs the KMS, so the
    # workload meets the dead KMS at its next step.
    m = make_mount(kms_server, work, extra_args=["--key-cache-ttl", "0", "--dek-pool", "0"])
    proc = None
    try:
        for seed in range(RUNS):
            sub = os.path.join(m.mountpoint, f"s{seed}")
            os.mkdir(sub)
            log_path = os.path.join(work, f"steps{seed}.jsonl")
            proc = start_workload(sub, log_path, seed)
            wait_for_steps(proc, log_path, random.Random(seed).randint(8, 60))
            killed_at = time.monotonic()
            kms_server.kill()
            assert_stopped_by(proc, {errno.EIO}, killed_at)  # it stops at its first EIO
            kms_server.start()
            try:
                assert check_after_crash(sub, log_path) > 0, "nothing was verified"
            except BaseException:
                print(f"seed {seed}; log {m.log()[-3000:]}")
                raise
        m.unmount()
        run_fsck(m)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        m.unmount()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.fuse
def test_recovery_sweeps_what_an_interrupted_create_or_unlink_leaves(kms_server):
    # The state a kill between an unlink's two steps leaves (the data file gone, its
    # sidecar and long-name file still there), made on purpose: the next mount's recovery
    # removes them and fsck then finds nothing.
    work = short_tempdir("encfs-crash-")
    m = make_mount(kms_server, work)
    try:
        long_name = "L" * 250  # past SHORT_MAX: stored as encfs.long.<H> + .name
        for name in ("keep", "gone", long_name):
            with open(os.path.join(m.mountpoint, name), "wb") as f:
                f.write(name.encode() * 100)
        os.sync()
        m.process.kill()  # an unclean stop: the dirty marker stays
        m.process.wait()
        m.unmount()
        os.unlink(m.backing_path("gone"))  # its sidecar stays
        longs = [n for n in os.listdir(m.backing) if n.startswith("encfs.long.")
                 and not n.endswith((".name", ".sfskey"))]
        assert len(longs) == 1
        os.unlink(os.path.join(m.backing, longs[0]))  # its .name and sidecar stay
        assert os.path.exists(m.backing_path("gone.sfskey"))
        m.mount()  # recovery
        assert "removed 2 key sidecar(s) of an interrupted create or unlink" in m.log()
        assert "removed 1 long-name file(s)" in m.log()
        assert sorted(os.listdir(m.mountpoint)) == ["keep"]
        m.unmount()
        run_fsck(m)
        assert not os.path.exists(m.backing_path("gone.sfskey"))
    finally:
        m.unmount()
        shutil.rmtree(work, ignore_errors=True)
