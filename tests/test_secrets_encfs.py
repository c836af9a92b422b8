"""Secrets hygiene, encfs side (issue 8, item 6).

A realistic session, with the mount logging every request (--debug): files written and
read, user xattrs, a rename and a hard link, a rewrap to another CMK, fsck (text and
--json), inspect (text and --json), decrypt (a good file and a tampered one, which fails).
Then every plaintext DEK the test can learn (decrypt-datakey of each sidecar) is searched
for in every log, every CLI output and every file of the backing dir, as lowercase and
uppercase hex, base64 (standard and URL-safe) and raw bytes. None may appear.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import short_tempdir, make_mount, start_kms_server

pytestmark = pytest.mark.fuse

S = fmt.SIDECAR_SUFFIX


def forms(dek: bytes) -> list[bytes]:
    return [dek, dek.hex().encode(), dek.hex().upper().encode(), base64.b64encode(dek),
            base64.urlsafe_b64encode(dek), base64.b64encode(dek).rstrip(b"=")]


def test_no_plaintext_dek_in_any_log_output_or_backing_file():
    work = short_tempdir("encfs-secrets-")
    kms = start_kms_server(os.path.join(work, "kms"))
    m = None
    outputs: list[bytes] = []

    def tool(*args, rc=None):
        res = subprocess.run([sys.executable, "-m", "encfs", *args, "--kms-socket",
                              kms.socket_path, "--project-id", kms.project_id],
                             capture_output=True, timeout=120)
        outputs.extend([res.stdout, res.stderr])
        assert b"Traceback" not in res.stderr, res.stderr
        if rc is not None:
            assert res.returncode == rc, res.stderr
        return res

    try:
        kms.client.create_key("secrets/other")
        m = make_mount(kms, work, extra_args=["--debug", "--key-cache-ttl", "5"])
        mp = m.mountpoint
        os.makedirs(f"{mp}/dir")
        files = {"a.txt": b"alpha " * 3000, "dir/b.bin": os.urandom(70000), "c": b"x"}
        for name, data in files.items():
            with open(f"{mp}/{name}", "wb") as f:
                f.write(data)
        os.setxattr(f"{mp}/a.txt", "user.note", b"an encrypted attribute value")
        os.rename(f"{mp}/c", f"{mp}/dir/c")
        os.link(f"{mp}/a.txt", f"{mp}/a-link")
        with open(f"{mp}/a.txt", "r+b") as f:
            f.seek(5000)
            f.write(b"partial block rewrite")
        m.remount()  # reads must unwrap again
        assert open(f"{mp}/dir/b.bin", "rb").read() == files["dir/b.bin"]
        assert os.getxattr(f"{mp}/a.txt", "user.note") == b"an encrypted attribute value"
        tool("inspect", f"{mp}/a.txt", rc=0)
        tool("inspect", f"{mp}/dir/b.bin", "--json", rc=0)
        tool("rewrap", m.backing, "--to-key", "secrets/other", rc=0)
        tool("rewrap", m.backing, "--json", rc=0)
        m.unmount()
        tool("fsck", m.backing, rc=0)
        tool("fsck", m.backing, "--json", rc=0)
        tool("decrypt", f"{m.backing}/dir/c", rc=0)
        with open(f"{m.backing}/dir/b.bin", "r+b") as f:  # a failing decrypt
            f.seek(fmt.HEADER_SIZE + 100)
            f.write(b"\xff\xfe")
        assert tool("decrypt", f"{m.backing}/dir/b.bin").returncode == 1
        tool("fsck", m.backing, "--json", rc=4)
        tool("inspect", f"{m.backing}/a.txt", "--json", rc=0)

        # Every DEK the test can learn.
        deks = []
        for dirpath, _, filenames in os.walk(m.backing):
            for n in filenames:
                if n.endswith(S):
                    rec = fmt.decode_sidecar(open(os.path.join(dirpath, n), "rb").read())
                    deks.append(kms.client.decrypt_datakey(rec.key_id, rec.cipher_text,
                                                           aad=rec.file_id.hex()))
        assert len({d for d in deks}) == 3  # a.txt (and its link), dir/b.bin, dir/c

        haystacks = {"mount log": open(m.log_path, "rb").read(),
                     "kms log": open(kms.log_path, "rb").read()}
        assert b" DEBUG " in haystacks["mount log"], "the mount did not log at debug level"
        for i, out in enumerate(outputs):
            haystacks[f"tool output {i}"] = out
        for dirpath, _, filenames in os.walk(m.backing):
            for n in filenames:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    haystacks[p] = open(p, "rb").read()
        for n in os.listdir(kms.data_dir):  # the KMS's own files hold wrapped material only
            p = os.path.join(kms.data_dir, n)
            if os.path.isfile(p):
                haystacks[p] = open(p, "rb").read()
        assert len(haystacks) > 15
        for dek in deks:
            for form in forms(dek):
                for where, text in haystacks.items():
                    assert form not in text, f"a DEK appears in {where}"
    finally:
        if m is not None:
            m.unmount()
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)
