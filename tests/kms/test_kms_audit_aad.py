"""The audit log shows each request's AAD (encfs: the file id), filterable; old audit.db files
are migrated in place."""

from __future__ import annotations

import json
import os
import sqlite3
import time

from kms.api import Kms, caller_for_uid
from kms.cli import main
from kms.store import AUDIT_DB, Store

FID = "0123456789abcdef0123456789abcdef"
FID2 = "fedcba9876543210fedcba9876543210"


def audit_json(server, capsys, *args):
    code = main(["--socket", server.socket_path, "--json", "audit", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["records"]


def test_audit_records_and_filters_the_aad(kms_server, capsys):
    with kms_server.client as c:
        kid = c.create_key("aad/key")["key_id"]
        other = c.create_key("aad/other")["key_id"]
        dek, ct = c.create_datakey(kid, aad=FID)
        assert c.decrypt_datakey(kid, ct, aad=FID) == dek
        c.create_datakey(kid, aad=FID2)
        moved = c.call("re-encrypt", {"cipher_text": ct, "destination_key_id": other,
                                      "source_additional_authenticated_data": FID,
                                      "destination_additional_authenticated_data": FID})
        assert c.decrypt_datakey(other, moved["cipher_text"], aad=FID) == dek
        c.call("encrypt-data", {"key_id": kid, "plain_text": "x", "additional_authenticated_data": FID2})
        try:
            c.decrypt_datakey(kid, ct, aad="x" * 300)        # too long: refused, still audited (truncated)
        except Exception:
            pass
    recs = audit_json(kms_server, capsys, "--aad", FID)
    assert [(r["operation"], r["key_id"], r["outcome"]) for r in recs] == [
        ("create-datakey", kid, "ok"), ("decrypt-datakey", kid, "ok"),
        ("re-encrypt", kid, "ok"), ("re-encrypt", other, "ok"), ("decrypt-datakey", other, "ok")]
    assert all(r["aad"] == FID and r["caller"] == f"uid={os.geteuid()}" and r["time"].isdigit() for r in recs)
    assert [r["operation"] for r in audit_json(kms_server, capsys, "--aad", FID2)] == ["create-datakey",
                                                                                        "encrypt-data"]
    every = audit_json(kms_server, capsys)
    assert {r["aad"] for r in every if r["operation"] == "create-key"} == {""}
    long = [r for r in every if r["error_code"] == "KMS.0308"]
    assert long and long[0]["aad"] == "x" * 128                 # truncated to 128 characters
    # filtering by key and AAD together; the table has an AAD column
    assert len(audit_json(kms_server, capsys, "--aad", FID, "--key", "aad/other")) == 2
    code = main(["--socket", kms_server.socket_path, "audit", "--aad", FID])
    out = capsys.readouterr().out
    assert code == 0 and "AAD" in out.splitlines()[0]
    assert sum(FID in line for line in out.splitlines()[1:]) == 5
    # and in the request log line: written by the daemon's periodic flush (kms/reqlog.py,
    # every 50 ms), so it may land a little after the replies on a loaded machine
    deadline = time.monotonic() + 30
    while FID not in kms_server.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert FID in kms_server.log()
    # never key material: neither the DEK nor anything but the fields above
    assert dek.hex().upper() not in json.dumps(every) and dek.hex() not in json.dumps(every)


def test_hostile_aad_is_escaped_in_the_table(kms_server, capsys):
    with kms_server.client as c:
        kid = c.create_key("aad/esc")["key_id"]
        c.create_datakey(kid, aad="a\x1b[31mb \u202ec\nd")
    code = main(["--socket", kms_server.socket_path, "audit", "--key", "aad/esc"])
    out = capsys.readouterr().out
    assert code == 0 and "\x1b" not in out and "\u202e" not in out
    assert "a\\x1b[31mb\\x20\\u202ec\\x0ad" in out
    lines = out.strip().splitlines()                            # header, create-key, create-datakey, resolve
    assert len(lines) == 4 and all(ln[:2] == "20" for ln in lines[1:]), out


def test_old_audit_db_is_migrated(tmp_path):
    data = tmp_path / "data"
    os.makedirs(data, mode=0o700)
    old = sqlite3.connect(data / AUDIT_DB)                      # the schema before the aad column
    old.executescript("""
        CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time_ms INTEGER NOT NULL,
            caller TEXT NOT NULL, operation TEXT NOT NULL, key_id TEXT NOT NULL, grant_id TEXT NOT NULL,
            outcome TEXT NOT NULL, status INTEGER NOT NULL, error_code TEXT NOT NULL);
        CREATE INDEX audit_key ON audit(key_id, time_ms);
        CREATE INDEX audit_time ON audit(time_ms);
        INSERT INTO audit (time_ms, caller, operation, key_id, grant_id, outcome, status, error_code)
            VALUES (1000, 'uid=1000', 'create-datakey', 'k', '', 'ok', 200, '');
    """)
    old.commit()
    old.close()
    os.chmod(data / AUDIT_DB, 0o644)
    for round_ in range(2):                                     # migrating twice is harmless
        store = Store(str(data))
        try:
            kms = Kms(store)
            alice = caller_for_uid(1000)
            r = kms.handle(alice, "POST", "create-key", {}, b'{"key_alias": "m%d"}' % round_)
            kid = r.body["key_info"]["key_id"]
            r = kms.handle(alice, "POST", "create-datakey", {}, json.dumps(
                {"key_id": kid, "additional_authenticated_data": FID}).encode())
            for rec in kms.audit_records(alice, "create-datakey", r):
                store.audit(rec)
            rows = store.query_audit()
            assert rows[0].aad == "" and rows[0].operation == "create-datakey" and rows[0].time_ms == 1000
            assert [x.key_id for x in store.query_audit(aad=FID)][-1] == kid
            assert len(store.query_audit(aad=FID)) == round_ + 1
        finally:
            store.close()
    db = sqlite3.connect(data / AUDIT_DB)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "aad" in {r[1] for r in db.execute("PRAGMA table_info(audit)")}
    db.close()
    assert os.stat(data / AUDIT_DB).st_mode & 0o777 == 0o600    # tightened on open
