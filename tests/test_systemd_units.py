"""The systemd units of `encfs systemd-units`: `systemd-analyze verify` accepts them
without a warning, and the mount template's command lines really mount and unmount."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from encfs import systemd
from encfs.pytest_plugin import short_tempdir

ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def unit_dir():
    d = short_tempdir("units-")
    r = subprocess.run([sys.executable, "-m", "encfs", "systemd-units", "--output", d],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def verify(*paths: str) -> subprocess.CompletedProcess:
    assert ANALYZE, "systemd-analyze is missing: make system-packages installs systemd"
    return subprocess.run([ANALYZE, "verify", *paths], capture_output=True, text=True,
                          timeout=120)


def test_units_verify_cleanly(unit_dir):
    assert sorted(os.listdir(unit_dir)) == sorted(systemd.UNITS)
    r = verify(os.path.join(unit_dir, "encfs-kms.service"),
               os.path.join(unit_dir, "encfs-mount@srv-plain.service"))  # an instance
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr + r.stdout


def test_verify_would_catch_a_broken_unit(unit_dir):
    """The check above can fail: a misspelt hardening option and a missing interpreter are
    both reported."""
    path = os.path.join(unit_dir, "encfs-kms.service")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.replace("ProtectSystem=", "ProtectSytem="))
    r = verify(path)
    assert "Unknown key 'ProtectSytem'" in r.stderr
    with open(path, "w") as f:
        f.write(text.replace(sys.executable, "/nonexistent/python3"))
    assert verify(path).returncode != 0


def test_kms_unit_is_hardened(unit_dir):
    text = open(os.path.join(unit_dir, "encfs-kms.service")).read()
    for line in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "StateDirectory=encfs-kms", "RuntimeDirectory=encfs-kms",
                 "CapabilityBoundingSet=\n"):
        assert line in text
    assert f"ExecStart={sys.executable} -m kms serve --socket /run/encfs-kms/kms.sock" in text


def _directive(text: str, key: str) -> str:
    return re.search(rf"^{key}=(.*)$", text, re.M).group(1)


def test_mount_template_mounts_and_unmounts(unit_dir, kms_server):
    """The template's ExecStart and ExecStopPost, expanded the way systemd expands them for
    one instance and its config file, mount, serve, and unmount on SIGTERM (systemd's
    stop)."""
    work = short_tempdir("unitmnt-")
    try:
        backing, mnt = os.path.join(work, "backing"), os.path.join(work, "mnt")
        os.mkdir(backing)
        os.mkdir(mnt)
        instance = subprocess.run(["systemd-escape", "--path", mnt], capture_output=True,
                                  text=True, check=True).stdout.strip()
        text = open(os.path.join(unit_dir, "encfs-mount@.service")).read()
        assert "After=encfs-kms.service" in text and "Wants=encfs-kms.service" in text
        env = {"BACKING": backing,
               "ENCFS_OPTIONS": f"--kms-socket {kms_server.socket_path} --project-id "
                                f"{kms_server.project_id}"}

        unescaped = subprocess.run(["systemd-escape", "--unescape", "--path", instance],
                                   capture_output=True, text=True, check=True).stdout.strip()
        assert unescaped == mnt

        def expand(cmd: str) -> list[str]:
            cmd = cmd.lstrip("-").replace("%f", unescaped)
            cmd = cmd.replace("%i", instance).replace("${BACKING}", shlex.quote(env["BACKING"]))
            return shlex.split(cmd.replace("$ENCFS_OPTIONS", env["ENCFS_OPTIONS"]))

        start = expand(_directive(text, "ExecStart"))
        assert start[:4] == [sys.executable, "-m", "encfs", "mount"] and mnt in start
        log = open(os.path.join(work, "unit.log"), "wb")
        proc = subprocess.Popen(start, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(mnt):
                assert proc.poll() is None, open(os.path.join(work, "unit.log")).read()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with open(os.path.join(mnt, "f"), "w") as f:
                f.write("from the unit\n")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert not os.path.ismount(mnt)
            # ExecStopPost after a clean stop: nothing left to detach; '-' ignores its
            # failure, as systemd does.
            subprocess.run(expand(_directive(text, "ExecStopPost")), capture_output=True)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt])
            log.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
