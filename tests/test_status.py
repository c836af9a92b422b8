"""`encfs status`: a real mount, a real KMS, the real command; healthy, revoked key, dead
KMS, dead daemon, each with its exit code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from encfs import control
from encfs.pytest_plugin import make_mount, short_tempdir, temporary_mount
from encfs.reqstats import RequestStats, summarize
from encfs.status import assess

pytestmark = pytest.mark.fuse


def status(*args: str) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "encfs", "status", *args],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def status_json(mountpoint: str) -> tuple[int, dict]:
    rc, out, err = status("--json", mountpoint)
    assert "Traceback" not in err
    doc = json.loads(out)
    assert len(doc["mounts"]) == 1
    return rc, doc["mounts"][0]


def wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.fixture
def own_key_mount(kms_server):
    """A mount whose CMK is not the KMS's default key (that one cannot be disabled), with a
    short key cache so that revocation shows within a second."""
    kms_server.client.create_key("test/status")
    with temporary_mount(kms_server, key="test/status",
                         extra_args=["--key-cache-ttl", "1"]) as m:
        yield m


@pytest.fixture
def long_ttl_mount(kms_server):
    """A mount with the default key cache TTL (60 s), so that cached DEKs are still there
    however slow the machine is."""
    kms_server.client.create_key("test/status")
    with temporary_mount(kms_server, key="test/status") as m:
        yield m


def test_healthy_mount_reports_everything(long_ttl_mount):
    m = long_ttl_mount
    path = os.path.join(m.mountpoint, "f")
    with open(path, "wb") as f:
        f.write(b"x" * 100000)
    with open(path, "rb") as held:  # one open file while we ask
        held.read()
        rc, st = status_json(m.mountpoint)
        assert rc == 0, st
        assert st["healthy"] and st["health"] == "healthy" and st["problems"] == []
        d = st["daemon"]
        assert d["backing"] == m.backing and d["mountpoint"] == m.mountpoint
        assert d["pid"] == m.process.pid
        assert d["kms"]["endpoint"] == m.kms.socket_path and d["kms"]["reachable"] is True
        assert d["kms"]["latency_ms"] > 0
        [key] = d["keys"]
        assert key["key_id"] == m.key_id and key["default"] and key["state"] == "enabled"
        assert key["alias"] == "test/status"
        assert key["revoked_here"] is None and key["open_files"] == 1
        assert d["open_files"] == 1 and d["deks_cached"] >= 1
        assert d["journal_pending"] == 0
        assert d["settings"] == {"key": m.key_id, "key_cache_ttl": 60.0,
                                 "shared_backing": False}
        assert d["requests"]["create"]["count"] == 1
        assert d["requests"]["write"]["count"] >= 1 and d["requests"]["open"]["count"] >= 1
        assert d["requests"]["all"]["count"] >= sum(
            v["count"] for k, v in d["requests"].items() if k != "all")
        assert 0 < d["requests"]["all"]["p50_ms"] <= d["requests"]["all"]["p99_ms"]
        assert d["last_errors"] == []
    # The table for people says the same.
    rc, out, err = status(m.mountpoint)
    assert rc == 0 and err == ""
    assert f"{m.mountpoint}: healthy" in out and m.key_id in out and "enabled" in out
    # With no argument: every encfs mount on the machine, this one among them.
    rc, out, _ = status("--json")
    assert m.mountpoint in [x["mountpoint"] for x in json.loads(out)["mounts"]]


def test_control_socket_is_private(own_key_mount):
    path = os.fsdecode(control.socket_path(os.fsencode(own_key_mount.backing)))
    assert wait_for(lambda: os.path.exists(path))
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_revoked_key_is_unhealthy(own_key_mount):
    m = own_key_mount
    with open(os.path.join(m.mountpoint, "f"), "wb") as f:
        f.write(b"data")
    m.kms.client.call("disable-key", {"key_id": m.key_id})

    def revoked():
        rc, st = status_json(m.mountpoint)
        return (rc, st) if st["daemon"]["keys"][0]["revoked_here"] else None

    rc, st = wait_for(revoked)
    assert rc == 1 and not st["healthy"]
    [key] = st["daemon"]["keys"]
    assert key["state"] == "disabled" and key["revoked_here"] == "EKEYREVOKED"
    assert any("revoked" in p for p in st["problems"])
    assert any("disabled" in e["message"] for e in st["daemon"]["last_errors"])
    rc, out, _ = status(m.mountpoint)
    assert rc == 1 and "UNHEALTHY" in out and "disabled" in out
    # Enabled again: healthy again, without a remount.
    m.kms.client.call("enable-key", {"key_id": m.key_id})
    assert wait_for(lambda: status_json(m.mountpoint)[0] == 0)


def test_dead_kms_is_unhealthy(own_key_mount):
    m = own_key_mount
    m.kms.stop()
    try:
        rc, st = status_json(m.mountpoint)
        assert rc == 1 and not st["healthy"]
        assert st["daemon"]["kms"]["reachable"] is False
        assert any("KMS unreachable" in p for p in st["problems"])
        rc, out, _ = status(m.mountpoint)
        assert rc == 1 and "UNREACHABLE" in out
    finally:
        m.kms.start()
    assert status_json(m.mountpoint)[0] == 0


def test_daemon_gone_but_mountpoint_left(own_key_mount):
    m = own_key_mount
    m.process.send_signal(signal.SIGKILL)
    m.process.wait()
    rc, st = status_json(m.mountpoint)
    assert rc == 1 and st["daemon"] is None and st["health"] == "unhealthy"
    assert "daemon gone" in st["daemon_error"] and st["problems"] == [st["daemon_error"]]
    rc, out, err = status(m.mountpoint)
    assert rc == 1 and "daemon gone" in out and "Traceback" not in err
    # (the fixture's unmount removes the dead mount)


def test_not_an_encfs_mount(tmp_path):
    rc, out, err = status(str(tmp_path))
    assert rc == 2 and "is not an encfs mount" in err and "Traceback" not in err


# --- pure parts -------------------------------------------------------------------------

def test_percentiles_within_a_bucket():
    s = RequestStats()
    for i in range(1, 1001):
        s.record("read", i * 1000)  # 1 us .. 1 ms
    r = s.summary()["read"]
    assert r.count == 1000
    for got, want in ((r.p50_ms, 0.5), (r.p90_ms, 0.9), (r.p99_ms, 0.99)):
        assert want / 1.2 <= got <= want * 1.2
    assert r.max_ms >= 1.0
    assert summarize([]).count == 0


def test_assess():
    ok = {"kms": {"reachable": True, "endpoint": "s"},
          "keys": [{"key_id": "k", "state": "enabled", "revoked_here": None}]}
    assert assess(ok) == []
    assert assess({**ok, "kms": {"reachable": False, "endpoint": "s", "error": "x"}})
    assert assess({**ok, "keys": [{"key_id": "k", "state": "pending_deletion",
                                   "revoked_here": None}]})
    assert assess({**ok, "keys": [{"key_id": "k", "state": "enabled",
                                   "revoked_here": "EACCES"}]})


def test_a_daemon_without_control_channel_is_unknown_not_unhealthy(kms_server):
    """A live daemon that cannot be asked (here: its socket path is taken by a directory;
    in the field, a daemon of an encfs without `status`) is reported, exit 0."""
    work = short_tempdir("noctl-")
    os.makedirs(os.path.join(work, "backing", ".encfs", "control.sock"))
    try:
        m = make_mount(kms_server, work)
        try:
            rc, st = status_json(m.mountpoint)
            assert rc == 0 and st["health"] == "unknown" and st["daemon"] is None
            assert "does not answer on its control channel" in st["daemon_error"]
            assert "no control channel" in m.log()
            with open(os.path.join(m.mountpoint, "f"), "w") as f:  # the mount itself works
                f.write("x")
        finally:
            m.unmount()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_backing_dir_too_deep_for_a_socket_address(kms_server):
    """A control socket path longer than a sockaddr_un holds (107 bytes) is bound and
    reached through /proc/self/fd of its directory."""
    work = short_tempdir("deep-")
    deep = os.path.join(work, *(["d" * 40] * 3))
    os.makedirs(deep)
    try:
        m = make_mount(kms_server, deep)
        try:
            assert len(control.socket_path(os.fsencode(m.backing))) > 108
            rc, st = status_json(m.mountpoint)
            assert rc == 0 and st["health"] == "healthy", st
            assert st["daemon"]["backing"] == m.backing
        finally:
            m.unmount()
    finally:
        shutil.rmtree(work, ignore_errors=True)
