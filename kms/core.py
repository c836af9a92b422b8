"""The KMS service object and what every handler shares: callers, the route table, key lookup,
authorisation, key states, and the CMK's material. No sockets and no HTTP.

The server hands in the caller, the method, the path below ``/v1.0/{project_id}/kms/`` and the
raw body, and gets back a status and a JSON-able body. Handlers live in ``kms.ops.*`` by concern
and register themselves with ``route``; ``kms.api`` imports them all.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import blob, material
from .errors import KmsApiError
from .material import Spec
from .store import (STATE_DISABLED, STATE_ENABLED, STATE_PENDING_DELETION, STATE_PENDING_IMPORT, AuditRecord,
                    KeyRecord, Store, StoreError)
from .validate import (ALIAS_RE, HEX_RE, KEY_ID_RE, check_fields, get_num, get_str, ms_str, parse_body,
                       present, request_aad)

REGION = "local"
DEFAULT_CMK_QUOTA = 1000
GRANTS_PER_CMK = 100
DAY_MS = 86_400_000

DEFAULT_ALIASES = ("obs/default", "evs/default", "ims/default", "vbs/default", "sfs/default", "kps/default",
                   "csms/default", "rds/default", "dds/default", "dlf/default", "elb/default", "mkp/default",
                   "coc/default", "cce/default")

#: Huawei's key_spec enum of create-key (some refused: material.REFUSED_SPECS).
KEY_SPECS = ("AES_256", "SM4", "RSA_2048", "RSA_3072", "RSA_4096", "EC_P256", "EC_P384", "SECP256K1", "SM2",
             "ED25519", "HMAC_256", "HMAC_384", "HMAC_512", "HMAC_SM3")

#: Data-key specs of create-datakey → bits.
DATAKEY_SPECS = {"AES_256": 256, "AES_128": 128, "SM4": 128, "HMAC_256": 256, "HMAC_384": 384, "HMAC_512": 512,
                 "HMAC_SM3": 256}

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


@dataclass
class Ctx:
    caller: Caller
    touched: list[tuple[str, str]] = field(default_factory=list)

    def touch(self, key_id: str, grant_id: str = "") -> None:
        self.touched.append((key_id, grant_id))



Handler = Callable[["Kms", Ctx, dict, dict], Any]
ROUTES: dict[tuple[str, str], Handler] = {}
#: The body fields (GET: query parameters) each route takes; others are refused.
FIELDS: dict[tuple[str, str], frozenset[str]] = {}


def route(method: str, op: str, fields: Iterable[str] = ()) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        ROUTES[(method, op)] = fn
        FIELDS[(method, op)] = frozenset(fields)
        return fn
    return deco



#: Operations served on the event loop: they only read the in-memory mirror of the store
#: (plus symmetric crypto or a cheap public-key operation), so they never wait for an fsync or
#: for a key generation. Everything else may write or be slow (RSA signing, key-pair
#: generation), and the server runs it in a worker thread so that other connections go on.
INLINE_OPERATIONS = frozenset({
    "create-datakey", "create-datakey-without-plaintext", "encrypt-datakey", "decrypt-datakey",
    "re-encrypt", "encrypt-data", "decrypt-data", "describe-key", "list-keys", "gen-random",
    "user-quotas", "user-instances", "list-grants", "list-retirable-grants", "get-key-rotation-status",
    "verify", "get-publickey", "generate-mac", "verify-mac"})


#: Slow operations that only read the in-memory mirror (private-key work): a worker thread, but
#: with ``kms serve --workers`` not the cross-process write lock, so they run in every worker at once.
THREADED_READ_OPERATIONS = frozenset({"sign", "create-rsa-datakey-pair", "create-ec-datakey-pair"})


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
        ctx = Ctx(caller)
        aad = ""
        try:
            fn, pattern, path_args = self._resolve_route(method, op)
            body = parse_body(raw_body)
            if method == "GET":
                body = {**query, **body}
            aad = request_aad(body)
            check_fields(body, FIELDS[pattern])
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
    def _resolve_route(method: str, op: str) -> tuple[Handler, tuple[str, str], dict]:
        fn = ROUTES.get((method, op))
        if fn is not None:
            return fn, (method, op), {}
        parts = op.split("/")
        if len(parts) >= 2 and parts[1] == "tags" and parts[0] != "":
            pattern = {2: "{key_id}/tags", 3: "{key_id}/tags/action"}.get(len(parts))
            args = {"key_id": parts[0]}
            if len(parts) == 3 and not (method == "POST" and parts[2] == "action"):
                pattern, args["tag_key"] = "{key_id}/tags/{key}", parts[2]
            fn = ROUTES.get((method, pattern)) if pattern else None
            if fn is not None:
                return fn, (method, pattern), args
        if len(parts) == 2 and parts[1] == "action" and method == "POST":
            pattern = ("POST", "{resource_instances}/action")
            return ROUTES[pattern], pattern, {"resource_instances": parts[0]}
        if any(o == op for _, o in ROUTES):
            raise KmsApiError("KMS.0201", f"method {method} is not allowed for {op}")
        raise KmsApiError("KMS.0201", f"unknown operation {op!r}")

    # ---- periodic work ---------------------------------------------------------------------

    def _due(self, k: KeyRecord, now: int) -> str:
        """What the sweep has to do with ``k``: "destroy", "rotate", "expire" or ""."""
        if k.destroyed_ms is not None:
            return ""
        if k.state == STATE_PENDING_DELETION and k.deletion_ms is not None and k.deletion_ms <= now:
            return "destroy"
        if k.expiration_ms is not None and k.expiration_ms <= now and k.state != STATE_PENDING_IMPORT:
            return "expire"
        if (k.rotation_enabled and k.state == STATE_ENABLED
                and now >= k.rotation_anchor_ms + k.rotation_interval * DAY_MS):
            return "rotate"
        return ""

    def sweep(self) -> tuple[int, int]:
        """Destroy keys whose pending-deletion period has ended; delete imported material that
        expired; rotate keys that are due. Returns (destroyed, rotated). Called periodically by
        the server, in a worker thread: it writes."""
        destroyed = rotated = 0
        now = self.now
        for k in self.store.keys():
            due = self._due(k, now)
            if due in ("destroy", "expire"):
                self._forget_parsed(k)
            if due == "destroy":
                self.store.destroy_key(k.key_id)
                destroyed += 1
            elif due == "expire":
                self.store.delete_material(k.key_id)
            elif due == "rotate":
                self.store.rotate_key(k.key_id, material.generate(self.spec(k)))
                rotated += 1
        return destroyed, rotated

    def _forget_parsed(self, k: KeyRecord) -> None:
        """Drop the parsed private-key objects of ``k`` before its material goes."""
        for v in self.store.versions(k.key_id):
            try:
                material.forget(self.store.material(k.key_id, v.version))
            except StoreError:
                pass

    def sweep_due(self) -> bool:
        """Cheap check whether sweep() has work, so the server can skip the thread hop."""
        now = self.now
        return any(self._due(k, now) for k in self.store.keys())

    # ---- keys: lookup, access, state -----------------------------------------------------------

    def _lookup(self, key_id: str) -> KeyRecord:
        """The key, refused when unknown or destroyed. A key whose deletion period ended since the
        last sweep is answered as destroyed at once, but destroyed by the sweep: this runs on the
        event loop for the hot operations, and must not write (docs/KMS.md)."""
        k = self.store.get_key(key_id)
        if k is None:
            raise KmsApiError("KMS.0207", f"key {key_id} does not exist")
        if k.destroyed_ms is not None:
            raise KmsApiError("KMS.0207", f"key {key_id} was deleted; its key material was destroyed "
                                          f"at {k.destroyed_ms} (ms since epoch)")
        if k.state == STATE_PENDING_DELETION and k.deletion_ms is not None and k.deletion_ms <= self.now:
            raise KmsApiError("KMS.0207", f"key {key_id} was deleted at {k.deletion_ms} (ms since epoch)")
        return k

    def _key(self, ctx: Ctx, body: dict, op: str | None, name: str = "key_id",
             owner_only: bool = False) -> KeyRecord:
        key_id = get_str(body, name, required=True)
        if not KEY_ID_RE.match(key_id):
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

    def _usable(self, k: KeyRecord) -> None:
        if k.state == STATE_DISABLED:
            raise KmsApiError("KMS.0209", f"key {k.key_id} is disabled")
        if k.state == STATE_PENDING_DELETION:
            raise KmsApiError("KMS.0210", f"key {k.key_id} is pending deletion")
        if k.state == STATE_PENDING_IMPORT or (k.expiration_ms is not None and k.expiration_ms <= self.now):
            raise KmsApiError("KMS.0308", f"key {k.key_id} has no key material (pending import, state 5)")
        if k.state != STATE_ENABLED:
            raise KmsApiError("KMS.0308", f"key {k.key_id} is not enabled (state {k.state})")

    @staticmethod
    def spec(k: KeyRecord) -> Spec:
        return material.SPECS[k.key_spec]

    def _for_usage(self, k: KeyRecord, usage: str, kinds: tuple[str, ...] | None = None) -> Spec:
        """The key's spec, refused (KMS.0308) when its key_usage or kind does not fit the operation."""
        s = self.spec(k)
        if k.key_usage != usage or (kinds is not None and s.kind not in kinds):
            raise KmsApiError("KMS.0308", f"key {k.key_id} is a {k.key_spec} key for {k.key_usage}; this "
                                          f"operation needs a key for {usage}")
        return s

    def _check_alias(self, owner: str, alias: str) -> None:
        if not ALIAS_RE.match(alias):
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
            "creation_date": str(k.creation_ms), "scheduled_deletion_date": ms_str(k.deletion_ms),
            "key_state": str(k.state), "default_key_flag": "1" if k.default_key else "0",
            "key_type": "1" if self.spec(k).symmetric else "2",
            "expiration_time": ms_str(k.expiration_ms), "origin": k.origin,
            "key_rotation_enabled": "true" if k.rotation_enabled else "false",
            "sys_enterprise_project_id": "0", "keystore_id": "0", "partition_type": "1",
        }

    def _default_key(self, caller: Caller, alias: str) -> KeyRecord:
        k = self.store.key_by_alias(caller.principal, alias)
        if k is None:
            service = alias.split("/")[0]
            k = self.store.create_key(owner=caller.principal, alias=alias, default_key=True,
                                      description=f"Default master key of {service}",
                                      material=material.generate(material.SPECS["AES_256"]))
        return k

    # ---- the CMK's material ---------------------------------------------------------------------

    def _material(self, key_id: str, version: int) -> bytes:
        m = self.store.material(key_id, version)
        if m is None:
            raise KmsApiError("KMS.0207", f"key {key_id} version {version} has no key material (destroyed)")
        return m

    def _current(self, k: KeyRecord) -> bytes:
        return self._material(k.key_id, k.current_version)

    def _seal(self, k: KeyRecord, kind: int, data: bytes, aad: bytes) -> bytes:
        """``data`` sealed by the key's current version (AES-256-GCM or SM4-GCM)."""
        v = k.current_version
        return blob.seal(kind, k.key_id, v, material.aead(self.spec(k), self._material(k.key_id, v)), data, aad)

    def _open(self, k: KeyRecord, h: blob.Header, raw: bytes, aad: bytes) -> bytes:
        """Raises blob.BlobAuthError when ``raw`` does not authenticate."""
        return blob.open_(h, raw, material.aead(self.spec(k), self._material(k.key_id, h.key_version)), aad)

    def _seal_datakey(self, k: KeyRecord, dek: bytes, aad: bytes) -> str:
        return self._seal(k, blob.KIND_DATAKEY, dek, aad).hex().upper()

    def _parse_datakey(self, cipher_text: str) -> tuple[bytes, blob.Header]:
        if not HEX_RE.match(cipher_text) or len(cipher_text) % 2:
            raise KmsApiError("KMS.2201", "cipher_text is not hexadecimal")
        raw = bytes.fromhex(cipher_text)
        try:
            return raw, blob.parse(raw, blob.KIND_DATAKEY)
        except blob.BlobError as e:
            raise KmsApiError("KMS.2201", f"cipher_text is invalid: {e}") from None

    def _open_datakey(self, k: KeyRecord, raw: bytes, h: blob.Header, aad: bytes) -> bytes:
        try:
            return self._open(k, h, raw, aad)
        except blob.BlobAuthError:
            raise KmsApiError("KMS.2203", "cipher_text failed authentication: wrong key, wrong "
                                          "additional_authenticated_data, or damaged ciphertext") from None

    def _datakey_bits(self, body: dict, length_code: str) -> int:
        if present(body, "datakey_length"):
            bits = get_num(body, "datakey_length", code=length_code)
            if bits % 8:
                raise KmsApiError("KMS.1903" if length_code == "KMS.1901" else length_code,
                                  "datakey_length must be a multiple of 8")
            if not 8 <= bits <= 8192:
                raise KmsApiError(length_code, "datakey_length must be between 8 and 8192 bits")
            return bits
        spec = get_str(body, "key_spec")
        if spec is None:
            return 256
        if spec not in DATAKEY_SPECS:
            raise KmsApiError("KMS.1902", f"key_spec must be one of {', '.join(DATAKEY_SPECS)}")
        return DATAKEY_SPECS[spec]

