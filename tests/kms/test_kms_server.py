"""The daemon over its Unix socket: curl for each foundation operation, the clients, keep-alive."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading

import pytest
import trio

from kms.client import AsyncKmsClient, KmsClient, KmsError, KmsUnavailable


def curl(server, op, body=None, method="POST", project="local", raw=None):
    cmd = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", server.socket_path, "-X", method,
           f"http://kms/v1.0/{project}/kms/{op}"]
    if raw is not None or body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", raw if raw is not None else json.dumps(body)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    text, _, code = out.rpartition("\n")
    return int(code), json.loads(text)


def test_curl_foundation_operations(kms_server):
    s = kms_server
    code, r = curl(s, "create-key", {"key_alias": "curl/key", "key_description": "made by curl"})
    assert code == 200
    kid = r["key_info"]["key_id"]
    code, r = curl(s, "describe-key", {"key_id": kid})
    assert code == 200 and r["key_info"]["key_alias"] == "curl/key" and r["key_info"]["key_state"] == "2"
    code, r = curl(s, "list-keys", {"limit": "10"})
    assert code == 200 and kid in r["keys"] and r["truncated"] == "false" and isinstance(r["total"], int)
    code, r = curl(s, "list-keys", raw="{}")
    assert code == 200 and kid in r["keys"]
    code, dk = curl(s, "create-datakey", {"key_id": kid, "datakey_length": "256",
                                          "additional_authenticated_data": "file-1"})
    assert code == 200 and len(dk["plain_text"]) == 64
    code, r = curl(s, "decrypt-datakey", {"key_id": kid, "cipher_text": dk["cipher_text"],
                                          "datakey_cipher_length": "32", "additional_authenticated_data": "file-1"})
    assert code == 200 and r["data_key"] == dk["plain_text"]
    code, r = curl(s, "x-encfs-resolve-key", {"key": "sfs/default"})
    assert code == 200 and r["key_info"]["default_key_flag"] == "1"
    # error cases, with Huawei's body and status
    assert curl(s, "describe-key", {"key_id": "00000000-0000-0000-0000-000000000000"}) == \
        (404, {"error": {"error_code": "KMS.0207", "error_msg": "key 00000000-0000-0000-0000-000000000000 does not exist"}})
    code, r = curl(s, "describe-key", {"key_id": "bad"})
    assert (code, r["error"]["error_code"]) == (400, "KMS.0205")
    code, r = curl(s, "create-key", raw="{oops")
    assert (code, r["error"]["error_code"]) == (400, "KMS.0202")
    code, r = curl(s, "create-key", {})
    assert (code, r["error"]["error_code"]) == (400, "KMS.0204")
    code, r = curl(s, "decrypt-datakey", {"key_id": kid, "cipher_text": dk["cipher_text"],
                                          "datakey_cipher_length": "32", "additional_authenticated_data": "file-2"})
    assert (code, r["error"]["error_code"]) == (400, "KMS.2203")
    code, r = curl(s, "list-keys", {}, project="someone-else")
    assert (code, r["error"]["error_code"]) == (403, "KMS.0321")
    code, r = curl(s, "create-key", raw="x" * (70 * 1024))
    assert (code, r["error"]["error_code"]) == (400, "KMS.0203")
    code, r = curl(s, "user-quotas", method="GET")
    assert code == 200 and r["quotas"]["resources"][0]["type"] == "CMK"


def test_socket_is_0600_and_removed_on_sigterm(kms_server):
    assert stat.S_IMODE(os.stat(kms_server.socket_path).st_mode) == 0o600
    kms_server.stop()
    assert kms_server.process.returncode == 0
    assert not os.path.exists(kms_server.socket_path)
    assert "->" in kms_server.log()       # one line per request


def test_sync_client(kms_server):
    with kms_server.client as c:
        info = c.create_key("client/key", "d")
        kid = info["key_id"]
        assert c.describe_key("client/key")["key_id"] == kid          # alias accepted
        dek, ct = c.create_datakey(kid, aad="fid")
        assert len(dek) == 32
        assert c.decrypt_datakey(kid, ct, aad="fid") == dek
        dek64, ct64 = c.create_datakey("client/key", length_bits=512)
        assert c.decrypt_datakey(kid, ct64, length_bytes=64) == dek64
        with pytest.raises(KmsError) as e:
            c.decrypt_datakey(kid, ct, aad="other")
        assert e.value.error_code == "KMS.2203" and e.value.status == 400
        assert str(e.value).startswith("KMS.2203: ")
        with pytest.raises(KmsError) as e:
            c.describe_key("00000000-0000-0000-0000-000000000000")
        assert e.value.status == 404 and e.value.error_code == "KMS.0207"
        assert c.resolve_key("sfs/default")["key_alias"] == "sfs/default"


def test_client_reconnects_after_daemon_restart(kms_server):
    c = kms_server.client
    kid = c.create_key("restart/key")["key_id"]
    dek, ct = c.create_datakey(kid)
    kms_server.stop()
    with pytest.raises(KmsUnavailable):
        c.describe_key(kid)
    kms_server.start()
    assert c.decrypt_datakey(kid, ct) == dek        # kept-alive connection was dead: reconnected
    c.close()


def test_unavailable_message(tmp_path):
    path = str(tmp_path / "none.sock")
    with pytest.raises(KmsUnavailable) as e:
        KmsClient(path).call("list-keys", {})
    msg = str(e.value)
    assert f"no KMS answers at {path}" in msg and f"kms serve --socket {path}" in msg
    assert e.value.status is None


def test_many_concurrent_sync_clients(kms_server):
    kid = kms_server.client.create_key("conc")["key_id"]
    errors = []

    def worker():
        try:
            with kms_server.client as c:
                for i in range(50):
                    dek, ct = c.create_datakey(kid, aad=str(i))
                    assert c.decrypt_datakey(kid, ct, aad=str(i)) == dek
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_async_client_concurrent_and_reconnect(kms_server):
    async def main():
        async with AsyncKmsClient(kms_server.socket_path, timeout=5) as c:
            kid = (await c.create_key("async/key"))["key_id"]
            results = {}

            async def one(i):
                dek, ct = await c.create_datakey(kid, aad=f"f{i}")
                results[i] = (dek, ct)

            async with trio.open_nursery() as n:
                for i in range(40):
                    n.start_soon(one, i)
            async with trio.open_nursery() as n:
                for i, (dek, ct) in results.items():
                    async def check(i=i, dek=dek, ct=ct):
                        assert await c.decrypt_datakey(kid, ct, aad=f"f{i}") == dek
                    n.start_soon(check)
            assert len(c._idle) >= 2          # a pool, not one connection
            with pytest.raises(KmsError) as e:
                await c.describe_key("00000000-0000-0000-0000-000000000000")
            assert e.value.error_code == "KMS.0207"
            await trio.to_thread.run_sync(kms_server.stop)
            with pytest.raises(KmsUnavailable):
                await c.describe_key(kid)
            await trio.to_thread.run_sync(kms_server.start)
            assert (await c.describe_key(kid))["key_id"] == kid
            return kid

    trio.run(main)


def test_async_client_timeout(tmp_path):
    """A socket that accepts but never answers: the call ends after `timeout` with KmsUnavailable."""
    import socket
    path = str(tmp_path / "mute.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(5)

    async def main():
        async with AsyncKmsClient(path, timeout=0.3) as c:
            with pytest.raises(KmsUnavailable, match="no reply within"):
                await c.call("list-keys", {})
    try:
        trio.run(main)
        with pytest.raises(KmsUnavailable):
            KmsClient(path, timeout=0.3).call("list-keys", {})
    finally:
        srv.close()


def test_pipelined_and_malformed_http(kms_server):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(kms_server.socket_path)
    req = (b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: kms\r\nContent-Length: 2\r\n\r\n{}")
    s.sendall(req * 2)
    data = b""
    while data.count(b"HTTP/1.1 200") < 2:
        chunk = s.recv(65536)
        assert chunk
        data += chunk
    s.sendall(b"GARBAGE\r\n\r\n")
    rest = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert rest.startswith(b"HTTP/1.1 400")
    s.close()


def test_stalled_connection_does_not_block_others(kms_server):
    """A client that sends half a request (or nothing) holds only its own connection task."""
    import socket
    stalled = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX)
        s.connect(kms_server.socket_path)
        s.sendall(b"POST /v1.0/local/kms/create-key HTTP/1.1\r\nHost: kms\r\nContent-Length: 100\r\n\r\n{")
        stalled.append(s)
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(kms_server.socket_path)
    try:
        with KmsClient(kms_server.socket_path, timeout=3) as c:
            kid = c.create_key("not/blocked")["key_id"]
            for _ in range(20):
                dek, ct = c.create_datakey(kid)
                assert c.decrypt_datakey(kid, ct) == dek
    finally:
        for s in stalled + [idle]:
            s.close()


def test_response_parser_framings():
    from kms.client import _Response
    r = _Response()
    assert not r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    assert r.feed(b"llo") and (r.status, bytes(r.body), r.close) == (200, b"hello", False)
    r = _Response()
    assert not r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert r.feed(b"2;x=1\r\nde\r\n0\r\n\r\n") and bytes(r.body) == b"abcde"
    r = _Response()
    assert not r.feed(b"HTTP/1.0 404 Not Found\r\n\r\n{}")
    assert r.feed(b"") and (r.status, bytes(r.body), r.close) == (404, b"{}", True)
    r = _Response()
    assert r.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert r.status == 200 and r.close
    with pytest.raises(ValueError):
        _Response().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
