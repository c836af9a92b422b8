"""fstab and mount(8): real `mount -t fuse.…`, `mount -a -T FSTAB` and `umount` calls
against a real KMS; and the option translation (encfs/fstab.py) on its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from encfs import fstab
from encfs.pytest_plugin import run_as_uid, short_tempdir, start_kms_server
from kms.client import KmsClient

ENCFS = os.path.join(os.path.dirname(sys.executable), "encfs")
HELPER = os.path.join(os.path.dirname(sys.executable), "mount.fuse.encfs")


# --- translation ------------------------------------------------------------------------

def test_every_encfs_mount_flag_has_an_o_spelling():
    from encfs.mount import build_parser
    flags = {s for a in build_parser()._actions for s in a.option_strings
             if s.startswith("--")} - {"--help"}
    spelled = set(fstab.VALUE_OPTIONS.values()) | set(fstab.FLAG_OPTIONS.values())
    assert flags == spelled


def test_translate_options():
    call = fstab.parse_helper_args(
        ["/b", "/m", "-o", "rw,key=sfs/x,kms_socket=/run/k.sock,kms_url=https://h:1,"
         "credentials=/c.csv,project_id=p,key_cache_ttl=5,shared_backing,user=alice,"
         "allow_other,nofail,_netdev,noauto,x-systemd.requires=encfs-kms.service,dev,suid,"
         'comment=x,log="/var/log/a,b.log",debug'])
    assert fstab.translate(call) == [
        "/b", "/m", "--key", "sfs/x", "--kms-socket", "/run/k.sock", "--kms-url", "https://h:1",
        "--credentials", "/c.csv", "--project-id", "p", "--key-cache-ttl", "5",
        "--shared-backing", "--user", "alice", "--log", "/var/log/a,b.log", "--debug",
        "-o", "rw,allow_other"]


def test_helper_arguments():
    call = fstab.parse_helper_args(["encfs#/b", "/m", "-n", "-sv", "-oro", "-t", "fuse.encfs"])
    assert (call.source, call.mountpoint, call.options) == ("/b", "/m", ["ro"])
    assert call.sloppy and call.verbose and not call.fake
    assert fstab.translate(fstab.parse_helper_args(["/b", "/m", "-s", "-o", "bogus"])) == \
        ["/b", "/m"]


@pytest.mark.parametrize("argv, message", [
    (["/b", "/m", "-o", "bogus"], "unknown mount option 'bogus'"),
    (["/b", "/m", "-o", "key="], "option key needs a value"),
    (["/b", "/m", "-o", "key"], "option key needs a value"),
    (["/b", "/m", "-o", 'log="x'], "unbalanced double quote"),
    (["/b"], "expected BACKING MOUNTPOINT"),
    (["/b", "/m", "-o"], "-o needs a value"),
    (["/b", "/m", "--frob"], "unknown argument --frob"),
])
def test_bad_options_are_named(argv, message):
    with pytest.raises(fstab.OptionError, match=message):
        fstab.translate(fstab.parse_helper_args(argv))


# --- real mount(8) ----------------------------------------------------------------------

def _mounted(mountpoint: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == mountpoint and line.split()[2] == "fuse.encfs"
                   for line in f)


def _daemon_pid(mountpoint: str) -> int | None:
    try:
        return int(os.getxattr(mountpoint, "user.encfs.pid"))
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def dirs(kms_server):
    """A backing dir and a mountpoint in a fresh temp dir; whatever a test mounted there is
    unmounted, and its daemon (found by its pid) stopped, also when the test fails."""
    work = short_tempdir("fstab-")
    backing, mnt = os.path.join(work, "backing"), os.path.join(work, "mnt")
    os.mkdir(backing)
    os.mkdir(mnt)
    kms_server.client.create_key("test/fstab")
    # libmount cuts a fuse.PATH type at a dot in PATH (the venv is .venv): the helper is
    # named through a symlink in our temp dir (no dots in mkdtemp names).
    os.mkdir(os.path.join(work, "bin"))
    os.symlink(ENCFS, os.path.join(work, "bin", "encfs"))
    try:
        yield kms_server, work, backing, mnt
    finally:
        pid = _daemon_pid(mnt) if _mounted(mnt) else None
        if _mounted(mnt):
            subprocess.run(["umount", mnt], capture_output=True)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        if pid and not _wait_gone(pid, 5):
            os.kill(pid, 9)
        shutil.rmtree(work, ignore_errors=True)


def _type(work: str) -> str:
    return f"fuse.{work}/bin/encfs"


def _opts(kms) -> str:
    return f"key=test/fstab,kms_socket={kms.socket_path},project_id={kms.project_id}"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_mount_t_then_umount(dirs):
    kms, work, backing, mnt = dirs
    r = _run(["mount", "-t", _type(work), backing, mnt,
              "-o", _opts(kms) + ",key_cache_ttl=5,nofail,_netdev,x-systemd.after=kms.service"])
    assert r.returncode == 0, r.stderr
    assert _mounted(mnt)
    with open(os.path.join(mnt, "hello"), "w") as f:
        f.write("through mount(8)\n")
    # Encrypted in the backing dir, under the CMK named by key=.
    with open(os.path.join(backing, "hello"), "rb") as f:
        assert b"through mount(8)" not in f.read()
    key_id = kms.client.resolve_key("test/fstab")["key_id"]
    r = _run([sys.executable, "-m", "encfs", "inspect", os.path.join(mnt, "hello")])
    assert key_id in r.stdout, r.stdout + r.stderr
    with open("/proc/self/mounts") as f:
        line = next(ln for ln in f if ln.split()[1] == mnt)
    assert line.split()[0] == backing and "nosuid" in line and "nodev" in line
    pid = _daemon_pid(mnt)
    assert pid
    r = _run(["umount", mnt])
    assert r.returncode == 0, r.stderr
    assert not _mounted(mnt)
    assert _wait_gone(pid), "the daemon did not exit after umount"
    assert "unmounted" in open(os.path.join(backing, ".encfs", "mount.log")).read()


def test_fstab_line_mount_a_and_umount(dirs):
    kms, work, backing, mnt = dirs
    other = os.path.join(work, "noauto-mnt")
    os.mkdir(other)
    table = os.path.join(work, "fstab")
    with open(table, "w") as f:
        f.write(f"# a test fstab\n"
                f"{backing} {mnt} {_type(work)} {_opts(kms)},allow_other,nofail,"
                f"x-systemd.requires=encfs-kms.service 0 0\n"
                f"{backing} {other} {_type(work)} noauto,{_opts(kms)} 0 0\n")
    r = _run(["mount", "-a", "-T", table])
    assert r.returncode == 0, r.stderr
    assert _mounted(mnt) and not _mounted(other)  # noauto: left alone by mount -a
    with open("/proc/self/mounts") as f:
        assert "allow_other" in next(ln for ln in f if ln.split()[1] == mnt)
    with open(os.path.join(mnt, "f"), "w") as f:
        f.write("persisted\n")
    pid = _daemon_pid(mnt)
    assert _run(["umount", mnt]).returncode == 0 and not _mounted(mnt)
    assert _wait_gone(pid)
    # Mounted again by its mountpoint alone (mount looks it up in the table).
    r = _run(["mount", "-T", table, mnt])
    assert r.returncode == 0, r.stderr
    with open(os.path.join(mnt, "f")) as f:
        assert f.read() == "persisted\n"
    pid = _daemon_pid(mnt)
    assert _run(["umount", mnt]).returncode == 0
    assert _wait_gone(pid)


def test_unknown_option_is_one_clear_error(dirs):
    kms, work, backing, mnt = dirs
    r = _run(["mount", "-t", _type(work), backing, mnt, "-o", _opts(kms) + ",colour=red"])
    assert r.returncode != 0 and not _mounted(mnt)
    assert "unknown mount option 'colour=red'" in r.stderr and "Traceback" not in r.stderr


def test_missing_kms_socket_is_one_clear_error(dirs):
    kms, work, backing, mnt = dirs
    r = _run(["mount", "-t", _type(work), backing, mnt,
              "-o", f"kms_socket={work}/none.sock"])
    assert r.returncode != 0 and not _mounted(mnt)
    assert "kms serve" in r.stderr and "Traceback" not in r.stderr


def test_type_fuse_encfs_with_the_installed_helper(dirs):
    """`mount -t fuse.encfs` with `encfs` installed on the standard PATH as the README says
    (`make install-mount-helper`: a symlink in /usr/local/sbin). The link is made in a
    private mount namespace (a temp dir bound over /usr/local/sbin), so the machine's own
    /usr/local/sbin is never touched; the whole sequence runs inside it."""
    kms, work, backing, mnt = dirs
    sbin = os.path.join(work, "sbin")
    os.mkdir(sbin)
    os.symlink(ENCFS, os.path.join(sbin, "encfs"))
    script = f"""
