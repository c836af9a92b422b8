"""The fixtures' daemons start from a clean, explicit environment (issue 20, item 5): what
the caller exported (a KMS passphrase, another KMS socket or project, a test clock) never
reaches a `kms serve` or `encfs mount` the suite starts."""

from __future__ import annotations

import pytest

from encfs.pytest_plugin import PASSED_ENV, running_kms, temporary_mount

LEAKY = {"KMS_PASSPHRASE": "caller's secret", "KMS_SOCKET": "/nonexistent/kms.sock",
         "KMS_PROJECT_ID": "someone-else", "KMS_TEST_CLOCK_FILE": "/nonexistent/clock",
         "ENCFS_SOMETHING": "x"}


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


@pytest.mark.fuse
def test_daemons_do_not_inherit_the_callers_kms_or_encfs_variables(monkeypatch):
    for k, v in LEAKY.items():
        monkeypatch.setenv(k, v)
    with running_kms() as kms, temporary_mount(kms) as m:
        for what, pid in (("kms serve", kms.process.pid), ("encfs mount", m.process.pid)):
            env = environ_of(pid)
            assert set(env) <= set(PASSED_ENV), (what, sorted(set(env) - set(PASSED_ENV)))
        open(f"{m.mountpoint}/f", "wb").write(b"works")
        assert open(f"{m.mountpoint}/f", "rb").read() == b"works"
