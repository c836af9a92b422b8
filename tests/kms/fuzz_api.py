"""Coverage-guided fuzzing (atheris) of the KMS's input surface. Not part of the test suite.

Targets, chosen by the first input byte: the API handlers (kms.api.Kms.handle: any method,
operation path, caller and body), the SDK-HMAC-SHA256 verifier (kms.auth.verify: any
Authorization/X-Sdk-Date/headers/body), and the ciphertext parser (kms.blob.parse/open_).
Only documented outcomes are allowed: a Result whose error code is in kms.api.ERROR_CODES
(never KMS.0101), KmsApiError from verify, BlobError/BlobAuthError from blob. Anything else
is a crash that atheris reports with the input that caused it.

    .venv/bin/pip install atheris          # not a project dependency
    .venv/bin/python tests/kms/fuzz_api.py -atheris_runs=200000 [CORPUS_DIR]
    .venv/bin/python tests/kms/fuzz_api.py -max_total_time=600 /tmp/kms-corpus

Run from the repository root; the store lives in a temporary directory that is removed at exit.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from kms import api, auth, blob
    from kms.api import ERROR_CODES, Kms, KmsApiError, caller_for_access_key, caller_for_uid
    from kms.store import Store

_DIR = tempfile.mkdtemp(prefix="kms-fuzz-")
atexit.register(shutil.rmtree, _DIR, True)
STORE = Store(_DIR + "/data")
STORE._db.execute("PRAGMA synchronous=OFF")
KMS = Kms(STORE)
CALLERS = [caller_for_uid(1000), caller_for_uid(1001), caller_for_uid(0), caller_for_access_key("carol", "AKC")]
KEY = KMS.handle(CALLERS[0], "POST", "create-key", {}, b'{"key_alias": "fuzz/a"}').body["key_info"]["key_id"]
CT = KMS.handle(CALLERS[0], "POST", "create-datakey", {}, json.dumps({"key_id": KEY}).encode()).body["cipher_text"]
METHODS = ["POST", "GET", "DELETE", "PUT"]
OPS = sorted({op.replace("{key_id}", KEY).replace("{key}", "t").replace("{resource_instances}", "resource_instances")
              for _, op in api._ROUTES})
CREDS = {"AKC": auth.Credential("carol", "AKC", "secret")}
MATERIAL = STORE.material(KEY, 1)


def _api(fdp: atheris.FuzzedDataProvider) -> None:
    method = METHODS[fdp.ConsumeIntInRange(0, len(METHODS) - 1)]
    op = OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)] if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(40)
    caller = CALLERS[fdp.ConsumeIntInRange(0, len(CALLERS) - 1)]
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    if raw[:1] == b"K":         # splice real ids in, so the fuzzer gets past the lookups
        raw = raw[1:].replace(b"@K", KEY.encode()).replace(b"@C", CT.encode())
    r = KMS.handle(caller, method, op, {}, raw)
    json.dumps(r.body)
    if r.status != 200:
        code = r.body["error"]["error_code"]
        if code not in ERROR_CODES or code == "KMS.0101" or r.status >= 500:
            raise AssertionError(f"undocumented outcome {r.status} {code}")


def _auth(fdp: atheris.FuzzedDataProvider) -> None:
    headers = {}
    for name in ("authorization", "x-sdk-date", "host", "content-type", "x-project-id", "x-sdk-content-sha256"):
        if fdp.ConsumeBool():
            headers[name] = fdp.ConsumeUnicodeNoSurrogates(120)
    if fdp.ConsumeBool():
        headers["authorization"] = ("SDK-HMAC-SHA256 Access=AKC, SignedHeaders=" + fdp.ConsumeUnicodeNoSurrogates(60)
                                    + ", Signature=" + fdp.ConsumeUnicodeNoSurrogates(70))
    target = fdp.ConsumeUnicodeNoSurrogates(80)
    try:
        auth.verify(CREDS, "POST", target, headers, fdp.ConsumeBytes(200), 1.7e9)
    except KmsApiError as e:
        assert e.code in ERROR_CODES


def _blob(fdp: atheris.FuzzedDataProvider) -> None:
    kind = fdp.ConsumeIntInRange(1, 2)
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        h = blob.parse(data, kind)
        blob.open_(h, data, MATERIAL)
    except (blob.BlobError, blob.BlobAuthError):
        pass


TARGETS = [_api, _api, _auth, _blob]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)](fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
