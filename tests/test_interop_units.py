"""Layer 1, issue #15: the pure parts of KMS interop.

Sidecar version 2 (wrap time and key version recorded; version 1 readable and upgraded in
place), the strict mode's envelope and refusals, alias resolution through Huawei's public
operations (the sans-I/O steps both clients drive), and which KMS a tool picks.
"""

from __future__ import annotations

import argparse
import os
import struct

import pytest

from encfs import format as fmt
from encfs import kmsconn
from kms import blob, strict
from kms.api import Caller, Kms
from kms.client import KmsError, _resolve_steps
from kms.store import Store

FID = bytes(range(16))
KID = "0d0466b0-e727-4d9c-b35d-f84bb474a37f"


def rec(**kw) -> fmt.KeyRecord:
    base = dict(file_id=FID, key_id=KID, wrapped_dek=os.urandom(102), created_ns=1_700_000_000 * 10**9)
    base.update(kw)
    return fmt.KeyRecord(**base)


def v1_sidecar(r: fmt.KeyRecord) -> bytes:
    """A sidecar as encfs wrote it before version 2: trailer bytes zero, head version 1."""
    assert r.wrapped_ns == r.key_version == 0
    data = bytearray(fmt.encode_sidecar(r))
    data[4:6] = struct.pack(">H", 1)
    return bytes(data)


# ---- sidecar version 2 -------------------------------------------------------------------------

def test_v2_records_wrap_time_and_key_version():
    r = rec(wrapped_ns=1_800_000_000 * 10**9, key_version=7)
    data = fmt.encode_sidecar(r)
    assert fmt.sidecar_version(data) == 2 and fmt.decode_sidecar(data) == r
    with pytest.raises(fmt.FormatError, match="too long"):
        fmt.encode_sidecar(rec(wrapped_dek=b"w" * (fmt.WRAPPED_MAX + 1)))


def test_v1_sidecar_reads_as_unknown_and_is_upgraded_in_place_crash_safely():
    old = rec()
    data = v1_sidecar(old)
    assert fmt.decode_sidecar(data) == old          # wrapped_ns, key_version: 0 = unknown
    new = rec(wrapped_dek=b"n" * 102, wrapped_ns=5, key_version=2)
    off, slot, written = fmt.next_slot_write(data, new)
    torn = bytearray(data)
    torn[off:off + fmt.SLOT_SIZE] = slot            # the slot is durable, the head not yet
    mid = fmt.decode_sidecar(bytes(torn))
    assert (mid.wrapped_dek, mid.seq, mid.key_version) == (new.wrapped_dek, 2, 0)   # v1 ignores the trailer
    hoff, head = fmt.upgrade_head(bytes(torn))
    torn[hoff:hoff + len(head)] = head
    assert fmt.decode_sidecar(bytes(torn)) == written and written.key_version == 2
    assert fmt.upgrade_head(bytes(torn)) is None


def test_v1_slot_with_a_long_wrapped_dek_stays_readable():
    long_old = rec(wrapped_dek=os.urandom(fmt.WRAPPED_MAX_V1))
    body = bytearray(fmt.SLOT_FIXED.pack(1, FID, 1, 32, len(KID), len(long_old.wrapped_dek)))
    body += KID.encode().ljust(fmt.KEY_ID_MAX, b"\0") + long_old.wrapped_dek
    body = bytes(body.ljust(fmt.SLOT_SIZE - 4, b"\0"))
    import zlib
    slot = body + struct.pack(">I", zlib.crc32(body))
    head = fmt.SIDECAR_HEAD.pack(fmt.SIDECAR_MAGIC, 1, fmt.SLOT_SIZE, bytes(8))
    got = fmt.decode_sidecar(head + slot + bytes(fmt.SLOT_SIZE))
    assert got.wrapped_dek == long_old.wrapped_dek and got.key_version == 0
    with pytest.raises(fmt.FormatError, match="version 3"):
        fmt.decode_sidecar(fmt.SIDECAR_HEAD.pack(fmt.SIDECAR_MAGIC, 3, fmt.SLOT_SIZE, bytes(8))
                           + slot + bytes(fmt.SLOT_SIZE))


