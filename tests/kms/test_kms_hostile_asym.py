"""Hostile and malformed input to the operations of asymmetric, MAC and imported keys, called
directly on the API (every reply is Huawei-shaped with a documented code, never a 500), and
the promise that private key material never leaves the daemon nor reaches the disk in the clear."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from kms import material
from kms.api import ERROR_CODES, Kms, caller_for_uid
from kms.store import Store

ALICE = caller_for_uid(1000)
BOB = caller_for_uid(1001)


class Clock:
    def __init__(self):
        self.ms = 1_800_000_000_000

    def __call__(self):
        return self.ms


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    store = Store(str(tmp_path / "data"), clock=clock)
    yield Kms(store), clock, str(tmp_path / "data")
    store.close()


def call(kms, op, body, caller=ALICE, raw=None):
    r = kms.handle(caller, "POST", op, {}, raw if raw is not None else json.dumps(body).encode())
    if r.status != 200:
        assert r.status < 500 and set(r.body) == {"error"} and r.body["error"]["error_code"] in ERROR_CODES, r.body
    return r.status, r.body


def code(kms, op, body, caller=ALICE):
    status, reply = call(kms, op, body, caller)
    assert status != 200, reply
    return reply["error"]["error_code"]


def ok(kms, op, body, caller=ALICE):
    status, reply = call(kms, op, body, caller)
    assert status == 200, reply
    return reply


def key(kms, alias, spec, **kw):
    return ok(kms, "create-key", {"key_alias": alias, "key_spec": spec, **kw})["key_info"]["key_id"]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def test_hostile_sign_verify_and_mac(world):
    kms, _, _ = world
    ec_key, hm = key(kms, "ec", "EC_P256"), key(kms, "hm", "HMAC_256")
    base = {"key_id": ec_key, "signing_algorithm": "ECDSA_SHA_256", "message_type": "RAW"}
    assert code(kms, "sign", {**base, "message": b64(b"x" * 4096)}) == "KMS.0308"        # < 4096 bytes
    assert code(kms, "sign", {**base, "message": ""}) == "KMS.0204"
    assert code(kms, "sign", {**base, "message": ["bQ=="]}) == "KMS.0308"
    assert code(kms, "sign", {**base, "message": "bQ==\n"}) == "KMS.0308"
    assert code(kms, "sign", {**base, "message": "bQ==", "signing_algorithm": 1}) == "KMS.0308"
    assert code(kms, "sign", {**base, "message": "bQ==", "key_id": "EC"}) == "KMS.0205"
    assert code(kms, "verify", {**base, "message": "bQ==", "signature": b64(b"s" * 1025)}) == "KMS.0308"
    status, reply = call(kms, "verify", {**base, "message": "bQ==", "signature": b64(b"\x30\x00")})
    assert status == 200 and reply["signature_valid"] == "false"             # garbage DER: just invalid
    status, _ = call(kms, "sign", {}, raw=b'{"key_id": "' + b"a" * 70000 + b'"}')
    assert status == 400
    mac = {"key_id": hm, "mac_algorithm": "HMAC_SHA_256"}
    assert code(kms, "generate-mac", {**mac, "message": b64(b"x" * 4097)}) == "KMS.0308"
    assert code(kms, "verify-mac", {**mac, "message": "bQ==", "mac": b64(b"m" * 129)}) == "KMS.0308"
    assert code(kms, "verify-mac", {**mac, "message": "bQ==", "mac": "%%%"}) == "KMS.0308"
    assert code(kms, "generate-mac", {**mac, "message": "bQ==", "mac_algorithm": "HMAC_MD5"}) == "KMS.0308"
    # another uid, no grant; the refusal is audited with the key
    status, _ = call(kms, "sign", {**base, "message": "bQ=="}, BOB)
    assert status == 403
    r = kms.handle(BOB, "POST", "generate-mac", {}, json.dumps({**mac, "message": "bQ=="}).encode())
    assert r.status == 403 and r.touched and r.touched[0][0] == hm


def test_hostile_import(world):
    kms, clock, _ = world
    kid = key(kms, "ext", "AES_256", origin="external")
    p1 = ok(kms, "get-parameters-for-import", {"key_id": kid, "wrapping_algorithm": "RSAES_OAEP_SHA_256"})
    p2 = ok(kms, "get-parameters-for-import", {"key_id": kid, "wrapping_algorithm": "RSAES_OAEP_SHA_256"})
    pub = serialization.load_der_public_key(base64.b64decode(p2["public_key"]))
    wrapped = b64(pub.encrypt(os.urandom(32), padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)))
    body = {"key_id": kid, "import_token": p2["import_token"], "encrypted_key_material": wrapped}
    # the first token was replaced by the second
    assert code(kms, "import-key-material", {**body, "import_token": p1["import_token"]}) == "KMS.2601"
    assert code(kms, "import-key-material", {**body, "import_token": "A" * 7000}) == "KMS.2601"
    assert code(kms, "import-key-material", {**body, "encrypted_key_material": b64(os.urandom(2000))}) == "KMS.2603"
    assert code(kms, "import-key-material", {**body, "encrypted_key_material": b64(os.urandom(512))}) == "KMS.2603"
    assert code(kms, "import-key-material", {**body, "expiration_time": "-1"}) == "KMS.2605"
    assert code(kms, "import-key-material", {**body, "expiration_time": 10**14}) == "KMS.2605"
    assert code(kms, "import-key-material", {**body, "expiration_time": clock.ms // 1000 - 1}) == "KMS.2605"
    # encrypted_privatekey belongs to asymmetric imports only
    assert code(kms, "import-key-material", {**body, "encrypted_privatekey": b64(os.urandom(64))}) == "KMS.0308"
    assert code(kms, "import-key-material", {**body, "key_id": key(kms, "native", "AES_256")}) == "KMS.0309"
    assert code(kms, "import-key-material", body, BOB) == "KMS.0306"
    assert ok(kms, "import-key-material", body) == {}
    assert code(kms, "import-key-material", body) == "KMS.0310"          # a replay after success
    assert code(kms, "get-parameters-for-import", {"key_id": kid, "wrapping_algorithm": "RSAES_PKCS1"}) == "KMS.0308"
    assert code(kms, "create-key", {"key_alias": "e2", "origin": "elsewhere"}) == "KMS.0308"


def _wrap_oaep(params: dict, data: bytes) -> str:
    pub = serialization.load_der_public_key(base64.b64decode(params["public_key"]))
    return b64(pub.encrypt(data, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)))


def test_hostile_asymmetric_import(world):
    """Huawei's two layers, each broken on its own: every failure is a documented code, the key
    stays pending import, and nothing of the offered private key shows in a reply."""
    kms, _, _ = world
    kid = key(kms, "ext-ec", "EC_P256", origin="external")
    p = ok(kms, "get-parameters-for-import", {"key_id": kid, "wrapping_algorithm": "RSAES_OAEP_SHA_256"})
    temporary = os.urandom(32)
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    body = {"key_id": kid, "import_token": p["import_token"], "encrypted_key_material": _wrap_oaep(p, temporary),
            "encrypted_privatekey": b64(aes_key_wrap_with_padding(temporary, der))}
    no_private = {k: v for k, v in body.items() if k != "encrypted_privatekey"}
    assert code(kms, "import-key-material", no_private) == "KMS.0204"
    replies = []
    for bad in (
        {"encrypted_privatekey": b64(os.urandom(152))},                                   # not a key wrap
        {"encrypted_privatekey": b64(aes_key_wrap_with_padding(os.urandom(32), der))},    # another temp key
        {"encrypted_privatekey": "not base64!"},
        {"encrypted_privatekey": b64(os.urandom(8))},                                     # too short to be a wrap
        {"encrypted_privatekey": 42},
    ):
        status, reply = call(kms, "import-key-material", {**body, **bad})
        assert status == 400 and reply["error"]["error_code"] in ("KMS.2603", "KMS.0308"), reply
        replies.append(json.dumps(reply))
    wrong_kind = [
        _wrap_oaep(p, temporary[:16]),                                                    # a 16-byte temp key
    ]
    for ekm in wrong_kind:
        assert code(kms, "import-key-material", {**body, "encrypted_key_material": ekm}) == "KMS.2604"
    for other in (ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP256K1()),
                  rsa.generate_private_key(65537, 2048)):
        other_der = other.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        status, reply = call(kms, "import-key-material",
                             {**body, "encrypted_privatekey": b64(aes_key_wrap_with_padding(temporary, other_der))})
        assert reply["error"]["error_code"] == "KMS.2604", reply
        replies.append(json.dumps(reply))
    status, reply = call(kms, "import-key-material",
                         {**body, "encrypted_privatekey": b64(aes_key_wrap_with_padding(temporary, os.urandom(200)))})
    assert reply["error"]["error_code"] == "KMS.2604"
    replies.append(json.dumps(reply))
    assert ok(kms, "describe-key", {"key_id": kid})["key_info"]["key_state"] == "5"
    assert ok(kms, "import-key-material", body) == {}
    pub = ok(kms, "get-publickey", {"key_id": kid})["public_key"]
    assert serialization.load_pem_public_key(pub.encode()).public_numbers() == private.public_key().public_numbers()
    for reply in replies:
        assert b64(der)[:40] not in reply and der.hex()[:40] not in reply
    # a symmetric key of origin external refuses the asymmetric layout; RSA takes it
    rkid = key(kms, "ext-rsa", "RSA_2048", origin="external", key_usage="ENCRYPT_DECRYPT")
    assert ok(kms, "describe-key", {"key_id": rkid})["key_info"]["key_state"] == "5"


def test_private_material_never_leaves(world):
    kms, _, data_dir = world
    ids = {spec: key(kms, f"p/{spec}", spec) for spec in ("RSA_2048", "EC_P256", "SECP256K1", "HMAC_512", "SM4")}
    kms.handle(ALICE, "POST", "create-key", {}, json.dumps({"key_alias": "p/enc", "key_spec": "RSA_3072",
                                                            "key_usage": "ENCRYPT_DECRYPT"}).encode())
    privates = {spec: kms.store.material(kid, 1) for spec, kid in ids.items()}
    replies = []
    for spec, kid in ids.items():
        for op in ("describe-key", "get-publickey", "get-key-rotation-status"):
            replies.append(json.dumps(kms.handle(ALICE, "POST", op, {}, json.dumps({"key_id": kid}).encode()).body))
    replies.append(json.dumps(kms.handle(ALICE, "POST", "list-keys", {}, b'{"key_spec": "ALL"}').body))
    blob = "".join(replies).encode()
    for spec, m in privates.items():
        for form in (m, m.hex().encode(), m.hex().upper().encode(), base64.b64encode(m)):
            assert form not in blob, spec
        if not material.SPECS[spec].symmetric:
            # an RSA/EC private key is PKCS#8: its private scalar must not be in any reply either
            priv = serialization.load_der_private_key(m, None)
            n = priv.private_numbers()
            v = n.d if hasattr(n, "d") else n.private_value
            secret = v.to_bytes((v.bit_length() + 7) // 8, "big")
            assert secret not in blob and base64.b64encode(secret) not in blob
    # a destroyed key leaves no parsed private key behind in the daemon either
    rsa_id = ids["RSA_2048"]
    assert privates["RSA_2048"] in material._PARSED           # parsed by get-publickey above
    kms.handle(ALICE, "POST", "schedule-key-deletion", {}, json.dumps({"key_id": rsa_id, "pending_days": "7"}).encode())
    world[1].ms += 8 * 86_400_000
    assert kms.sweep()[0] == 1
    assert privates["RSA_2048"] not in material._PARSED and kms.store.material(rsa_id, 1) is None
    kms.store.flush_audit()
    for name in os.listdir(data_dir):
        content = open(os.path.join(data_dir, name), "rb").read()
        for spec, m in privates.items():
            assert m not in content and m[-32:] not in content, (name, spec)
