"""Every key spec and every operation of the reference's appendix A that this KMS claims, through
Huawei's official SDK (huaweicloudsdkkms v2) against a real `kms serve --listen`: happy paths,
wrong key usage, disabled and pending-deletion keys, missing grants, wrong algorithms, tampered
signatures and MACs, the import flow (expired token, wrong wrapping), tags, aliases,
retire-grant, list-retirable-grants, update alias/description and show_version(s)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time

import pytest

from encfs.pytest_plugin import short_tempdir, start_kms_server
from huawei_sdk import free_port, sdk_client  # noqa: E402

# The SDK is a test dependency the Makefile installs: imported unconditionally (a failed
# install fails the suite instead of skipping it; docs/TESTING.md).
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding  # noqa: E402
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException  # noqa: E402
from huaweicloudsdkkms.v2 import (  # noqa: E402
    AssociateAliasRequest, AssociateAliasRequestBody, BatchCreateKmsTagsRequest, BatchCreateKmsTagsRequestBody,
    CancelSelfGrantRequest, CreateAliasRequest, CreateAliasRequestBody, CreateDatakeyRequest,
    CreateDatakeyRequestBody, CreateEcDatakeyPairRequest, CreateEcDatakeyPairRequestBody, CreateGrantRequest,
    CreateGrantRequestBody, CreateKeyRequest, CreateKeyRequestBody, CreateKmsTagRequest, CreateKmsTagRequestBody,
    CreateParametersForImportRequest, CreateRsaDatakeyPairRequest, CreateRsaDatakeyPairRequestBody,
    DecryptDataRequest, DecryptDataRequestBody, DecryptDatakeyRequest, DecryptDatakeyRequestBody,
    DeleteAliasRequest, DeleteAliasRequestBody, DeleteImportedKeyMaterialRequest, DeleteKeyRequest,
    DeleteTagRequest, DisableKeyRequest, EnableKeyRotationRequest, EncryptDataRequest, EncryptDataRequestBody,
    GenerateMacRequest, GenerateMacRequestBody, GetParametersForImportRequestBody, ImportKeyMaterialRequest,
    ImportKeyMaterialRequestBody, KmsClient, ListAliasesRequest, ListKeyDetailRequest, ListKmsByTagsRequest,
    ListKmsByTagsRequestBody, ListKmsTagsRequest, ListRetirableGrantsRequest, ListRetirableGrantsRequestBody,
    OperateKeyRequestBody, RevokeGrantRequestBody, RotateOnDemandRequest, RotateOnDemandRequestBody,
    ScheduleKeyDeletionRequestBody, ShowKmsTagsRequest, ShowPublicKeyRequest, ShowVersionRequest,
    ShowVersionsRequest, SignRequest, SignRequestBody, Tag, TagItem, UpdateKeyAliasRequest,
    UpdateKeyAliasRequestBody, UpdateKeyDescriptionRequest, UpdateKeyDescriptionRequestBody,
    ValidateSignatureRequest, VerifyMacRequest, VerifyMacRequestBody, VerifyRequestBody)
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding  # noqa: E402

PROJECT = "0123456789abcdef0123456789abcdef"
USERS = {"alice": ("AKALICE0123456789ABC", "alice-secret-0123456789"),
         "bob": ("AKBOB00123456789ABCD", "bob-secret-0123456789")}

SIGNING = {
    "RSA_2048": ["RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512", "RSASSA_PKCS1_V1_5_SHA_256",
                 "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512"],
    "RSA_3072": ["RSASSA_PSS_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384"],
    "RSA_4096": ["RSASSA_PSS_SHA_512"],
    "EC_P256": ["ECDSA_SHA_256"], "EC_P384": ["ECDSA_SHA_384"], "SECP256K1": ["ECDSA_SHA_256"],
}
HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


@pytest.fixture(scope="module")
def tcp_kms():
    workdir = short_tempdir("kms-sdks-")
    creds = os.path.join(workdir, "credentials.csv")
    with open(creds, "w") as f:
        f.write("User Name,Access Key Id,Secret Access Key\n")
        for name, (ak, sk) in USERS.items():
            f.write(f"{name},{ak},{sk}\n")
    os.chmod(creds, 0o600)
    clock = os.path.join(workdir, "clock")
    port = free_port()
    server = start_kms_server(workdir, project_id=PROJECT,
                              extra_args=["--listen", f"127.0.0.1:{port}", "--credentials", creds,
                                          "--test-clock-file", clock])
    try:
        yield port, clock
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def sdk(port, user="alice") -> KmsClient:
    ak, sk = USERS[user]
    return sdk_client(f"http://127.0.0.1:{port}", ak, sk, PROJECT)


def expect_error(fn, code, status=400):
    with pytest.raises(ClientRequestException) as e:
        fn()
    assert e.value.error_code == code, e.value
    assert e.value.status_code == status
    return e.value


def create(c, alias, spec, usage=None, origin=None) -> str:
    return c.create_key(CreateKeyRequest(body=CreateKeyRequestBody(
        key_alias=alias, key_spec=spec, key_usage=usage, origin=origin))).key_info.key_id


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sign(c, kid, alg, message, mtype="RAW"):
    return c.sign(SignRequest(body=SignRequestBody(key_id=kid, message=b64(message), signing_algorithm=alg,
                                                   message_type=mtype))).signature


def verify(c, kid, alg, message, sig, mtype="RAW"):
    return c.validate_signature(ValidateSignatureRequest(body=VerifyRequestBody(
        key_id=kid, message=b64(message), signature=sig, signing_algorithm=alg, message_type=mtype))).signature_valid


def public_key(c, kid):
    pem = c.show_public_key(ShowPublicKeyRequest(body=OperateKeyRequestBody(key_id=kid))).public_key
    return serialization.load_pem_public_key(pem.encode())


def test_versions(tcp_kms):
    port, _ = tcp_kms
    c = sdk(port)
    v = c.show_version(ShowVersionRequest(version_id="v1.0")).version
    assert v is not None and v["id"] == "v1.0" and v["status"] == "CURRENT"
    vs = c.show_versions(ShowVersionsRequest()).versions
    assert [x.id for x in vs] == ["v1.0"]


@pytest.mark.parametrize("spec", sorted(SIGNING))
def test_sign_verify_every_spec(tcp_kms, spec):
    port, _ = tcp_kms
    c = sdk(port)
    kid = create(c, f"sig-{spec.lower()}", spec)
    d = c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info
    assert d.key_spec == spec and d.key_usage == "SIGN_VERIFY" and d.key_state == "2"
    pub = public_key(c, kid)
    msg = b"message for " + spec.encode()
    for alg in SIGNING[spec]:
        h = HASH[alg[-3:]]
        sig = sign(c, kid, alg, msg)
        assert verify(c, kid, alg, msg, sig) == "true"
        digest = hashlib.new(h.name, msg).digest()
        sig2 = sign(c, kid, alg, digest, "DIGEST")
        assert verify(c, kid, alg, msg, sig2) == "true"          # a DIGEST signature is the RAW one's
        raw = base64.b64decode(sig)
        if spec.startswith("RSA"):
            pad = (padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size) if "PSS" in alg
                   else padding.PKCS1v15())
            pub.verify(raw, msg, pad, h())                               # checked outside the KMS
        else:
            pub.verify(raw, msg, ec.ECDSA(h()))
        tampered = bytearray(raw)
        tampered[len(tampered) // 2] ^= 1
        assert verify(c, kid, alg, msg, b64(bytes(tampered))) == "false"
        assert verify(c, kid, alg, msg + b"!", sig) == "false"
    # the wrong algorithm for the spec, a digest of the wrong length, an SM2 algorithm
    wrong = "ECDSA_SHA_256" if spec.startswith("RSA") else "RSASSA_PSS_SHA_256"
    expect_error(lambda: sign(c, kid, wrong, msg), "KMS.0308")
    expect_error(lambda: sign(c, kid, SIGNING[spec][0], b"short", "DIGEST"), "KMS.0308")
    expect_error(lambda: sign(c, kid, "SM2DSA_SM3", msg), "KMS.0308")
    # keys of this usage do no data keys, no MACs; asymmetric keys do not rotate
    expect_error(lambda: c.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=kid))),
                 "KMS.0308")
    expect_error(lambda: c.rotate_on_demand(RotateOnDemandRequest(body=RotateOnDemandRequestBody(key_id=kid))),
                 "KMS.0324")
    expect_error(lambda: c.enable_key_rotation(EnableKeyRotationRequest(body=OperateKeyRequestBody(key_id=kid))),
                 "KMS.0324")


def test_disabled_pending_deletion_and_grants(tcp_kms):
    port, _ = tcp_kms
    c, bob = sdk(port), sdk(port, "bob")
    kid = create(c, "sig-states", "EC_P256")
    msg = b"hello"
    # missing grant, then a grant for sign only, retired by bob himself
    expect_error(lambda: sign(bob, kid, "ECDSA_SHA_256", msg), "KMS.0306", 403)
    gid = c.create_grant(CreateGrantRequest(body=CreateGrantRequestBody(
        key_id=kid, grantee_principal="bob", operations=["sign"], retiring_principal="bob"))).grant_id
    sig = sign(bob, kid, "ECDSA_SHA_256", msg)
    assert verify(c, kid, "ECDSA_SHA_256", msg, sig) == "true"
    expect_error(lambda: verify(bob, kid, "ECDSA_SHA_256", msg, sig), "KMS.0306", 403)
    retirable = bob.list_retirable_grants(ListRetirableGrantsRequest(body=ListRetirableGrantsRequestBody(limit="10")))
    assert [g.grant_id for g in retirable.grants] == [gid] and retirable.total == 1
    bob.cancel_self_grant(CancelSelfGrantRequest(body=RevokeGrantRequestBody(key_id=kid, grant_id=gid)))
    expect_error(lambda: sign(bob, kid, "ECDSA_SHA_256", msg), "KMS.0306", 403)
    assert bob.list_retirable_grants(ListRetirableGrantsRequest(body=ListRetirableGrantsRequestBody())).total == 0
    # disabled, then pending deletion
    c.disable_key(DisableKeyRequest(body=OperateKeyRequestBody(key_id=kid)))
    expect_error(lambda: sign(c, kid, "ECDSA_SHA_256", msg), "KMS.0209")
    expect_error(lambda: verify(c, kid, "ECDSA_SHA_256", msg, sig), "KMS.0209")
    c.delete_key(DeleteKeyRequest(body=ScheduleKeyDeletionRequestBody(key_id=kid, pending_days="7")))
    expect_error(lambda: sign(c, kid, "ECDSA_SHA_256", msg), "KMS.0210")
    expect_error(lambda: public_key(c, kid), "KMS.0210")


def test_rsa_encrypt_decrypt(tcp_kms):
    port, _ = tcp_kms
    c = sdk(port)
    kid = create(c, "rsa-enc", "RSA_2048", "ENCRYPT_DECRYPT")
    sig_key = create(c, "rsa-sig", "RSA_2048")
    ct = c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
        key_id=kid, plain_text="secret text", encryption_algorithm="RSAES_OAEP_SHA_256"))).cipher_text
    r = c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        cipher_text=ct, key_id=kid, encryption_algorithm="RSAES_OAEP_SHA_256")))
    assert r.plain_text == "secret text"
    # made outside the KMS with the public key
    outside = public_key(c, kid).encrypt(b"from outside", padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    r = c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        cipher_text=b64(outside), key_id=kid, encryption_algorithm="RSAES_OAEP_SHA_256")))
    assert r.plain_text == "from outside" and base64.b64decode(r.plain_text_base64) == b"from outside"
    bad = bytearray(outside)
    bad[5] ^= 1
    expect_error(lambda: c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        cipher_text=b64(bytes(bad)), key_id=kid, encryption_algorithm="RSAES_OAEP_SHA_256"))), "KMS.0308")
    # wrong usage, wrong algorithm for the key, SM2
    expect_error(lambda: c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
        key_id=sig_key, plain_text="x", encryption_algorithm="RSAES_OAEP_SHA_256"))), "KMS.0308")
    expect_error(lambda: c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
        key_id=kid, plain_text="x"))), "KMS.0308")
    expect_error(lambda: c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
        key_id=kid, plain_text="x", encryption_algorithm="SM2_ENCRYPT"))), "KMS.0308")
    expect_error(lambda: c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
        key_id=kid, plain_text="x" * 191, encryption_algorithm="RSAES_OAEP_SHA_256"))), "KMS.0308")
    expect_error(lambda: sign(c, kid, "RSASSA_PSS_SHA_256", b"m"), "KMS.0308")


@pytest.mark.parametrize("spec,alg", [("HMAC_256", "HMAC_SHA_256"), ("HMAC_384", "HMAC_SHA_384"),
                                      ("HMAC_512", "HMAC_SHA_512"), ("HMAC_SM3", "HMAC_SM3")])
def test_mac_every_spec(tcp_kms, spec, alg):
    port, _ = tcp_kms
    c = sdk(port)
    kid = create(c, f"mac-{spec.lower()}", spec)
    assert c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info.key_usage \
        == "GENERATE_VERIFY_MAC"
    msg = b64(b"mac me")
    r = c.generate_mac(GenerateMacRequest(body=GenerateMacRequestBody(key_id=kid, mac_algorithm=alg, message=msg)))
    assert r.mac_algorithm == alg and len(base64.b64decode(r.mac)) == {"384": 48, "512": 64}.get(spec[-3:], 32)

    def check(mac, message=msg, algorithm=alg):
        return c.verify_mac(VerifyMacRequest(body=VerifyMacRequestBody(
            key_id=kid, mac_algorithm=algorithm, message=message, mac=mac))).mac_valid
    assert check(r.mac) is True
    tampered = bytearray(base64.b64decode(r.mac))
    tampered[0] ^= 1
    assert check(b64(bytes(tampered))) is False
    assert check(r.mac, message=b64(b"mac mf")) is False
    other = "HMAC_SHA_512" if alg != "HMAC_SHA_512" else "HMAC_SHA_256"
    expect_error(lambda: check(r.mac, algorithm=other), "KMS.0308")
    expect_error(lambda: sign(c, kid, "ECDSA_SHA_256", b"m"), "KMS.0308")
    expect_error(lambda: c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(key_id=kid, plain_text="x"))),
                 "KMS.0308")
    expect_error(lambda: public_key(c, kid), "KMS.0308")


def test_sm4_and_datakey_specs(tcp_kms):
    port, _ = tcp_kms
    c = sdk(port)
    kid = create(c, "sm4-key", "SM4")
    for spec, n in [("SM4", 16), ("HMAC_256", 32), ("HMAC_384", 48), ("HMAC_512", 64), ("HMAC_SM3", 32),
                    ("AES_128", 16)]:
        r = c.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=kid, key_spec=spec,
                                                                               additional_authenticated_data="f")))
        assert len(bytes.fromhex(r.plain_text)) == n
        d = c.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
            key_id=kid, cipher_text=r.cipher_text, datakey_cipher_length=str(n), additional_authenticated_data="f")))
        assert d.data_key == r.plain_text
    ct = c.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(key_id=kid, plain_text="sm4 data"))).cipher_text
    assert c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(cipher_text=ct))).plain_text == "sm4 data"
    c.rotate_on_demand(RotateOnDemandRequest(body=RotateOnDemandRequestBody(key_id=kid)))      # SM4 rotates
    assert c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(cipher_text=ct))).plain_text == "sm4 data"
    expect_error(lambda: create(c, "sm2-key", "SM2"), "KMS.0308")
    expect_error(lambda: create(c, "ed-key", "ED25519"), "KMS.0308")
    expect_error(lambda: create(c, "bad-usage", "EC_P256", "ENCRYPT_DECRYPT"), "KMS.0308")
    expect_error(lambda: create(c, "bad-usage2", "AES_256", "SIGN_VERIFY"), "KMS.0308")


def test_datakey_pairs(tcp_kms):
    port, _ = tcp_kms
    c = sdk(port)
    kid = create(c, "pair-cmk", "AES_256")
    for spec in ("RSA_2048", "RSA_3072"):
        for with_plain in (True, False):
            r = c.create_rsa_datakey_pair(CreateRsaDatakeyPairRequest(body=CreateRsaDatakeyPairRequestBody(
                key_id=kid, key_spec=spec, with_plain_text=with_plain, additional_authenticated_data="pair")))
            _check_pair(c, r, with_plain)
    for spec in ("ECC_NIST_P256", "ECC_NIST_P384", "ECC_SECG_P256K1"):
        r = c.create_ec_datakey_pair(CreateEcDatakeyPairRequest(body=CreateEcDatakeyPairRequestBody(
            key_id=kid, key_spec=spec, with_plain_text=True, additional_authenticated_data="pair")))
        _check_pair(c, r, True)
    expect_error(lambda: c.create_ec_datakey_pair(CreateEcDatakeyPairRequest(body=CreateEcDatakeyPairRequestBody(
        key_id=kid, key_spec="SM2"))), "KMS.0308")
    sig_key = create(c, "pair-wrong", "EC_P256")
    expect_error(lambda: c.create_rsa_datakey_pair(CreateRsaDatakeyPairRequest(body=CreateRsaDatakeyPairRequestBody(
        key_id=sig_key, key_spec="RSA_2048"))), "KMS.0308")


def _check_pair(c, r, with_plain):
    pub = serialization.load_der_public_key(base64.b64decode(r.public_key))
    back = c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        cipher_text=r.private_key_cipher_text, additional_authenticated_data="pair")))
    private = serialization.load_der_private_key(base64.b64decode(back.plain_text_base64), None)
    assert private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == \
        base64.b64decode(r.public_key)
    assert pub is not None
    if with_plain:
        assert base64.b64decode(r.private_key_plain_text) == base64.b64decode(back.plain_text_base64)
    else:
        assert r.private_key_plain_text is None


def _params(c, kid, alg="RSAES_OAEP_SHA_256"):
    return c.create_parameters_for_import(CreateParametersForImportRequest(body=GetParametersForImportRequestBody(
        key_id=kid, wrapping_algorithm=alg)))


def _wrap(params, key: bytes, hash_cls=hashes.SHA256) -> str:
    pub = serialization.load_der_public_key(base64.b64decode(params.public_key))
    return b64(pub.encrypt(key, padding.OAEP(mgf=padding.MGF1(hash_cls()), algorithm=hash_cls(), label=None)))


def _import(c, kid, token, material, expiration=None):
    return c.import_key_material(ImportKeyMaterialRequest(body=ImportKeyMaterialRequestBody(
        key_id=kid, import_token=token, encrypted_key_material=material, expiration_time=expiration)))


def test_import_flow(tcp_kms):
    port, clock = tcp_kms
    c = sdk(port)
    kid = create(c, "imported", "AES_256", origin="external")
    d = c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info
    assert d.key_state == "5" and d.origin == "external"
    expect_error(lambda: c.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=kid))), "KMS.0308")
    native = create(c, "native", "AES_256")
    expect_error(lambda: _params(c, native), "KMS.0309")
    expect_error(lambda: _params(c, kid, "SM2_ENCRYPT"), "KMS.0308")
    key = os.urandom(32)
    p = _params(c, kid)
    assert p.expiration_time > time.time() + 23 * 3600 and len(p.import_token) >= 200
    # wrong wrapping: SHA-1 OAEP against SHA-256 parameters; a 16-byte key for AES_256; a forged token
    expect_error(lambda: _import(c, kid, p.import_token, _wrap(p, key, hashes.SHA1)), "KMS.2603")
    expect_error(lambda: _import(c, kid, p.import_token, _wrap(p, key[:16])), "KMS.2604")
    expect_error(lambda: _import(c, kid, b64(os.urandom(192)), _wrap(p, key)), "KMS.2601")
    # an expired token
    with open(clock, "w") as f:
        f.write(str(time.time() + 25 * 3600))
    try:
        expect_error(lambda: _import(c, kid, p.import_token, _wrap(p, key)), "KMS.2602")
    finally:
        open(clock, "w").close()
    p = _params(c, kid, "RSAES_OAEP_SHA_1")
    _import(c, kid, p.import_token, _wrap(p, key, hashes.SHA1), expiration=int(time.time()) + 30 * 86400)
    d = c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info
    assert d.key_state == "2" and d.expiration_time
    r = c.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=kid)))
    expect_error(lambda: _params(c, kid), "KMS.0310")
    expect_error(lambda: c.rotate_on_demand(RotateOnDemandRequest(body=RotateOnDemandRequestBody(key_id=kid))),
                 "KMS.0312")
    c.delete_imported_key_material(DeleteImportedKeyMaterialRequest(body=OperateKeyRequestBody(key_id=kid)))
    assert c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info.key_state == "5"
    expect_error(lambda: c.delete_imported_key_material(DeleteImportedKeyMaterialRequest(
        body=OperateKeyRequestBody(key_id=kid))), "KMS.2701")
    decrypt = DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(key_id=kid, cipher_text=r.cipher_text,
                                                                   datakey_cipher_length="32"))
    expect_error(lambda: c.decrypt_datakey(decrypt), "KMS.0308")
    # other material is refused; the same material brings the old data keys back
    p = _params(c, kid)
    expect_error(lambda: _import(c, kid, p.import_token, _wrap(p, os.urandom(32))), "KMS.2606")
    _import(c, kid, p.import_token, _wrap(p, key))
    assert c.decrypt_datakey(decrypt).data_key == r.plain_text
    # expiry of the material: the sweep deletes it
    c.delete_imported_key_material(DeleteImportedKeyMaterialRequest(body=OperateKeyRequestBody(key_id=kid)))
    p = _params(c, kid)
    _import(c, kid, p.import_token, _wrap(p, key), expiration=int(time.time()) + 3600)
    with open(clock, "w") as f:
        f.write(str(time.time() + 7200))
    try:
        deadline = time.monotonic() + 10
        while c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info.key_state != "5":
            assert time.monotonic() < deadline, "expired material not deleted by the sweep"
            time.sleep(0.2)
    finally:
        open(clock, "w").close()


def _pkcs8(private) -> bytes:
    return private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def _import_private(c, kid, params, private_der, temporary=None, hash_cls=hashes.SHA256):
    """Huawei's asymmetric import: the PKCS#8 key wrapped (RFC 5649) under a temporary AES-256
    key, the temporary key OAEP-wrapped with the wrapping public key."""
    temporary = temporary if temporary is not None else os.urandom(32)
    return c.import_key_material(ImportKeyMaterialRequest(body=ImportKeyMaterialRequestBody(
        key_id=kid, import_token=params.import_token, encrypted_key_material=_wrap(params, temporary, hash_cls),
        encrypted_privatekey=b64(aes_key_wrap_with_padding(temporary, private_der)))))


@pytest.mark.parametrize("spec,alg,usage", [("RSA_2048", "RSASSA_PSS_SHA_256", "SIGN_VERIFY"),
                                            ("EC_P256", "ECDSA_SHA_256", "SIGN_VERIFY"),
                                            ("RSA_2048", None, "ENCRYPT_DECRYPT")])
def test_import_asymmetric_flow(tcp_kms, spec, alg, usage):
    port, clock = tcp_kms
    c = sdk(port)
    kid = create(c, f"imported-{spec}-{usage}", spec, usage=usage, origin="external")
    assert c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info.key_state == "5"
    private = (rsa.generate_private_key(65537, 2048) if spec.startswith("RSA")
               else ec.generate_private_key(ec.SECP256R1()))
    der = _pkcs8(private)
    p = _params(c, kid)
    # wrong wrapping: SHA-1 OAEP against SHA-256 parameters; the private key without its layer;
    # a key of another curve or size; an expired token
    expect_error(lambda: _import_private(c, kid, p, der, hash_cls=hashes.SHA1), "KMS.2603")
    expect_error(lambda: _import(c, kid, p.import_token, _wrap(p, os.urandom(32))), "KMS.0204")
    other = ec.generate_private_key(ec.SECP384R1()) if spec.startswith("EC") else rsa.generate_private_key(65537, 3072)
    expect_error(lambda: _import_private(c, kid, p, _pkcs8(other)), "KMS.2604")
    with open(clock, "w") as f:
        f.write(str(time.time() + 25 * 3600))
    try:
        expect_error(lambda: _import_private(c, kid, p, der), "KMS.2602")
    finally:
        open(clock, "w").close()
    _import_private(c, kid, p, der)
    assert c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info.key_state == "2"
    assert public_key(c, kid).public_numbers() == private.public_key().public_numbers()
    if usage == "SIGN_VERIFY":
        sig = base64.b64decode(sign(c, kid, alg, b"imported"))
        if spec.startswith("EC"):
            private.public_key().verify(sig, b"imported", ec.ECDSA(hashes.SHA256()))
        else:
            private.public_key().verify(sig, b"imported", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                        hashes.SHA256())
    else:
        ct = private.public_key().encrypt(b"to the imported key", padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
        back = c.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
            key_id=kid, cipher_text=b64(ct), encryption_algorithm="RSAES_OAEP_SHA_256")))
        assert back.plain_text == "to the imported key"
    expect_error(lambda: c.rotate_on_demand(RotateOnDemandRequest(body=RotateOnDemandRequestBody(key_id=kid))),
                 "KMS.0312")
    # deleted, then only the same private key comes back
    c.delete_imported_key_material(DeleteImportedKeyMaterialRequest(body=OperateKeyRequestBody(key_id=kid)))
    p = _params(c, kid, "RSAES_OAEP_SHA_1")
    fresh = (rsa.generate_private_key(65537, 2048) if spec.startswith("RSA")
             else ec.generate_private_key(ec.SECP256R1()))
    expect_error(lambda: _import_private(c, kid, p, _pkcs8(fresh), hash_cls=hashes.SHA1), "KMS.2606")
    _import_private(c, kid, p, der, hash_cls=hashes.SHA1)
    assert public_key(c, kid).public_numbers() == private.public_key().public_numbers()


def test_tags_aliases_and_updates(tcp_kms):
    port, _ = tcp_kms
    c = sdk(port)
    kid = create(c, "tagged", "EC_P256")
    c.create_kms_tag(CreateKmsTagRequest(key_id=kid, body=CreateKmsTagRequestBody(tag=TagItem(key="env", value="dev"))))
    c.batch_create_kms_tags(BatchCreateKmsTagsRequest(key_id=kid, body=BatchCreateKmsTagsRequestBody(
        tags=[TagItem(key="team", value="fs"), TagItem(key="tmp", value="x")], action="create")))
    tags = c.show_kms_tags(ShowKmsTagsRequest(key_id=kid))
    assert {(t.key, t.value) for t in tags.tags} == {("env", "dev"), ("team", "fs"), ("tmp", "x")}
    assert tags.exist_tags_num == 3
    c.delete_tag(DeleteTagRequest(key_id=kid, key="tmp"))
    expect_error(lambda: c.delete_tag(DeleteTagRequest(key_id=kid, key="tmp")), "KMS.0416", 404)
    project = c.list_kms_tags(ListKmsTagsRequest())
    assert {t.key: t.values for t in project.tags}["env"] == ["dev"]
    found = c.list_kms_by_tags(ListKmsByTagsRequest(resource_instances="resource_instances",
                                                    body=ListKmsByTagsRequestBody(
                                                        action="filter", tags=[Tag(key="team", values=["fs"])])))
    assert [r.resource_id for r in found.resources] == [kid] and found.total_count == 1
    # aliases
    other = create(c, "alias-target", "EC_P256")
    a = c.create_alias(CreateAliasRequest(body=CreateAliasRequestBody(key_id=kid, alias="alias/sdk")))
    assert a.alias == "alias/sdk" and a.key_id == kid
    pages = c.list_aliases(ListAliasesRequest(key_id=kid)).body
    assert [x.alias for x in pages[0].aliases] == ["alias/sdk"]
    r = c.associate_alias(AssociateAliasRequest(body=AssociateAliasRequestBody(alias="alias/sdk", target_key_id=other)))
    assert r.key_id == other
    c.delete_alias(DeleteAliasRequest(body=DeleteAliasRequestBody(aliases=["alias/sdk"], key_id=other)))
    assert c.list_aliases(ListAliasesRequest(key_id=other)).body[0].aliases == []
    # update alias and description
    r = c.update_key_alias(UpdateKeyAliasRequest(body=UpdateKeyAliasRequestBody(key_id=kid, key_alias="renamed")))
    assert r.key_info.key_alias == "renamed"
    r = c.update_key_description(UpdateKeyDescriptionRequest(body=UpdateKeyDescriptionRequestBody(
        key_id=kid, key_description="new words")))
    assert r.key_info.key_description == "new words"
    d = c.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=kid))).key_info
    assert (d.key_alias, d.key_description) == ("renamed", "new words")
    expect_error(lambda: c.update_key_alias(UpdateKeyAliasRequest(body=UpdateKeyAliasRequestBody(
        key_id=kid, key_alias="x/default"))), "KMS.1101")


def test_refused_operations_answer_like_an_unknown_path(tcp_kms):
    """The appendix-A operations docs/KMS.md lists as refused answer 400 KMS.0201 through the SDK."""
    from huaweicloudsdkkms.v2 import (CreateDatakeyCapsuleRequest, CreateDatakeyCapsuleRequestBody,
                                      CreateKeyStoreRequest, CreateKeyStoreRequestBody, CreatePinRequest,
                                      CreatePinRequestBody, DeriveSharedSecretRequest, DeriveSharedSecretRequestBody,
                                      ListAccessPointRequest, ListKeyPolicyRequest, ListKeyStoresRequest,
                                      ListSupportRegionsRequest, ShowKeyStoreRequest)
    port, _ = tcp_kms
    c = sdk(port)
    kid = create(c, "refused-ops", "EC_P256")
    calls = [
        lambda: c.create_pin(CreatePinRequest(body=CreatePinRequestBody(pin_type="PlainText"))),
        lambda: c.derive_shared_secret(DeriveSharedSecretRequest(body=DeriveSharedSecretRequestBody(
            key_id=kid, key_agreement_algorithm="ECDH", public_key="AAAA"))),
        lambda: c.create_datakey_capsule(CreateDatakeyCapsuleRequest(body=CreateDatakeyCapsuleRequestBody(
            key_id=kid, datakey_length="256"))),
        lambda: c.list_key_stores(ListKeyStoresRequest()),
        lambda: c.show_key_store(ShowKeyStoreRequest(keystore_id="0")),
        lambda: c.create_key_store(CreateKeyStoreRequest(body=CreateKeyStoreRequestBody(keystore_alias="ks"))),
        lambda: c.list_access_point(ListAccessPointRequest(keyspace_id="x")),
        lambda: c.list_key_policy(ListKeyPolicyRequest(keyspace_id="x")),
        lambda: c.list_support_regions(ListSupportRegionsRequest()),
    ]
    for fn in calls:
        expect_error(fn, "KMS.0201")
