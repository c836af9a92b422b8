"""Crash tests of the name layer: SIGKILL the daemon while files are renamed between long
(hashed, with a long-name file) and short names (tests/crash_workload.py's ``names``
workload), then check as tests/test_crash.py does: every file readable under exactly the
names the completed steps left (the step in flight may have happened or not), fsck clean
or made clean by --repair (which removes unused long-name files)."""

from __future__ import annotations

import os

import pytest

from encfs.pytest_plugin import NAME_MODES

from test_crash import sigkill_daemon_runs

RUNS = int(os.environ.get("ENCFS_CRASH_RUNS", "12"))


def renamed_before_the_kill(log_path: str) -> None:
    with open(log_path) as f:
        assert sum(1 for line in f if '"rename"' in line) > 0, \
            "the workload renamed nothing before the kill"


@pytest.mark.fuse
@pytest.mark.parametrize("names_mode", NAME_MODES)
def test_sigkill_during_long_short_renames(kms_server, names_mode):
    sigkill_daemon_runs(kms_server, names_mode, range(RUNS), "names", (10, 60),
                        check_log=renamed_before_the_kill)
