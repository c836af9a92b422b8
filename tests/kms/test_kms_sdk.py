"""Huawei's official Python SDK against `kms serve --listen` with AK/SK signatures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

from encfs.pytest_plugin import short_tempdir, start_kms_server
from huawei_sdk import free_port, sdk_client

# A test dependency the Makefile installs: imported unconditionally, so a failed install
# fails the suite instead of skipping the Huawei compatibility layer.
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkkms.v2 import (
    CancelGrantRequest, CancelKeyDeletionRequest, CreateDatakeyRequest, CreateDatakeyRequestBody,
    CreateGrantRequest, CreateGrantRequestBody, CreateKeyRequest, CreateKeyRequestBody, CreateRandomRequest,
    DecryptDataRequest, DecryptDataRequestBody, DecryptDatakeyRequest, DecryptDatakeyRequestBody, DeleteKeyRequest,
    DisableKeyRequest, EnableKeyRequest, EnableKeyRotationRequest, EncryptDataRequest, EncryptDataRequestBody,
    EncryptDatakeyRequest, EncryptDatakeyRequestBody, GenRandomRequestBody, KmsClient, ListGrantsRequest,
    ListGrantsRequestBody, ListKeyDetailRequest, ListKeysRequest, ListKeysRequestBody, OperateKeyRequestBody,
    ReEncryptRequest, ReEncryptRequestBody, RevokeGrantRequestBody, RotateOnDemandRequest,
    RotateOnDemandRequestBody, ScheduleKeyDeletionRequestBody, ShowKeyRotationStatusRequest,
    ShowUserQuotasRequest)

AK, SK = "TESTAK0123456789ABCD", "test-secret-key-0123456789"
PROJECT = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def tcp_kms():
    workdir = short_tempdir("kms-sdk-")
    creds = os.path.join(workdir, "credentials.csv")
    with open(creds, "w") as f:
        f.write(f"User Name,Access Key Id,Secret Access Key\nsdkuser,{AK},{SK}\n")
    os.chmod(creds, 0o600)
    port = free_port()
    server = start_kms_server(workdir, project_id=PROJECT,
                              extra_args=["--listen", f"127.0.0.1:{port}", "--credentials", creds])
    try:
        yield server, port
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def sdk(port, ak=AK, sk=SK, project=PROJECT) -> KmsClient:
    return sdk_client(f"http://127.0.0.1:{port}", ak, sk, project)


def expect_error(fn, code, status=400):
    with pytest.raises(ClientRequestException) as e:
        fn()
    assert e.value.error_code == code, e.value
    assert e.value.status_code == status
    return e.value


def test_sdk_operations(tcp_kms):
    _server, port = tcp_kms
    c = sdk(port)
    r = c.create_key(CreateKeyRequest(body=CreateKeyRequestBody(key_alias="sdk-key", key_description="via sdk")))
    kid = r.key_info.key_id
    assert r.key_info.domain_id == "user:sdkuser"
    lst = c.list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="10", key_spec="ALL")))
    assert kid in lst.keys and lst.total >= 1 and lst.truncated == "false"
    d = c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid)))
    assert d.key_info.key_alias == "sdk-key" and d.key_info.key_state == "2"

    dk = c.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(
        key_id=kid, datakey_length="256", additional_authenticated_data="file-1")))
    dec = c.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=kid, cipher_text=dk.cipher_text, datakey_cipher_length="32", additional_authenticated_data="file-1")))
    assert dec.data_key == dk.plain_text and dec.datakey_length == "32"
    assert dec.datakey_dgst == hashlib.sha256(bytes.fromhex(dk.plain_text)).hexdigest().upper()

    dek = os.urandom(32)
    enc = c.encrypt_datakey(EncryptDatakeyRequest(body=EncryptDatakeyRequestBody(
        key_id=kid, plain_text=(dek + hashlib.sha256(dek).digest()).hex(), datakey_plain_length="32")))
    assert enc.datakey_length == "32"
    back = c.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=kid, cipher_text=enc.cipher_text, datakey_cipher_length="32")))
    assert bytes.fromhex(back.data_key) == dek

    ed = c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(key_id=kid, plain_text="hello kms")))
    dd = c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(cipher_text=ed.cipher_text)))
    assert dd.plain_text == "hello kms" and dd.key_id == kid

    rnd = c.create_random(CreateRandomRequest(body=GenRandomRequestBody(random_data_length="512")))
    assert len(rnd.random_data) == 128

    # state transitions
    assert c.disable_key(DisableKeyRequest(body=OperateKeyRequestBody(key_id=kid))).key_info.key_state == "3"
    expect_error(lambda: c.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=kid))), "KMS.0209")
    expect_error(lambda: c.disable_key(DisableKeyRequest(body=OperateKeyRequestBody(key_id=kid))), "KMS.1301")
    assert c.enable_key(EnableKeyRequest(body=OperateKeyRequestBody(key_id=kid))).key_info.key_state == "2"
    s = c.delete_key(DeleteKeyRequest(body=ScheduleKeyDeletionRequestBody(key_id=kid, pending_days="7")))
    assert s.key_state == "4"
    expect_error(lambda: c.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=kid))), "KMS.0210")
    expect_error(lambda: c.enable_key(EnableKeyRequest(body=OperateKeyRequestBody(key_id=kid))), "KMS.0210")
    assert c.cancel_key_deletion(CancelKeyDeletionRequest(body=OperateKeyRequestBody(key_id=kid))).key_state == "3"
    expect_error(lambda: c.cancel_key_deletion(CancelKeyDeletionRequest(body=OperateKeyRequestBody(key_id=kid))),
                 "KMS.1501")
    c.enable_key(EnableKeyRequest(body=OperateKeyRequestBody(key_id=kid)))

    # grants
    g = c.create_grant(CreateGrantRequest(body=CreateGrantRequestBody(
        key_id=kid, grantee_principal="otheruser", operations=["describe-key", "decrypt-datakey"], name="g1")))
    assert len(g.grant_id) == 64
    gl = c.list_grants(ListGrantsRequest(body=ListGrantsRequestBody(key_id=kid)))
    assert gl.total == 1 and gl.grants[0].grant_id == g.grant_id and gl.grants[0].operations == \
        ["describe-key", "decrypt-datakey"]
    c.cancel_grant(CancelGrantRequest(body=RevokeGrantRequestBody(key_id=kid, grant_id=g.grant_id)))
    assert c.list_grants(ListGrantsRequest(body=ListGrantsRequestBody(key_id=kid))).total == 0

    # rotation and re-encrypt
    c.enable_key_rotation(EnableKeyRotationRequest(body=OperateKeyRequestBody(key_id=kid)))
    expect_error(lambda: c.enable_key_rotation(EnableKeyRotationRequest(body=OperateKeyRequestBody(key_id=kid))),
                 "KMS.2901")
    c.rotate_on_demand(RotateOnDemandRequest(body=RotateOnDemandRequestBody(key_id=kid)))
    st = c.show_key_rotation_status(ShowKeyRotationStatusRequest(body=OperateKeyRequestBody(key_id=kid)))
    assert st.key_rotation_enabled is True and st.number_of_rotations == 1 and len(st.key_materials) == 2
    re = c.re_encrypt(ReEncryptRequest(body=ReEncryptRequestBody(
        cipher_text=dk.cipher_text, destination_key_id=kid, source_additional_authenticated_data="file-1",
        destination_additional_authenticated_data="file-1", datakey_cipher_length="32")))
    assert re.cipher_text != dk.cipher_text and re.key_id == kid
    again = c.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=kid, cipher_text=re.cipher_text, datakey_cipher_length="32", additional_authenticated_data="file-1")))
    assert again.data_key == dk.plain_text

    q = c.show_user_quotas(ShowUserQuotasRequest())
    assert q.quotas.resources[0].type == "CMK"

    # error cases
    missing = "00000000-0000-0000-0000-000000000000"
    e = expect_error(lambda: c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=missing))),
                     "KMS.0207", 404)
    assert "does not exist" in e.error_msg
    expect_error(lambda: c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id="nope"))),
                 "KMS.0205")
    expect_error(lambda: c.create_key(CreateKeyRequest(body=CreateKeyRequestBody(key_alias="sdk-key"))), "KMS.1104")


def test_sdk_wrong_secret_wrong_project_refused(tcp_kms):
    _server, port = tcp_kms
    body = ListKeysRequest(body=ListKeysRequestBody(limit="1"))
    expect_error(lambda: sdk(port, sk="wrong").list_keys(body), "KMS.0302", 403)
    expect_error(lambda: sdk(port, ak="UNKNOWNAK").list_keys(body), "KMS.0302", 403)
    expect_error(lambda: sdk(port, project="ffffffffffffffffffffffffffffffff").list_keys(body), "KMS.0321", 403)


def _raw(port, headers, body=b'{"limit": "1"}', path=f"/v1.0/{PROJECT}/kms/list-keys"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unsigned_stale_and_tampered_requests_refused(tcp_kms):
    from kms import auth
    _server, port = tcp_kms
    status, r = _raw(port, {"Content-Type": "application/json"})
    assert status == 403 and r["error"]["error_code"] == "KMS.0301"

    def signed(date, body=b'{"limit": "1"}', send_body=None):
        headers = {"content-type": "application/json;charset=utf-8", "host": f"127.0.0.1:{port}",
                   "x-sdk-date": date}
        signed_names = sorted(headers)
        sts = auth.string_to_sign("POST", f"/v1.0/{PROJECT}/kms/list-keys", headers, signed_names, body, date)
        headers["Authorization"] = (f"SDK-HMAC-SHA256 Access={AK}, SignedHeaders={';'.join(signed_names)}, "
                                    f"Signature={auth.sign(SK, sts)}")
        return _raw(port, headers, send_body if send_body is not None else body)

    from datetime import datetime, timedelta, timezone
    now = datetime.now(timezone.utc)
    assert signed(now.strftime("%Y%m%dT%H%M%SZ"))[0] == 200           # our own signer agrees
    status, r = signed((now - timedelta(hours=1)).strftime("%Y%m%dT%H%M%SZ"))
    assert status == 403 and r["error"]["error_code"] == "KMS.0303"
    status, r = signed(now.strftime("%Y%m%dT%H%M%SZ"), send_body=b'{"limit": "2"}')   # body changed after signing
    assert status == 403 and r["error"]["error_code"] == "KMS.0302"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to administer another principal's key")
def test_root_administers_keys_created_over_tcp(tcp_kms):
    server, port = tcp_kms
    kid = sdk(port).create_key(CreateKeyRequest(body=CreateKeyRequestBody(key_alias="tcp-owned"))).key_info.key_id
    with server.client as local:
        info = local.describe_key(kid)
    assert info["key_alias"] == "tcp-owned" and info["domain_id"] == "user:sdkuser"
