"""Property tests over kms.api's pure handlers (issue 8 item 4): random and mutated JSON bodies
for every operation. Whatever comes in, only a 200 or a documented KmsApiError (a code of
kms.api.ERROR_CODES, Huawei's body shape, never KMS.0101 / 500) may come out, and the reply
must serialise to JSON. Bounded: a few seconds in the normal run. The coverage-guided fuzzer
for the same surface is tests/kms/fuzz_api.py (atheris, not in CI; see docs/KMS.md).
"""

from __future__ import annotations

import json
import glob
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms import api
from kms.api import ERROR_CODES, Kms, caller_for_access_key, caller_for_uid
from kms.store import Store

ALICE = caller_for_uid(1000)
BOB = caller_for_uid(1001)
ROOT = caller_for_uid(0)
TCP = caller_for_access_key("carol", "AKCAROL")

FIELDS = ["key_id", "key_alias", "key_description", "key_spec", "key_usage", "origin", "datakey_length",
          "additional_authenticated_data", "plain_text", "datakey_plain_length", "cipher_text",
          "datakey_cipher_length", "destination_key_id", "source_key_id", "source_additional_authenticated_data",
          "destination_additional_authenticated_data", "source_encryption_algorithm",
          "destination_encryption_algorithm", "encryption_algorithm", "random_data_length", "grantee_principal",
          "grantee_principal_type", "operations", "name", "retiring_principal", "grant_id", "limit", "marker",
          "key_state", "pending_days", "rotation_interval", "alias", "aliases", "target_key_id", "tag", "tags",
          "action", "matches", "offset", "key", "since", "aad", "sequence"]

# Operation paths, with the {key_id}/{key} placeholders of kms.api's routes filled in.
ROUTES = sorted(api._ROUTES)


class World:
    """One store with a few keys, a grant and ciphertexts that the strategies draw from."""

    def __init__(self, data_dir: str) -> None:
        self.store = Store(data_dir)
        self.store._db.execute("PRAGMA synchronous=OFF")       # speed; durability is not under test
        self.kms = Kms(self.store)
        ok = lambda op, body, who=ALICE: self._ok(op, body, who)   # noqa: E731
        self.key = ok("create-key", {"key_alias": "fuzz/a"})["key_info"]["key_id"]
        self.key2 = ok("create-key", {"key_alias": "fuzz/b"})["key_info"]["key_id"]
        self.bob_key = ok("create-key", {"key_alias": "fuzz/bob"}, BOB)["key_info"]["key_id"]
        dk = ok("create-datakey", {"key_id": self.key, "additional_authenticated_data": "f" * 32})
        self.dek_hex, self.ct = dk["plain_text"], dk["cipher_text"]
        self.data_ct = ok("encrypt-data", {"key_id": self.key, "plain_text": "hello"})["cipher_text"]
        self.grant = ok("create-grant", {"key_id": self.key, "grantee_principal": "1001",
                                         "operations": ["decrypt-datakey", "describe-key"]})["grant_id"]
        ok(f"{self.key}/tags/action", {"action": "create", "tags": [{"key": "t", "value": "v"}]})

    def _ok(self, op, body, who):
        r = self.kms.handle(who, "POST", op, {}, json.dumps(body).encode())
        assert r.status == 200, r.body
        return r.body


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(str(tmp_path_factory.mktemp("fuzz") / "data"))
    yield w
    w.store.close()


def scalars(w: World):
    ids = [w.key, w.key2, w.bob_key, "00000000-0000-0000-0000-000000000000"]
    return st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-2**70, max_value=2**70), st.integers(min_value=-10, max_value=10000),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40), st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
        st.from_regex(r"\A[0-9]{1,25}\Z"), st.from_regex(r"\A-?[0-9]{1,6}\Z"), st.from_regex(r"\A[0-9A-Fa-f]{0,300}\Z"),
        st.sampled_from(ids + [w.ct, w.ct.lower(), w.ct[:-2], w.ct + "00", w.data_ct, w.data_ct[:-4], w.grant,
                               w.grant.upper(), w.dek_hex, "f" * 32, "AES_256", "AES_128", "ALL", "SYMMETRIC_DEFAULT",
                               "create", "delete", "filter", "count", "1001", "alice", "sfs/default", "fuzz/a",
                               "fuzz/x", "x/default", "7", "30", "365", "1096", "256", "32", "8192", "0", "",
                               "\ud800", "a\x00b", "a\u202eb", "alias\n", "resource_instances", "resource_name"]),
    )


def values(w: World):
    return st.recursive(scalars(w), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS + ["key", "value", "values"]), inner,
                                                      max_size=4)), max_leaves=8)


