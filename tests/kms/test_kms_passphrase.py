"""The root key from a passphrase (scrypt): kms serve --passphrase-file FILE / KMS_PASSPHRASE."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from encfs.pytest_plugin import daemon_env, short_tempdir, start_kms_server
from kms.store import ROOT_KEY_FILE, SCRYPT_FILE, Store, StoreError

SMALL_N = 2**10         # fast for the in-process tests; the daemon uses the default (2**17)


def test_store_with_passphrase_round_trip(tmp_path):
    d = str(tmp_path / "data")
    s = Store(d, passphrase=b"correct horse", scrypt_n=SMALL_N)
    k = s.create_key(owner="uid:1", alias="a", description="")
    material = s.material(k.key_id, 1)
    s.close()
    assert not os.path.exists(os.path.join(d, ROOT_KEY_FILE))
    meta_path = os.path.join(d, SCRYPT_FILE)
    assert stat.S_IMODE(os.stat(meta_path).st_mode) == 0o600
    meta = json.load(open(meta_path))
    assert meta["kdf"] == "scrypt" and meta["n"] == SMALL_N and meta["r"] == 8 and meta["p"] == 1
    assert "correct horse" not in open(meta_path).read()

    s = Store(d, passphrase=b"correct horse")          # parameters come from root.scrypt; unwraps at open
    assert s.material(k.key_id, 1) == material
    s.close()
    with pytest.raises(StoreError, match="wrong passphrase"):
        Store(d, passphrase=b"wrong horse")
    with pytest.raises(StoreError, match="derived from a passphrase"):
        Store(d)                                         # refuses to mix: no silent new root.key
    assert not os.path.exists(os.path.join(d, ROOT_KEY_FILE))
    s = Store(d, passphrase=b"correct horse")           # the failed attempts left the lock free
    s.close()


def test_passphrase_refused_for_a_root_key_dir_and_damaged_params(tmp_path):
    d = str(tmp_path / "data")
    Store(d).close()
    with pytest.raises(StoreError, match="refusing to also use a passphrase"):
        Store(d, passphrase=b"pw", scrypt_n=SMALL_N)
    d2 = str(tmp_path / "data2")
    Store(d2, passphrase=b"pw", scrypt_n=SMALL_N).close()
    meta_path = os.path.join(d2, SCRYPT_FILE)
    meta = json.load(open(meta_path))
    for bad in ({"n": 2**40}, {"n": 1000}, {"salt": "!!"}, {"r": 0}):
        with open(meta_path, "w") as f:
            json.dump({**meta, **bad}, f)
        with pytest.raises(StoreError, match="damaged"):
            Store(d2, passphrase=b"pw")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    os.chmod(meta_path, 0o644)
    with pytest.raises(StoreError, match="group or others"):
        Store(d2, passphrase=b"pw")


def test_missing_root_key_with_existing_keys_is_refused(tmp_path):
    d = str(tmp_path / "data")
    s = Store(d)
    s.create_key(owner="uid:1", alias="a", description="")
    s.close()
    os.unlink(os.path.join(d, ROOT_KEY_FILE))
    with pytest.raises(StoreError, match="holds keys"):
        Store(d)
    with pytest.raises(StoreError, match="holds keys"):
        Store(d, passphrase=b"pw", scrypt_n=SMALL_N)


def test_daemon_with_passphrase_file_and_env():
    workdir = short_tempdir("kms-pass-")
    pw = os.path.join(workdir, "passphrase")
    with open(pw, "w") as f:
        f.write("daemon passphrase\n")
    os.chmod(pw, 0o600)
    try:
        server = start_kms_server(workdir, extra_args=["--passphrase-file", pw])
        try:
            with server.client as c:
                kid = c.create_key("pass/key")["key_id"]
                dek, ct = c.create_datakey(kid, aad="f")
        finally:
            server.stop()
        assert os.path.exists(os.path.join(server.data_dir, SCRYPT_FILE))
        assert not os.path.exists(os.path.join(server.data_dir, ROOT_KEY_FILE))
        assert "daemon passphrase" not in server.log()
        # the same passphrase from the environment (the trailing newline of the file is not part of it)
        env = daemon_env(KMS_PASSPHRASE="daemon passphrase")
        server.env, server.extra_args = env, []
        server.start()
        try:
            with server.client as c:
                assert c.decrypt_datakey(kid, ct, aad="f") == dek
        finally:
            server.stop()

        def serve(*extra, env=None):
            return subprocess.run([sys.executable, "-m", "kms", "serve", "--socket", server.socket_path,
                                   "--data-dir", server.data_dir, *extra], capture_output=True, text=True,
                                  timeout=60, env=env)
        p = serve()                                                      # refuses to mix
        assert p.returncode == 1 and "derived from a passphrase" in p.stderr
        p = serve(env=daemon_env(KMS_PASSPHRASE="nope"))
        assert p.returncode == 1 and "wrong passphrase" in p.stderr and "nope" not in p.stderr
        os.chmod(pw, 0o640)
        p = serve("--passphrase-file", pw)
        assert p.returncode == 2 and "chmod 600" in p.stderr
        os.chmod(pw, 0o600)
        p = serve("--passphrase-file", pw, env=daemon_env(KMS_PASSPHRASE="x"))
        assert p.returncode == 2 and "not both" in p.stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
