"""Key lifecycle: create, describe, list, states (enable, disable, deletion), alias and
description, quotas, rotation, and the two encfs extensions (resolve-key, list-audit)."""

from __future__ import annotations

from .. import material
from ..core import (DAY_MS, DEFAULT_ALIASES, GRANTS_PER_CMK, KEY_SPECS, REGION, Ctx, Kms, route)
from ..errors import KmsApiError
from ..store import STATE_DISABLED, STATE_ENABLED, STATE_PENDING_DELETION, STATE_PENDING_IMPORT, KeyRecord
from ..validate import AUDIT_AAD_MAX, KEY_ID_RE, get_enum, get_num, get_str, ms_str, paging, page_of

# =============================== key management =================================================

def _create_spec(body: dict) -> tuple[material.Spec, str, str]:
    """(spec, key_usage, origin) of a create-key request, by Huawei's rules: each spec has the
    usages it allows (the first is the default); every spec here may be of origin external
    (symmetric material imported raw, RSA/EC private keys by Huawei's two-layer wrapping)."""
    name = get_str(body, "key_spec", default="AES_256")
    if name in material.REFUSED_SPECS:
        raise KmsApiError("KMS.0308", f"key_spec {name} is not supported by this KMS: {material.REFUSED_SPECS[name]}")
    if name not in material.SPECS:
        raise KmsApiError("KMS.0308", f"key_spec must be one of {', '.join(s for s in KEY_SPECS)}")
    spec = material.SPECS[name]
    usage = get_str(body, "key_usage", default=spec.usages[0])
    if usage not in spec.usages:
        raise KmsApiError("KMS.0308", f"key_usage of a {name} key must be {' or '.join(spec.usages)}")
    origin = get_enum(body, "origin", ("kms", "external"), default="kms")
    keystore = get_str(body, "keystore_id", default="0")
    if keystore != "0":
        raise KmsApiError("KMS.0308", "keystore_id must be 0: this KMS has only the default key store")
    if get_str(body, "vm_id") is not None:
        raise KmsApiError("KMS.0308", "vm_id is not supported (no dedicated HSM here)")
    get_str(body, "enterprise_project_id", max_len=36)      # one enterprise project ("0"): accepted, unused
    return spec, usage, origin


@route("POST", "create-key", fields=("key_alias", "key_spec", "key_usage", "key_description", "origin",
                                     "enterprise_project_id", "keystore_id", "vm_id"))
