"""Handlers of kms.api, called directly (no daemon): shapes, string types, error codes."""

from __future__ import annotations

import hashlib
import json

import pytest

from kms.api import Kms, caller_for_uid
from kms.store import Store

ALICE = caller_for_uid(1000)
BOB = caller_for_uid(1001)
ROOT = caller_for_uid(0)


@pytest.fixture
def kms(tmp_path):
    store = Store(str(tmp_path / "data"))
    yield Kms(store)
    store.close()


def call(kms, op, body=None, caller=ALICE, method="POST", raw=None):
    r = kms.handle(caller, method, op, {}, raw if raw is not None else json.dumps(body or {}).encode())
    return r.status, r.body


def ok(kms, op, body=None, caller=ALICE, method="POST"):
    status, reply = call(kms, op, body, caller, method)
    assert status == 200, reply
    return reply


def err(kms, op, body=None, caller=ALICE, method="POST", raw=None):
    status, reply = call(kms, op, body, caller, method, raw)
    assert status != 200, reply
    return status, reply["error"]["error_code"]


def new_key(kms, alias="k1", caller=ALICE):
    return ok(kms, "create-key", {"key_alias": alias}, caller)["key_info"]["key_id"]


def test_create_describe_list(kms):
    kid = new_key(kms, "app/one")
    info = ok(kms, "describe-key", {"key_id": kid})["key_info"]
    assert info["key_alias"] == "app/one" and info["key_state"] == "2" and info["default_key_flag"] == "0"
    assert all(isinstance(v, str) for v in info.values())
    assert info["key_spec"] == "AES_256" and info["origin"] == "kms"
    lst = ok(kms, "list-keys", {"limit": "10"})
    assert lst["keys"] == [kid] and lst["total"] == 1 and lst["truncated"] == "false"
    assert lst["key_details"][0]["key_id"] == kid


def test_list_keys_paging_and_filters(kms):
    ids = [new_key(kms, f"k{i}") for i in range(5)]
    ok(kms, "disable-key", {"key_id": ids[1]})
    p1 = ok(kms, "list-keys", {"limit": "2"})
    assert p1["keys"] == ids[:2] and p1["truncated"] == "true" and p1["total"] == 5
    p2 = ok(kms, "list-keys", {"limit": "2", "marker": p1["next_marker"]})
    p3 = ok(kms, "list-keys", {"limit": "2", "marker": p2["next_marker"]})
    assert p2["keys"] + p3["keys"] == ids[2:] and p3["truncated"] == "false"
    assert ok(kms, "list-keys", {"key_state": "3"})["keys"] == [ids[1]]
    assert ok(kms, "list-keys", {"key_spec": "SM4"})["keys"] == []
    assert err(kms, "list-keys", {"limit": "0"}) == (400, "KMS.1601")
    assert err(kms, "list-keys", {"marker": "-1"}) == (400, "KMS.1602")
    assert ok(kms, "list-keys", {}, caller=BOB)["total"] == 0          # Bob sees only his keys
    assert ok(kms, "list-keys", {}, caller=ROOT)["total"] == 5        # root administers all


def test_request_errors(kms):
    assert err(kms, "create-key", raw=b"{not json") == (400, "KMS.0202")
    assert err(kms, "create-key", raw=b"x" * (64 * 1024 + 1)) == (400, "KMS.0203")
    assert err(kms, "create-key", {}) == (400, "KMS.0204")
    assert err(kms, "describe-key", {"key_id": "not-a-uuid"}) == (400, "KMS.0205")
    assert err(kms, "describe-key", {"key_id": "00000000-0000-0000-0000-000000000000"}) == (404, "KMS.0207")
    assert err(kms, "no-such-op", {}) == (400, "KMS.0201")
    assert err(kms, "create-key", {"key_alias": "bad alias!"}) == (400, "KMS.1101")
    assert err(kms, "create-key", {"key_alias": "mine/default"}) == (400, "KMS.1101")
    assert err(kms, "create-key", {"key_alias": "a", "key_spec": "SM2"}) == (400, "KMS.0308")
    new_key(kms, "dup")
    assert err(kms, "create-key", {"key_alias": "dup"}) == (400, "KMS.1104")
    assert err(kms, "create-key", {"key_alias": "x", "key_description": "d" * 256}) == (400, "KMS.1103")


