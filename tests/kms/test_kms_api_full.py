"""The rest of the API, called directly: lifecycle, data keys, data, grants, rotation, aliases, tags,
deletion with a controlled clock."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest

from kms.api import DAY_MS, Kms, caller_for_uid
from kms.store import Store

ALICE = caller_for_uid(1000)
BOB = caller_for_uid(1001)
CAROL = caller_for_uid(1002)
ROOT = caller_for_uid(0)


class Clock:
    def __init__(self):
        self.ms = 1_800_000_000_000

    def __call__(self):
        return self.ms


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def kms(tmp_path, clock):
    store = Store(str(tmp_path / "data"), clock=clock)
    yield Kms(store)
    store.close()


def call(kms, op, body=None, caller=ALICE, method="POST", query=None):
    r = kms.handle(caller, method, op, query or {}, json.dumps(body or {}).encode())
    return r.status, r.body


def ok(kms, op, body=None, caller=ALICE, method="POST", query=None):
    status, reply = call(kms, op, body, caller, method, query)
    assert status == 200, reply
    return reply


def err(kms, op, body=None, caller=ALICE, method="POST"):
    status, reply = call(kms, op, body, caller, method)
    assert status != 200, reply
    return status, reply["error"]["error_code"]


def new_key(kms, alias="k1", caller=ALICE):
    return ok(kms, "create-key", {"key_alias": alias}, caller)["key_info"]["key_id"]


def state(kms, kid, caller=ALICE):
    return ok(kms, "describe-key", {"key_id": kid}, caller)["key_info"]["key_state"]


def test_state_transitions(kms):
    kid = new_key(kms)
    assert err(kms, "enable-key", {"key_id": kid}) == (400, "KMS.1201")
    assert ok(kms, "disable-key", {"key_id": kid}) == {"key_info": {"key_id": kid, "key_state": "3"}}
    assert err(kms, "disable-key", {"key_id": kid}) == (400, "KMS.1301")
    assert ok(kms, "enable-key", {"key_id": kid})["key_info"]["key_state"] == "2"
    assert err(kms, "schedule-key-deletion", {"key_id": kid, "pending_days": "6"}) == (400, "KMS.1401")
    assert err(kms, "schedule-key-deletion", {"key_id": kid, "pending_days": "1097"}) == (400, "KMS.1401")
    assert err(kms, "schedule-key-deletion", {"key_id": kid}) == (400, "KMS.0204")
    assert err(kms, "cancel-key-deletion", {"key_id": kid}) == (400, "KMS.1501")
    assert ok(kms, "schedule-key-deletion", {"key_id": kid, "pending_days": "7"}) == {"key_id": kid, "key_state": "4"}
    info = ok(kms, "describe-key", {"key_id": kid})["key_info"]
    assert info["key_state"] == "4" and info["scheduled_deletion_date"] != ""
    assert err(kms, "schedule-key-deletion", {"key_id": kid, "pending_days": "7"}) == (400, "KMS.1402")
    assert err(kms, "enable-key", {"key_id": kid}) == (400, "KMS.0210")
    assert err(kms, "disable-key", {"key_id": kid}) == (400, "KMS.0210")
    assert ok(kms, "cancel-key-deletion", {"key_id": kid}) == {"key_id": kid, "key_state": "3"}
    assert ok(kms, "describe-key", {"key_id": kid})["key_info"]["scheduled_deletion_date"] == ""
    # only the owner (or root) may change the state
    assert err(kms, "enable-key", {"key_id": kid}, BOB) == (403, "KMS.0306")
    assert ok(kms, "enable-key", {"key_id": kid}, ROOT)["key_info"]["key_state"] == "2"


def test_deletion_destroys_material_when_period_ends(kms, clock):
    kid = new_key(kms)
    dk = ok(kms, "create-datakey", {"key_id": kid})
    ok(kms, "schedule-key-deletion", {"key_id": kid, "pending_days": "7"})
    clock.ms += 7 * DAY_MS - 1000
    assert state(kms, kid) == "4"
    assert kms.sweep() == (0, 0)
    clock.ms += 2000
    assert kms.sweep_due()
    assert kms.sweep() == (1, 0)
    status, reply = call(kms, "describe-key", {"key_id": kid})
    assert status == 404 and reply["error"]["error_code"] == "KMS.0207"
    assert "deleted" in reply["error"]["error_msg"] and "destroyed" in reply["error"]["error_msg"]
    assert kms.store.material(kid, 1) is None
    assert err(kms, "decrypt-datakey", {"key_id": kid, "cipher_text": dk["cipher_text"],
                                        "datakey_cipher_length": "32"}) == (404, "KMS.0207")
    assert kid not in ok(kms, "list-keys", {})["keys"]
    new_key(kms, "k1")          # the alias is free again


def test_deletion_checked_on_access(kms, clock):
    kid = new_key(kms)
    ok(kms, "schedule-key-deletion", {"key_id": kid, "pending_days": "30"})
    clock.ms += 31 * DAY_MS
    assert err(kms, "describe-key", {"key_id": kid}) == (404, "KMS.0207")     # no sweep needed
    assert err(kms, "create-datakey", {"key_id": kid}) == (404, "KMS.0207")
    # Refused at once, but destroyed by the sweep: a lookup (on the event loop) never writes.
    assert kms.store.get_key(kid).destroyed_ms is None
    assert kms.sweep() == (1, 0)
    assert kms.store.get_key(kid).destroyed_ms is not None


def test_update_alias_and_description(kms):
    kid = new_key(kms, "old")
    new_key(kms, "taken")
    assert ok(kms, "update-key-alias", {"key_id": kid, "key_alias": "new"}) == \
        {"key_info": {"key_id": kid, "key_alias": "new"}}
    assert ok(kms, "x-encfs-resolve-key", {"key": "new"})["key_info"]["key_id"] == kid
    assert err(kms, "x-encfs-resolve-key", {"key": "old"}) == (404, "KMS.0207")
    assert err(kms, "update-key-alias", {"key_id": kid, "key_alias": "taken"}) == (400, "KMS.1104")
    assert err(kms, "update-key-alias", {"key_id": kid, "key_alias": "x/default"}) == (400, "KMS.1101")
    assert ok(kms, "update-key-description", {"key_id": kid, "key_description": "hello"})["key_info"] == \
        {"key_id": kid, "key_description": "hello"}
    assert ok(kms, "update-key-description", {"key_id": kid, "key_description": ""})["key_info"]["key_description"] == ""
    assert err(kms, "update-key-description", {"key_id": kid, "key_description": "x" * 256}) == (400, "KMS.1103")
    d = ok(kms, "x-encfs-resolve-key", {"key": "sfs/default"})["key_info"]["key_id"]
    assert err(kms, "update-key-alias", {"key_id": d, "key_alias": "other"}) == (400, "KMS.0211")


def test_quotas_and_instances(kms):
    new_key(kms, "a")
    new_key(kms, "b")
    ok(kms, "x-encfs-resolve-key", {"key": "sfs/default"})
    q = ok(kms, "user-quotas", method="GET")["quotas"]["resources"]
    assert q[0] == {"type": "CMK", "used": 2, "quota": kms.cmk_quota}
    assert q[1]["type"] == "grant_per_CMK" and q[1]["quota"] == 100
    assert ok(kms, "user-instances", method="GET") == {"instance_num": 2}
    assert ok(kms, "user-instances", caller=BOB, method="GET") == {"instance_num": 0}
    assert err(kms, "user-quotas", {}) == (400, "KMS.0201")   # wrong method
    kms.cmk_quota = 2
    assert err(kms, "create-key", {"key_alias": "c"}) == (400, "KMS.1105")


def test_without_plaintext_and_encrypt_datakey(kms):
    kid = new_key(kms)
    r = ok(kms, "create-datakey-without-plaintext", {"key_id": kid, "datakey_length": "128"})
    assert set(r) == {"key_id", "cipher_text"}
    d = ok(kms, "decrypt-datakey", {"key_id": kid, "cipher_text": r["cipher_text"], "datakey_cipher_length": "16"})
    assert len(d["data_key"]) == 32
    assert err(kms, "create-datakey-without-plaintext", {"key_id": kid, "datakey_length": "7"}) == (400, "KMS.2001")
    dek = os.urandom(64)
    plain = (dek + hashlib.sha256(dek).digest()).hex().upper()
    r = ok(kms, "encrypt-datakey", {"key_id": kid, "plain_text": plain, "datakey_plain_length": "64",
                                    "additional_authenticated_data": "ctx"})
    assert r["datakey_length"] == "64" and r["key_id"] == kid
    d = ok(kms, "decrypt-datakey", {"key_id": kid, "cipher_text": r["cipher_text"], "datakey_cipher_length": "64",
                                    "additional_authenticated_data": "ctx"})
    assert bytes.fromhex(d["data_key"]) == dek
    bad = (dek + b"\0" * 32).hex()
    assert err(kms, "encrypt-datakey", {"key_id": kid, "plain_text": bad, "datakey_plain_length": "64"}) \
        == (400, "KMS.2103")
    assert err(kms, "encrypt-datakey", {"key_id": kid, "plain_text": plain, "datakey_plain_length": "32"}) \
        == (400, "KMS.2104")
    assert err(kms, "encrypt-datakey", {"key_id": kid, "plain_text": "XYZ", "datakey_plain_length": "64"}) \
        == (400, "KMS.2101")
    assert err(kms, "encrypt-datakey", {"key_id": kid, "plain_text": plain, "datakey_plain_length": "0"}) \
        == (400, "KMS.2102")


def test_encrypt_decrypt_data(kms):
    kid = new_key(kms)
    r = ok(kms, "encrypt-data", {"key_id": kid, "plain_text": "hello kms ✓", "additional_authenticated_data": "a"})
    base64.b64decode(r["cipher_text"], validate=True)
    d = ok(kms, "decrypt-data", {"cipher_text": r["cipher_text"], "additional_authenticated_data": "a"})
    assert d["plain_text"] == "hello kms ✓" and d["key_id"] == kid
    assert base64.b64decode(d["plain_text_base64"]).decode() == "hello kms ✓"
    assert err(kms, "decrypt-data", {"cipher_text": r["cipher_text"]}) == (400, "KMS.0308")
    assert err(kms, "decrypt-data", {"cipher_text": "!!!"}) == (400, "KMS.0308")
    big = "x" * 4096
    r2 = ok(kms, "encrypt-data", {"key_id": kid, "plain_text": big})
    assert ok(kms, "decrypt-data", {"cipher_text": r2["cipher_text"]})["plain_text"] == big
    assert err(kms, "encrypt-data", {"key_id": kid, "plain_text": big + "x"}) == (400, "KMS.0308")
    # a data-key ciphertext is not accepted as data
    dk = ok(kms, "create-datakey", {"key_id": kid})["cipher_text"]
    assert err(kms, "decrypt-data", {"cipher_text": base64.b64encode(bytes.fromhex(dk)).decode()}) == (400, "KMS.0308")


def test_gen_random(kms):
    r = ok(kms, "gen-random", {"random_data_length": "512"})
    assert len(r["random_data"]) == 128 and r["random_data"] == r["random_data"].upper()
    assert err(kms, "gen-random", {"random_data_length": "12"}) == (400, "KMS.1802")
    assert err(kms, "gen-random", {"random_data_length": "8200"}) == (400, "KMS.1801")
    assert err(kms, "gen-random", {}) == (400, "KMS.0204")


def test_grants(kms):
    kid = new_key(kms)
    dk = ok(kms, "create-datakey", {"key_id": kid, "additional_authenticated_data": "f"})
    dec = {"key_id": kid, "cipher_text": dk["cipher_text"], "datakey_cipher_length": "32",
           "additional_authenticated_data": "f"}
    assert err(kms, "decrypt-datakey", dec, BOB) == (403, "KMS.0306")
    g = ok(kms, "create-grant", {"key_id": kid, "grantee_principal": "1001",
                                 "operations": ["decrypt-datakey", "describe-key"], "name": "bob",
                                 "retiring_principal": "1002"})["grant_id"]
    assert len(g) == 64
    assert ok(kms, "decrypt-datakey", dec, BOB)["data_key"] == dk["plain_text"]
    assert state(kms, kid, BOB) == "2"
    assert err(kms, "create-datakey", {"key_id": kid}, BOB) == (403, "KMS.0306")     # not granted
    assert err(kms, "disable-key", {"key_id": kid}, BOB) == (403, "KMS.0306")
    assert err(kms, "decrypt-datakey", dec, CAROL) == (403, "KMS.0306")
    lst = ok(kms, "list-grants", {"key_id": kid})
    assert lst["total"] == 1 and lst["truncated"] == "false"
    assert lst["grants"][0] | {} == {
        "key_id": kid, "grant_id": g, "grantee_principal": "1001", "grantee_principal_type": "user",
        "operations": ["decrypt-datakey", "describe-key"], "issuing_principal": "uid:1000",
        "creation_date": lst["grants"][0]["creation_date"], "name": "bob", "retiring_principal": "1002"}
    assert err(kms, "list-grants", {"key_id": kid}, BOB) == (403, "KMS.0306")
    assert ok(kms, "list-retirable-grants", {}, CAROL)["grants"][0]["grant_id"] == g
    assert ok(kms, "list-retirable-grants", {}, BOB)["total"] == 0
    assert err(kms, "retire-grant", {"key_id": kid, "grant_id": g}, BOB) == (403, "KMS.0306")
    assert ok(kms, "retire-grant", {"key_id": kid, "grant_id": g}, CAROL) == {}
    assert err(kms, "decrypt-datakey", dec, BOB) == (403, "KMS.0306")
    # revoke by the owner; errors
    g2 = ok(kms, "create-grant", {"key_id": kid, "grantee_principal": "1001",
                                  "operations": ["create-datakey"]})["grant_id"]
    assert ok(kms, "create-datakey", {"key_id": kid}, BOB)["key_id"] == kid
    assert err(kms, "revoke-grant", {"key_id": kid, "grant_id": g2}, BOB) == (403, "KMS.0306")
    assert ok(kms, "revoke-grant", {"key_id": kid, "grant_id": g2}) == {}
    assert err(kms, "revoke-grant", {"key_id": kid, "grant_id": g2}) == (400, "KMS.2501")
    assert err(kms, "create-datakey", {"key_id": kid}, BOB) == (403, "KMS.0306")
    other = new_key(kms, "k2")
    g3 = ok(kms, "create-grant", {"key_id": other, "grantee_principal": "1001",
                                  "operations": ["create-datakey"]})["grant_id"]
    assert err(kms, "revoke-grant", {"key_id": kid, "grant_id": g3}) == (400, "KMS.2502")
    assert err(kms, "revoke-grant", {"key_id": kid, "grant_id": "xyz"}) == (400, "KMS.0308")
    assert err(kms, "create-grant", {"key_id": kid, "grantee_principal": "1001",
                                     "operations": ["create-grant"]}) == (400, "KMS.2401")
    assert err(kms, "create-grant", {"key_id": kid, "grantee_principal": "1001",
                                     "operations": ["sign-everything"]}) == (400, "KMS.2401")
    assert err(kms, "create-grant", {"key_id": kid, "grantee_principal": "a b",
                                     "operations": ["describe-key"]}) == (400, "KMS.2402")
    assert err(kms, "create-grant", {"key_id": kid, "grantee_principal": "1001"}) == (400, "KMS.0204")


def test_grant_by_user_name_and_delegation(kms):
    import pwd
    nobody = pwd.getpwnam("nobody")
    kid = new_key(kms)
    ok(kms, "create-grant", {"key_id": kid, "grantee_principal": "nobody",
                             "operations": ["create-datakey", "describe-key", "create-grant"]})
    who = caller_for_uid(nobody.pw_uid)
    assert ok(kms, "create-datakey", {"key_id": kid}, who)["key_id"] == kid
    # a grantee with create-grant may pass on only what it holds
    assert err(kms, "create-grant", {"key_id": kid, "grantee_principal": "1002",
                                     "operations": ["decrypt-datakey"]}, who) == (403, "KMS.0306")
    ok(kms, "create-grant", {"key_id": kid, "grantee_principal": "1002", "operations": ["describe-key"]}, who)
    assert state(kms, kid, CAROL) == "2"


def test_rotation(kms, clock):
    kid = new_key(kms)
    before = ok(kms, "create-datakey", {"key_id": kid})
    st = ok(kms, "get-key-rotation-status", {"key_id": kid})
    assert st["key_rotation_enabled"] is False and st["number_of_rotations"] == 0 and len(st["key_materials"]) == 1
    assert err(kms, "disable-key-rotation", {"key_id": kid}) == (400, "KMS.0313")
    assert ok(kms, "enable-key-rotation", {"key_id": kid}) == {}
    assert err(kms, "enable-key-rotation", {"key_id": kid}) == (400, "KMS.2901")
    assert ok(kms, "describe-key", {"key_id": kid})["key_info"]["key_rotation_enabled"] == "true"
    assert err(kms, "update-key-rotation-interval", {"key_id": kid, "rotation_interval": 29}) == (400, "KMS.3001")
    assert err(kms, "update-key-rotation-interval", {"key_id": kid, "rotation_interval": 366}) == (400, "KMS.3001")
    assert ok(kms, "update-key-rotation-interval", {"key_id": kid, "rotation_interval": 30}) == {}
    assert ok(kms, "rotate-on-demand", {"key_id": kid}) == {"key_id": kid}
    after = ok(kms, "create-datakey", {"key_id": kid})
    # new data keys use version 2; the old ciphertext (version 1) still decrypts
    assert int(after["cipher_text"][76:84], 16) == 2 and int(before["cipher_text"][76:84], 16) == 1
    for dk in (before, after):
        assert ok(kms, "decrypt-datakey", {"key_id": kid, "cipher_text": dk["cipher_text"],
                                           "datakey_cipher_length": "32"})["data_key"] == dk["plain_text"]
    # automatic rotation after the interval
    clock.ms += 30 * DAY_MS + 1
    assert kms.sweep() == (0, 1)
    st = ok(kms, "get-key-rotation-status", {"key_id": kid})
    assert st["number_of_rotations"] == 2 and st["rotation_interval"] == 30 and len(st["key_materials"]) == 3
    assert st["last_rotation_time"] == str(clock.ms)
    assert ok(kms, "disable-key-rotation", {"key_id": kid}) == {}
    clock.ms += 365 * DAY_MS
    assert kms.sweep() == (0, 0)
    assert err(kms, "rotate-on-demand", {"key_id": kid}, BOB) == (403, "KMS.0306")


def test_re_encrypt(kms):
    a = new_key(kms, "a")
    b = new_key(kms, "b")
    dk = ok(kms, "create-datakey", {"key_id": a, "additional_authenticated_data": "f1"})
    r = ok(kms, "re-encrypt", {"cipher_text": dk["cipher_text"], "destination_key_id": b,
                               "source_additional_authenticated_data": "f1",
                               "destination_additional_authenticated_data": "f1"})
    assert r["key_id"] == b and r["source_key_id"] == a and "plain_text" not in r
    d = ok(kms, "decrypt-datakey", {"key_id": b, "cipher_text": r["cipher_text"], "datakey_cipher_length": "32",
                                    "additional_authenticated_data": "f1"})
    assert d["data_key"] == dk["plain_text"]
    # to the newest version of the same key
    ok(kms, "rotate-on-demand", {"key_id": a})
    r2 = ok(kms, "re-encrypt", {"cipher_text": dk["cipher_text"], "destination_key_id": a,
                                "source_additional_authenticated_data": "f1",
                                "destination_additional_authenticated_data": "f1", "datakey_cipher_length": "32"})
    assert int(r2["cipher_text"][76:84], 16) == 2
    assert err(kms, "re-encrypt", {"cipher_text": dk["cipher_text"], "destination_key_id": b}) == (400, "KMS.2203")
    assert err(kms, "re-encrypt", {"cipher_text": dk["cipher_text"]}) == (400, "KMS.0204")
    assert err(kms, "re-encrypt", {"cipher_text": dk["cipher_text"], "destination_key_id": b,
                                   "source_key_id": b, "source_additional_authenticated_data": "f1"}) == (400, "KMS.2201")
    ok(kms, "disable-key", {"key_id": b})
    assert err(kms, "re-encrypt", {"cipher_text": dk["cipher_text"], "destination_key_id": b,
                                   "source_additional_authenticated_data": "f1"}) == (400, "KMS.0209")


def test_aliases_api(kms):
    a = new_key(kms, "a")
    b = new_key(kms, "b")
    r = ok(kms, "aliases", {"key_id": a, "alias": "alias/extra"})
    assert r["alias"] == "alias/extra" and r["key_id"] == a and r["alias_urn"].endswith(":alias:alias/extra")
    assert ok(kms, "x-encfs-resolve-key", {"key": "alias/extra"})["key_info"]["key_id"] == a
    assert err(kms, "aliases", {"key_id": b, "alias": "alias/extra"}) == (400, "KMS.1104")
    assert err(kms, "aliases", {"key_id": b, "alias": "b"}) == (400, "KMS.1104")
    pages = ok(kms, "aliases", method="GET")
    assert isinstance(pages, list) and [x["alias"] for x in pages[0]["aliases"]] == ["alias/extra"]
    assert ok(kms, "aliases", method="GET", query={"key_id": b})[0]["aliases"] == []
    r = ok(kms, "alias/associate", {"alias": "alias/extra", "target_key_id": b})
    assert r["key_id"] == b
    assert ok(kms, "x-encfs-resolve-key", {"key": "alias/extra"})["key_info"]["key_id"] == b
    assert err(kms, "aliases", {"key_id": a, "aliases": ["alias/extra"]}, method="DELETE") == (400, "KMS.0308")
    assert ok(kms, "aliases", {"key_id": b, "aliases": ["alias/extra"]}, method="DELETE") == {}
    assert err(kms, "x-encfs-resolve-key", {"key": "alias/extra"}) == (404, "KMS.0207")


def test_tags_api(kms):
    a = new_key(kms, "a")
    b = new_key(kms, "b")
    assert ok(kms, f"{a}/tags", {"tag": {"key": "env", "value": "prod"}}) == {}
    ok(kms, f"{a}/tags/action", {"action": "create", "tags": [{"key": "team", "value": "x"},
                                                               {"key": "env", "value": "dev"}]})
    ok(kms, f"{b}/tags", {"tag": {"key": "env", "value": "prod"}})
    t = ok(kms, f"{a}/tags", method="GET")
    assert t == {"tags": [{"key": "env", "value": "dev"}, {"key": "team", "value": "x"}], "existTagsNum": 2}
    assert ok(kms, "tags", method="GET") == {"tags": [{"key": "env", "values": ["dev", "prod"]},
                                                      {"key": "team", "values": ["x"]}]}
    r = ok(kms, "resource_instances/action", {"action": "filter", "tags": [{"key": "env", "values": ["prod"]}]})
    assert r["total_count"] == 1 and r["resources"][0]["resource_id"] == b
    assert ok(kms, "resource_instances/action", {"action": "count", "tags": [{"key": "env", "values": []}]}) == \
        {"total_count": 2}
    assert ok(kms, f"{a}/tags/team", method="DELETE") == {}
    assert err(kms, f"{a}/tags/team", method="DELETE") == (404, "KMS.0416")
    ok(kms, f"{a}/tags/action", {"action": "delete", "tags": [{"key": "env"}]})
    assert ok(kms, f"{a}/tags", method="GET")["existTagsNum"] == 0
    assert err(kms, f"{a}/tags", {"tag": {"key": "", "value": "x"}}) == (400, "KMS.0401")
    assert err(kms, f"{a}/tags", {"tag": {"key": "k"}}, BOB) == (403, "KMS.0306")
    assert err(kms, "not-a-key/tags", {"tag": {"key": "k"}}) == (400, "KMS.0205")
    ok(kms, f"{a}/tags/action", {"action": "create", "tags": [{"key": f"t{i}", "value": ""} for i in range(20)]})
    assert err(kms, f"{a}/tags", {"tag": {"key": "one-more", "value": ""}}) == (400, "KMS.0409")


def test_audit_query_scoped(kms):
    a = new_key(kms, "a")
    for caller, op, body in [(ALICE, "describe-key", {"key_id": a}), (BOB, "describe-key", {"key_id": a}),
                             (BOB, "gen-random", {"random_data_length": "8"})]:
        r = kms.handle(caller, "POST", op, {}, json.dumps(body).encode())
        for rec in kms.audit_records(caller, op, r):
            kms.store.audit(rec)
    mine = ok(kms, "x-encfs-list-audit", {"key_id": a})["records"]
    assert [(r["caller"], r["outcome"], r["error_code"]) for r in mine] == \
        [("uid=1000", "ok", ""), ("uid=1001", "error", "KMS.0306")]
    bobs = ok(kms, "x-encfs-list-audit", {}, BOB)["records"]
    assert {r["caller"] for r in bobs} == {"uid=1001"}           # Bob sees his own requests only
    assert len(ok(kms, "x-encfs-list-audit", {}, ROOT)["records"]) == 3
