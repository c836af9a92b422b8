"""Crash and lifecycle tests against a real daemon: SIGKILL mid-stream, deletion for real with the
testing clock, the audit trail."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import threading
import time

import pytest

from encfs.pytest_plugin import short_tempdir, start_kms_server
from kms.cli import main
from kms.client import KmsClient, KmsError, KmsUnavailable


def test_sigkill_mid_stream_loses_nothing_acknowledged(kms_server):
    keys: list[tuple[str, str]] = []            # (alias, key_id) acknowledged by create-key
    deks: list[tuple[str, str, bytes, str]] = []  # (key_id, aad, dek, cipher_text) acknowledged
    stop = threading.Event()
    errors = []

    def stream(worker: int) -> None:
        rng = random.Random(worker)
        with KmsClient(kms_server.socket_path, timeout=5) as c:
            base = c.create_key(f"crash/base{worker}")["key_id"]
            keys.append((f"crash/base{worker}", base))
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if rng.random() < 0.3 and len(keys) < 300:  # stay below the CMK quota
                        alias = f"crash/w{worker}-{i}"
                        keys.append((alias, c.create_key(alias)["key_id"]))
                    else:
                        kid = rng.choice([k for _, k in keys])
                        aad = f"w{worker}-{i}"
                        dek, ct = c.create_datakey(kid, aad=aad)
                        deks.append((kid, aad, dek, ct))
                except KmsUnavailable:
                    return                        # the daemon died: stop the stream
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
                    return

    for round_ in range(2):
        stop.clear()
        threads = [threading.Thread(target=stream, args=(round_ * 10 + w,)) for w in range(3)]
        for t in threads:
            t.start()
        # Kill once this round has done some work (not after a fixed time, which on a
        # loaded machine could be before the first request).
        want = len(deks) + random.randint(10, 40)
        deadline = time.monotonic() + 60
        while len(deks) < want:
            assert not errors, errors
            assert time.monotonic() < deadline, f"only {len(deks)} data keys in 60 s"
            time.sleep(0.005)
        kms_server.kill()                       # SIGKILL while requests are in flight
        stop.set()
        for t in threads:
            t.join()
        assert errors == []
        kms_server.start()

    assert len(keys) > 6 and len(deks) > 20
    with kms_server.client as c:
        for alias, kid in keys:
            assert c.resolve_key(alias)["key_id"] == kid
        for kid, aad, dek, ct in deks:
            assert c.decrypt_datakey(kid, ct, aad=aad) == dek


@pytest.fixture
def clocked_kms():
    workdir = short_tempdir("kms-")
    clock = os.path.join(workdir, "clock")
    server = start_kms_server(workdir, extra_args=["--test-clock-file", clock])
    try:
        yield server, clock
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_deletion_destroys_material_via_test_clock(clocked_kms):
    server, clock = clocked_kms
    with server.client as c:
        kid = c.create_key("doomed")["key_id"]
        keep = c.create_key("kept")["key_id"]
        dek, ct = c.create_datakey(kid, aad="a")
        c.call("schedule-key-deletion", {"key_id": kid, "pending_days": "7"})
        with open(clock, "w") as f:
            f.write(str(time.time() + 6 * 86400))
        time.sleep(1.5)                           # a sweep or two: nothing due yet
        assert c.describe_key(kid)["key_state"] == "4"
        c.call("cancel-key-deletion", {"key_id": kid})
        c.call("enable-key", {"key_id": kid})
        assert c.decrypt_datakey(kid, ct, aad="a") == dek
        c.call("schedule-key-deletion", {"key_id": kid, "pending_days": "7"})
        with open(clock, "w") as f:
            f.write(str(time.time() + 14 * 86400))
    # The periodic sweep destroys the material without any request touching the key.
    db = sqlite3.connect(f"file:{server.data_dir}/keys.db?mode=ro", uri=True)
    deadline = time.monotonic() + 10
    while db.execute("SELECT wrapped IS NULL FROM key_versions WHERE key_id=?", (kid,)).fetchone()[0] != 1:
        assert time.monotonic() < deadline, "material not destroyed by the sweep"
        time.sleep(0.1)
    db.close()
    server.stop()
    server.start()
    with server.client as c:
        with pytest.raises(KmsError) as e:
            c.describe_key(kid)
        assert e.value.error_code == "KMS.0207" and "destroyed" in e.value.error_msg
        with pytest.raises(KmsError) as e:
            c.decrypt_datakey(kid, ct, aad="a")
        assert e.value.error_code == "KMS.0207"
        assert kid not in c.call("list-keys", {})["keys"]
        assert c.describe_key(keep)["key_state"] == "2"          # other keys untouched
    assert "TESTING ONLY" in server.log()


def test_audit_cli_and_no_key_material_in_audit(kms_server, capsys):
    with kms_server.client as c:
        kid = c.create_key("audited")["key_id"]
        dek, ct = c.create_datakey(kid, aad="x")
        with pytest.raises(KmsError):
            c.decrypt_datakey(kid, ct, aad="wrong")
        other = c.create_key("other")["key_id"]
    code = main(["--socket", kms_server.socket_path, "audit", "--key", "audited", "--since", "1h"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["TIME", "CALLER", "OPERATION", "KEY_ID", "AAD", "GRANT", "OUTCOME", "STATUS",
                                "ERROR"]
    rows = [ln.split() for ln in lines[1:]]     # date, time, caller, operation, key, aad, grant, outcome, status, error
    assert [r[3:6] + r[7:] for r in rows if r[3] == "create-key"] == [["create-key", kid, "-", "ok", "200", "-"]]
    assert ["decrypt-datakey", kid, "wrong", "error", "400", "KMS.2203"] in [r[3:6] + r[7:] for r in rows]
    assert other not in out
    code = main(["--socket", kms_server.socket_path, "--json", "audit", "--since", "2026-01-01T00:00:00"])
    import json
    recs = json.loads(capsys.readouterr().out)["records"]
    assert {r["caller"] for r in recs} == {f"uid={os.geteuid()}"}
    assert all(set(r) == {"time", "caller", "operation", "key_id", "grant_id", "outcome", "status", "error_code",
                          "aad"}
               for r in recs)
    kms_server.stop()                           # flushes; then look at the files themselves
    for name in os.listdir(kms_server.data_dir):
        blob = open(os.path.join(kms_server.data_dir, name), "rb").read()
        assert dek not in blob and dek.hex().upper().encode() not in blob and dek.hex().encode() not in blob
    assert dek.hex().upper() not in kms_server.log()
