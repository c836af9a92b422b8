"""AK/SK authentication over TCP: Huawei's ``SDK-HMAC-SHA256`` request signature, both sides.

One implementation of the canonicalisation serves the daemon's verifier (``verify``) and the
client's signer (``sign_request``), so the two cannot drift apart. It is computed exactly as
``huaweicloudsdkcore.signer.Signer`` does (reference §7)::

    CanonicalRequest = METHOD \\n CanonicalURI \\n CanonicalQuery \\n CanonicalHeaders \\n SignedHeaders \\n hex(sha256(body))
    StringToSign     = "SDK-HMAC-SHA256" \\n X-Sdk-Date \\n hex(sha256(CanonicalRequest))
    Signature        = hex(HMAC-SHA256(SK, StringToSign))

The comparison is constant-time. Host and X-Sdk-Date must be among the signed headers (else a
captured request could be re-dated or re-targeted), the date must be within ``MAX_SKEW``
of our clock, and unsigned payloads are refused.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import re
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote, unquote

from .api import KmsApiError

ALGORITHM = "SDK-HMAC-SHA256"
EMPTY_HASH = hashlib.sha256(b"").hexdigest()
MAX_SKEW = 15 * 60
_AUTH_RE = re.compile(r"^SDK-HMAC-SHA256\s+Access=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-fA-F]{1,128})\Z")


@dataclass(frozen=True)
class Credential:
    user_name: str
    access_key: str
    secret_key: str


class CredentialsError(Exception):
    pass


def load_credentials(path: str) -> dict[str, Credential]:
    """Huawei's downloaded access-key CSV: ``User Name,Access Key Id,Secret Access Key``.

    Refused when group or others may read it: the secret keys are in it.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise CredentialsError(f"cannot read credentials {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise CredentialsError(f"refusing credentials {path}: group or others have access "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise CredentialsError(f"credentials {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    try:
        i_user, i_ak, i_sk = (header.index("user name"), header.index("access key id"),
                              header.index("secret access key"))
    except ValueError:
        raise CredentialsError(f"credentials {path} lacks the header "
                               "'User Name,Access Key Id,Secret Access Key'") from None
    creds = {}
    for row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(i_user, i_ak, i_sk):
            raise CredentialsError(f"credentials {path}: a row has too few columns")
        c = Credential(row[i_user].strip(), row[i_ak].strip(), row[i_sk].strip())
        if not c.access_key or not c.secret_key:
            raise CredentialsError(f"credentials {path}: a row lacks the access key or the secret")
        creds[c.access_key] = c
    if not creds:
        raise CredentialsError(f"credentials {path} holds no access key")
    return creds


def read_access_key(path: str, who: str | None = None) -> Credential:
    """The client's access key from Huawei's downloaded CSV (same checks as load_credentials:
    refused when group or others may read it). ``who`` picks a row by user name or access key
    id; by default the first row."""
    creds = load_credentials(path)
    if who is None:
        return next(iter(creds.values()))
    for c in creds.values():
        if who in (c.user_name, c.access_key):
            return c
    raise CredentialsError(f"credentials {path} hold no access key of {who!r}")


def _q(s: str) -> str:
    return quote(s, safe="~")


def canonical_uri(path: str) -> str:
    uri = "/".join(_q(seg) for seg in unquote(path).split("/"))
    return uri if uri.endswith("/") else uri + "/"


def canonical_query(query: str) -> str:
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        pairs.append((unquote(k), unquote(v)))
    pairs.sort()
    return "&".join(f"{_q(k)}={_q(v)}" for k, v in pairs)


def string_to_sign(method: str, target: str, headers: dict[str, str], signed: list[str],
                   body: bytes, sdk_date: str) -> str:
    path, _, query = target.partition("?")
    canon_headers = "".join(f"{h}:{headers[h].strip()}\n" for h in signed)
    body_hash = hashlib.sha256(body).hexdigest() if body else EMPTY_HASH
    canonical = "\n".join([method.upper(), canonical_uri(path), canonical_query(query), canon_headers,
                           ";".join(signed), body_hash])
    return f"{ALGORITHM}\n{sdk_date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"


def sign(sk: str, sts: str) -> str:
    return hmac.new(sk.encode(), sts.encode(), hashlib.sha256).hexdigest()


def sdk_date(now: float | None = None) -> str:
    """X-Sdk-Date for ``now`` (Unix seconds, default the clock): ``YYYYMMDDTHHMMSSZ`` in UTC."""
    return datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def sign_request(method: str, target: str, headers: dict[str, str], body: bytes, ak: str, sk: str,
                 now: float | None = None) -> dict[str, str]:
    """The headers of a signed request, as the SDK's Signer makes them: ``headers`` plus
    ``X-Sdk-Date`` and ``Authorization``. Every given header is signed (names with "_" are
    skipped, as the SDK does), so pass Host and the others the request will carry; headers
    added afterwards (Content-Length, Accept) are simply unsigned. ``target`` is the request
    target exactly as sent (path and query, already percent-encoded)."""
    out = dict(headers)
    if not any(k.lower() == "x-sdk-date" for k in out):
        out["X-Sdk-Date"] = sdk_date(now)
    lower = {k.lower(): str(v).strip() for k, v in out.items()}
    if "host" not in lower:
        raise ValueError("the Host header must be signed")
    signed = sorted(k for k in lower if "_" not in k)
    sts = string_to_sign(method, target, lower, signed, body, lower["x-sdk-date"])
    out["Authorization"] = f"{ALGORITHM} Access={ak}, SignedHeaders={';'.join(signed)}, Signature={sign(sk, sts)}"
    return out


def verify(creds: dict[str, Credential], method: str, target: str, headers: dict[str, str],
           body: bytes, now: float) -> Credential:
    """The credential that signed this request, or KmsApiError 403 (KMS.0301/0302/0303).

    ``headers`` maps lower-case names to values decoded as UTF-8.
    """
    auth = headers.get("authorization")
    if not auth:
        raise KmsApiError("KMS.0301", "the request is not signed: Authorization header missing")
    m = _AUTH_RE.match(auth.strip())
    if not m:
        raise KmsApiError("KMS.0301", "Authorization header is malformed (expected SDK-HMAC-SHA256)")
    ak, signed_str, signature = m.groups()
    signed = signed_str.split(";")
    if "host" not in signed or "x-sdk-date" not in signed:
        raise KmsApiError("KMS.0302", "host and x-sdk-date must be signed headers")
    if any(h not in headers for h in signed):
        raise KmsApiError("KMS.0302", "a signed header is missing from the request")
    if "x-sdk-content-sha256" in headers:
        raise KmsApiError("KMS.0302", "unsigned payloads are not accepted")
    sdk_date = headers["x-sdk-date"].strip()
    try:
        t = datetime.strptime(sdk_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise KmsApiError("KMS.0301", "X-Sdk-Date is malformed (expected YYYYMMDDTHHMMSSZ)") from None
    if abs(now - t) > MAX_SKEW:
        raise KmsApiError("KMS.0303", "the request signature has expired (X-Sdk-Date is too far from now)")
    cred = creds.get(ak)
    # Compute a signature even for an unknown AK so the timing does not tell which AKs exist.
    sk = cred.secret_key if cred else "\0unknown"
    expected = sign(sk, string_to_sign(method, target, headers, signed, body, sdk_date))
    if not hmac.compare_digest(expected.encode(), signature.lower().encode()) or cred is None:
        raise KmsApiError("KMS.0302", "the access key or the request signature is invalid")
    return cred
