"""Suite-wide checks. The fixtures themselves (kms_server, encrypted_mount) come from the
package's pytest plugin, exactly as users of encfs get them."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import settings

from encfs.mounts import fs_type_of
from encfs.pytest_plugin import TEMP_ROOT_ENV, short_tempdir

# Hypothesis's 200 ms deadline per example measures the machine's load, not the code:
# off for every property (those that set their own settings keep them).
settings.register_profile("encfs", deadline=None)
settings.load_profile("encfs")

FUSE_FIXTURES = {"encrypted_mount"}


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FUSE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fuse)
        if item.get_closest_marker("fuse") and not fuse_available():
            item.add_marker(pytest.mark.skip(reason="needs /dev/fuse (FUSE mount test)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # ENCFS_REQUIRE_FUSE=1 (set by .ci/run): the machine has everything the suite can use
    # (/dev/fuse, root for the multi-user and other-uid tests, the system python3, the test
    # dependencies), so every skip is a failure: no test of the suite may skip there.
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail")
            and os.environ.get("ENCFS_REQUIRE_FUSE") == "1"):
        report.outcome = "failed"
        report.longrepr = f"test skipped where ENCFS_REQUIRE_FUSE=1 requires it to run: {report.longrepr}"


def pytest_configure(config):
    # Every temp dir of this run (fixtures, daemons, mounts) lives under one root of its
    # own, so the leftover checks judge only what this run made: the user's own mounts,
    # and other test runs on the same machine, are none of its business. 0755 so that the
    # multi-user tests' other uids can reach their dirs below it.
    if TEMP_ROOT_ENV not in os.environ:
        root = tempfile.mkdtemp(prefix="encfs-run-", dir="/tmp")
        os.chmod(root, 0o755)
        os.environ[TEMP_ROOT_ENV] = root
        config._encfs_temp_root = root


EXT4_IMAGE_MB = 512  # sparse: only what the tests write takes space


@pytest.fixture(scope="session")
def ext4_root():
    """A directory on real ext4, for the reference side of "behaves like ext4" tests.

    The run's temp root when it is on ext4 (/proc/self/mountinfo says so); else a sparse
    ext4 image made here, loop-mounted under the run's root and unmounted at the end. Mode
    0777 with the sticky bit, as the multi-user tests' other uids write there too."""
    base = short_tempdir("ext4-")
    mounted = False
    if fs_type_of(base) != "ext4":
        if os.geteuid() != 0:
            pytest.skip(f"{base} is {fs_type_of(base)}, and a loop-mounted ext4 needs root")
        image = base + ".img"
        with open(image, "wb") as f:
            f.truncate(EXT4_IMAGE_MB << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, base], check=True, capture_output=True)
        mounted = True
    try:
        assert fs_type_of(base) == "ext4", fs_type_of(base)
        os.chmod(base, 0o1777)
        yield base
    finally:
        if mounted:
            subprocess.run(["umount", base], check=False)
            os.unlink(image)
        shutil.rmtree(base, ignore_errors=True)


def fuse_mounts_of_this_run() -> list[str]:
    """FUSE mounts below this run's temp root (never anything the user mounted)."""
    root = os.environ[TEMP_ROOT_ENV].rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f
                  if line.split(" - ")[1].split()[0].startswith("fuse")]
    return [p for p in points if p.startswith(root)]


def pytest_sessionfinish(session, exitstatus):
    leftovers = fuse_mounts_of_this_run()
    if leftovers:
        print(f"\nERROR: FUSE mounts left behind by the tests: {leftovers}")
        session.exitstatus = 1
    elif getattr(session.config, "_encfs_temp_root", None):
        shutil.rmtree(session.config._encfs_temp_root, ignore_errors=True)
