"""Grants: create, list, revoke, retire, list-retirable."""

from __future__ import annotations

import secrets

from ..core import GRANTS_PER_CMK, Ctx, Kms, normalise_principal, route
from ..errors import KmsApiError
from ..store import GrantRecord
from ..validate import ALIAS_RE, GRANT_ID_RE, KEY_ID_RE, PRINCIPAL_RE, get_str, page_of, paging

#: Huawei's grant operations, and (an extension of the list, docs/KMS.md) the operations of
#: asymmetric and MAC keys, without which a grant could give nothing on such a key.
GRANT_OPERATIONS = ("create-datakey", "create-datakey-without-plaintext", "encrypt-datakey", "decrypt-datakey",
                    "describe-key", "create-grant", "retire-grant", "encrypt-data", "decrypt-data",
                    "sign", "verify", "get-publickey", "generate-mac", "verify-mac",
                    "create-rsa-datakey-pair", "create-ec-datakey-pair")

# =============================== grants =========================================================

def _grant_json(g: GrantRecord) -> dict:
    return {"key_id": g.key_id, "grant_id": g.grant_id, "grantee_principal": g.grantee,
            "grantee_principal_type": g.grantee_type, "operations": list(g.operations),
            "issuing_principal": g.issuer, "creation_date": str(g.creation_ms), "name": g.name,
            "retiring_principal": g.retiring}


@route("POST", "create-grant", fields=("key_id", "grantee_principal", "operations", "name",
                                       "retiring_principal", "grantee_principal_type"))
def _create_grant(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, "create-grant")
    grantee = get_str(body, "grantee_principal", required=True, code="KMS.2402")
    if not PRINCIPAL_RE.match(grantee):
        raise KmsApiError("KMS.2402", "grantee_principal must be 1-64 characters of a-z A-Z 0-9 . _ -")
    ops = body.get("operations")
    if ops is None or ops == []:
        raise KmsApiError("KMS.0204", "operations is required")
    if not isinstance(ops, list) or not all(isinstance(o, str) and o in GRANT_OPERATIONS for o in ops):
        raise KmsApiError("KMS.2401", f"operations must be a list of: {', '.join(GRANT_OPERATIONS)}")
    if set(ops) == {"create-grant"}:
        raise KmsApiError("KMS.2401", "operations cannot be only create-grant")
    ptype = get_str(body, "grantee_principal_type", default="user")
    if ptype not in ("user", "domain"):
        raise KmsApiError("KMS.0308", "grantee_principal_type must be user or domain")
    name = get_str(body, "name", default="")
    if name and not ALIAS_RE.match(name):
        raise KmsApiError("KMS.0308", "name must be 1-255 characters of a-z A-Z 0-9 : / _ -")
    retiring = get_str(body, "retiring_principal", default="")
    if retiring and not PRINCIPAL_RE.match(retiring):
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


@route("POST", "list-grants", fields=("key_id", "limit", "marker"))
def _list_grants(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    limit, marker = paging(body, 100)
    grants = self.store.grants_for_key(k.key_id)
    page, next_marker, truncated = page_of(grants, limit, marker)
    return {"grants": [_grant_json(g) for g in page], "next_marker": next_marker,
            "truncated": truncated, "total": len(grants)}


@route("POST", "list-retirable-grants", fields=("limit", "marker"))
def _list_retirable(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    limit, marker = paging(body, 100)
    grants = [g for g in self.store.all_grants() if g.retiring_norm and g.retiring_norm in ctx.caller.identities]
    page, next_marker, truncated = page_of(grants, limit, marker)
    return {"grants": [_grant_json(g) for g in page], "next_marker": next_marker,
            "truncated": truncated, "total": len(grants)}


def _grant_of(self: Kms, body: dict, key_id: str) -> GrantRecord:
    gid = get_str(body, "grant_id", required=True)
    if not GRANT_ID_RE.match(gid):
        raise KmsApiError("KMS.0308", "grant_id must be 64 hexadecimal characters")
    g = self.store.get_grant(gid.lower())
    if g is None:
        raise KmsApiError("KMS.2501", f"grant {gid} does not exist")
    if g.key_id != key_id:
        raise KmsApiError("KMS.2502", f"grant {gid} does not belong to key {key_id}")
    return g


@route("POST", "revoke-grant", fields=("key_id", "grant_id"))
def _revoke_grant(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    g = _grant_of(self, body, k.key_id)
    self.store.delete_grant(g.grant_id)
    ctx.touched[-1] = (k.key_id, g.grant_id)
    return {}


@route("POST", "retire-grant", fields=("key_id", "grant_id"))
def _retire_grant(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    key_id = get_str(body, "key_id", required=True)
    if not KEY_ID_RE.match(key_id):
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

