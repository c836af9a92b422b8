"""Huawei KMS v1.0 operations as pure handlers over a Store: the public face of the KMS's API.

The service object and what handlers share live in ``kms.core``; the handlers, by concern, in
``kms.ops`` (keys, datakeys, crypto, grants, tags, imports); the validation helpers in
``kms.validate``; the errors in ``kms.errors``; per-spec key material in ``kms.material``.
Importing this module registers every route. Field names, string-typed values, key states and
error codes follow Huawei's API reference (see docs/KMS.md); anything Huawei lacks is named
``x-encfs-*`` so it cannot collide.
"""

from __future__ import annotations

from .core import (DAY_MS, DEFAULT_ALIASES, DEFAULT_CMK_QUOTA, FIELDS, GRANTS_PER_CMK, INLINE_OPERATIONS,
                   KEY_SPECS, REGION, ROUTES, THREADED_READ_OPERATIONS, Caller, Kms, Result,
                   caller_for_access_key, caller_for_uid, normalise_principal)
from .errors import ERROR_CODES, KmsApiError
from .ops import crypto, datakeys, grants, imports, keys, tags  # noqa: F401  (registers the routes)
from .ops.grants import GRANT_OPERATIONS
from .validate import AUDIT_AAD_MAX, MAX_BODY, request_aad

_ROUTES = ROUTES        # the name the fuzz tests know

__all__ = ["AUDIT_AAD_MAX", "Caller", "DAY_MS", "DEFAULT_ALIASES", "DEFAULT_CMK_QUOTA", "ERROR_CODES", "FIELDS",
           "GRANTS_PER_CMK", "GRANT_OPERATIONS", "INLINE_OPERATIONS", "KEY_SPECS", "Kms", "KmsApiError",
           "MAX_BODY", "REGION", "ROUTES", "Result", "THREADED_READ_OPERATIONS", "caller_for_access_key", "caller_for_uid",
           "normalise_principal", "request_aad"]
