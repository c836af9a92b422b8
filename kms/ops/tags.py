"""Aliases (create, list, delete, associate) and tags (per key, per project, filter by tags)."""

from __future__ import annotations

from typing import Any

from ..core import REGION, Ctx, Kms, route
from ..errors import KmsApiError
from ..store import KeyRecord
from ..validate import get_num, get_str, page_of, paging

# =============================== aliases ========================================================

def _alias_json(self: Kms, a) -> dict:
    return {"domain_id": a.owner, "key_id": a.key_id, "alias": a.alias,
            "alias_urn": f"kms:{REGION}:{a.owner}:alias:{a.alias}",
            "create_time": str(a.create_ms), "update_time": str(a.update_ms)}


@route("POST", "aliases", fields=("key_id", "alias"))
def _create_alias(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    k = self._key(ctx, body, None, owner_only=True)
    alias = get_str(body, "alias", required=True, code="KMS.1101")
    self._check_alias(k.owner, alias)
    return _alias_json(self, self.store.put_alias(k.owner, alias, k.key_id))


@route("GET", "aliases", fields=("key_id", "limit", "marker"))
def _list_aliases(self: Kms, ctx: Ctx, body: dict, _: dict) -> list:
    limit, marker = paging(body, 100)
    key_id = get_str(body, "key_id")
    owned = {k.key_id for k in self._owned(ctx.caller)}
    items = [a for a in self.store.aliases() if a.key_id in owned and (key_id is None or a.key_id == key_id)]
    page, next_marker, _t = page_of(items, limit, marker)
    # The SDK's model for this call is a top-level JSON array of pages.
    return [{"aliases": [_alias_json(self, a) for a in page],
             "page_info": {"next_marker": next_marker, "current_count": len(page)}}]


@route("DELETE", "aliases", fields=("key_id", "aliases"))
def _delete_aliases(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
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


@route("POST", "alias/associate", fields=("alias", "target_key_id"))
def _associate_alias(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    alias = get_str(body, "alias", required=True, code="KMS.1101")
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


def _tag_key(self: Kms, ctx: Ctx, args: dict) -> KeyRecord:
    return self._key(ctx, {"key_id": args["key_id"]}, None, owner_only=True)


@route("POST", "{key_id}/tags", fields=("tag",))
def _add_tag(self: Kms, ctx: Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    if "tag" not in body:
        raise KmsApiError("KMS.0204", "tag is required")
    key, value = _tag_item(body["tag"])
    existing = dict(self.store.tags(k.key_id))
    if key not in existing and len(existing) >= 20:
        raise KmsApiError("KMS.0409", "a key has at most 20 tags")
    self.store.set_tags(k.key_id, put=[(key, value)])
    return {}


@route("POST", "{key_id}/tags/action", fields=("tags", "action"))
def _tags_action(self: Kms, ctx: Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    action = get_str(body, "action", required=True)
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


@route("DELETE", "{key_id}/tags/{key}")
def _delete_tag(self: Kms, ctx: Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    if args["tag_key"] not in dict(self.store.tags(k.key_id)):
        raise KmsApiError("KMS.0416", f"tag {args['tag_key']} does not exist")
    self.store.set_tags(k.key_id, delete=[args["tag_key"]])
    return {}


@route("GET", "{key_id}/tags")
def _key_tags(self: Kms, ctx: Ctx, body: dict, args: dict) -> dict:
    k = _tag_key(self, ctx, args)
    tags = self.store.tags(k.key_id)
    return {"tags": [{"key": t, "value": v} for t, v in tags], "existTagsNum": len(tags)}


@route("GET", "tags")
def _project_tags(self: Kms, ctx: Ctx, body: dict, _: dict) -> dict:
    owned = {k.key_id for k in self._owned(ctx.caller)}
    merged: dict[str, list[str]] = {}
    for key_id, tags in self.store.all_tags().items():
        if key_id in owned:
            for t, v in tags:
                if v not in merged.setdefault(t, []):
                    merged[t].append(v)
    return {"tags": [{"key": t, "values": sorted(vs)} for t, vs in sorted(merged.items())]}


@route("POST", "{resource_instances}/action",
       fields=("limit", "offset", "action", "tags", "matches"))
def _filter_by_tags(self: Kms, ctx: Ctx, body: dict, args: dict) -> dict:
    if args["resource_instances"] != "resource_instances":
        raise KmsApiError("KMS.0201", f"unknown operation {args['resource_instances']}/action")
    action = get_str(body, "action", required=True)
    if action not in ("filter", "count"):
        raise KmsApiError("KMS.0308", "action must be filter or count")
    limit = get_num(body, "limit", code="KMS.1601", default=1000)
    offset = get_num(body, "offset", code="KMS.1602", default=0)
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