def test_datakey_roundtrip_and_aad(kms):
    kid = new_key(kms)
    r = ok(kms, "create-datakey", {"key_id": kid, "datakey_length": "256", "additional_authenticated_data": "f1"})
    assert r["key_id"] == kid and len(r["plain_text"]) == 64 and r["plain_text"] == r["plain_text"].upper()
    assert r["cipher_text"] == r["cipher_text"].upper()
    d = ok(kms, "decrypt-datakey", {"key_id": kid, "cipher_text": r["cipher_text"], "datakey_cipher_length": "32",
                                    "additional_authenticated_data": "f1"})
    assert d["data_key"] == r["plain_text"] and d["datakey_length"] == "32"
    assert d["datakey_dgst"] == hashlib.sha256(bytes.fromhex(r["plain_text"])).hexdigest().upper()
    base = {"key_id": kid, "cipher_text": r["cipher_text"], "datakey_cipher_length": "32"}
    assert err(kms, "decrypt-datakey", {**base, "additional_authenticated_data": "f2"}) == (400, "KMS.2203")
    assert err(kms, "decrypt-datakey", base) == (400, "KMS.2203")      # AAD omitted
    assert err(kms, "decrypt-datakey", {**base, "additional_authenticated_data": "f1",
                                        "datakey_cipher_length": "16"}) == (400, "KMS.2204")
    assert err(kms, "decrypt-datakey", {**base, "cipher_text": "ZZ"}) == (400, "KMS.2201")
    tampered = r["cipher_text"][:-2] + ("00" if r["cipher_text"][-2:] != "00" else "11")
    assert err(kms, "decrypt-datakey", {**base, "cipher_text": tampered,
                                        "additional_authenticated_data": "f1"}) == (400, "KMS.2203")
    other = new_key(kms, "k2")
    assert err(kms, "decrypt-datakey", {**base, "key_id": other}) == (400, "KMS.2201")


def test_datakey_lengths(kms):
    kid = new_key(kms)
    assert len(ok(kms, "create-datakey", {"key_id": kid})["plain_text"]) == 64               # default 256 bits
    assert len(ok(kms, "create-datakey", {"key_id": kid, "key_spec": "AES_128"})["plain_text"]) == 32
    assert len(ok(kms, "create-datakey", {"key_id": kid, "datakey_length": "512"})["plain_text"]) == 128
    assert err(kms, "create-datakey", {"key_id": kid, "datakey_length": "12"}) == (400, "KMS.1903")
    assert err(kms, "create-datakey", {"key_id": kid, "datakey_length": "8200"}) == (400, "KMS.1901")
    assert err(kms, "create-datakey", {"key_id": kid, "datakey_length": "abc"}) == (400, "KMS.1901")
    assert err(kms, "create-datakey", {"key_id": kid, "key_spec": "RSA_2048"}) == (400, "KMS.1902")
    assert err(kms, "create-datakey", {"key_id": kid, "additional_authenticated_data": "a" * 129}) == (400, "KMS.0308")
    assert err(kms, "decrypt-datakey", {"key_id": kid, "cipher_text": "00", "datakey_cipher_length": "0"}) \
        == (400, "KMS.2202")


def test_default_keys(kms):
    r = ok(kms, "x-encfs-resolve-key", {"key": "sfs/default"})["key_info"]
    assert r["key_alias"] == "sfs/default" and r["default_key_flag"] == "1"
    again = ok(kms, "x-encfs-resolve-key", {"key": "sfs/default"})["key_info"]
    assert again["key_id"] == r["key_id"]
    assert ok(kms, "x-encfs-resolve-key", {"key": r["key_id"]})["key_info"]["key_id"] == r["key_id"]
    # Per-user namespaces: Bob's sfs/default is another key.
    assert ok(kms, "x-encfs-resolve-key", {"key": "sfs/default"}, BOB)["key_info"]["key_id"] != r["key_id"]
    assert err(kms, "x-encfs-resolve-key", {"key": "nope"}) == (404, "KMS.0207")
    assert err(kms, "x-encfs-resolve-key", {"key": "obs/default"}, raw=b"{}") == (400, "KMS.0204")
    assert err(kms, "disable-key", {"key_id": r["key_id"]}) == (400, "KMS.0211")
    assert err(kms, "schedule-key-deletion", {"key_id": r["key_id"], "pending_days": "7"}) == (400, "KMS.0211")
    assert err(kms, "create-key", {"key_alias": "sfs/default"}) == (400, "KMS.1101")


def test_state_errors_on_crypto(kms):
    kid = new_key(kms)
    ct = ok(kms, "create-datakey", {"key_id": kid})["cipher_text"]
    ok(kms, "disable-key", {"key_id": kid})
    assert err(kms, "create-datakey", {"key_id": kid}) == (400, "KMS.0209")
    assert err(kms, "decrypt-datakey", {"key_id": kid, "cipher_text": ct, "datakey_cipher_length": "32"}) \
        == (400, "KMS.0209")
    ok(kms, "schedule-key-deletion", {"key_id": kid, "pending_days": "7"})
    assert err(kms, "create-datakey", {"key_id": kid}) == (400, "KMS.0210")


def test_other_uid_refused(kms):
    kid = new_key(kms)
    assert err(kms, "describe-key", {"key_id": kid}, BOB) == (403, "KMS.0306")
    assert err(kms, "create-datakey", {"key_id": kid}, BOB) == (403, "KMS.0306")
    assert ok(kms, "describe-key", {"key_id": kid}, ROOT)["key_info"]["key_id"] == kid


def test_audit_records_have_no_key_material(kms):
    kid = new_key(kms)
    r = kms.handle(ALICE, "POST", "create-datakey", {}, json.dumps({"key_id": kid}).encode())
    recs = kms.audit_records(ALICE, "create-datakey", r)
    assert len(recs) == 1 and recs[0].key_id == kid and recs[0].outcome == "ok" and recs[0].caller == "uid=1000"
    assert r.body["plain_text"] not in repr(recs)