# ---- the strict mode ----------------------------------------------------------------------------

def test_envelope_round_trip_and_refusals():
    ours = blob.seal(blob.KIND_DATAKEY, KID, 3, os.urandom(32), os.urandom(32), b"aad").hex().upper()
    foreign = strict.wrap(ours)
    raw = bytes.fromhex(foreign)
    assert raw[:2] == b"\x02\x00" and struct.unpack("<H", raw[2:4])[0] == len(raw)
    assert raw[-40:-4] == KID.encode()
    with pytest.raises(blob.BlobError):
        blob.parse(raw, blob.KIND_DATAKEY)
    assert strict.unwrap(foreign) == ours
    for bad in (ours, foreign[:-2], "zz", foreign[:8]):
        with pytest.raises(Exception) as e:
            strict.unwrap(bad)
        assert getattr(e.value, "code", None) == "KMS.2201"


@pytest.fixture
def kms(tmp_path):
    store = Store(str(tmp_path / "data"))
    yield Kms(store)
    store.close()


ALICE = Caller(principal="uid:1000", identities=frozenset({"uid:1000"}), admin=False, label="uid=1000")


def test_strict_answers_extensions_as_unknown_paths_and_translates_ciphertexts(kms):
    plain, hard = kms.handle, strict.StrictHuawei(kms.handle)
    unknown = plain(ALICE, "POST", "x-encfs-nope", {}, b"{}")
    assert hard(ALICE, "POST", "x-encfs-nope", {}, b"{}").body == unknown.body
    refused = hard(ALICE, "POST", "x-encfs-resolve-key", {}, b'{"key": "sfs/default"}')
    assert (refused.status, refused.body) == (
        unknown.status, {"error": {**unknown.body["error"],
                                   "error_msg": unknown.body["error"]["error_msg"].replace("nope", "resolve-key")}})
    assert plain(ALICE, "POST", "x-encfs-resolve-key", {}, b'{"key": "sfs/default"}').status == 200
    kid = hard(ALICE, "POST", "create-key", {}, b'{"key_alias": "a"}').body["key_info"]["key_id"]
    made = hard(ALICE, "POST", "create-datakey", {}, f'{{"key_id": "{kid}"}}'.encode()).body
    with pytest.raises(blob.BlobError):
        blob.parse(bytes.fromhex(made["cipher_text"]), blob.KIND_DATAKEY)
    body = f'{{"key_id": "{kid}", "cipher_text": "{made["cipher_text"]}", "datakey_cipher_length": "32"}}'
    assert hard(ALICE, "POST", "decrypt-datakey", {}, body.encode()).body["data_key"] == made["plain_text"]
    assert plain(ALICE, "POST", "decrypt-datakey", {}, body.encode()).error_code == "KMS.2201"


# ---- alias resolution ---------------------------------------------------------------------------

def drive(ref: str, replies: dict, shortcut: bool = True) -> tuple[dict | KmsError, list[str]]:
    """Run the resolution steps against scripted replies (operation -> reply or KmsError)."""
    steps, asked = _resolve_steps(ref, "KMS", shortcut), []
    try:
        step = next(steps)
        while True:
            asked.append(step[0])
            step = steps.send(replies[step[0]])
    except StopIteration as done:
        return done.value, asked
    except KmsError as e:
        return e, asked


UNKNOWN = KmsError(400, "KMS.0201", "unknown operation")


def test_alias_found_on_a_later_list_keys_page():
    replies = {"x-encfs-resolve-key": UNKNOWN,
               "list-keys": {"key_details": [{"key_id": "k1", "key_alias": "other"}], "truncated": "true",
                             "next_marker": "1"}}
    first = dict(replies)
    steps, asked = _resolve_steps("mine", "KMS", True), []
    step = next(steps)
    step = steps.send(first["x-encfs-resolve-key"])
    assert step[0] == "list-keys" and "marker" not in step[1]
    step = steps.send(first["list-keys"])
    assert step == ("list-keys", {"limit": "100", "marker": "1"}, "POST")
    with pytest.raises(StopIteration) as done:
        steps.send({"key_details": [{"key_id": "k2", "key_alias": "mine"}], "truncated": "false"})
    assert done.value.value["key_id"] == "k2"


