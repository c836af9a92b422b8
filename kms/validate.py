"""Validation of request bodies, shared by every handler: parsing, field types, unknown fields. Pure.

Huawei sends nearly every scalar as a JSON string; numbers are accepted as strings of digits or
as JSON integers. Each route names the fields it takes (``core.route``); anything else is refused
(KMS.0308), ``encryption_context`` with KMS.0208 because dropping it would drop a binding the
caller believes in (docs/KMS.md, "Strict requests").
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Iterable

from .errors import KmsApiError

MAX_BODY = 64 * 1024
# Every pattern ends in \Z, not $: Python's $ also matches before a trailing newline, which
# would let "alias\n" or "ABCD\n" through. The character classes are explicit ASCII ranges, so
# look-alike letters, NUL, RTL marks and other Unicode never pass.
KEY_ID_RE = re.compile(r"^[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}\Z")
ALIAS_RE = re.compile(r"^[a-zA-Z0-9:/_-]{1,255}\Z")
GRANT_ID_RE = re.compile(r"^[A-Fa-f0-9]{64}\Z")
PRINCIPAL_RE = re.compile(r"^[a-zA-Z0-9._-]{1,64}\Z")
DIGITS_RE = re.compile(r"^[0-9]{1,15}\Z")
HEX_RE = re.compile(r"^[0-9A-Fa-f]*\Z")
MAX_NUMBER = 10**15 - 1         # numeric fields: at most 15 digits, as strings or JSON integers
MAX_JSON_DEPTH = 32             # request bodies nest at most this deep (Huawei's need 3)
AUDIT_AAD_MAX = 128             # characters of a request's AAD kept in the audit log


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


# ---- field helpers ---------------------------------------------------------------------------

def present(body: dict, name: str) -> bool:
    v = body.get(name)
    return v is not None and v != ""


def get_str(body: dict, name: str, required: bool = False, max_len: int | None = None,
         code: str = "KMS.0308", default: str | None = None) -> str | None:
    if not present(body, name):
        if required:
            raise KmsApiError("KMS.0204", f"{name} is required")
        return default
    v = body[name]
    if not isinstance(v, str):
        raise KmsApiError(code, f"{name} must be a string")
    if max_len is not None and len(v.encode()) > max_len:
        raise KmsApiError(code, f"{name} is longer than {max_len} bytes")
    return v


def get_num(body: dict, name: str, required: bool = False, code: str = "KMS.0308",
         default: int | None = None) -> int | None:
    """A numeric field; Huawei sends digits in a string, a JSON integer is accepted too."""
    if not present(body, name):
        if required:
            raise KmsApiError("KMS.0204", f"{name} is required")
        return default
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise KmsApiError(code, f"{name} must be a number in a string")
    if isinstance(v, str):
        if not DIGITS_RE.match(v):
            raise KmsApiError(code, f"{name} must be a decimal number")
        v = int(v)
    elif not 0 <= v <= MAX_NUMBER:
        raise KmsApiError(code, f"{name} must be between 0 and {MAX_NUMBER}")
    return v


def get_aad(body: dict, name: str = "additional_authenticated_data") -> bytes:
    v = get_str(body, name, max_len=128)
    return v.encode() if v else b""


def paging(body: dict, max_limit: int = 1000) -> tuple[int, int]:
    limit = get_num(body, "limit", code="KMS.1601", default=max_limit)
    if not 1 <= limit <= max_limit:
        raise KmsApiError("KMS.1601", f"limit must be between 1 and {max_limit}")
    marker = get_num(body, "marker", code="KMS.1602", default=0)
    return limit, marker


def page_of(items: list, limit: int, marker: int) -> tuple[list, str, str]:
    page = items[marker:marker + limit]
    end = marker + len(page)
    truncated = end < len(items)
    return page, (str(end) if truncated else ""), ("true" if truncated else "false")


def ms_str(v: int | None) -> str:
    return "" if v is None else str(v)


def check_json(body: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not valid Unicode (JSON
    allows lone surrogates such as "\\ud800", which cannot be encoded, stored or compared)."""
    stack = [(body, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise KmsApiError("KMS.0202", f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                check_str(k)
                stack.append((x, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str):
            check_str(v)


def check_str(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise KmsApiError("KMS.0202", "request body holds a string that is not valid Unicode") from None


def parse_body(raw: bytes) -> dict:
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
    check_json(body)
    return body


#: Fields every request may carry (Huawei: a 36-byte serial number, not echoed).
COMMON_FIELDS = frozenset({"sequence"})
_SEQUENCE_MAX = 36


def check_fields(body: dict, allowed: Iterable[str]) -> None:
    """Refuse fields the operation does not take: a typo or a field of another API version
    would otherwise be dropped without a word."""
    if "encryption_context" in body:
        raise KmsApiError("KMS.0208", "encryption_context is not supported by this KMS (Huawei's current API "
                                      "has none); bind data with additional_authenticated_data instead")
    allowed = COMMON_FIELDS | set(allowed)
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise KmsApiError("KMS.0308", f"unknown field {unknown[0][:64]!r} for this operation")
    seq = body.get("sequence")
    if seq is not None and (not isinstance(seq, str) or len(seq) > _SEQUENCE_MAX):
        raise KmsApiError("KMS.0206", f"sequence must be a string of at most {_SEQUENCE_MAX} characters")


def get_bool(body: dict, name: str, default: bool) -> bool:
    """A boolean: JSON true/false or the strings "true"/"false" (Huawei's SDK sends JSON)."""
    v = body.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, bool):
        return v
    if v in ("true", "false"):
        return v == "true"
    raise KmsApiError("KMS.0308", f"{name} must be true or false")


def get_b64(body: dict, name: str, required: bool = True, code: str = "KMS.0308",
            min_len: int = 0, max_len: int = 1 << 20) -> bytes:
    """A base64 field, decoded; refused when it is not strict base64 or outside the byte bounds."""
    v = get_str(body, name, required=required, code=code)
    if v is None:
        return b""
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise KmsApiError(code, f"{name} is not valid base64") from None
    if not min_len <= len(raw) <= max_len:
        raise KmsApiError(code, f"{name} must decode to {min_len}-{max_len} bytes")
    return raw


def get_enum(body: dict, name: str, values: Iterable[str], required: bool = False, default: str | None = None,
             code: str = "KMS.0308") -> str | None:
    v = get_str(body, name, required=required, default=default, code=code)
    values = tuple(values)
    if v is not None and v not in values:
        raise KmsApiError(code, f"{name} must be one of {', '.join(values)}")
    return v
