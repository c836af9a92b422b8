"""Huawei KMS v1.0 operations as pure handlers over a Store: validate, authorise, act, shape the reply.

No sockets and no HTTP here: the server hands in the caller, the method, the path below
``/v1.0/{project_id}/kms/`` and the raw body, and gets back a status and a JSON-able body.
Field names, string-typed values, key states and error codes follow Huawei's API reference
(see docs/KMS.md); anything Huawei lacks is named ``x-encfs-*`` so it cannot collide.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import pwd
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from . import blob
from .store import (STATE_DISABLED, STATE_ENABLED, STATE_PENDING_DELETION, AuditRecord, GrantRecord,
                    KeyRecord, Store)

REGION = "local"
DEFAULT_CMK_QUOTA = 1000
GRANTS_PER_CMK = 100
MAX_BODY = 64 * 1024
DAY_MS = 86_400_000

DEFAULT_ALIASES = ("obs/default", "evs/default", "ims/default", "vbs/default", "sfs/default", "kps/default",
                   "csms/default", "rds/default", "dds/default", "dlf/default", "elb/default", "mkp/default",
                   "coc/default", "cce/default")

GRANT_OPERATIONS = ("create-datakey", "create-datakey-without-plaintext", "encrypt-datakey", "decrypt-datakey",
                    "describe-key", "create-grant", "retire-grant", "encrypt-data", "decrypt-data")

KEY_SPECS = ("AES_256", "SM4", "RSA_2048", "RSA_3072", "RSA_4096", "EC_P256", "EC_P384", "SECP256K1", "SM2",
             "ED25519", "HMAC_256", "HMAC_384", "HMAC_512", "HMAC_SM3")

# Every pattern ends in \Z, not $: Python's $ also matches before a trailing newline, which
# would let "alias\n" or "ABCD\n" through. The character classes are explicit ASCII ranges, so
# look-alike letters, NUL, RTL marks and other Unicode never pass.
_KEY_ID_RE = re.compile(r"^[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}\Z")
_ALIAS_RE = re.compile(r"^[a-zA-Z0-9:/_-]{1,255}\Z")
_GRANT_ID_RE = re.compile(r"^[A-Fa-f0-9]{64}\Z")
_PRINCIPAL_RE = re.compile(r"^[a-zA-Z0-9._-]{1,64}\Z")
_DIGITS_RE = re.compile(r"^[0-9]{1,15}\Z")
_HEX_RE = re.compile(r"^[0-9A-Fa-f]*\Z")
MAX_NUMBER = 10**15 - 1         # numeric fields: at most 15 digits, as strings or JSON integers
MAX_JSON_DEPTH = 32             # request bodies nest at most this deep (Huawei's need 3)
AUDIT_AAD_MAX = 128             # characters of a request's AAD kept in the audit log

# Huawei's HTTP status per error code (reference §6); everything unlisted is 400.
_STATUS = {"KMS.0207": 404, "KMS.0416": 404, "KMS.0301": 403, "KMS.0302": 403, "KMS.0303": 403,
           "KMS.0305": 403, "KMS.0306": 403, "KMS.0307": 403, "KMS.0321": 403, "KMS.0101": 500,
           "KMS.0102": 500, "KMS.0103": 503, "APIGW.0308": 429}


#: Every error code this KMS answers with (docs/KMS.md lists them). Huawei's codes keep Huawei's
#: meaning; KMS.0103 and APIGW.0308 come from the server's connection and rate limits.
ERROR_CODES = {
    "KMS.0101": "internal error", "KMS.0102": "I/O error",
    "KMS.0103": "too many connections (server busy), 503",
    "APIGW.0308": "request rate limit exceeded, 429",
    "KMS.0201": "invalid request URL, method or malformed HTTP", "KMS.0202": "body is not valid JSON",
    "KMS.0203": "request (body or headers) too long", "KMS.0204": "required parameter missing",
    "KMS.0205": "invalid key_id", "KMS.0207": "key does not exist or was destroyed",
    "KMS.0209": "key is disabled", "KMS.0210": "key is pending deletion",
    "KMS.0211": "not allowed on a default key", "KMS.0301": "request not signed or malformed signature",
    "KMS.0302": "wrong access key or signature", "KMS.0303": "signature expired",
    "KMS.0305": "project/region mismatch", "KMS.0306": "no permission on the key",
    "KMS.0307": "operation not allowed for this caller", "KMS.0308": "a field is invalid",
    "KMS.0312": "key cannot be rotated", "KMS.0313": "rotation is not enabled",
    "KMS.0321": "project id mismatch", "KMS.0401": "invalid tag key", "KMS.0403": "invalid tag value",
    "KMS.0409": "tag limit reached", "KMS.0416": "tag does not exist",
    "KMS.1101": "invalid alias", "KMS.1103": "invalid description", "KMS.1104": "alias already exists",
    "KMS.1105": "key quota reached", "KMS.1201": "key is not disabled", "KMS.1301": "key is not enabled",
    "KMS.1401": "pending_days out of range", "KMS.1402": "key already pending deletion",
    "KMS.1501": "key not pending deletion", "KMS.1601": "invalid limit", "KMS.1602": "invalid marker",
    "KMS.1801": "invalid random_data_length", "KMS.1802": "random_data_length not a multiple of 8",
    "KMS.1901": "invalid datakey_length", "KMS.1902": "invalid key_spec",
    "KMS.1903": "datakey_length not a multiple of 8", "KMS.2001": "invalid datakey_length",
    "KMS.2101": "invalid plain_text", "KMS.2102": "invalid datakey_plain_length",
    "KMS.2103": "data key digest mismatch", "KMS.2104": "plain_text length mismatch",
    "KMS.2201": "invalid cipher_text", "KMS.2202": "invalid datakey_cipher_length",
    "KMS.2203": "cipher_text does not authenticate", "KMS.2204": "data key length mismatch",
    "KMS.2401": "invalid grant operations", "KMS.2402": "invalid principal",
    "KMS.2404": "grant limit reached", "KMS.2501": "grant does not exist",
    "KMS.2502": "grant belongs to another key", "KMS.2901": "rotation already enabled",
    "KMS.3001": "rotation_interval out of range",
}


class KmsApiError(Exception):
    """A Huawei-style error reply. The message must never contain key material."""

    def __init__(self, code: str, msg: str, status: int | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.status = status or _STATUS.get(code, 400)

    def body(self) -> dict:
        return {"error": {"error_code": self.code, "error_msg": self.msg}}


@dataclass(frozen=True)
class Caller:
    """Who is asking. ``principal`` owns the keys this caller creates; ``identities`` are what
    grants may name; ``label`` goes to the audit log and the request log."""

    principal: str
    identities: frozenset[str]
    admin: bool
    label: str


def caller_for_uid(uid: int) -> Caller:
    ids = {f"uid:{uid}"}
    try:
        ids.add(f"user:{pwd.getpwuid(uid).pw_name}")
    except KeyError:
        pass
    return Caller(principal=f"uid:{uid}", identities=frozenset(ids), admin=uid == 0, label=f"uid={uid}")


def caller_for_access_key(user_name: str, ak: str) -> Caller:
    name = user_name or ak
    return Caller(principal=f"user:{name}", identities=frozenset({f"user:{name}", f"ak:{ak}"}),
                  admin=False, label=f"ak={ak}")


def normalise_principal(p: str) -> str:
    """A grantee as given ("1000", "alice") → the identity it matches ("uid:1000", "user:alice")."""
    return f"uid:{int(p)}" if p.isdigit() else f"user:{p}"


@dataclass
class Result:
    status: int
    body: Any
    touched: list[tuple[str, str]] = field(default_factory=list)   # (key_id, grant_id) for the audit
    error_code: str = ""
    aad: str = ""           # the request's AAD (re-encrypt: the source AAD), truncated, for the audit


def request_aad(body: Any) -> str:
    """The AAD a request names, for the audit log: ``additional_authenticated_data``, or for
    re-encrypt ``source_additional_authenticated_data``; '' when absent or not a string.
    Truncated to AUDIT_AAD_MAX characters. The AAD is not secret (Huawei: "not encrypted")."""
    if not isinstance(body, dict):
        return ""
    v = body.get("additional_authenticated_data")
    if not isinstance(v, str) or not v:
        v = body.get("source_additional_authenticated_data")
    return v[:AUDIT_AAD_MAX] if isinstance(v, str) else ""


@dataclass
class _Ctx:
    caller: Caller
    touched: list[tuple[str, str]] = field(default_factory=list)

    def touch(self, key_id: str, grant_id: str = "") -> None:
        self.touched.append((key_id, grant_id))


# ---- field helpers ---------------------------------------------------------------------------

def _present(body: dict, name: str) -> bool:
    v = body.get(name)
    return v is not None and v != ""


def _str(body: dict, name: str, required: bool = False, max_len: int | None = None,
         code: str = "KMS.0308", default: str | None = None) -> str | None:
    if not _present(body, name):
        if required:
            raise KmsApiError("KMS.0204", f"{name} is required")
        return default
    v = body[name]
    if not isinstance(v, str):
        raise KmsApiError(code, f"{name} must be a string")
    if max_len is not None and len(v.encode()) > max_len:
        raise KmsApiError(code, f"{name} is longer than {max_len} bytes")
    return v


def _num(body: dict, name: str, required: bool = False, code: str = "KMS.0308",
         default: int | None = None) -> int | None:
    """A numeric field; Huawei sends digits in a string, a JSON integer is accepted too."""
    if not _present(body, name):
        if required:
            raise KmsApiError("KMS.0204", f"{name} is required")
        return default
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise KmsApiError(code, f"{name} must be a number in a string")
    if isinstance(v, str):
        if not _DIGITS_RE.match(v):
            raise KmsApiError(code, f"{name} must be a decimal number")
        v = int(v)
    elif not 0 <= v <= MAX_NUMBER:
        raise KmsApiError(code, f"{name} must be between 0 and {MAX_NUMBER}")
    return v


def _aad(body: dict, name: str = "additional_authenticated_data") -> bytes:
    v = _str(body, name, max_len=128)
    return v.encode() if v else b""


def _paging(body: dict, max_limit: int = 1000) -> tuple[int, int]:
    limit = _num(body, "limit", code="KMS.1601", default=max_limit)
    if not 1 <= limit <= max_limit:
        raise KmsApiError("KMS.1601", f"limit must be between 1 and {max_limit}")
    marker = _num(body, "marker", code="KMS.1602", default=0)
    return limit, marker


def _page(items: list, limit: int, marker: int) -> tuple[list, str, str]:
    page = items[marker:marker + limit]
    end = marker + len(page)
    truncated = end < len(items)
    return page, (str(end) if truncated else ""), ("true" if truncated else "false")


def _ms(v: int | None) -> str:
    return "" if v is None else str(v)


def _check_json(body: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not valid Unicode (JSON
    allows lone surrogates such as "\\ud800", which cannot be encoded, stored or compared)."""
    stack = [(body, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise KmsApiError("KMS.0202", f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                _check_str(k)
                stack.append((x, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str):
            _check_str(v)


def _check_str(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise KmsApiError("KMS.0202", "request body holds a string that is not valid Unicode") from None


Handler = Callable[["Kms", _Ctx, dict, dict], Any]
_ROUTES: dict[tuple[str, str], Handler] = {}


def _route(method: str, op: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _ROUTES[(method, op)] = fn
        return fn
    return deco


#: Operations served on the event loop: they only read the in-memory mirror of the store
#: (plus AES-GCM), so they never wait for an fsync. Everything else may write, and the server
#: runs it in a worker thread so that a slow commit does not stall other connections.
INLINE_OPERATIONS = frozenset({
    "create-datakey", "create-datakey-without-plaintext", "encrypt-datakey", "decrypt-datakey",
    "re-encrypt", "encrypt-data", "decrypt-data", "describe-key", "list-keys", "gen-random",
    "user-quotas", "user-instances", "list-grants", "list-retirable-grants", "get-key-rotation-status"})


class Kms:
    """All operations of one KMS instance over one Store."""

    def __init__(self, store: Store, cmk_quota: int = DEFAULT_CMK_QUOTA) -> None:
        self.store = store
        self.cmk_quota = cmk_quota

    @property
    def now(self) -> int:
        return self.store.clock()

    # ---- entry point -----------------------------------------------------------------------

    def handle(self, caller: Caller, method: str, op: str, query: dict[str, str], raw_body: bytes) -> Result:
        """Run one request. ``op`` is the path below ``/kms/`` (e.g. ``create-key``, ``<id>/tags``)."""
        ctx = _Ctx(caller)
        aad = ""
        try:
            fn, path_args = self._resolve_route(method, op)
            body = self._parse_body(raw_body)
            if method == "GET":
                body = {**query, **body}
            aad = request_aad(body)
            reply = fn(self, ctx, body, path_args)
            return Result(200, reply, ctx.touched, aad=aad)
        except KmsApiError as e:
            return Result(e.status, e.body(), ctx.touched, e.code, aad=aad)

    def audit_records(self, caller: Caller, op: str, result: Result) -> list[AuditRecord]:
        now = self.now
        outcome = "ok" if result.status == 200 else "error"
        touched = result.touched or [("", "")]
        seen = []
        for t in touched:
            if t not in seen:
                seen.append(t)
        return [AuditRecord(now, caller.label, op, kid, gid, outcome, result.status, result.error_code,
                            result.aad) for kid, gid in seen]

    @staticmethod
    def _resolve_route(method: str, op: str) -> tuple[Handler, dict]:
        fn = _ROUTES.get((method, op))
        if fn is not None:
            return fn, {}
        parts = op.split("/")
        if len(parts) >= 2 and parts[1] == "tags" and parts[0] != "":
            pattern = {2: "{key_id}/tags", 3: "{key_id}/tags/action"}.get(len(parts))
            args = {"key_id": parts[0]}
            if len(parts) == 3 and not (method == "POST" and parts[2] == "action"):
                pattern, args["tag_key"] = "{key_id}/tags/{key}", parts[2]
            fn = _ROUTES.get((method, pattern)) if pattern else None
            if fn is not None:
                return fn, args
        if len(parts) == 2 and parts[1] == "action" and method == "POST":
            return _ROUTES[("POST", "{resource_instances}/action")], {"resource_instances": parts[0]}
        if any(o == op for _, o in _ROUTES):
            raise KmsApiError("KMS.0201", f"method {method} is not allowed for {op}")
        raise KmsApiError("KMS.0201", f"unknown operation {op!r}")

    @staticmethod
    def _parse_body(raw: bytes) -> dict:
        """The JSON object of a request body: bounded size and nesting, valid Unicode."""
        if len(raw) > MAX_BODY:
            raise KmsApiError("KMS.0203", f"request body is longer than {MAX_BODY} bytes")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            # ValueError covers integers longer than Python's int_max_str_digits, too.
            raise KmsApiError("KMS.0202", "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise KmsApiError("KMS.0202", "request body must be a JSON object")
        _check_json(body)
        return body

    # ---- periodic work ---------------------------------------------------------------------

    def sweep(self) -> tuple[int, int]:
        """Destroy keys whose pending-deletion period has ended; rotate keys that are due.
        Returns (destroyed, rotated). Called periodically by the server and lazily on access."""
        destroyed = rotated = 0
        now = self.now
        for k in self.store.keys():
            if k.destroyed_ms is not None:
                continue
            if k.state == STATE_PENDING_DELETION and k.deletion_ms is not None and k.deletion_ms <= now:
                self.store.destroy_key(k.key_id)
                destroyed += 1
            elif (k.rotation_enabled and k.state == STATE_ENABLED
                  and now >= k.rotation_anchor_ms + k.rotation_interval * DAY_MS):
                self.store.rotate_key(k.key_id)
                rotated += 1
        return destroyed, rotated

    def sweep_due(self) -> bool:
        """Cheap check whether sweep() has work, so the server can skip the thread hop."""
        now = self.now
        for k in self.store.keys():
            if k.destroyed_ms is not None:
                continue
            if k.state == STATE_PENDING_DELETION and k.deletion_ms is not None and k.deletion_ms <= now:
                return True
            if (k.rotation_enabled and k.state == STATE_ENABLED
                    and now >= k.rotation_anchor_ms + k.rotation_interval * DAY_MS):
                return True
        return False

    # ---- keys: lookup, access, state -----------------------------------------------------------

    def _lookup(self, key_id: str) -> KeyRecord:
        k = self.store.get_key(key_id)
        if k is None:
            raise KmsApiError("KMS.0207", f"key {key_id} does not exist")
        if (k.destroyed_ms is None and k.state == STATE_PENDING_DELETION
                and k.deletion_ms is not None and k.deletion_ms <= self.now):
            k = self.store.destroy_key(key_id)   # the period ended since the last sweep
        if k.destroyed_ms is not None:
            raise KmsApiError("KMS.0207", f"key {key_id} was deleted; its key material was destroyed "
                                          f"at {k.destroyed_ms} (ms since epoch)")
        return k

    def _key(self, ctx: _Ctx, body: dict, op: str | None, name: str = "key_id",
             owner_only: bool = False) -> KeyRecord:
        key_id = _str(body, name, required=True)
        if not _KEY_ID_RE.match(key_id):
            raise KmsApiError("KMS.0205", f"{name} is not a valid key id")
        k = self._lookup(key_id)
        ctx.touch(k.key_id)     # before the check: refused attempts are audited with their key
        ctx.touched[-1] = (k.key_id, self._authorise(ctx.caller, k, None if owner_only else op))
        return k

    def _authorise(self, caller: Caller, k: KeyRecord, op: str | None, any_grant: bool = False) -> str:
        """'' when the caller owns the key or is root; else the id of a grant that allows ``op``."""
        if caller.admin or k.owner == caller.principal:
            return ""
        if op is not None or any_grant:
            for g in self.store.grants_for_key(k.key_id):
                if g.grantee_norm in caller.identities and (any_grant or op in g.operations):
                    return g.grant_id
        raise KmsApiError("KMS.0306", f"{caller.label} has no permission to {op or 'administer'} key {k.key_id}")

    @staticmethod
    def _usable(k: KeyRecord) -> None:
        if k.state == STATE_DISABLED:
            raise KmsApiError("KMS.0209", f"key {k.key_id} is disabled")
        if k.state == STATE_PENDING_DELETION:
            raise KmsApiError("KMS.0210", f"key {k.key_id} is pending deletion")
        if k.state != STATE_ENABLED:
            raise KmsApiError("KMS.0308", f"key {k.key_id} is not enabled (state {k.state})")

    def _check_alias(self, owner: str, alias: str) -> None:
        if not _ALIAS_RE.match(alias):
            raise KmsApiError("KMS.1101", "key_alias must be 1-255 characters of a-z A-Z 0-9 : / _ -")
        if alias.endswith("/default"):
            raise KmsApiError("KMS.1101", "aliases ending in /default are reserved for default keys")
        if self.store.alias_taken(owner, alias):
            raise KmsApiError("KMS.1104", f"alias {alias} already exists")

    def _owned(self, caller: Caller) -> list[KeyRecord]:
        return [k for k in self.store.keys()
                if k.destroyed_ms is None and (caller.admin or k.owner == caller.principal)]

    def details(self, k: KeyRecord) -> dict:
        """Huawei's KeyDetails: every value a string."""
        return {
            "key_id": k.key_id, "domain_id": k.owner, "key_alias": k.alias or "", "realm": REGION,
            "key_spec": k.key_spec, "key_usage": k.key_usage, "key_description": k.description,
            "creation_date": str(k.creation_ms), "scheduled_deletion_date": _ms(k.deletion_ms),
            "key_state": str(k.state), "default_key_flag": "1" if k.default_key else "0",
            "key_type": "1", "expiration_time": "", "origin": k.origin,
            "key_rotation_enabled": "true" if k.rotation_enabled else "false",
            "sys_enterprise_project_id": "0", "keystore_id": "0", "partition_type": "1",
        }

    def _default_key(self, caller: Caller, alias: str) -> KeyRecord:
        k = self.store.key_by_alias(caller.principal, alias)
        if k is None:
            service = alias.split("/")[0]
            k = self.store.create_key(owner=caller.principal, alias=alias, default_key=True,
                                      description=f"Default master key of {service}")
        return k

    # ---- crypto helpers -------------------------------------------------------------------------

    def _material(self, key_id: str, version: int) -> bytes:
        m = self.store.material(key_id, version)
        if m is None:
            raise KmsApiError("KMS.0207", f"key {key_id} version {version} has no key material (destroyed)")
        return m

    def _seal_datakey(self, k: KeyRecord, dek: bytes, aad: bytes) -> str:
        v = k.current_version
        return blob.seal(blob.KIND_DATAKEY, k.key_id, v, self._material(k.key_id, v), dek, aad).hex().upper()

    def _parse_datakey(self, cipher_text: str) -> tuple[bytes, blob.Header]:
        if not _HEX_RE.match(cipher_text) or len(cipher_text) % 2:
            raise KmsApiError("KMS.2201", "cipher_text is not hexadecimal")
        raw = bytes.fromhex(cipher_text)
        try:
            return raw, blob.parse(raw, blob.KIND_DATAKEY)
        except blob.BlobError as e:
            raise KmsApiError("KMS.2201", f"cipher_text is invalid: {e}") from None

    def _open_datakey(self, k: KeyRecord, raw: bytes, h: blob.Header, aad: bytes) -> bytes:
        try:
            return blob.open_(h, raw, self._material(k.key_id, h.key_version), aad)
        except blob.BlobAuthError:
            raise KmsApiError("KMS.2203", "cipher_text failed authentication: wrong key, wrong "
                                          "additional_authenticated_data, or damaged ciphertext") from None

    def _datakey_bits(self, body: dict, length_code: str) -> int:
        if _present(body, "datakey_length"):
            bits = _num(body, "datakey_length", code=length_code)
            if bits % 8:
                raise KmsApiError("KMS.1903" if length_code == "KMS.1901" else length_code,
                                  "datakey_length must be a multiple of 8")
            if not 8 <= bits <= 8192:
                raise KmsApiError(length_code, "datakey_length must be between 8 and 8192 bits")
            return bits
        spec = _str(body, "key_spec")
        if spec is None:
            return 256
        if spec not in ("AES_256", "AES_128"):
            raise KmsApiError("KMS.1902", "key_spec must be AES_128 or AES_256")
        return 256 if spec == "AES_256" else 128


# =============================== key management =================================================

@_route("POST", "create-key")
def _create_key(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    owner = ctx.caller.principal
    alias = _str(body, "key_alias", required=True, code="KMS.1101")
    description = _str(body, "key_description", code="KMS.1103", default="")
    if len(description) > 255:
        raise KmsApiError("KMS.1103", "key_description is longer than 255 characters")
    spec = _str(body, "key_spec", default="AES_256")
    if spec != "AES_256":
        raise KmsApiError("KMS.0308", f"key_spec {spec} is not supported here (only AES_256)"
                          if spec in KEY_SPECS else "key_spec is invalid")
    usage = _str(body, "key_usage", default="ENCRYPT_DECRYPT")
    if usage != "ENCRYPT_DECRYPT":
        raise KmsApiError("KMS.0308", "key_usage must be ENCRYPT_DECRYPT for symmetric keys")
    origin = _str(body, "origin", default="kms")
    if origin != "kms":
        raise KmsApiError("KMS.0308", "origin must be kms (imported key material is not supported)")
    self._check_alias(owner, alias)
    mine = sum(1 for k in self.store.keys() if k.owner == owner and not k.default_key and k.destroyed_ms is None)
    if mine >= self.cmk_quota:
        raise KmsApiError("KMS.1105", f"the number of keys reached the quota of {self.cmk_quota}")
    k = self.store.create_key(owner=owner, alias=alias, description=description)
    ctx.touch(k.key_id)
    return {"key_info": {"key_id": k.key_id, "domain_id": k.owner, "region_id": REGION}}


@_route("POST", "describe-key")
def _describe_key(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    return {"key_info": self.details(self._key(ctx, body, "describe-key"))}


@_route("POST", "x-encfs-resolve-key")
def _resolve_key(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    """Extension: an alias or key id → KeyDetails; a default alias creates its key on first use."""
    ref = _str(body, "key", required=True)
    if _KEY_ID_RE.match(ref):
        k = self._lookup(ref)
        ctx.touch(k.key_id)
        ctx.touched[-1] = (k.key_id, self._authorise(ctx.caller, k, None, any_grant=True))
    else:
        k = self.store.key_by_alias(ctx.caller.principal, ref)
        if k is None and ref in DEFAULT_ALIASES:
            k = self._default_key(ctx.caller, ref)
        if k is None or k.destroyed_ms is not None:
            raise KmsApiError("KMS.0207", f"no key has the alias {ref}")
        k = self._lookup(k.key_id)
        ctx.touch(k.key_id)
    return {"key_info": self.details(k)}


@_route("POST", "list-keys")
def _list_keys(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    limit, marker = _paging(body)
    state = _str(body, "key_state")
    if state is not None and state not in ("1", "2", "3", "4", "5"):
        raise KmsApiError("KMS.0308", "key_state must be 1-5")
    spec = _str(body, "key_spec", default="AES_256")
    if spec != "ALL" and spec not in KEY_SPECS:
        raise KmsApiError("KMS.0308", "key_spec is invalid")
    keys = [k for k in self._owned(ctx.caller)
            if (state is None or str(k.state) == state) and (spec == "ALL" or k.key_spec == spec)]
    page, next_marker, truncated = _page(keys, limit, marker)
    return {"keys": [k.key_id for k in page], "key_details": [self.details(k) for k in page],
            "next_marker": next_marker, "truncated": truncated, "total": len(keys)}


@_route("POST", "enable-key")
def _enable_key(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if k.state == STATE_PENDING_DELETION:
        raise KmsApiError("KMS.0210", f"key {k.key_id} is pending deletion; cancel the deletion first")
    if k.state != STATE_DISABLED:
        raise KmsApiError("KMS.1201", f"key {k.key_id} is not disabled")
    k = self.store.update_key(k.key_id, state=STATE_ENABLED)
    return {"key_info": {"key_id": k.key_id, "key_state": str(k.state)}}


@_route("POST", "disable-key")
def _disable_key(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if k.default_key:
        raise KmsApiError("KMS.0211", f"default key {k.alias} cannot be disabled")
    if k.state == STATE_PENDING_DELETION:
        raise KmsApiError("KMS.0210", f"key {k.key_id} is pending deletion")
    if k.state != STATE_ENABLED:
        raise KmsApiError("KMS.1301", f"key {k.key_id} is not enabled")
    k = self.store.update_key(k.key_id, state=STATE_DISABLED)
    return {"key_info": {"key_id": k.key_id, "key_state": str(k.state)}}


@_route("POST", "schedule-key-deletion")
def _schedule_deletion(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    days = _num(body, "pending_days", required=True, code="KMS.1401")
    if not 7 <= days <= 1096:
        raise KmsApiError("KMS.1401", "pending_days must be between 7 and 1096")
    if k.default_key:
        raise KmsApiError("KMS.0211", f"default key {k.alias} cannot be deleted")
    if k.state == STATE_PENDING_DELETION:
        raise KmsApiError("KMS.1402", f"key {k.key_id} is already pending deletion")
    k = self.store.update_key(k.key_id, state=STATE_PENDING_DELETION, deletion_ms=self.now + days * DAY_MS)
    return {"key_id": k.key_id, "key_state": str(k.state)}


@_route("POST", "cancel-key-deletion")
def _cancel_deletion(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if k.state != STATE_PENDING_DELETION:
        raise KmsApiError("KMS.1501", f"key {k.key_id} is not pending deletion")
    # Huawei returns a cancelled key as disabled: the owner re-enables it on purpose.
    k = self.store.update_key(k.key_id, state=STATE_DISABLED, deletion_ms=None)
    return {"key_id": k.key_id, "key_state": str(k.state)}


@_route("POST", "update-key-alias")
def _update_alias(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    alias = _str(body, "key_alias", required=True, code="KMS.1101")
    if k.default_key:
        raise KmsApiError("KMS.0211", "the alias of a default key cannot be changed")
    if alias != k.alias:
        self._check_alias(k.owner, alias)
        k = self.store.update_key(k.key_id, alias=alias)
    return {"key_info": {"key_id": k.key_id, "key_alias": k.alias}}


@_route("POST", "update-key-description")
def _update_description(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if "key_description" not in body or body["key_description"] is None:
        raise KmsApiError("KMS.0204", "key_description is required")
    d = _str(body, "key_description", code="KMS.1103", default="")
    if len(d) > 255:
        raise KmsApiError("KMS.1103", "key_description is longer than 255 characters")
    k = self.store.update_key(k.key_id, description=d)
    return {"key_info": {"key_id": k.key_id, "key_description": k.description}}


@_route("GET", "user-quotas")
def _user_quotas(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    mine = [k for k in self._owned(ctx.caller) if k.owner == ctx.caller.principal]
    used = sum(1 for k in mine if not k.default_key)
    grants = max((len(self.store.grants_for_key(k.key_id)) for k in mine), default=0)
    return {"quotas": {"resources": [{"type": "CMK", "used": used, "quota": self.cmk_quota},
                                     {"type": "grant_per_CMK", "used": grants, "quota": GRANTS_PER_CMK}]}}


@_route("GET", "user-instances")
def _user_instances(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    mine = [k for k in self._owned(ctx.caller) if k.owner == ctx.caller.principal and not k.default_key]
    return {"instance_num": len(mine)}


# =============================== data keys ======================================================

@_route("POST", "create-datakey")
def _create_datakey(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "create-datakey")
    bits = self._datakey_bits(body, "KMS.1901")
    aad = _aad(body)
    self._usable(k)
    dek = secrets.token_bytes(bits // 8)
    return {"key_id": k.key_id, "plain_text": dek.hex().upper(), "cipher_text": self._seal_datakey(k, dek, aad)}


@_route("POST", "create-datakey-without-plaintext")
def _create_datakey_np(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "create-datakey-without-plaintext")
    bits = self._datakey_bits(body, "KMS.2001")
    aad = _aad(body)
    self._usable(k)
    dek = secrets.token_bytes(bits // 8)
    return {"key_id": k.key_id, "cipher_text": self._seal_datakey(k, dek, aad)}


@_route("POST", "encrypt-datakey")
def _encrypt_datakey(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "encrypt-datakey")
    plain = _str(body, "plain_text", required=True, code="KMS.2101")
    n = _num(body, "datakey_plain_length", required=True, code="KMS.2102")
    if not 1 <= n <= 1024:
        raise KmsApiError("KMS.2102", "datakey_plain_length must be between 1 and 1024 bytes")
    if not _HEX_RE.match(plain) or len(plain) % 2:
        raise KmsApiError("KMS.2101", "plain_text must be hexadecimal: DEK followed by its SHA-256")
    raw = bytes.fromhex(plain)
    if len(raw) != n + 32:
        raise KmsApiError("KMS.2104", "plain_text length does not match datakey_plain_length + 32-byte SHA-256")
    dek, digest = raw[:n], raw[n:]
    if not hmac.compare_digest(hashlib.sha256(dek).digest(), digest):
        raise KmsApiError("KMS.2103", "the SHA-256 digest in plain_text does not match the data key")
    aad = _aad(body)
    self._usable(k)
    return {"key_id": k.key_id, "cipher_text": self._seal_datakey(k, dek, aad), "datakey_length": str(n)}


@_route("POST", "decrypt-datakey")
def _decrypt_datakey(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "decrypt-datakey")
    ct = _str(body, "cipher_text", required=True, code="KMS.2201")
    n = _num(body, "datakey_cipher_length", required=True, code="KMS.2202")
    if not 1 <= n <= 1024:
        raise KmsApiError("KMS.2202", "datakey_cipher_length must be between 1 and 1024 bytes")
    aad = _aad(body)
    raw, h = self._parse_datakey(ct)
    if h.key_id != k.key_id:
        raise KmsApiError("KMS.2201", f"cipher_text was not made with key {k.key_id}")
    self._usable(k)
    dek = self._open_datakey(k, raw, h, aad)
    if len(dek) != n:
        raise KmsApiError("KMS.2204", f"datakey_cipher_length {n} does not match the data key length")
    return {"data_key": dek.hex().upper(), "datakey_length": str(len(dek)),
            "datakey_dgst": hashlib.sha256(dek).hexdigest().upper()}


@_route("POST", "re-encrypt")
def _re_encrypt(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    ct = _str(body, "cipher_text", required=True, code="KMS.2201")
    _str(body, "destination_key_id", required=True)
    for name in ("source_encryption_algorithm", "destination_encryption_algorithm"):
        alg = _str(body, name, default="SYMMETRIC_DEFAULT")
        if alg != "SYMMETRIC_DEFAULT":
            raise KmsApiError("KMS.0308", f"{name} must be SYMMETRIC_DEFAULT")
    raw, h = self._parse_datakey(ct)
    if _present(body, "source_key_id") and _str(body, "source_key_id") != h.key_id:
        raise KmsApiError("KMS.2201", "cipher_text was not made with source_key_id")
    src = self._key(ctx, {"key_id": h.key_id}, "decrypt-datakey")
    dst = self._key(ctx, body, "encrypt-datakey", name="destination_key_id")
    self._usable(src)
    self._usable(dst)
    dek = self._open_datakey(src, raw, h, _aad(body, "source_additional_authenticated_data"))
    n = _num(body, "datakey_cipher_length", code="KMS.2202")
    if n is not None and n != len(dek):
        raise KmsApiError("KMS.2204", f"datakey_cipher_length {n} does not match the data key length")
    out = self._seal_datakey(dst, dek, _aad(body, "destination_additional_authenticated_data"))
    return {"key_id": dst.key_id, "source_key_id": src.key_id, "cipher_text": out,
            "source_encryption_algorithm": "SYMMETRIC_DEFAULT",
            "destination_encryption_algorithm": "SYMMETRIC_DEFAULT"}


# =============================== data ===========================================================

@_route("POST", "encrypt-data")
def _encrypt_data(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "encrypt-data")
    text = _str(body, "plain_text", required=True)
    data = text.encode()
    if not 1 <= len(data) <= 4096:
        raise KmsApiError("KMS.0308", "plain_text must be 1-4096 bytes")
    if _str(body, "encryption_algorithm", default="SYMMETRIC_DEFAULT") != "SYMMETRIC_DEFAULT":
        raise KmsApiError("KMS.0308", "encryption_algorithm must be SYMMETRIC_DEFAULT for symmetric keys")
    aad = _aad(body)
    self._usable(k)
    v = k.current_version
    out = blob.seal(blob.KIND_DATA, k.key_id, v, self._material(k.key_id, v), data, aad)
    return {"key_id": k.key_id, "cipher_text": base64.b64encode(out).decode()}


@_route("POST", "decrypt-data")
def _decrypt_data(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    ct = _str(body, "cipher_text", required=True)
    if _str(body, "encryption_algorithm", default="SYMMETRIC_DEFAULT") != "SYMMETRIC_DEFAULT":
        raise KmsApiError("KMS.0308", "encryption_algorithm must be SYMMETRIC_DEFAULT for symmetric keys")
    try:
        raw = base64.b64decode(ct, validate=True)
        h = blob.parse(raw, blob.KIND_DATA)
    except (binascii.Error, ValueError) as e:
        raise KmsApiError("KMS.0308", f"cipher_text is invalid: {e}") from None
    if _present(body, "key_id") and _str(body, "key_id") != h.key_id:
        raise KmsApiError("KMS.0308", "cipher_text was not made with key_id")
    k = self._key(ctx, {"key_id": h.key_id}, "decrypt-data")
    aad = _aad(body)
    self._usable(k)
    try:
        data = blob.open_(h, raw, self._material(k.key_id, h.key_version), aad)
    except blob.BlobAuthError:
        raise KmsApiError("KMS.0308", "cipher_text failed authentication: wrong "
                                      "additional_authenticated_data or damaged ciphertext") from None
    return {"key_id": k.key_id, "plain_text": data.decode(errors="replace"),
            "plain_text_base64": base64.b64encode(data).decode()}


@_route("POST", "gen-random")
def _gen_random(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    bits = _num(body, "random_data_length", required=True, code="KMS.1801")
    if bits % 8:
        raise KmsApiError("KMS.1802", "random_data_length must be a multiple of 8")
    if not 8 <= bits <= 8192:
        raise KmsApiError("KMS.1801", "random_data_length must be between 8 and 8192 bits")
    return {"random_data": secrets.token_bytes(bits // 8).hex().upper()}


# =============================== grants =========================================================

def _grant_json(g: GrantRecord) -> dict:
    return {"key_id": g.key_id, "grant_id": g.grant_id, "grantee_principal": g.grantee,
            "grantee_principal_type": g.grantee_type, "operations": list(g.operations),
            "issuing_principal": g.issuer, "creation_date": str(g.creation_ms), "name": g.name,
            "retiring_principal": g.retiring}


@_route("POST", "create-grant")
def _create_grant(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "create-grant")
    grantee = _str(body, "grantee_principal", required=True, code="KMS.2402")
    if not _PRINCIPAL_RE.match(grantee):
        raise KmsApiError("KMS.2402", "grantee_principal must be 1-64 characters of a-z A-Z 0-9 . _ -")
    ops = body.get("operations")
    if ops is None or ops == []:
        raise KmsApiError("KMS.0204", "operations is required")
    if not isinstance(ops, list) or not all(isinstance(o, str) and o in GRANT_OPERATIONS for o in ops):
        raise KmsApiError("KMS.2401", f"operations must be a list of: {', '.join(GRANT_OPERATIONS)}")
    if set(ops) == {"create-grant"}:
        raise KmsApiError("KMS.2401", "operations cannot be only create-grant")
    ptype = _str(body, "grantee_principal_type", default="user")
    if ptype not in ("user", "domain"):
        raise KmsApiError("KMS.0308", "grantee_principal_type must be user or domain")
    name = _str(body, "name", default="")
    if name and not _ALIAS_RE.match(name):
        raise KmsApiError("KMS.0308", "name must be 1-255 characters of a-z A-Z 0-9 : / _ -")
    retiring = _str(body, "retiring_principal", default="")
    if retiring and not _PRINCIPAL_RE.match(retiring):
        raise KmsApiError("KMS.2402", "retiring_principal is invalid")
    grant_used = ctx.touched[-1][1]
    if grant_used:
        # A grantee allowed to create grants may pass on only what it was given.
        mine = self.store.get_grant(grant_used)
        if mine is not None and not set(ops) <= set(mine.operations):
            raise KmsApiError("KMS.0306", "a grant cannot give more operations than the granter holds")
    if len(self.store.grants_for_key(k.key_id)) >= GRANTS_PER_CMK:
        raise KmsApiError("KMS.2404", f"key {k.key_id} already has {GRANTS_PER_CMK} grants")
    g = GrantRecord(grant_id=secrets.token_hex(32), key_id=k.key_id, grantee=grantee, grantee_type=ptype,
                    grantee_norm=normalise_principal(grantee), operations=tuple(dict.fromkeys(ops)),
                    name=name, retiring=retiring, retiring_norm=normalise_principal(retiring) if retiring else "",
                    issuer=ctx.caller.principal, creation_ms=self.now)
    self.store.add_grant(g)
    ctx.touched[-1] = (k.key_id, g.grant_id)
    return {"grant_id": g.grant_id}


@_route("POST", "list-grants")
def _list_grants(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    limit, marker = _paging(body, 100)
    grants = self.store.grants_for_key(k.key_id)
    page, next_marker, truncated = _page(grants, limit, marker)
    return {"grants": [_grant_json(g) for g in page], "next_marker": next_marker,
            "truncated": truncated, "total": len(grants)}


@_route("POST", "list-retirable-grants")
def _list_retirable(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    limit, marker = _paging(body, 100)
    grants = [g for g in self.store.all_grants() if g.retiring_norm and g.retiring_norm in ctx.caller.identities]
    page, next_marker, truncated = _page(grants, limit, marker)
    return {"grants": [_grant_json(g) for g in page], "next_marker": next_marker,
            "truncated": truncated, "total": len(grants)}


def _grant_of(self: Kms, body: dict, key_id: str) -> GrantRecord:
    gid = _str(body, "grant_id", required=True)
    if not _GRANT_ID_RE.match(gid):
        raise KmsApiError("KMS.0308", "grant_id must be 64 hexadecimal characters")
    g = self.store.get_grant(gid.lower())
    if g is None:
        raise KmsApiError("KMS.2501", f"grant {gid} does not exist")
    if g.key_id != key_id:
        raise KmsApiError("KMS.2502", f"grant {gid} does not belong to key {key_id}")
    return g


@_route("POST", "revoke-grant")
def _revoke_grant(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    g = _grant_of(self, body, k.key_id)
    self.store.delete_grant(g.grant_id)
    ctx.touched[-1] = (k.key_id, g.grant_id)
    return {}


@_route("POST", "retire-grant")
def _retire_grant(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    key_id = _str(body, "key_id", required=True)
    if not _KEY_ID_RE.match(key_id):
        raise KmsApiError("KMS.0205", "key_id is not a valid key id")
    k = self._lookup(key_id)
    g = _grant_of(self, body, k.key_id)
    c = ctx.caller
    allowed = (c.admin or k.owner == c.principal or (g.retiring_norm and g.retiring_norm in c.identities)
               or (g.grantee_norm in c.identities and "retire-grant" in g.operations))
    ctx.touch(k.key_id, g.grant_id)
    if not allowed:
        raise KmsApiError("KMS.0306", f"{c.label} may not retire grant {g.grant_id}")
    self.store.delete_grant(g.grant_id)
    return {}


# =============================== rotation =======================================================

def _rotatable(k: KeyRecord) -> None:
    if k.origin != "kms":
        raise KmsApiError("KMS.0312", "keys with imported material cannot be rotated")
    Kms._usable(k)


@_route("POST", "enable-key-rotation")
def _enable_rotation(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    _rotatable(k)
    if k.rotation_enabled:
        raise KmsApiError("KMS.2901", f"rotation of key {k.key_id} is already enabled")
    self.store.update_key(k.key_id, rotation_enabled=True, rotation_anchor_ms=self.now)
    return {}


@_route("POST", "disable-key-rotation")
def _disable_rotation(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if not k.rotation_enabled:
        raise KmsApiError("KMS.0313", f"rotation of key {k.key_id} is not enabled")
    self.store.update_key(k.key_id, rotation_enabled=False)
    return {}


@_route("POST", "update-key-rotation-interval")
def _rotation_interval(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    days = _num(body, "rotation_interval", required=True, code="KMS.3001")
    if not 30 <= days <= 365:
        raise KmsApiError("KMS.3001", "rotation_interval must be between 30 and 365 days")
    if not k.rotation_enabled:
        raise KmsApiError("KMS.0313", f"rotation of key {k.key_id} is not enabled")
    self.store.update_key(k.key_id, rotation_interval=days)
    return {}


@_route("POST", "get-key-rotation-status")
def _rotation_status(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    materials = [{"material_id": str(v.version), "charge_id": "", "create_time": str(v.creation_ms),
                  "expiration_time": "", "state": 2} for v in self.store.versions(k.key_id)]
    return {"key_rotation_enabled": k.rotation_enabled, "rotation_interval": k.rotation_interval,
            "last_rotation_time": _ms(k.last_rotation_ms), "number_of_rotations": k.rotations,
            "key_materials": materials}


@_route("POST", "rotate-on-demand")
def _rotate_on_demand(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    _rotatable(k)
    self.store.rotate_key(k.key_id)
    return {"key_id": k.key_id}


# =============================== aliases ========================================================

def _alias_json(self: Kms, a) -> dict:
    return {"domain_id": a.owner, "key_id": a.key_id, "alias": a.alias,
            "alias_urn": f"kms:{REGION}:{a.owner}:alias:{a.alias}",
            "create_time": str(a.create_ms), "update_time": str(a.update_ms)}


@_route("POST", "aliases")
def _create_alias(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    alias = _str(body, "alias", required=True, code="KMS.1101")
    self._check_alias(k.owner, alias)
    return _alias_json(self, self.store.put_alias(k.owner, alias, k.key_id))


@_route("GET", "aliases")
def _list_aliases(self: Kms, ctx: _Ctx, body: dict, _: dict) -> list:
    limit, marker = _paging(body, 100)
    key_id = _str(body, "key_id")
    owned = {k.key_id for k in self._owned(ctx.caller)}
    items = [a for a in self.store.aliases() if a.key_id in owned and (key_id is None or a.key_id == key_id)]
    page, next_marker, _t = _page(items, limit, marker)
    # The SDK's model for this call is a top-level JSON array of pages.
    return [{"aliases": [_alias_json(self, a) for a in page],
             "page_info": {"next_marker": next_marker, "current_count": len(page)}}]


@_route("DELETE", "aliases")
def _delete_aliases(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    names = body.get("aliases")
    if not names:
        raise KmsApiError("KMS.0204", "aliases is required")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise KmsApiError("KMS.0308", "aliases must be a list of strings")
    for n in names:
        a = self.store.key_by_alias(k.owner, n)
        if a is None or a.key_id != k.key_id or k.alias == n:
            raise KmsApiError("KMS.0308", f"alias {n} is not an alias of key {k.key_id}")
    self.store.delete_aliases(k.owner, names)
    return {}


@_route("POST", "alias/associate")
def _associate_alias(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    alias = _str(body, "alias", required=True, code="KMS.1101")
    k = self._key(ctx, body, None, name="target_key_id", owner_only=True)
    if (k.owner, alias) not in {(a.owner, a.alias) for a in self.store.aliases()}:
        raise KmsApiError("KMS.0308", f"alias {alias} does not exist")
    return _alias_json(self, self.store.put_alias(k.owner, alias, k.key_id))


# =============================== tags ===========================================================

def _tag_item(body: Any) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise KmsApiError("KMS.0308", "tag must be an object with key and value")
    key, value = body.get("key"), body.get("value", "")
    if not isinstance(key, str) or not 1 <= len(key) <= 36:
        raise KmsApiError("KMS.0401", "tag key must be 1-36 characters")
    if not isinstance(value, str) or len(value) > 43:
        raise KmsApiError("KMS.0403", "tag value must be 0-43 characters")
    return key, value


def _tag_key(self: Kms, ctx: _Ctx, args: dict) -> KeyRecord:
    return self._key(ctx, {"key_id": args["key_id"]}, None, owner_only=True)


@_route("POST", "{key_id}/tags")
def _add_tag(self: Kms, ctx: _Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    if "tag" not in body:
        raise KmsApiError("KMS.0204", "tag is required")
    key, value = _tag_item(body["tag"])
    existing = dict(self.store.tags(k.key_id))
    if key not in existing and len(existing) >= 20:
        raise KmsApiError("KMS.0409", "a key has at most 20 tags")
    self.store.set_tags(k.key_id, put=[(key, value)])
    return {}


@_route("POST", "{key_id}/tags/action")
def _tags_action(self: Kms, ctx: _Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    action = _str(body, "action", required=True)
    items = body.get("tags")
    if not isinstance(items, list):
        raise KmsApiError("KMS.0204", "tags is required")
    tags = [_tag_item(t) for t in items]
    if action == "create":
        existing = dict(self.store.tags(k.key_id))
        if len(set(existing) | {t for t, _ in tags}) > 20:
            raise KmsApiError("KMS.0409", "a key has at most 20 tags")
        self.store.set_tags(k.key_id, put=tags)
    elif action == "delete":
        self.store.set_tags(k.key_id, delete=[t for t, _ in tags])
    else:
        raise KmsApiError("KMS.0308", "action must be create or delete")
    return {}


@_route("DELETE", "{key_id}/tags/{key}")
def _delete_tag(self: Kms, ctx: _Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    if args["tag_key"] not in dict(self.store.tags(k.key_id)):
        raise KmsApiError("KMS.0416", f"tag {args['tag_key']} does not exist")
    self.store.set_tags(k.key_id, delete=[args["tag_key"]])
    return {}


@_route("GET", "{key_id}/tags")
def _key_tags(self: Kms, ctx: _Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    tags = self.store.tags(k.key_id)
    return {"tags": [{"key": t, "value": v} for t, v in tags], "existTagsNum": len(tags)}


@_route("GET", "tags")
def _project_tags(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    owned = {k.key_id for k in self._owned(ctx.caller)}
    merged: dict[str, list[str]] = {}
    for key_id, tags in self.store.all_tags().items():
        if key_id in owned:
            for t, v in tags:
                if v not in merged.setdefault(t, []):
                    merged[t].append(v)
    return {"tags": [{"key": t, "values": sorted(vs)} for t, vs in sorted(merged.items())]}


@_route("POST", "{resource_instances}/action")
def _filter_by_tags(self: Kms, ctx: _Ctx, body: dict, args: dict) -> dict:
    if args["resource_instances"] != "resource_instances":
        raise KmsApiError("KMS.0201", f"unknown operation {args['resource_instances']}/action")
    action = _str(body, "action", required=True)
    if action not in ("filter", "count"):
        raise KmsApiError("KMS.0308", "action must be filter or count")
    limit = _num(body, "limit", code="KMS.1601", default=1000)
    offset = _num(body, "offset", code="KMS.1602", default=0)
    wanted = body.get("tags") or []
    matches = body.get("matches") or []
    if not isinstance(wanted, list) or not isinstance(matches, list):
        raise KmsApiError("KMS.0308", "tags and matches must be lists")
    for w in wanted:
        if (not isinstance(w, dict) or not isinstance(w.get("key"), str)
                or not isinstance(w.get("values") or [], list)
                or not all(isinstance(x, str) for x in w.get("values") or [])):
            raise KmsApiError("KMS.0308", "tags must be a list of {\"key\": string, \"values\": [string]}")
    for m in matches:
        if not isinstance(m, dict) or not isinstance(m.get("key"), str) or not isinstance(m.get("value", ""), str):
            raise KmsApiError("KMS.0308", "matches must be a list of {\"key\": string, \"value\": string}")
    all_tags = self.store.all_tags()
    out = []
    for k in self._owned(ctx.caller):
        tags = dict(all_tags.get(k.key_id, []))
        ok = all(w["key"] in tags and (not w.get("values") or tags[w["key"]] in w["values"]) for w in wanted)
        for m in matches:
            if m["key"] == "resource_name" and m.get("value"):
                ok = ok and m["value"] in (k.alias or "")
        if ok:
            out.append(k)
    if action == "count":
        return {"total_count": len(out)}
    page = out[offset:offset + limit]
    return {"resources": [{"resource_id": k.key_id, "resource_detail": self.details(k),
                           "resource_name": k.alias or "",
                           "tags": [{"key": t, "value": v} for t, v in all_tags.get(k.key_id, [])]}
                          for k in page], "total_count": len(out)}


# =============================== audit (extension) ===============================================

@_route("POST", "x-encfs-list-audit")
def _list_audit(self: Kms, ctx: _Ctx, body: dict, _: dict) -> dict:
    """Extension: audit records, newest last. Root sees all; others their own requests and keys.
    ``aad`` filters on the request's additional_authenticated_data (encfs: the file id)."""
    key_id = _str(body, "key_id")
    aad = _str(body, "aad", max_len=AUDIT_AAD_MAX * 4)
    since = _num(body, "since", default=None)
    limit = _num(body, "limit", code="KMS.1601", default=1000)
    if not 1 <= limit <= 100000:
        raise KmsApiError("KMS.1601", "limit must be between 1 and 100000")
    c = ctx.caller
    scope = {} if c.admin else {"callers": [c.label],
                                "key_ids": [k.key_id for k in self.store.keys() if k.owner == c.principal]}
    rows = self.store.query_audit(key_id=key_id, since_ms=since, limit=limit,
                                  aad=aad[:AUDIT_AAD_MAX] if aad else None, **scope)
    return {"records": [{"time": str(r.time_ms), "caller": r.caller, "operation": r.operation,
                         "key_id": r.key_id, "grant_id": r.grant_id, "outcome": r.outcome,
                         "status": str(r.status), "error_code": r.error_code, "aad": r.aad} for r in rows],
            "total": len(rows)}
