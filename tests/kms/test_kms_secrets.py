"""Secrets hygiene of kms/ (issue 8 item 6): no DEK, CMK material, root key, SK or plaintext in
any log line (at DEBUG), error message, exception text, audit row or --json output; key files
0600 from their creation; constant-time comparison of secrets, digests and signatures."""

from __future__ import annotations

import ast
import base64
import glob
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat

import pytest

from encfs.pytest_plugin import short_tempdir, start_kms_server
from kms import store as store_mod
from kms.cli import main
from kms.client import KmsClient, KmsError
from kms.store import ROOT_KEY_FILE, Store

AK, SK = "HYGIENEAK00000000001", "hygiene-secret-key-7f3a9c2e5b8d1f4a"
SECRET_TEXT = "the-plaintext-of-encrypt-data-7c1e"


def forms(secret: bytes) -> set[bytes]:
    """How a secret could show up: raw, hex either case, base64 (standard, url-safe, unpadded)."""
    out = {secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
           base64.urlsafe_b64encode(secret), base64.b64encode(secret).rstrip(b"=")}
    if len(secret) >= 8:
        out.add(secret)
    return out


def assert_clean(name: str, blob: bytes, secrets: dict[str, bytes]) -> None:
    for label, secret in secrets.items():
        for f in forms(secret):
            assert f not in blob, f"{label} found in {name}"


def test_no_secret_in_logs_audit_outputs_or_errors(capsys):
    workdir = short_tempdir("kms-hygiene-")
    creds = os.path.join(workdir, "credentials.csv")
    with open(creds, "w") as f:
        f.write(f"User Name,Access Key Id,Secret Access Key\nhyg,{AK},{SK}\n")
    os.chmod(creds, 0o600)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = start_kms_server(workdir, extra_args=["--log-level", "debug", "--listen", f"127.0.0.1:{port}",
                                                   "--credentials", creds])
    secrets: dict[str, bytes] = {"SK": SK.encode(), "plaintext": SECRET_TEXT.encode()}
    outputs: list[str] = []          # CLI output and exception texts that must be clean
    key_ids = []
    try:
        def cli(*args):
            code = main(["--socket", server.socket_path, *args])
            out, err = capsys.readouterr()
            outputs.append(out + err)
            return code, out

        with server.client as c:
            kid = c.create_key("hyg/key")["key_id"]
            kid2 = c.create_key("hyg/other")["key_id"]
            key_ids += [kid, kid2]
            for i in range(5):
                dek, ct = c.create_datakey(kid, aad=f"{i:032x}")
                secrets[f"dek{i}"] = dek
                assert c.decrypt_datakey(kid, ct, aad=f"{i:032x}") == dek
                try:
                    c.decrypt_datakey(kid, ct, aad="wrong")
                except KmsError as e:
                    outputs.append(str(e))
            # encrypt-datakey with a DEK of ours, then with a wrong digest (the DEK is in the request)
            mine = os.urandom(32)
            secrets["dek-mine"] = mine
            c.call("encrypt-datakey", {"key_id": kid, "plain_text": (mine + hashlib.sha256(mine).digest()).hex(),
                                       "datakey_plain_length": "32"})
            for bad in [(mine + b"\0" * 32).hex(), mine.hex() + "zz", (mine + hashlib.sha256(mine).digest()).hex()[:-2]]:
                with pytest.raises(KmsError) as e:
                    c.call("encrypt-datakey", {"key_id": kid, "plain_text": bad, "datakey_plain_length": "32"})
                outputs.append(str(e.value))
            with pytest.raises(KmsError) as e:          # the DEK in a field where it does not belong
                c.call("describe-key", {"key_id": mine.hex()})
            outputs.append(str(e.value))
            c.call("re-encrypt", {"cipher_text": ct, "destination_key_id": kid2,
                                  "source_additional_authenticated_data": f"{4:032x}"})
            enc = c.call("encrypt-data", {"key_id": kid, "plain_text": SECRET_TEXT})
            c.call("decrypt-data", {"cipher_text": enc["cipher_text"]})
            c.call("rotate-on-demand", {"key_id": kid})
            dek5, ct5 = c.create_datakey(kid, aad="v2")
            secrets["dek5"] = dek5
            c.call("create-grant", {"key_id": kid, "grantee_principal": "1234", "operations": ["decrypt-datakey"]})
            secrets["random"] = bytes.fromhex(c.call("gen-random", {"random_data_length": "256"})["random_data"])
        # over TCP, signed; and with a wrong secret that shares a prefix with the real one
        with KmsClient(url=f"http://127.0.0.1:{port}", ak=AK, sk=SK) as t:
            dek6, ct6 = t.create_datakey(kid2 if False else t.create_key("hyg/tcp")["key_id"], aad="tcp")
            secrets["dek6"] = dek6
        with KmsClient(url=f"http://127.0.0.1:{port}", ak=AK, sk=SK[:-1] + "x") as t:
            with pytest.raises(KmsError) as e:
                t.call("list-keys", {})
            outputs.append(str(e.value))
        # a request whose framing is broken so that a DEK lands where the next request line goes
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(30)
            raw.connect(server.socket_path)
            payload = (b'{"key_id": "' + kid.encode() + b'", "plain_text": "' + mine.hex().upper().encode()
                       + b' HTTP/1.1\r\n\r\n')
            raw.sendall(b"POST /v1.0/local/kms/encrypt-datakey HTTP/1.1\r\nHost: k\r\nContent-Length: 20\r\n\r\n"
                        + payload)
            reply = b""
            while chunk := raw.recv(65536):
                reply += chunk
            assert reply.count(b"HTTP/1.1 400") == 2, reply        # bad JSON, then a bad request line
            outputs.append(reply.decode("latin-1"))
        # the CLI: everything but the commands whose purpose is to print key material
        for args in (["--json", "list-keys"], ["--json", "describe-key", "hyg/key"], ["list-keys"],
                     ["--json", "audit"], ["audit"], ["--json", "get-key-rotation-status", "hyg/key"],
                     ["--json", "list-grants", "hyg/key"], ["--json", "decrypt-datakey", "hyg/key", "--cipher-text",
                                                             ct5, "--aad", "wrong"],
                     ["--json", "encrypt-datakey", "hyg/key", "--data-key", mine.hex() + "00"]):
            cli(*args)
        code, out = cli("--json", "create-datakey", "hyg/key")      # prints a DEK by design: learn it
        secrets["dek-cli"] = bytes.fromhex(json.loads(out)["plain_text"])
        outputs.pop()
        cli("--json", "audit")
    finally:
        server.stop()
    try:
        # CMK material and the root key, read with the daemon stopped
        secrets["root key"] = open(os.path.join(server.data_dir, ROOT_KEY_FILE), "rb").read()
        st = Store(server.data_dir)
        try:
            for k in st.keys():
                for v in st.versions(k.key_id):
                    secrets[f"cmk {k.key_id} v{v.version}"] = st.material(k.key_id, v.version)
        finally:
            st.close()
        log = open(server.log_path, "rb").read()
        assert b" DEBUG " in log                                 # the daemon did log at DEBUG
        assert_clean("daemon log", log, secrets)
        for path in glob.glob(os.path.join(server.data_dir, "audit.db*")):
            assert_clean(path, open(path, "rb").read(), secrets)
        db = sqlite3.connect(os.path.join(server.data_dir, "audit.db"))
        rows = "\n".join(map(repr, db.execute("SELECT * FROM audit").fetchall())).encode()
        db.close()
        assert rows.count(b"\n") > 30
        assert_clean("audit rows", rows, secrets)
        for path in glob.glob(os.path.join(server.data_dir, "keys.db*")):
            assert_clean(path, open(path, "rb").read(), {k: v for k, v in secrets.items() if k != "plaintext"})
        for i, text in enumerate(outputs):
            assert_clean(f"output {i}: {text[:80]!r}", text.encode(), secrets)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_key_files_are_0600_before_anything_is_written(tmp_path, monkeypatch):
    """With umask 0 and a data dir others may enter, every file the store creates is 0600 from
    the start: each database file exists with mode 0600 before SQLite opens it."""
    real_connect = store_mod.sqlite3.connect
    seen = []

    def checking_connect(path, *a, **kw):
        st = os.stat(path)  # it exists before SQLite opens it...
        assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
        if os.path.basename(path) not in seen:  # ... and, at its first open, nothing is in it yet
            assert st.st_size == 0, (path, st.st_size)
        seen.append(os.path.basename(path))
        return real_connect(path, *a, **kw)

    monkeypatch.setattr(store_mod.sqlite3, "connect", checking_connect)
    data = tmp_path / "data"
    os.makedirs(data)
    os.chmod(data, 0o755)
    old = os.umask(0)
    try:
        s = Store(str(data))
        s.create_key(owner="uid:1", alias="a", description="")
        s.close()
        s = Store(str(data))
        s.close()
    finally:
        os.umask(old)
    assert sorted(set(seen)) == ["audit.db", "keys.db"]
    for name in os.listdir(data):
        assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600, name


