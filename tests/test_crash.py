"""Crash tests: SIGKILL the filesystem (or the KMS) at a random moment of a mixed workload.

After each kill: remount; every file must be readable; a file whose last completed step
was an fsync has exactly that content; any other file holds, page by page, one of the
states it went through since its last fsync; `encfs fsck` is clean, or `--repair` makes it
clean. ENCFS_CRASH_RUNS sets the number of seeds per test (30 by default; 1,000 for a
long run: `ENCFS_CRASH_RUNS=1000 make test PYTEST_ARGS=tests/test_crash.py`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from encfs.pytest_plugin import short_tempdir, make_mount

RUNS = int(os.environ.get("ENCFS_CRASH_RUNS", "30"))
WORKLOAD = os.path.join(os.path.dirname(__file__), "crash_workload.py")
PAGE = 4096


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


def check_after_crash(mnt: str, log_path: str) -> None:
    candidates, inflight = replay(log_path)
    present = set(os.listdir(mnt)) - {"lost+found"}  # where fsck --repair puts orphans
    contents = {}
    for name in present:
        with open(f"{mnt}/{name}", "rb") as f:  # EIO here is the failure we look for
            contents[name] = f.read()
    assert present - set(candidates) - inflight == set(), "files that never existed"
    for name, cands in candidates.items():
        if name in inflight:
            continue
        assert name in present, f"{name} vanished"
        assert page_member(contents[name], cands), \
            f"{name}: {len(contents[name])} bytes match none of its {len(cands)} states"


def run_fsck(m) -> None:
    base = [sys.executable, "-m", "encfs", "fsck", m.backing, "--kms-socket",
            m.kms.socket_path, "--project-id", m.kms.project_id]
    res = subprocess.run(base, capture_output=True, text=True)
    if res.returncode != 0:
        assert res.returncode == 4, res.stdout + res.stderr
        fixed = subprocess.run(base + ["--repair"], capture_output=True, text=True)
        assert fixed.returncode == 1, fixed.stdout + fixed.stderr
        again = subprocess.run(base, capture_output=True, text=True)
        assert again.returncode == 0, again.stdout + again.stderr


def assert_fsck_clean(m) -> None:
    """After a recovery and a clean unmount, `encfs fsck` must find nothing at all (not
    even something `--repair` could fix): recovery alone leaves a consistent backing dir."""
    res = subprocess.run([sys.executable, "-m", "encfs", "fsck", m.backing, "--kms-socket",
                          m.kms.socket_path, "--project-id", m.kms.project_id],
                         capture_output=True, text=True)
    assert res.returncode == 0, "fsck after recovery: " + res.stdout + res.stderr


def start_workload(mnt: str, log_path: str, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKLOAD, mnt, log_path, str(seed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.fuse
def test_sigkill_filesystem_at_random_moments(kms_server):
    for seed in range(RUNS):
        work = short_tempdir("encfs-crash-")
        log_path = os.path.join(work, "steps.jsonl")
        m = make_mount(kms_server, work)
        proc = None
        try:
            proc = start_workload(m.mountpoint, log_path, seed)
            time.sleep(random.Random(seed).uniform(0.2, 1.2))
            m.process.kill()  # SIGKILL the filesystem daemon mid-workload
            m.process.wait()
            proc.wait(30)
            m.unmount()
            m.mount()
            check_after_crash(m.mountpoint, log_path)
            m.unmount()
            assert_fsck_clean(m)
            run_fsck(m)
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
def test_sigkill_kms_at_random_moments(kms_server):
    work = short_tempdir("encfs-crash-")
    m = make_mount(kms_server, work, extra_args=["--key-cache-ttl", "0"])
    try:
        for seed in range(RUNS):
            sub = os.path.join(m.mountpoint, f"s{seed}")
            os.mkdir(sub)
            log_path = os.path.join(work, f"steps{seed}.jsonl")
            proc = start_workload(sub, log_path, seed)
            time.sleep(random.Random(seed).uniform(0.1, 0.6))
            kms_server.kill()
            proc.wait(60)  # the workload stops at its first EIO
            kms_server.start()
            try:
                check_after_crash(sub, log_path)
            except BaseException:
                print(f"seed {seed}; log {m.log()[-3000:]}")
                raise
        m.unmount()
        assert_fsck_clean(m)
        run_fsck(m)
    finally:
        m.unmount()
        shutil.rmtree(work, ignore_errors=True)
