"""The client's TCP mode: KmsClient/AsyncKmsClient(url=..., ak=..., sk=...) against
``kms serve --listen 127.0.0.1:PORT --credentials FILE``, signed with kms.auth's SDK-HMAC-SHA256."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import trio

from encfs.pytest_plugin import short_tempdir, start_kms_server
from huawei_sdk import free_port
from kms import auth
from kms.cli import main
from kms.client import AsyncKmsClient, KmsClient, KmsError, KmsUnavailable

AK, SK = "REMOTEAK0123456789AB", "remote-secret-key-0123456789"
PROJECT = "fedcba9876543210fedcba9876543210"
FILE_ID = "0123456789abcdef0123456789abcdef"


def write_credentials(path: str, rows: list[tuple[str, str, str]], mode: int = 0o600) -> str:
    with open(path, "w") as f:
        f.write("User Name,Access Key Id,Secret Access Key\n")
        for row in rows:
            f.write(",".join(row) + "\n")
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def remote():
    workdir = short_tempdir("kms-remote-")
    creds = write_credentials(os.path.join(workdir, "credentials.csv"), [("remoteuser", AK, SK)])
    port = free_port()
    server = start_kms_server(workdir, project_id=PROJECT,
                              extra_args=["--listen", f"127.0.0.1:{port}", "--credentials", creds])
    try:
        yield server, f"http://127.0.0.1:{port}", creds
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_sync_client_round_trip(remote):
    server, url, creds = remote
    with KmsClient.from_credentials_file(url, creds, project_id=PROJECT) as c:
        assert c.url == url and c.socket_path is None
        kid = c.create_key("remote/sync", "over tcp")["key_id"]
        assert c.describe_key("remote/sync")["domain_id"] == "user:remoteuser"
        dek, ct = c.create_datakey(kid, aad=FILE_ID)
        assert len(dek) == 32
        for _ in range(3):                                   # kept-alive connection reused
            assert c.decrypt_datakey(kid, ct, aad=FILE_ID) == dek
        with pytest.raises(KmsError) as e:
            c.decrypt_datakey(kid, ct, aad="f" * 32)
        assert (e.value.status, e.value.error_code) == (400, "KMS.2203")
        assert c.call(f"aliases?key_id={kid}", method="GET")[0]["aliases"] == []   # signed query string
        assert c.call("user-quotas", method="GET")["quotas"]["resources"][0]["type"] == "CMK"
        recs = c.call("x-encfs-list-audit", {"aad": FILE_ID})["records"]
    assert {(r["operation"], r["caller"]) for r in recs} == {("create-datakey", f"ak={AK}"),
                                                             ("decrypt-datakey", f"ak={AK}")}


def test_wrong_secret_or_access_key_is_403_kms_0302(remote):
    _server, url, _creds = remote
    for ak, sk in [(AK, "wrong-secret"), ("UNKNOWNAK", SK)]:
        with KmsClient(url=url, project_id=PROJECT, ak=ak, sk=sk) as c:
            with pytest.raises(KmsError) as e:
                c.call("list-keys", {})
        assert (e.value.status, e.value.error_code) == (403, "KMS.0302")
        assert sk not in str(e.value)

    async def run():
        async with AsyncKmsClient(url=url, project_id=PROJECT, ak=AK, sk="wrong-secret") as c:
            with pytest.raises(KmsError) as e:
                await c.call("list-keys", {})
            assert (e.value.status, e.value.error_code) == (403, "KMS.0302")
    trio.run(run)


def test_async_client_round_trip(remote):
    _server, url, creds = remote

    async def run():
        async with AsyncKmsClient.from_credentials_file(url, creds, project_id=PROJECT, max_connections=4) as c:
            assert c.url == url
            kid = (await c.create_key("remote/async"))["key_id"]
            results = []

            async def one(i):
                dek, ct = await c.create_datakey(kid, aad=f"{i:032x}")
                results.append(await c.decrypt_datakey(kid, ct, aad=f"{i:032x}") == dek)
            async with trio.open_nursery() as n:
                for i in range(12):
                    n.start_soon(one, i)
            assert results == [True] * 12
    trio.run(run)


def test_signature_is_the_sdks(remote):
    """Our signer and huaweicloudsdkcore's Signer produce the same Authorization."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.sdk_request import SdkRequest
    from huaweicloudsdkcore.signer.signer import Signer

    body = b'{"key_id": "x", "datakey_length": "256"}'
    headers = {"Host": "127.0.0.1:8443", "Content-Type": "application/json;charset=utf-8",
               "X-Project-Id": PROJECT, "User-Agent": "huaweicloud-usdk-python/3.0",
               "X-Sdk-Date": "20260102T030405Z"}
    for path, query in [(f"/v1.0/{PROJECT}/kms/create-datakey", []), (f"/v1.0/{PROJECT}/kms/aliases",
                                                                      [("key_id", "a b/c"), ("limit", "5")])]:
        req = SdkRequest(method="POST", schema="http", host="127.0.0.1:8443", resource_path=path,
                         query_params=list(query), header_params=dict(headers), body=body)
        sdk_auth = Signer(BasicCredentials(AK, SK, PROJECT)).sign(req).header_params["Authorization"]
        target = path + ("?" + "&".join(f"{k}={v.replace(' ', '%20').replace('/', '%2F')}" for k, v in query)
                         if query else "")
        ours = auth.sign_request("POST", target, headers, body, AK, SK)["Authorization"]
        assert ours == sdk_auth