def bodies(w: World):
    return st.one_of(st.dictionaries(st.sampled_from(FIELDS), values(w), max_size=8),
                     values(w))


def op_paths(w: World):
    def fill(route):
        method, op = route
        return st.tuples(st.just(method), st.sampled_from([
            op.replace("{key_id}", k).replace("{key}", t).replace("{resource_instances}", r)
            for k in (w.key, w.bob_key, "nope") for t in ("t", "zz") for r in ("resource_instances", "other")]))
    return st.sampled_from(ROUTES).flatmap(fill)


def check(result) -> None:
    json.dumps(result.body)                                  # the reply must be JSON
    if result.status == 200:
        assert result.error_code == ""
        return
    assert result.status != 500, result.body
    assert set(result.body) == {"error"} and set(result.body["error"]) == {"error_code", "error_msg"}
    code = result.body["error"]["error_code"]
    assert code in ERROR_CODES and code != "KMS.0101" and code == result.error_code, result.body
    assert isinstance(result.body["error"]["error_msg"], str)
    assert len(result.aad) <= api.AUDIT_AAD_MAX


# KMS_FUZZ_EXAMPLES=100000 for a long run; the default keeps the module under ~10 s.
FUZZ = settings(max_examples=int(os.environ.get("KMS_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_every_operation_with_random_bodies(world, data):
    method, op = data.draw(op_paths(world))
    body = data.draw(bodies(world))
    caller = data.draw(st.sampled_from([ALICE, ALICE, BOB, ROOT, TCP]))
    query = data.draw(st.dictionaries(st.sampled_from(["limit", "marker", "key_id"]), st.text(max_size=10),
                                      max_size=2)) if method == "GET" else {}
    result = world.kms.handle(caller, method, op, query, json.dumps(body).encode())
    check(result)
    for rec in world.kms.audit_records(caller, op, result):   # audit rows are storable
        world.store.audit(rec)
    world.store.flush_audit()


def _valid_bodies(w: World) -> list[tuple[str, dict]]:
    return [
        ("create-datakey", {"key_id": w.key, "datakey_length": "256", "additional_authenticated_data": "f" * 32}),
        ("decrypt-datakey", {"key_id": w.key, "cipher_text": w.ct, "datakey_cipher_length": "32",
                             "additional_authenticated_data": "f" * 32}),
        ("encrypt-datakey", {"key_id": w.key, "plain_text": w.dek_hex + "00" * 32, "datakey_plain_length": "32"}),
        ("re-encrypt", {"cipher_text": w.ct, "destination_key_id": w.key2,
                        "source_additional_authenticated_data": "f" * 32}),
        ("decrypt-data", {"cipher_text": w.data_ct}),
        ("create-grant", {"key_id": w.key, "grantee_principal": "alice", "operations": ["describe-key"]}),
        ("list-keys", {"limit": "10", "marker": "0", "key_spec": "ALL"}),
        ("resource_instances/action", {"action": "filter", "tags": [{"key": "t", "values": ["v"]}],
                                       "matches": [{"key": "resource_name", "value": "fuzz"}]}),
        ("x-encfs-list-audit", {"aad": "f" * 32, "limit": "5"}),
    ]


@FUZZ
@given(data=st.data())
def test_mutated_valid_bodies(world, data):
    op, body = data.draw(st.sampled_from(_valid_bodies(world)))
    body = dict(body)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(body) + FIELDS[:12]))
        if data.draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = data.draw(values(world))
    check(world.kms.handle(data.draw(st.sampled_from([ALICE, BOB])), "POST", op, {}, json.dumps(body).encode()))


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_raw_and_mutated_bytes(world, data):
    op, body = data.draw(st.sampled_from(_valid_bodies(world)))
    raw = bytearray(json.dumps(body).encode())
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "random"]))
    if kind == "random":
        raw = bytearray(data.draw(st.binary(max_size=2000)))
    elif raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del raw[i:]
        else:
            raw[i:i] = data.draw(st.sampled_from([b"[" * 40, b'"\\ud800"', b"\xff", b"1e999", b"-", b"\x00", b"{}"]))
    check(world.kms.handle(ALICE, "POST", op, {}, bytes(raw)))


def test_error_codes_are_documented():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "KMS.md")).read()
    # listed as "KMS.0401/0403/0409" too
    missing = [c for c in ERROR_CODES if c not in doc and "/" + c.split(".")[1] not in doc]
    assert not missing, f"error codes not in docs/KMS.md: {missing}"
    used = set(re.findall(r'"((?:KMS|APIGW)\.\d{4})"', "".join(
        open(f).read() for f in glob.glob(os.path.join(os.path.dirname(api.__file__), "**", "*.py"),
                                      recursive=True))))
    assert used <= set(ERROR_CODES), used - set(ERROR_CODES)
