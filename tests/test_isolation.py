"""The suite leaves the user's mounts alone: a mount made outside a test run (as
`make mount` makes one before `make test`) survives the run untouched and does not fail
it; only what the run made itself counts as left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from encfs.pytest_plugin import TEMP_ROOT_ENV, temporary_mount

TESTS = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.fuse


def child_run(env_root: str | None) -> subprocess.CompletedProcess:
    """A fresh pytest run (a mount test, then the leftover checks), as `make test`
    starts one: with a temp root of its own, or the one given."""
    env = dict(os.environ)
    env.pop(TEMP_ROOT_ENV, None)
    if env_root:
        env[TEMP_ROOT_ENV] = env_root
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(TESTS, "isolation_child.py"), os.path.join(TESTS, "test_zz_leftovers.py")],
        cwd=os.path.dirname(TESTS), env=env, capture_output=True, text=True, timeout=300)


def test_a_mount_made_outside_the_run_survives_it(kms_server):
    with temporary_mount(kms_server, prefix="users-own-") as users:
        with open(os.path.join(users.mountpoint, "mine"), "w") as f:
            f.write("the user's file\n")
        before = os.stat(os.path.join(users.mountpoint, "mine"))
        r = child_run(None)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "3 passed" in r.stdout and "left behind" not in r.stdout
        # Untouched: still mounted, the same daemon, the file as it was.
        assert os.path.ismount(users.mountpoint) and users.process.poll() is None
        assert int(os.getxattr(users.mountpoint, "user.encfs.pid")) == users.process.pid
        with open(os.path.join(users.mountpoint, "mine")) as f:
            assert f.read() == "the user's file\n"
        assert os.stat(os.path.join(users.mountpoint, "mine")).st_mtime_ns == before.st_mtime_ns


def test_the_leftover_check_does_fail_on_a_mount_of_the_run(kms_server):
    """The check the test above relies on can fail: a child run given this run's temp root
    (which holds our mount, standing for one a test forgot to unmount) fails, names the
    mount, and leaves it alone."""
    with temporary_mount(kms_server, prefix="forgotten-") as m:
        r = child_run(os.environ[TEMP_ROOT_ENV])
        assert r.returncode != 0
        assert m.mountpoint in r.stdout and "left behind" in r.stdout
        assert os.path.ismount(m.mountpoint) and m.process.poll() is None
