"""Key lifecycle through a real mount and a real KMS: audit of file keys, revocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from encfs import format as fmt


def kms_cli(m, *args) -> str:
    res = subprocess.run([sys.executable, "-m", "kms", "--socket", m.kms.socket_path,
                          "--project-id", m.kms.project_id, *args],
                         capture_output=True, text=True, check=True)
    return res.stdout


def test_kms_audit_shows_the_unwrap_of_an_opened_file(encrypted_mount):
    m = encrypted_mount
    with open(f"{m.mountpoint}/report.txt", "w") as f:
        f.write("quarterly numbers")
    rec = fmt.decode_sidecar(open(f"{m.backing}/report.txt.sfskey", "rb").read())
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
    assert found.stdout.split() == [os.path.join(m.backing, "report.txt")]
    table = kms_cli(m, "audit", "--key", m.key_id)
    assert rec.file_id.hex() in table and "decrypt-datakey" in table
