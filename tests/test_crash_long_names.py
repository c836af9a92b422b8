"""Crash tests of the name layer: SIGKILL the daemon while files are renamed between long
(hashed, with a long-name file) and short names, then check as tests/test_crash.py does:
every file readable under exactly the names the completed steps left (the step in flight
may have happened or not), fsck clean or made clean by --repair (which removes unused
long-name files)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from encfs.pytest_plugin import NAME_MODES, make_mount, names_args, short_tempdir
import errno

from test_crash import assert_stopped_by, check_after_crash, run_fsck, wait_for_steps

RUNS = int(os.environ.get("ENCFS_CRASH_RUNS", "12"))
WORKLOAD = os.path.join(os.path.dirname(__file__), "crash_names_workload.py")


@pytest.mark.fuse
@pytest.mark.parametrize("names_mode", NAME_MODES)
def test_sigkill_during_long_short_renames(kms_server, names_mode):
    for seed in range(RUNS):
        work = short_tempdir("encfs-crashn-")
        log_path = os.path.join(work, "steps.jsonl")
        m = make_mount(kms_server, work, extra_args=names_args(names_mode))
        proc = None
        try:
            proc = subprocess.Popen([sys.executable, WORKLOAD, m.mountpoint, log_path,
                                     str(seed)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            wait_for_steps(proc, log_path, random.Random(seed).randint(10, 60))
            killed_at = time.monotonic()
            m.process.kill()
            m.process.wait()
            assert_stopped_by(proc, {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}, killed_at)
            with open(log_path) as f:
                assert sum(1 for line in f if '"rename"' in line) > 0, \
                    "the workload renamed nothing before the kill"
            m.unmount()
            m.mount()
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