set -e
mount --bind {sbin} /usr/local/sbin
mount -t fuse.encfs {backing} {mnt} -o {_opts(kms)}
echo inside > {mnt}/x
grep -q ' {mnt} fuse.encfs ' /proc/self/mounts
pid=$(getfattr --only-values -n user.encfs.pid {mnt})
umount {mnt}
while [ -e /proc/$pid ]; do sleep 0.05; done
cat {backing}/.encfs/mount.log | grep -c unmounted
"""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "1"
    assert os.path.exists(os.path.join(backing, "x"))  # written through the mount


def test_mount_fuse_encfs_helper_as_mount_calls_it(dirs):
    """/sbin/mount.fuse.encfs (when linked there) is run by mount(8) itself as
    `mount.fuse.encfs SOURCE MOUNTPOINT -o OPTIONS`: the same call, made here directly."""
    kms, _, backing, mnt = dirs
    r = _run([HELPER, backing, mnt, "-n", "-o", "rw," + _opts(kms) + ",noauto"])
    assert r.returncode == 0, r.stderr
    assert _mounted(mnt)
    pid = _daemon_pid(mnt)
    assert _run(["umount", mnt]).returncode == 0 and _wait_gone(pid)
    r = _run([HELPER, backing, mnt, "-f", "-o", _opts(kms)])  # -f: fake, says what it would do
    assert r.returncode == 0 and not _mounted(mnt)
    assert r.stderr.startswith("encfs mount ") and "--kms-socket" in r.stderr


def test_fstab_user_option_serves_as_that_user():
    """`user=UID,allow_other` in an fstab line: root mounts, the daemon then serves as that
    uid (the KMS sees it: the key is that user's own), and `encfs status` as root still
    reaches its control channel; `umount` ends it."""
    uid = 4244
    work = short_tempdir("fstabuser-")
    os.chmod(work, 0o755)
    kms = start_kms_server(f"{work}/kms", extra_args=["--socket-mode", "0666"])
    os.chmod(f"{work}/kms", 0o755)
    backing, mnt = f"{work}/backing", f"{work}/mnt"
    os.makedirs(backing)
    os.makedirs(mnt)
    os.chown(backing, uid, uid)
    os.mkdir(f"{work}/bin")
    os.symlink(ENCFS, f"{work}/bin/encfs")
    pid = None
    try:
        kind, info = run_as_uid(uid, lambda: KmsClient(kms.socket_path).create_key("fstab/own"))
        assert kind == "ok", info
        table = f"{work}/fstab"
        with open(table, "w") as f:
            f.write(f"{backing} {mnt} fuse.{work}/bin/encfs key={info['key_id']},"
                    f"kms_socket={kms.socket_path},user={uid},allow_other 0 0\n")
        r = _run(["mount", "-a", "-T", table])
        assert r.returncode == 0, r.stderr
        pid = _daemon_pid(mnt)
        with open(f"/proc/{pid}/status") as f:
            assert next(ln for ln in f if ln.startswith("Uid:")).split()[2] == str(uid)

        def write_and_read():
            with open(f"{mnt}/mine", "w") as f:
                f.write("served as the user\n")
            with open(f"{mnt}/mine") as f:
                return f.read()

        assert run_as_uid(uid, write_and_read) == ("ok", "served as the user\n")
        assert os.stat(f"{backing}/mine").st_uid == uid
        r = subprocess.run([sys.executable, "-m", "encfs", "status", "--json", mnt],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["mounts"][0]["daemon"]["uid"] == uid
        assert _run(["umount", mnt]).returncode == 0 and not _mounted(mnt)
        assert _wait_gone(pid)
    finally:
        if _mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            if pid and not _wait_gone(pid, 5):
                os.kill(pid, 9)
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)