def _create_key(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    owner = ctx.caller.principal
    alias = get_str(body, "key_alias", required=True, code="KMS.1101")
    description = get_str(body, "key_description", code="KMS.1103", default="")
    if len(description) > 255:
        raise KmsApiError("KMS.1103", "key_description is longer than 255 characters")
    spec, usage, origin = _create_spec(body)
    self._check_alias(owner, alias)
    mine = sum(1 for k in self.store.keys() if k.owner == owner and not k.default_key and k.destroyed_ms is None)
    if mine >= self.cmk_quota:
        raise KmsApiError("KMS.1105", f"the number of keys reached the quota of {self.cmk_quota}")
    k = self.store.create_key(owner=owner, alias=alias, description=description, key_spec=spec.name,
                              key_usage=usage, origin=origin,
                              material=material.generate(spec) if origin == "kms" else None)
    ctx.touch(k.key_id)
    return {"key_info": {"key_id": k.key_id, "domain_id": k.owner, "region_id": REGION}}


@route("POST", "describe-key", fields=("key_id",))
def _describe_key(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    return {"key_info": self.details(self._key(ctx, body, "describe-key"))}


@route("POST", "x-encfs-resolve-key", fields=("key",))
def _resolve_key(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    """Extension: an alias or key id → KeyDetails; a default alias creates its key on first use."""
    ref = get_str(body, "key", required=True)
    if KEY_ID_RE.match(ref):
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


@route("POST", "list-keys", fields=("limit", "marker", "key_state", "key_spec", "enterprise_project_id"))
def _list_keys(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    limit, marker = paging(body)
    state = get_str(body, "key_state")
    if state is not None and state not in ("1", "2", "3", "4", "5"):
        raise KmsApiError("KMS.0308", "key_state must be 1-5")
    spec = get_str(body, "key_spec", default="AES_256")
    if spec != "ALL" and spec not in KEY_SPECS:
        raise KmsApiError("KMS.0308", "key_spec is invalid")
    keys = [k for k in self._owned(ctx.caller)
            if (state is None or str(k.state) == state) and (spec == "ALL" or k.key_spec == spec)]
    page, next_marker, truncated = page_of(keys, limit, marker)
    return {"keys": [k.key_id for k in page], "key_details": [self.details(k) for k in page],
            "next_marker": next_marker, "truncated": truncated, "total": len(keys)}


@route("POST", "enable-key", fields=("key_id",))
def _enable_key(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if k.state == STATE_PENDING_DELETION:
        raise KmsApiError("KMS.0210", f"key {k.key_id} is pending deletion; cancel the deletion first")
    if k.state != STATE_DISABLED:
        raise KmsApiError("KMS.1201", f"key {k.key_id} is not disabled")
    k = self.store.update_key(k.key_id, state=STATE_ENABLED)
    return {"key_info": {"key_id": k.key_id, "key_state": str(k.state)}}


@route("POST", "disable-key", fields=("key_id",))
def _disable_key(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if k.default_key:
        raise KmsApiError("KMS.0211", f"default key {k.alias} cannot be disabled")
    if k.state == STATE_PENDING_DELETION:
        raise KmsApiError("KMS.0210", f"key {k.key_id} is pending deletion")
    if k.state != STATE_ENABLED:
        raise KmsApiError("KMS.1301", f"key {k.key_id} is not enabled")
    k = self.store.update_key(k.key_id, state=STATE_DISABLED)
    return {"key_info": {"key_id": k.key_id, "key_state": str(k.state)}}


@route("POST", "schedule-key-deletion", fields=("key_id", "pending_days"))
def _schedule_deletion(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    days = get_num(body, "pending_days", required=True, code="KMS.1401")
    if not 7 <= days <= 1096:
        raise KmsApiError("KMS.1401", "pending_days must be between 7 and 1096")
    if k.default_key:
        raise KmsApiError("KMS.0211", f"default key {k.alias} cannot be deleted")
    if k.state == STATE_PENDING_DELETION:
        raise KmsApiError("KMS.1402", f"key {k.key_id} is already pending deletion")
    k = self.store.update_key(k.key_id, state=STATE_PENDING_DELETION, deletion_ms=self.now + days * DAY_MS)
    return {"key_id": k.key_id, "key_state": str(k.state)}


@route("POST", "cancel-key-deletion", fields=("key_id",))
def _cancel_deletion(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if k.state != STATE_PENDING_DELETION:
        raise KmsApiError("KMS.1501", f"key {k.key_id} is not pending deletion")
    # Huawei returns a cancelled key as disabled: the owner re-enables it on purpose.
    # An external key without material goes back to waiting for its import (state 5).
    state = STATE_DISABLED if self.store.material(k.key_id, k.current_version) is not None else STATE_PENDING_IMPORT
    k = self.store.update_key(k.key_id, state=state, deletion_ms=None)
    return {"key_id": k.key_id, "key_state": str(k.state)}


@route("POST", "update-key-alias", fields=("key_id", "key_alias"))
def _update_alias(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    alias = get_str(body, "key_alias", required=True, code="KMS.1101")
    if k.default_key:
        raise KmsApiError("KMS.0211", "the alias of a default key cannot be changed")
    if alias != k.alias:
        self._check_alias(k.owner, alias)
        k = self.store.update_key(k.key_id, alias=alias)
    return {"key_info": {"key_id": k.key_id, "key_alias": k.alias}}


@route("POST", "update-key-description", fields=("key_id", "key_description"))
def _update_description(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if "key_description" not in body or body["key_description"] is None:
        raise KmsApiError("KMS.0204", "key_description is required")
    d = get_str(body, "key_description", code="KMS.1103", default="")
    if len(d) > 255:
        raise KmsApiError("KMS.1103", "key_description is longer than 255 characters")
    k = self.store.update_key(k.key_id, description=d)
    return {"key_info": {"key_id": k.key_id, "key_description": k.description}}


@route("GET", "user-quotas")
def _user_quotas(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    mine = [k for k in self._owned(ctx.caller) if k.owner == ctx.caller.principal]
    used = sum(1 for k in mine if not k.default_key)
    grants = max((len(self.store.grants_for_key(k.key_id)) for k in mine), default=0)
    return {"quotas": {"resources": [{"type": "CMK", "used": used, "quota": self.cmk_quota},
                                     {"type": "grant_per_CMK", "used": grants, "quota": GRANTS_PER_CMK}]}}


@route("GET", "user-instances")
def _user_instances(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    mine = [k for k in self._owned(ctx.caller) if k.owner == ctx.caller.principal and not k.default_key]
    return {"instance_num": len(mine)}


# =============================== rotation =======================================================

def _rotatable(self: Kms, k: KeyRecord) -> None:
    if k.origin != "kms":
        raise KmsApiError("KMS.0312", "keys with imported material cannot be rotated")
    if not self.spec(k).rotatable:
        raise KmsApiError("KMS.0324", f"{k.key_spec} keys cannot be rotated (only AES_256 and SM4 keys)")
    self._usable(k)


@route("POST", "enable-key-rotation", fields=("key_id",))
def _enable_rotation(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    _rotatable(self, k)
    if k.rotation_enabled:
        raise KmsApiError("KMS.2901", f"rotation of key {k.key_id} is already enabled")
    self.store.update_key(k.key_id, rotation_enabled=True, rotation_anchor_ms=self.now)
    return {}


@route("POST", "disable-key-rotation", fields=("key_id",))
def _disable_rotation(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    if not k.rotation_enabled:
        raise KmsApiError("KMS.0313", f"rotation of key {k.key_id} is not enabled")
    self.store.update_key(k.key_id, rotation_enabled=False)
    return {}


@route("POST", "update-key-rotation-interval", fields=("key_id", "rotation_interval"))
def _rotation_interval(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    days = get_num(body, "rotation_interval", required=True, code="KMS.3001")
    if not 30 <= days <= 365:
        raise KmsApiError("KMS.3001", "rotation_interval must be between 30 and 365 days")
    if not k.rotation_enabled:
        raise KmsApiError("KMS.0313", f"rotation of key {k.key_id} is not enabled")
    self.store.update_key(k.key_id, rotation_interval=days)
    return {}


@route("POST", "get-key-rotation-status", fields=("key_id",))
def _rotation_status(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    materials = [{"material_id": str(v.version), "charge_id": "", "create_time": str(v.creation_ms),
                  "expiration_time": "", "state": 2} for v in self.store.versions(k.key_id)]
    return {"key_rotation_enabled": k.rotation_enabled, "rotation_interval": k.rotation_interval,
            "last_rotation_time": ms_str(k.last_rotation_ms), "number_of_rotations": k.rotations,
            "key_materials": materials}


@route("POST", "rotate-on-demand", fields=("key_id",))
def _rotate_on_demand(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    _rotatable(self, k)
    self.store.rotate_key(k.key_id, material.generate(self.spec(k)))
    return {"key_id": k.key_id}


# =============================== audit (extension) ===============================================

@route("POST", "x-encfs-list-audit", fields=("key_id", "aad", "since", "limit"))
def _list_audit(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    """Extension: audit records, newest last. Root sees all; others their own requests and keys.
    ``aad`` filters on the request's additional_authenticated_data (encfs: the file id)."""
    key_id = get_str(body, "key_id")
    aad = get_str(body, "aad", max_len=AUDIT_AAD_MAX * 4)
    since = get_num(body, "since", default=None)
    limit = get_num(body, "limit", code="KMS.1601", default=1000)
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
