"""Layer 3: the `encfs mount` / `encfs umount` command lines, their errors and background mode."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from encfs.pytest_plugin import short_tempdir

ENCFS = [sys.executable, "-m", "encfs"]


def run(args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(ENCFS + args, capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def dirs():
    work = short_tempdir("encfs-cli-")
    backing, mnt = os.path.join(work, "backing"), os.path.join(work, "mnt")
    os.makedirs(backing)
    os.makedirs(mnt)
    daemons: list[int] = []
    try:
        yield work, backing, mnt, daemons
    finally:
        # Background mounts are not our children: unmount, then stop them by PID.
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        for pid in daemons:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)


def mount_pid(mnt: str) -> int:
    return int(os.getxattr(mnt, "user.encfs.pid"))


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_missing_backing_dir(kms_server, dirs):
    work, _, mnt, _ = dirs
    res = run(["mount", f"{work}/nope", mnt, "--kms-socket", kms_server.socket_path])
    assert "backing directory" in one_line_error(res) and "does not exist" in res.stderr


def test_kms_unreachable_says_how_to_start_one(dirs):
    work, backing, mnt, _ = dirs
    res = run(["mount", backing, mnt, "--kms-socket", f"{work}/no.sock"])
    line = one_line_error(res)
    assert "kms serve" in line and f"{work}/no.sock" in line
    assert not os.path.ismount(mnt)


def test_unknown_key(kms_server, dirs):
    _, backing, mnt, _ = dirs
    res = run(["mount", backing, mnt, "--kms-socket", kms_server.socket_path,
               "--key", "no-such-key"])
    assert "no-such-key" in one_line_error(res) and "kms create-key" in res.stderr


def test_disabled_key(kms_server, dirs):
    _, backing, mnt, _ = dirs
    c = kms_server.client
    key_id = c.create_key("tenant-a")["key_id"]
    c.call("disable-key", {"key_id": key_id})
    res = run(["mount", backing, mnt, "--kms-socket", kms_server.socket_path,
               "--key", "tenant-a"])
    assert "disabled" in one_line_error(res) and "kms enable-key" in res.stderr


@pytest.mark.fuse
def test_background_mount_then_umount(kms_server, dirs):
    _, backing, mnt, daemons = dirs
    res = run(["mount", backing, mnt, "--kms-socket", kms_server.socket_path])
    assert res.returncode == 0, res.stderr
    assert os.path.ismount(mnt)
    pid = mount_pid(mnt)
    daemons.append(pid)
    with open(f"{mnt}/a", "w") as f:
        f.write("hi\n")
    assert open(f"{mnt}/a").read() == "hi\n"
    busy = run(["mount", backing, mnt, "--kms-socket", kms_server.socket_path])
    assert "busy" in one_line_error(busy)
    res = run(["umount", mnt])
    assert res.returncode == 0, res.stderr
    assert not os.path.ismount(mnt)
    assert wait_gone(pid)
    assert sorted(os.listdir(backing)) == [".encfs", "a", "a.sfskey"]
    again = run(["umount", mnt])
    assert "not an encfs mount" in one_line_error(again)


@pytest.mark.fuse
def test_mount_starts_a_local_kms_with_default_key(dirs):
    """No --kms-socket and no $KMS_SOCKET: mount starts `kms serve` at the default path."""
    work, backing, mnt, daemons = dirs
    env = dict(os.environ)
    env.pop("KMS_SOCKET", None)
    env.pop("KMS_DATA_DIR", None)
    env["XDG_RUNTIME_DIR"] = f"{work}/run"
    env["XDG_DATA_HOME"] = f"{work}/share"
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    try:
        res = run(["mount", backing, mnt], env=env)
        kms_pid_file = f"{work}/share/encfs-kms/kms.pid"
        if os.path.exists(kms_pid_file):
            daemons.append(int(open(kms_pid_file).read()))
        assert res.returncode == 0, res.stderr
        assert "started a local KMS" in res.stderr
        daemons.insert(0, mount_pid(mnt))
        with open(f"{mnt}/a", "w") as f:
            f.write("hi\n")
        assert open(f"{mnt}/a").read() == "hi\n"
        assert os.path.exists(f"{work}/run/encfs-kms.sock")
        assert run(["umount", mnt]).returncode == 0
    finally:
        for pid in daemons:  # stop the KMS we caused to start, by PID
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in daemons:
            assert wait_gone(pid)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.fuse
def test_mount_over_kms_url_with_ak_sk(dirs):
    """`--kms-url` signs every request with AK/SK; a wrong SK is refused with a clear line."""
    from encfs.pytest_plugin import start_kms_server

    work, backing, mnt, daemons = dirs
    creds = os.path.join(work, "credentials.csv")
    with open(creds, "w") as f:
        f.write("User Name,Access Key Id,Secret Access Key\nalice,AKTEST123,s3cr3t-sk\n")
    os.chmod(creds, 0o600)
    port = _free_port()
    kms = start_kms_server(os.path.join(work, "kms"),
                           extra_args=["--listen", f"127.0.0.1:{port}", "--credentials", creds])
    try:
        url = f"http://127.0.0.1:{port}"
        res = run(["mount", backing, mnt, "--kms-url", url, "--credentials", creds])
        assert res.returncode == 0, res.stderr
        daemons.append(mount_pid(mnt))
        with open(f"{mnt}/a", "w") as f:
            f.write("over tcp\n")
        assert open(f"{mnt}/a").read() == "over tcp\n"
        assert run(["umount", mnt]).returncode == 0
        # The key belongs to the access key's user, not to the socket's uid 0.
        rec_key = open(f"{backing}/a.sfskey", "rb").read()
        audit = subprocess.run([sys.executable, "-m", "kms", "--socket", kms.socket_path,
                                "--json", "audit"], capture_output=True, text=True)
        assert "ak=AKTEST123" in audit.stdout and rec_key
        bad = os.path.join(work, "bad.csv")
        with open(bad, "w") as f:
            f.write("User Name,Access Key Id,Secret Access Key\nalice,AKTEST123,wrong\n")
        os.chmod(bad, 0o600)
        res = run(["mount", backing, mnt, "--kms-url", url, "--credentials", bad])
        line = one_line_error(res)
        assert "KMS.0302" in line and url in line
        assert not os.path.ismount(mnt)
    finally:
        kms.stop()


@pytest.mark.fuse
def test_one_mount_per_backing_dir_and_recovery_after_kill(encrypted_mount, dirs):
    m = encrypted_mount
    _, _, other_mnt, _ = dirs
    res = run(["mount", m.backing, other_mnt, "--kms-socket", m.kms.socket_path])
    line = one_line_error(res)
    assert "already in use" in line and f"pid {m.process.pid}" in line
    with open(f"{m.mountpoint}/f", "wb") as f:
        f.write(b"x" * 5000)
    m.process.kill()  # an unclean stop leaves the dirty marker behind
    m.process.wait()
    m.unmount()
    assert os.path.exists(f"{m.backing}/.encfs/dirty")
    m.mount()
    assert "did not stop cleanly; recovered" in m.log()
    m.remount()  # a clean stop clears it: no recovery message the second time
    assert m.log().count("did not stop cleanly") == 1
    assert m.unmount() == 0
    assert not os.path.exists(f"{m.backing}/.encfs/dirty")  # a clean stop cleared it