def test_secrets_and_digests_compared_in_constant_time():
    """No == / != on anything named like a digest, signature, MAC, tag or check value in kms/;
    hmac.compare_digest is used for the encrypt-datakey digest, signatures and the passphrase check."""
    pkg = os.path.join(os.path.dirname(__file__), "..", "..", "kms")
    suspicious = ("digest", "dgst", "signature", "sig", "mac", "check", "secret", "sk", "passphrase")
    offenders = []
    for path in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                for side in [node.left, *node.comparators]:
                    names = {n.id.lower() for n in ast.walk(side) if isinstance(n, ast.Name)} | \
                            {n.attr.lower() for n in ast.walk(side) if isinstance(n, ast.Attribute)}
                    if any(w in name.split("_") or name.endswith(w) for name in names for w in suspicious):
                        offenders.append(f"{os.path.basename(path)}:{node.lineno}")
    assert not offenders, offenders
    src = {f: open(os.path.join(pkg, f)).read() for f in ("ops/datakeys.py", "ops/imports.py", "material.py",
                                                          "auth.py", "client.py", "store.py")}
    assert "hmac.compare_digest(material.datakey_digest(self.spec(k), dek), digest)" in src["ops/datakeys.py"]
    assert "hmac.compare_digest(p.token.encode(), token.encode())" in src["ops/imports.py"]
    assert "hmac.compare_digest(before, digest)" in src["ops/imports.py"]
    assert "_hmac.compare_digest(a, b)" in src["material.py"]
    assert "hmac.compare_digest(expected" in src["auth.py"]
    assert "hmac.compare_digest(" in src["client.py"] and "hmac.compare_digest(" in src["store.py"]
