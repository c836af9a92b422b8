"""Huawei-style KMS errors: the codes this KMS answers with, their HTTP status, the exception."""

from __future__ import annotations


# Huawei's HTTP status per error code (reference §6); everything unlisted is 400.
STATUS = {"KMS.0207": 404, "KMS.0416": 404, "KMS.0301": 403, "KMS.0302": 403, "KMS.0303": 403,
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
    "KMS.0206": "invalid sequence",
    "KMS.0208": "encryption_context is not supported (use additional_authenticated_data)",
    "KMS.0211": "not allowed on a default key", "KMS.0301": "request not signed or malformed signature",
    "KMS.0302": "wrong access key or signature", "KMS.0303": "signature expired",
    "KMS.0305": "project/region mismatch", "KMS.0306": "no permission on the key",
    "KMS.0307": "operation not allowed for this caller", "KMS.0308": "a field is invalid",
    "KMS.0309": "key origin is not external", "KMS.0310": "key is not pending import",
    "KMS.0312": "key cannot be rotated", "KMS.0324": "asymmetric or MAC key cannot be rotated", "KMS.0313": "rotation is not enabled",
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
    "KMS.2502": "grant belongs to another key",
    "KMS.2601": "invalid import_token", "KMS.2602": "import token expired",
    "KMS.2603": "encrypted_key_material does not unwrap", "KMS.2604": "key material does not fit the key spec",
    "KMS.2605": "invalid expiration_time", "KMS.2606": "imported material differs from the key's earlier material",
    "KMS.2701": "key has no imported material", "KMS.2901": "rotation already enabled",
    "KMS.3001": "rotation_interval out of range",
}


class KmsApiError(Exception):
    """A Huawei-style error reply. The message must never contain key material."""

    def __init__(self, code: str, msg: str, status: int | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.status = status or STATUS.get(code, 400)

    def body(self) -> dict:
        return {"error": {"error_code": self.code, "error_msg": self.msg}}

