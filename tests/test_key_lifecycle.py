"""Key lifecycle through a real mount and a real KMS: audit of file keys, revocation."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from encfs import format as fmt
from encfs.keys import check_period
from encfs.pytest_plugin import both_name_modes, short_tempdir, make_mount, start_kms_server


def kms_cli(m, *args) -> str:
    res = subprocess.run([sys.executable, "-m", "kms", "--socket", m.kms.socket_path,
                          "--project-id", m.kms.project_id, *args],
                         capture_output=True, text=True, check=True)
    return res.stdout


@both_name_modes
def test_kms_audit_shows_the_unwrap_of_an_opened_file(encrypted_mount):
    m = encrypted_mount
    with open(f"{m.mountpoint}/report.txt", "w") as f:
        f.write("quarterly numbers")
    rec = fmt.decode_sidecar(open(m.backing_path("report.txt.sfskey"), "rb").read())
    m.remount()  # the next open must unwrap at the KMS
    assert open(f"{m.mountpoint}/report.txt").read() == "quarterly numbers"
    records = json.loads(kms_cli(m, "--json", "audit", "--aad", rec.file_id.hex()))["records"]
    ops = [(r["operation"], r["outcome"], r["key_id"]) for r in records]
    assert ("create-datakey", "ok", m.key_id) in ops
    assert ("decrypt-datakey", "ok", m.key_id) in ops
    assert all(r["caller"] == "uid=0" for r in records)
    # ...and the file id maps back to the path.
    found = subprocess.run([sys.executable, "-m", "encfs", "inspect", "--file-id",
                            rec.file_id.hex(), m.mountpoint], capture_output=True, text=True)
    # (with encrypted names inspect shows the plaintext path beside the backing one)
    assert found.stdout.split() == [m.backing_path("report.txt")] + (
        ["(/report.txt)"] if m.encrypted_names else [])
    table = kms_cli(m, "audit", "--key", m.key_id)
    assert rec.file_id.hex() in table and "decrypt-datakey" in table


GRACE = 1.0  # --key-cache-ttl for these tests
#: How long a change of a key's state may take to show: the cached DEKs expire after GRACE
#: and the mount rechecks every check_period(GRACE); a factor of 10 for a loaded machine
#: (time is the subject here, but the load must not be).
WITHIN = 10 * (GRACE + check_period(GRACE))


@pytest.fixture
def revocable(names_mode):
    """A KMS with a test clock, and a mount whose new files use a customer key with a
    short grace period (default keys can never be disabled). With encrypted names the
    name key is made under that key too: revoking it hides the names as well."""
    work = short_tempdir("encfs-keys-")
    clock = f"{work}/clock"
    kms = start_kms_server(f"{work}/kms", extra_args=["--test-clock-file", clock])
    m = None
    try:
        kms.client.create_key("tenant")
        m = make_mount(kms, work, key="tenant", extra_args=["--key-cache-ttl", str(GRACE)],
                       names_mode=names_mode)
        m.clock = clock
        yield m
    finally:
        if m is not None:
            m.unmount()
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)


def wait_errno(fn, expected: int, within: float) -> float:
    """Call fn until it fails with ``expected``; return how long that took."""
    t0 = time.monotonic()
    while True:
        try:
            fn()
        except OSError as e:
            if e.errno == expected:
                return time.monotonic() - t0
            raise
        if time.monotonic() - t0 > within:
            raise AssertionError(f"still works after {within}s")
        time.sleep(0.05)


def wait_content(path: str, expected: bytes, within: float) -> None:
    """Read until the file is readable again (access restored) and holds ``expected``."""
    deadline = time.monotonic() + within
    while True:
        try:
            assert fresh_read(path) == expected
            return
        except OSError:
            assert time.monotonic() < deadline, "still unreadable"
            time.sleep(0.05)


def fresh_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.fuse
@both_name_modes
def test_disable_then_enable_key_without_remount(revocable):
    m = revocable
    c = m.kms.client
    path = f"{m.mountpoint}/secret"
    with open(path, "wb") as f:
        f.write(b"s" * 10000)
    held = open(path, "rb")
    c.call("disable-key", {"key_id": m.key_id})
    took = wait_errno(lambda: fresh_read(path), errno.EKEYREVOKED, WITHIN)
    assert took <= WITHIN
    with pytest.raises(OSError) as e:
        held.seek(0)
        held.read()  # an open handle stops too, also for pages the kernel had cached
    assert e.value.errno == errno.EKEYREVOKED
    with pytest.raises(OSError) as e:
        open(f"{m.mountpoint}/new", "wb").write(b"x")  # the key for new files is disabled
    assert e.value.errno == errno.EKEYREVOKED
    assert f"key {m.key_id} can no longer be used" in m.log()
    c.call("enable-key", {"key_id": m.key_id})
    wait_content(path, b"s" * 10000, WITHIN)
    held.seek(0)
    assert held.read() == b"s" * 10000
    held.close()


@pytest.mark.fuse
@both_name_modes
def test_schedule_then_cancel_deletion(revocable):
    m = revocable
    c = m.kms.client
    path = f"{m.mountpoint}/doc"
    open(path, "wb").write(b"d" * 100)
    c.call("schedule-key-deletion", {"key_id": m.key_id, "pending_days": "7"})
    wait_errno(lambda: fresh_read(path), errno.EKEYREVOKED, WITHIN)
    c.call("cancel-key-deletion", {"key_id": m.key_id})  # back to disabled, as Huawei does
    time.sleep(GRACE)
    with pytest.raises(OSError):
        fresh_read(path)
    c.call("enable-key", {"key_id": m.key_id})
    wait_content(path, b"d" * 100, WITHIN)


@pytest.mark.fuse
@both_name_modes
def test_destroyed_key_makes_data_permanently_unreadable(revocable):
    m = revocable
    c = m.kms.client
    path = f"{m.mountpoint}/gone-for-good"
    open(path, "wb").write(b"g" * 100)
    c.call("schedule-key-deletion", {"key_id": m.key_id, "pending_days": "7"})
    with open(m.clock, "w") as f:
        f.write(str(time.time() + 8 * 86400))  # the pending period is over: material destroyed
    wait_errno(lambda: fresh_read(path), errno.ENOKEY, WITHIN)
    with pytest.raises(Exception) as e:
        c.call("cancel-key-deletion", {"key_id": m.key_id})
    assert "KMS.0207" in str(e.value)
    m.unmount()
    res = subprocess.run([sys.executable, "-m", "encfs", "fsck", m.backing, "--json",
                          "--kms-socket", m.kms.socket_path], capture_output=True, text=True)
    if m.encrypted_names:  # the name key went with the CMK: no name can be read, none checked
        assert res.returncode == 8, res.stdout + res.stderr
        assert "cannot unwrap the name key" in res.stderr and "KMS.0207" in res.stderr, res.stderr
        return
    assert res.returncode == 4
    [problem] = json.loads(res.stdout)["problems"]
    # The error code, not the KMS's wording (which changed: "destroyed" -> "deleted at").
    assert problem["kind"] == "key-unusable" and "KMS.0207" in problem["detail"], problem


@both_name_modes
def test_directory_carries_its_own_key(encrypted_mount):
    """`user.encfs.key` on a directory picks the CMK for new files below it."""
    m = encrypted_mount
    c = m.kms.client
    tenant = c.create_key("tenant-x")["key_id"]
    os.makedirs(f"{m.mountpoint}/tenants/x/deep")
    os.setxattr(f"{m.mountpoint}/tenants/x", "user.encfs.key", b"tenant-x")
    assert os.getxattr(f"{m.mountpoint}/tenants/x", "user.encfs.key") == tenant.encode()
    for rel in ("tenants/x/a", "tenants/x/deep/b", "tenants/other", "top"):
        open(f"{m.mountpoint}/{rel}", "w").write(rel)

    def cmk(rel):
        return fmt.decode_sidecar(open(m.backing_path(f"{rel}.sfskey"), "rb").read()).key_id
    assert cmk("tenants/x/a") == cmk("tenants/x/deep/b") == tenant
    assert cmk("tenants/other") == cmk("top") == m.key_id
    # A subtree moved elsewhere keeps its own key; files keep theirs whatever the key.
    os.rename(f"{m.mountpoint}/tenants/x", f"{m.mountpoint}/x-moved")
    open(f"{m.mountpoint}/x-moved/c", "w").write("c")
    assert cmk("x-moved/c") == tenant
    with pytest.raises(OSError) as e:
        os.setxattr(f"{m.mountpoint}/x-moved", "user.encfs.key", b"no-such-key")
    assert e.value.errno == errno.ENOKEY
    with pytest.raises(OSError) as e:
        os.setxattr(f"{m.mountpoint}/top", "user.encfs.key", b"tenant-x")
    assert e.value.errno == errno.ENOTDIR
    os.removexattr(f"{m.mountpoint}/x-moved", "user.encfs.key")
    open(f"{m.mountpoint}/x-moved/d", "w").write("d")
    assert cmk("x-moved/d") == m.key_id
    m.remount()
    expected = {"x-moved/a": "tenants/x/a", "x-moved/deep/b": "tenants/x/deep/b",
                "x-moved/c": "c", "x-moved/d": "d", "top": "top"}
    for rel, content in expected.items():
        assert open(f"{m.mountpoint}/{rel}").read() == content