def test_alias_through_the_aliases_api_then_describe_key():
    got, asked = drive("extra", {
        "x-encfs-resolve-key": UNKNOWN,
        "list-keys": {"key_details": [{"key_id": "k1", "key_alias": "own"}], "truncated": "false"},
        "aliases?limit=100": [{"aliases": [{"alias": "extra", "key_id": "k1"}], "page_info": {}}],
        "describe-key": {"key_info": {"key_id": "k1", "key_state": "2"}}})
    assert got == {"key_id": "k1", "key_state": "2"}
    assert asked == ["x-encfs-resolve-key", "list-keys", "aliases?limit=100", "describe-key"]


def test_shortcut_answers_when_offered_and_ids_need_no_alias_lookup():
    got, asked = drive("a", {"x-encfs-resolve-key": {"key_info": {"key_id": "k"}}})
    assert got == {"key_id": "k"} and asked == ["x-encfs-resolve-key"]
    got, asked = drive(KID, {"describe-key": {"key_info": {"key_id": KID}}}, shortcut=False)
    assert got == {"key_id": KID} and asked == ["describe-key"]
    refused = KmsError(403, "KMS.0306", "no permission")
    got, _ = drive("a", {"x-encfs-resolve-key": refused})
    assert got is refused       # an answer of the extension itself is not second-guessed


def test_unknown_alias_names_it_and_a_kms_without_the_aliases_api_is_fine():
    got, asked = drive("ghost", {"list-keys": {"key_details": [], "truncated": "false"},
                                 "aliases?limit=100": KmsError(404, "APIGW.0101", "no such API")}, shortcut=False)
    assert isinstance(got, KmsError) and got.error_code == "KMS.0207" and "'ghost'" in str(got)


# ---- which KMS a tool uses ----------------------------------------------------------------------

def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    kmsconn.add_options(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_target_from_args(tmp_path, monkeypatch):
    monkeypatch.delenv("KMS_SOCKET", raising=False)
    backing = os.fsencode(tmp_path)
    os.mkdir(tmp_path / ".encfs")
    os.mkdir(tmp_path / ".encfs" / "tmp")
    with pytest.raises(kmsconn.KmsConnError, match="not both"):
        kmsconn.target_from_args(args(kms_url="https://h", kms_socket="/s"))
    with pytest.raises(kmsconn.KmsConnError, match="needs --credentials"):
        kmsconn.target_from_args(args(kms_url="https://h"))
    with pytest.raises(kmsconn.KmsConnError, match="use https://"):
        kmsconn.target_from_args(args(kms_url="http://kms.example.com", credentials="c"))
    assert kmsconn.target_from_args(args(kms_url="http://127.0.0.1:1", credentials="c")).url
    with pytest.raises(kmsconn.KmsConnError, match="go with --kms-url"):
        kmsconn.target_from_args(args(kms_ca_file="ca.pem"))
    remote = kmsconn.KmsTarget("p", url="https://kms.example.com", credentials="/c.csv", ca_file="/ca.pem")
    kmsconn.record(backing, remote)
    assert kmsconn.recorded_target(backing) == remote
    assert kmsconn.target_from_args(args(), backing) == remote                     # no option: the mount's
    assert kmsconn.target_from_args(args(kms_socket="/s"), backing).socket_path == "/s"   # an option wins
    assert kmsconn.target_from_args(args(project_id="q"), backing).project_id == "q"
    monkeypatch.setenv("KMS_SOCKET", "/env.sock")
    assert kmsconn.target_from_args(args(), backing) == remote
    assert kmsconn.target_from_args(args()).socket_path == "/env.sock"
    (tmp_path / ".encfs" / "kms.json").write_text('{"project_id": "p", "url": 5}')
    assert kmsconn.recorded_target(backing) is None
    assert kmsconn.backing_root_of(os.path.join(backing, b"a", b"b")) is None   # no config.json
    (tmp_path / ".encfs" / "config.json").write_text("{}")
    assert kmsconn.backing_root_of(os.path.join(backing, b"a", b"b")) == backing
