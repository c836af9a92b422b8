"""Suite-wide checks. The fixtures themselves (kms_server, encrypted_mount) come from the
package's pytest plugin, exactly as users of encfs get them."""

from __future__ import annotations

import os

import pytest

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
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and item.get_closest_marker("fuse")
            and os.environ.get("ENCFS_REQUIRE_FUSE") == "1"):
        report.outcome = "failed"
        report.longrepr = f"FUSE test skipped where FUSE is required: {report.longrepr}"


def fuse_mounts_under_tmp() -> list[str]:
    """FUSE mounts in the temp dirs the fixtures use (never anything the user mounted)."""
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f
                if line.split()[2].startswith("fuse") and line.split()[1].startswith("/tmp/")]


def pytest_sessionfinish(session, exitstatus):
    leftovers = fuse_mounts_under_tmp()
    if leftovers:
        print(f"\nERROR: FUSE mounts left behind by the tests: {leftovers}")
        session.exitstatus = 1
