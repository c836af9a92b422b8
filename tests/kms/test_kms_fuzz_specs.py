"""Property tests of every route with bodies made only of the fields that route takes (since
requests are strict, bodies of random fields stop at "unknown field"; these get past it into
the handlers), over a world with keys of every kind: AES, SM4, RSA (sign and encrypt), EC,
HMAC and an external key waiting for import. Only a 200 or a documented Huawei error may
come out, never a 500; the reply serialises to JSON."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms import api
from kms.api import ERROR_CODES, Kms, caller_for_uid
from kms.store import Store

ALICE = caller_for_uid(1000)
BOB = caller_for_uid(1001)
EXAMPLES = int(os.environ.get("KMS_FUZZ_EXAMPLES", "300"))


class World:
    def __init__(self, data_dir: str) -> None:
        self.store = Store(data_dir)
        self.store._db.execute("PRAGMA synchronous=OFF")       # speed; durability is not under test
        self.kms = Kms(self.store)
        self.keys = {}
        for spec, usage in (("AES_256", None), ("SM4", None), ("RSA_2048", None), ("RSA_2048", "ENCRYPT_DECRYPT"),
                            ("EC_P256", None), ("SECP256K1", None), ("HMAC_256", None)):
            body = {"key_alias": f"f/{spec}/{usage}", "key_spec": spec, **({"key_usage": usage} if usage else {})}
            self.keys[(spec, usage)] = self._ok("create-key", body)["key_info"]["key_id"]
        self.external = self._ok("create-key", {"key_alias": "f/ext", "origin": "external"})["key_info"]["key_id"]
        self.params = self._ok("get-parameters-for-import", {"key_id": self.external,
                                                             "wrapping_algorithm": "RSAES_OAEP_SHA_256"})
        ec = self.keys[("EC_P256", None)]
        self.sig = self._ok("sign", {"key_id": ec, "message": base64.b64encode(b"m").decode(),
                                     "signing_algorithm": "ECDSA_SHA_256", "message_type": "RAW"})["signature"]
        self.mac = self._ok("generate-mac", {"key_id": self.keys[("HMAC_256", None)], "message": "bQ==",
                                             "mac_algorithm": "HMAC_SHA_256"})["mac"]
        self.ct = self._ok("create-datakey", {"key_id": self.keys[("AES_256", None)]})["cipher_text"]
        self.data_ct = self._ok("encrypt-data", {"key_id": self.keys[("SM4", None)], "plain_text": "x"})["cipher_text"]

    def _ok(self, op, body, who=ALICE):
        r = self.kms.handle(who, "POST", op, {}, json.dumps(body).encode())
        assert r.status == 200, r.body
        return r.body


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(str(tmp_path_factory.mktemp("fuzzspecs") / "data"))
    yield w
    w.store.close()


def scalars(w: World):
    return st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-2**66, max_value=2**66), st.text(max_size=30),
        st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()),
        st.sampled_from([*w.keys.values(), w.external, w.params["import_token"], w.sig, w.mac, w.ct, w.data_ct,
                         "bQ==", "", "DIGEST", "RAW", "ECDSA_SHA_256", "ECDSA_SHA_384", "RSASSA_PSS_SHA_256",
                         "RSASSA_PKCS1_V1_5_SHA_512", "SM2DSA_SM3", "HMAC_SHA_256", "HMAC_SM3", "RSAES_OAEP_SHA_256",
                         "RSAES_OAEP_SHA_1", "SM2_ENCRYPT", "SYMMETRIC_DEFAULT", "RSA_2048", "ECC_NIST_P256",
                         "ECC_SECG_P256K1", "SM4", "HMAC_512", "ED25519", "SM2", "external", "kms", "SIGN_VERIFY",
                         "GENERATE_VERIFY_MAC", "ENCRYPT_DECRYPT", "true", "false", "32", "256", "1900000000",
                         "\ud800", "a\x00b"]))


def values(w: World):
    return st.recursive(scalars(w), lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=6)


ROUTES = sorted(r for r in api.ROUTES if "{" not in r[1])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_routes_with_their_own_fields(world, data):
    method, op = data.draw(st.sampled_from(ROUTES))
    fields = sorted(api.FIELDS[(method, op)] | {"sequence"})
    body = data.draw(st.dictionaries(st.sampled_from(fields), values(world), max_size=len(fields))) if fields else {}
    who = data.draw(st.sampled_from([ALICE, BOB]))
    r = world.kms.handle(who, method, op, {}, json.dumps(body).encode())
    json.dumps(r.body)
    if r.status != 200:
        assert r.status != 500, r.body
        assert set(r.body) == {"error"} and r.body["error"]["error_code"] in ERROR_CODES, r.body
        assert r.body["error"]["error_code"] != "KMS.0101", r.body