def test_credentials_file_checks(tmp_path):
    loose = write_credentials(str(tmp_path / "loose.csv"), [("u", "AK1", "SK1")], mode=0o644)
    with pytest.raises(auth.CredentialsError, match="group or others have access.*chmod 600"):
        KmsClient.from_credentials_file("http://127.0.0.1:1", loose)
    two = write_credentials(str(tmp_path / "two.csv"), [("u1", "AK1", "SK1"), ("u2", "AK2", "SK2")])
    assert auth.read_access_key(two).access_key == "AK1"
    assert auth.read_access_key(two, "u2").secret_key == "SK2"
    assert auth.read_access_key(two, "AK2").user_name == "u2"
    with pytest.raises(auth.CredentialsError):
        auth.read_access_key(two, "nobody")


def test_constructor_checks():
    with pytest.raises(ValueError, match="access key"):
        KmsClient(url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="http://HOST"):
        KmsClient(url="ftp://x", ak="a", sk="b")
    with pytest.raises(ValueError, match="no path"):
        KmsClient(url="https://x/v1.0", ak="a", sk="b")
    with pytest.raises(ValueError, match="not both"):
        KmsClient("/tmp/s.sock", url="http://x", ak="a", sk="b")
    with pytest.raises(ValueError):
        KmsClient("/tmp/s.sock", ak="a", sk="b")
    c = KmsClient(url="https://kms.example.com", ak="a", sk="the-secret")
    assert c.url == "https://kms.example.com" and "the-secret" not in repr(c._remote)
    assert KmsClient("/tmp/x.sock").socket_path == "/tmp/x.sock"              # positional socket path


def test_unavailable_names_the_url(remote):
    _server, url, _creds = remote
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(KmsUnavailable) as e:
        KmsClient(url=closed, ak=AK, sk=SK, timeout=5).call("list-keys", {})
    assert closed in str(e.value) and e.value.url == closed and e.value.status is None
    tls_to_plain = url.replace("http://", "https://")                        # a TLS handshake with a plain server
    with pytest.raises(KmsUnavailable) as e:
        KmsClient(url=tls_to_plain, ak=AK, sk=SK, timeout=5).call("list-keys", {})
    assert tls_to_plain in str(e.value)

    async def run():
        for u in (closed, tls_to_plain):
            async with AsyncKmsClient(url=u, ak=AK, sk=SK, timeout=5) as c:
                with pytest.raises(KmsUnavailable) as e:
                    await c.call("list-keys", {})
                assert u in str(e.value)
    trio.run(run)


def test_cli_over_url(remote, capsys):
    _server, url, creds = remote
    code = main(["--url", url, "--credentials", creds, "--project-id", PROJECT, "--json", "create-key",
                 "--alias", "remote/cli"])
    out, err = capsys.readouterr()
    assert code == 0, err
    kid = json.loads(out)["key_info"]["key_id"]
    code = main(["--url", url, "--credentials", creds, "--project-id", PROJECT, "list-keys"])
    out, _ = capsys.readouterr()
    assert code == 0 and kid in out and "remote/cli" in out
    assert main(["--url", url, "--project-id", PROJECT, "list-keys"]) == 2
    assert "--url needs --credentials" in capsys.readouterr().err
    bad = write_credentials(os.path.join(os.path.dirname(creds), "bad.csv"), [("x", AK, "nope")])
    assert main(["--url", url, "--credentials", bad, "--project-id", PROJECT, "list-keys"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kms: KMS.0302") and "nope" not in err
