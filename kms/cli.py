"""``kms``: run the daemon (``kms serve``) or call one API operation per subcommand.

Readable tables by default, ``--json`` prints the daemon's reply unchanged for scripts.
Wherever a KEY is taken, an alias works too (resolved with Huawei's list-keys and aliases API, or
our daemon's x-encfs-resolve-key extension where it answers).
User mistakes end with one line on stderr and exit status 1 (2 for bad usage), never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from datetime import datetime
from typing import Any, Callable

from .client import KmsClient, KmsError
from .paths import default_data_dir, default_project_id, default_socket_path

STATES = {"1": "pending-activation", "2": "enabled", "3": "disabled", "4": "pending-deletion",
          "5": "pending-import", "7": "frozen"}
CLOCK_ENV = "KMS_TEST_CLOCK_FILE"
URL_ENV = "KMS_URL"
PASSPHRASE_ENV = "KMS_PASSPHRASE"
CREDENTIALS_ENV = "KMS_CREDENTIALS"


class UsageError(Exception):
    pass


# ---- output ---------------------------------------------------------------------------------

def _when(ms: str) -> str:
    if not ms:
        return "-"
    try:
        return datetime.fromtimestamp(int(ms) / 1000).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return ms


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _fields(d: dict, order: list[str] | None = None) -> str:
    keys = order or list(d)
    width = max((len(k) for k in keys), default=0)
    out = []
    for k in keys:
        if k not in d:
            continue
        v = d[k]
        if k == "key_state":
            v = f"{v} ({STATES.get(str(v), '?')})"
        elif k in ("creation_date", "scheduled_deletion_date", "create_time", "update_time",
                   "last_rotation_time") and v:
            v = f"{v} ({_when(str(v))})"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
        out.append(f"{k.ljust(width)}  {v}")
    return "\n".join(out)


def _keys_table(details: list[dict]) -> str:
    rows = [[d["key_id"], d.get("key_alias", ""), STATES.get(d["key_state"], d["key_state"]),
             "yes" if d.get("default_key_flag") == "1" else "", _when(d.get("creation_date", "")),
             _when(d.get("scheduled_deletion_date", ""))] for d in details]
    return _table(rows, ["KEY_ID", "ALIAS", "STATE", "DEFAULT", "CREATED", "DELETION"])


def _grants_table(grants: list[dict]) -> str:
    rows = [[g["grant_id"][:16] + "…", g["key_id"], g["grantee_principal"], ",".join(g["operations"]),
             g.get("name", ""), _when(g.get("creation_date", ""))] for g in grants]
    return _table(rows, ["GRANT_ID", "KEY_ID", "GRANTEE", "OPERATIONS", "NAME", "CREATED"])


# ---- subcommands ----------------------------------------------------------------------------

Command = Callable[[KmsClient, argparse.Namespace], tuple[Any, Callable[[Any], str] | None]]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def deco(fn: Command) -> Command:
        COMMANDS[name] = (fn, args, help)
        return fn
    return deco


def _key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", metavar="KEY", help="key id or alias")


def _aad_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aad", help="additional_authenticated_data (must match on decrypt)")


def _with_aad(body: dict, aad: str | None, name: str = "additional_authenticated_data") -> dict:
    if aad is not None:
        body[name] = aad
    return body


def _simple(op: str, help: str, fmt: Callable[[Any], str] | None = None) -> None:
    """A subcommand whose only argument is KEY."""
    def run(c: KmsClient, a: argparse.Namespace):
        return c.call(op, {"key_id": c.key_id(a.key)}), fmt
    command(op, help, _key_arg)(run)


def _fmt_info(r: dict) -> str:
    return _fields(r.get("key_info", r))


@command("create-key", "create a customer master key (AES_256 unless --spec)",
         lambda p: (p.add_argument("--alias", required=True), p.add_argument("--description"),
                    p.add_argument("--spec", help="AES_256 (default), SM4, RSA_2048/3072/4096, EC_P256, EC_P384, "
                                                  "SECP256K1, HMAC_256/384/512, HMAC_SM3"),
                    p.add_argument("--usage", help="ENCRYPT_DECRYPT, SIGN_VERIFY or GENERATE_VERIFY_MAC "
                                                   "(default: the spec's)"),
                    p.add_argument("--external", action="store_true",
                                   help="origin external: the key waits for import-key-material")))
def _c_create_key(c, a):
    body = _with_aad({"key_alias": a.alias}, a.description, "key_description")
    for name, v in (("key_spec", a.spec), ("key_usage", a.usage), ("origin", "external" if a.external else None)):
        if v is not None:
            body[name] = v
    return c.call("create-key", body), _fmt_info


@command("list-keys", "list keys (all pages unless --limit)",
         lambda p: (p.add_argument("--state", choices=["1", "2", "3", "4", "5"]),
                    p.add_argument("--limit", type=int), p.add_argument("--marker")))
def _c_list_keys(c, a):
    body: dict = {"key_spec": "ALL"}
    if a.state:
        body["key_state"] = a.state
    if a.limit is not None or a.marker:
        if a.limit is not None:
            body["limit"] = str(a.limit)
        if a.marker:
            body["marker"] = a.marker
        reply = c.call("list-keys", body)
    else:
        details, marker = [], None
        while True:
            reply = c.call("list-keys", {**body, **({"marker": marker} if marker else {})})
            details += reply["key_details"]
            if reply["truncated"] != "true":
                break
            marker = reply["next_marker"]
        reply = {**reply, "keys": [d["key_id"] for d in details], "key_details": details,
                 "truncated": "false", "next_marker": ""}
    return reply, lambda r: _keys_table(r["key_details"]) + (
        f"\n(more: --marker {r['next_marker']})" if r.get("truncated") == "true" else "")


@command("describe-key", "show a key", _key_arg)
def _c_describe(c, a):
    return {"key_info": c.describe_key(a.key)}, _fmt_info


@command("resolve-key", "alias or id -> key details (creates a default key such as sfs/default)",
         lambda p: p.add_argument("ref", metavar="ALIAS_OR_ID"))
def _c_resolve(c, a):
    return {"key_info": c.resolve_key(a.ref)}, _fmt_info


_simple("enable-key", "enable a disabled key", _fmt_info)
_simple("disable-key", "disable a key (its ciphertexts stop decrypting)", _fmt_info)
_simple("cancel-key-deletion", "cancel a scheduled deletion (the key becomes disabled)", _fields)


@command("schedule-key-deletion", "schedule deletion after 7..1096 days",
         lambda p: (_key_arg(p), p.add_argument("--pending-days", default="7")))
def _c_schedule(c, a):
    return c.call("schedule-key-deletion", {"key_id": c.key_id(a.key), "pending_days": str(a.pending_days)}), _fields


@command("update-key-alias", "rename a key", lambda p: (_key_arg(p), p.add_argument("--alias", required=True)))
def _c_update_alias(c, a):
    return c.call("update-key-alias", {"key_id": c.key_id(a.key), "key_alias": a.alias}), _fmt_info


@command("update-key-description", "change a key's description",
         lambda p: (_key_arg(p), p.add_argument("--description", required=True)))
def _c_update_desc(c, a):
    return c.call("update-key-description", {"key_id": c.key_id(a.key), "key_description": a.description}), _fmt_info


@command("create-datakey", "generate a data key: plaintext and ciphertext (hex)",
         lambda p: (_key_arg(p), p.add_argument("--length", type=int, default=256, help="bits"), _aad_arg(p),
                    p.add_argument("--without-plaintext", action="store_true")))
def _c_create_datakey(c, a):
    op = "create-datakey-without-plaintext" if a.without_plaintext else "create-datakey"
    body = _with_aad({"key_id": c.key_id(a.key), "datakey_length": str(a.length)}, a.aad)
    return c.call(op, body), _fields


@command("create-datakey-without-plaintext", "generate a data key, return only its ciphertext",
         lambda p: (_key_arg(p), p.add_argument("--length", type=int, default=256, help="bits"), _aad_arg(p)))
def _c_create_datakey_np(c, a):
    body = _with_aad({"key_id": c.key_id(a.key), "datakey_length": str(a.length)}, a.aad)
    return c.call("create-datakey-without-plaintext", body), _fields


@command("encrypt-datakey", "wrap a data key you hold (hex)",
         lambda p: (_key_arg(p), p.add_argument("--data-key", required=True, help="hex"), _aad_arg(p)))
def _c_encrypt_datakey(c, a):
    try:
        dek = bytes.fromhex(a.data_key)
    except ValueError:
        raise UsageError("--data-key must be hexadecimal") from None
    plain = (dek + hashlib.sha256(dek).digest()).hex().upper()
    body = _with_aad({"key_id": c.key_id(a.key), "plain_text": plain, "datakey_plain_length": str(len(dek))}, a.aad)
    return c.call("encrypt-datakey", body), _fields


@command("decrypt-datakey", "unwrap a data key",
         lambda p: (_key_arg(p), p.add_argument("--cipher-text", required=True),
                    p.add_argument("--length", type=int, default=32, help="data key bytes"), _aad_arg(p)))
def _c_decrypt_datakey(c, a):
    body = _with_aad({"key_id": c.key_id(a.key), "cipher_text": a.cipher_text,
                      "datakey_cipher_length": str(a.length)}, a.aad)
    return c.call("decrypt-datakey", body), _fields


@command("re-encrypt", "move a data-key ciphertext to another key or the newest version, without plaintext",
         lambda p: (p.add_argument("--cipher-text", required=True), p.add_argument("--to", required=True,
                    metavar="KEY"), p.add_argument("--source-aad"), p.add_argument("--destination-aad")))
def _c_re_encrypt(c, a):
    body = {"cipher_text": a.cipher_text, "destination_key_id": c.key_id(a.to)}
    _with_aad(body, a.source_aad, "source_additional_authenticated_data")
    _with_aad(body, a.destination_aad, "destination_additional_authenticated_data")
    return c.call("re-encrypt", body), _fields


@command("encrypt-data", "encrypt up to 4096 bytes of text (base64 out)",
         lambda p: (_key_arg(p), p.add_argument("--text", required=True, help="text, or - for stdin"), _aad_arg(p)))
def _c_encrypt_data(c, a):
    text = sys.stdin.read() if a.text == "-" else a.text
    return c.call("encrypt-data", _with_aad({"key_id": c.key_id(a.key), "plain_text": text}, a.aad)), _fields


@command("decrypt-data", "decrypt encrypt-data output",
         lambda p: (p.add_argument("--cipher-text", required=True), _aad_arg(p)))
def _c_decrypt_data(c, a):
    return c.call("decrypt-data", _with_aad({"cipher_text": a.cipher_text}, a.aad)), _fields


@command("gen-random", "random bytes (hex)", lambda p: p.add_argument("--bits", type=int, default=256))
def _c_gen_random(c, a):
    return c.call("gen-random", {"random_data_length": str(a.bits)}), lambda r: r["random_data"]


@command("create-grant", "let another user (uid or name) use a key for some operations",
         lambda p: (_key_arg(p), p.add_argument("--grantee", required=True, help="uid or user name"),
                    p.add_argument("--operations", required=True, help="comma-separated, e.g. "
                                   "create-datakey,decrypt-datakey,describe-key"),
                    p.add_argument("--name"), p.add_argument("--retiring", help="principal that may retire it")))
def _c_create_grant(c, a):
    body: dict = {"key_id": c.key_id(a.key), "grantee_principal": a.grantee,
                  "operations": [o.strip() for o in a.operations.split(",") if o.strip()]}
    if a.name:
        body["name"] = a.name
    if a.retiring:
        body["retiring_principal"] = a.retiring
    return c.call("create-grant", body), _fields


@command("list-grants", "grants of a key", _key_arg)
def _c_list_grants(c, a):
    return c.call("list-grants", {"key_id": c.key_id(a.key)}), lambda r: _grants_table(r["grants"])


@command("list-retirable-grants", "grants you may retire")
def _c_list_retirable(c, a):
    return c.call("list-retirable-grants", {}), lambda r: _grants_table(r["grants"])


@command("revoke-grant", "revoke a grant (key owner)", lambda p: (_key_arg(p), p.add_argument("grant_id")))
def _c_revoke(c, a):
    return c.call("revoke-grant", {"key_id": c.key_id(a.key), "grant_id": a.grant_id}), lambda r: "revoked"


@command("retire-grant", "retire a grant (retiring principal or grantee)",
         lambda p: (_key_arg(p), p.add_argument("grant_id")))
def _c_retire(c, a):
    return c.call("retire-grant", {"key_id": c.key_id(a.key), "grant_id": a.grant_id}), lambda r: "retired"


_simple("enable-key-rotation", "rotate the key every rotation interval", lambda r: "rotation enabled")
_simple("disable-key-rotation", "stop automatic rotation", lambda r: "rotation disabled")
_simple("get-key-rotation-status", "rotation settings and key versions", _fields)
_simple("rotate-on-demand", "add a new key version now", lambda r: f"rotated {r['key_id']}")


@command("update-key-rotation-interval", "days between rotations (30..365)",
         lambda p: (_key_arg(p), p.add_argument("days", type=int)))
def _c_rotation_interval(c, a):
    return c.call("update-key-rotation-interval", {"key_id": c.key_id(a.key), "rotation_interval": a.days}), \
        lambda r: f"rotation interval set to {a.days} days"


@command("user-quotas", "key and grant quotas")
def _c_quotas(c, a):
    return c.call("user-quotas", method="GET"), lambda r: _table(
        [[q["type"], str(q["used"]), str(q["quota"])] for q in r["quotas"]["resources"]], ["TYPE", "USED", "QUOTA"])


@command("user-instances", "number of your (non-default) keys")
def _c_instances(c, a):
    return c.call("user-instances", method="GET"), lambda r: str(r["instance_num"])


@command("create-alias", "add an alias to a key", lambda p: (_key_arg(p), p.add_argument("alias")))
def _c_create_alias(c, a):
    return c.call("aliases", {"key_id": c.key_id(a.key), "alias": a.alias}), _fields


@command("list-aliases", "aliases (of one key, or all)", lambda p: p.add_argument("key", nargs="?", metavar="KEY"))
def _c_list_aliases(c, a):
    path = "aliases" + (f"?key_id={c.key_id(a.key)}" if a.key else "")
    return c.call(path, method="GET"), lambda r: _table(
        [[x["alias"], x["key_id"], _when(x["create_time"])] for page in r for x in page["aliases"]],
        ["ALIAS", "KEY_ID", "CREATED"])


@command("delete-alias", "remove aliases from a key", lambda p: (_key_arg(p), p.add_argument("alias", nargs="+")))
def _c_delete_alias(c, a):
    return c.call("aliases", {"key_id": c.key_id(a.key), "aliases": a.alias}, method="DELETE"), lambda r: "deleted"


@command("associate-alias", "point an existing alias at another key",
         lambda p: (p.add_argument("alias"), p.add_argument("key", metavar="KEY")))
def _c_associate(c, a):
    return c.call("alias/associate", {"alias": a.alias, "target_key_id": c.key_id(a.key)}), _fields


@command("tag-key", "set tags KEY=VALUE", lambda p: (_key_arg(p), p.add_argument("tags", nargs="+")))
def _c_tag(c, a):
    tags = []
    for t in a.tags:
        k, sep, v = t.partition("=")
        if not sep:
            raise UsageError(f"tag {t!r} must be KEY=VALUE")
        tags.append({"key": k, "value": v})
    return c.call(f"{c.key_id(a.key)}/tags/action", {"action": "create", "tags": tags}), lambda r: "tagged"


@command("untag-key", "remove tags", lambda p: (_key_arg(p), p.add_argument("tag_keys", nargs="+")))
def _c_untag(c, a):
    return c.call(f"{c.key_id(a.key)}/tags/action",
                  {"action": "delete", "tags": [{"key": k, "value": ""} for k in a.tag_keys]}), lambda r: "untagged"


@command("list-tags", "tags of a key", _key_arg)
def _c_list_tags(c, a):
    return c.call(f"{c.key_id(a.key)}/tags", method="GET"), lambda r: _table(
        [[t["key"], t["value"]] for t in r["tags"]], ["KEY", "VALUE"])


def parse_since(text: str, now: float | None = None) -> int:
    """--since: "10m", "2h", "3d", Unix seconds, or an ISO date/time → ms since epoch."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m:
        return int((now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]) * 1000)
    try:
        return int(float(text) * 1000)
    except ValueError:
        pass
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        raise UsageError(f"--since {text!r}: use e.g. 10m, 2h, 1d, Unix seconds or 2026-01-31T12:00") from None


@command("audit", "audit log: who used which key for what, with the request's AAD (encfs: the file id)",
         lambda p: (p.add_argument("--key", metavar="KEY"), p.add_argument("--since", metavar="T",
                    help="10m, 2h, 1d, Unix seconds or ISO time"),
                    p.add_argument("--aad", metavar="AAD", help="only requests with this additional_authenticated_data "
                                   "(encfs passes the file id, 32 hex characters)"),
                    p.add_argument("--limit", type=int, default=1000)))
def _c_audit(c, a):
    body: dict = {"limit": str(a.limit)}
    if a.key:
        body["key_id"] = a.key if _is_id(a.key) else c.key_id(a.key)
    if a.since:
        body["since"] = str(parse_since(a.since))
    if a.aad:
        body["aad"] = a.aad
    return c.call("x-encfs-list-audit", body), lambda r: _table(
        [[_when(x["time"]), x["caller"], x["operation"], x["key_id"] or "-", _printable(x.get("aad", "")) or "-",
          (x["grant_id"][:12] or "-"), x["outcome"], x["status"], x["error_code"] or "-"] for x in r["records"]],
        ["TIME", "CALLER", "OPERATION", "KEY_ID", "AAD", "GRANT", "OUTCOME", "STATUS", "ERROR"])


def _printable(text: str) -> str:
    """A caller-chosen string made safe for a terminal table: control characters, spaces and
    anything non-ASCII are escaped (no escape sequences, no bidi tricks, one column)."""
    if text.isascii() and text.isprintable() and " " not in text:
        return text
    return "".join(ch if ch.isascii() and ch.isprintable() and ch != " " else
                   (f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}") for ch in text)


def _is_id(ref: str) -> bool:
    from .client import is_key_id
    return is_key_id(ref)


# ---- serve ----------------------------------------------------------------------------------

def _serve(a: argparse.Namespace) -> int:
    from . import auth
    from .server import ServerConfig, serve, server_tls_context
    from .store import StoreError

    logging.basicConfig(level=getattr(logging, a.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s kms %(levelname)s %(message)s")
    try:
        mode = int(a.socket_mode, 8)
    except ValueError:
        raise UsageError(f"--socket-mode {a.socket_mode!r} is not an octal mode such as 600") from None
    listen = None
    creds = None
    tls = None
    if (a.tls_cert is None) != (a.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together (kms make-cert makes both)")
    if a.tls_cert and not a.listen:
        raise UsageError("--tls-cert/--tls-key are for the TCP listener: add --listen HOST:PORT")
    if a.listen:
        host, sep, port = a.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"--listen {a.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8443")
        listen = (host.strip("[]") or "127.0.0.1", int(port))
        if a.tls_cert:
            try:
                tls = server_tls_context(a.tls_cert, a.tls_key)
            except (OSError, ValueError) as e:     # ssl.SSLError is an OSError
                raise UsageError(f"cannot use --tls-cert {a.tls_cert} / --tls-key {a.tls_key}: "
                                 f"{getattr(e, 'strerror', None) or getattr(e, 'reason', None) or e}") from None
        elif listen[0] not in ("127.0.0.1", "::1", "localhost"):
            # Plain HTTP: signatures stop forgery, but bodies (data keys!) would travel in the clear.
            raise UsageError(f"refusing plain HTTP on --listen {a.listen}, which is not a loopback address: "
                             f"data keys would cross the network in the clear. Add --tls-cert FILE --tls-key "
                             f"FILE (kms make-cert --dir DIR --host NAME makes them), or listen on 127.0.0.1")
        if not getattr(a, "credentials", None):
            raise UsageError("--listen needs --credentials FILE (Huawei access-key CSV)")
        try:
            creds = auth.load_credentials(a.credentials)
        except auth.CredentialsError as e:
            raise UsageError(str(e)) from None
    elif getattr(a, "credentials", None):
        raise UsageError("--credentials is only used with --listen")
    clock = a.test_clock_file or os.environ.get(CLOCK_ENV) or None
    if clock:
        logging.getLogger("kms").warning("TESTING ONLY: key lifecycle clock read from %s", clock)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*s)?\s*", a.rate_limit)
    if not m:
        raise UsageError(f"--rate-limit {a.rate_limit!r}: expected N/s, e.g. 2000/s (0 = unlimited)")
    if not 1 <= a.workers <= 64:
        raise UsageError("--workers must be between 1 and 64")
    for name in ("max_connections", "max_connections_per_uid"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("header_timeout", "body_timeout", "idle_timeout"):
        if not getattr(a, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be more than 0 seconds")
    config = ServerConfig(socket_path=a.socket, data_dir=a.data_dir, project_id=a.project_id,
                          socket_mode=mode, listen=listen, credentials=creds, clock_file=clock,
                          header_timeout=a.header_timeout, body_timeout=a.body_timeout,
                          idle_timeout=a.idle_timeout, max_connections=a.max_connections,
                          max_connections_per_peer=a.max_connections_per_uid, rate_limit=float(m.group(1)),
                          passphrase=_passphrase(a.passphrase_file), tls=tls,
                          strict_huawei=a.strict_huawei)
    try:
        return serve(config, a.workers)
    except (StoreError, OSError) as e:
        print(f"kms serve: {e}", file=sys.stderr)
        return 1


def _passphrase(path: str | None) -> bytes | None:
    """--passphrase-file (refused unless only its owner may read it) or $KMS_PASSPHRASE; one
    trailing newline is not part of the passphrase."""
    env = os.environ.get(PASSPHRASE_ENV)
    if path is None:
        return env.encode() if env else None
    if env:
        raise UsageError(f"give --passphrase-file or {PASSPHRASE_ENV}, not both")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"cannot read passphrase file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise UsageError(f"refusing passphrase file {path}: group or others have access "
                             f"(mode {st.st_mode & 0o7777:04o}); chmod 600 {path}")
        data = os.read(fd, 65537)
    finally:
        os.close(fd)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise UsageError(f"passphrase file {path} is empty")
    return data


# ---- main -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # The second spellings are encfs's (encfs/kmsconn.py): one set of KMS options for every tool.
    common.add_argument("--socket", "--kms-socket", dest="socket", default=argparse.SUPPRESS,
                        help="daemon socket (env KMS_SOCKET)")
    common.add_argument("--project-id", default=argparse.SUPPRESS, help="project id (env KMS_PROJECT_ID)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON")
    common.add_argument("--url", "--kms-url", dest="url", default=argparse.SUPPRESS, metavar="URL",
                        help=f"talk to a KMS over TCP instead of the socket: http://HOST:PORT or "
                             f"https://HOST[:PORT], requests signed with AK/SK (env {URL_ENV})")
    common.add_argument("--ca-file", "--kms-ca-file", dest="ca_file", default=argparse.SUPPRESS, metavar="FILE",
                        help="with an https:// --url: trust only the CA certificate(s) in FILE (e.g. the ca.pem "
                             "of kms make-cert)")
    common.add_argument("--credentials", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"Huawei access-key CSV (mode 0600): with --url the client's key (env "
                             f"{CREDENTIALS_ENV}); with serve --listen the keys accepted")

    p = argparse.ArgumentParser(prog="kms", parents=[common],
                                description="Local Huawei-compatible KMS: daemon and client.")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    s.add_argument("--data-dir", default=None, help="key store directory (env KMS_DATA_DIR)")
    s.add_argument("--socket-mode", default="600", help="octal mode of the socket (default 600)")
    s.add_argument("--listen", metavar="HOST:PORT", help="also serve Huawei's SDK over TCP (AK/SK signed); "
                   "plain HTTP only on a loopback address, elsewhere --tls-cert/--tls-key are required")
    s.add_argument("--tls-cert", metavar="FILE", help="serve --listen over TLS with this certificate (PEM chain)")
    s.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    s.add_argument("--strict-huawei", action="store_true",
                   help="TESTING: behave as Huawei Cloud KMS to a client: refuse every x-encfs-* extension "
                        "as an unknown path, present data-key ciphertexts in a foreign layout")
    s.add_argument("--test-clock-file", metavar="FILE",
                   help=f"TESTING ONLY: file holding 'now' in Unix seconds (env {CLOCK_ENV})")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="serve with N processes sharing the socket and the store (uses N cores; limits "
                        "are shared out between them; default 1)")
    s.add_argument("--passphrase-file", metavar="FILE",
                   help=f"derive the root key from the passphrase in FILE (mode 0600) with scrypt instead of "
                        f"keeping root.key (env {PASSPHRASE_ENV}: the passphrase itself)")
    lim = s.add_argument_group("limits against hostile or runaway clients")
    lim.add_argument("--max-connections", type=int, default=1024, metavar="N",
                     help="open connections in all; more get 503 (default 1024)")
    lim.add_argument("--max-connections-per-uid", type=int, default=256, metavar="N",
                     help="open connections per uid (socket) or IP address (TCP); more get 503 (default 256)")
    lim.add_argument("--rate-limit", default="20000/s", metavar="N/s",
                     help="requests per second per caller (uid or access key), bursts of one second's worth; "
                          "more get 429 APIGW.0308; 0 = unlimited (default 20000/s: far above what one client reaches, so only a runaway caller meets it)")
    lim.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                     help="seconds from a request's first byte to the end of its headers (default 10)")
    lim.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                     help="seconds from the end of the headers to the end of the body (default 30)")
    lim.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                     help="seconds a kept-alive connection may wait for its next request (default 60)")

    mc = sub.add_parser("make-cert", help="make a private CA and a server certificate for serve --tls-cert")
    mc.add_argument("--dir", required=True, help="where ca.pem, ca.key, server.pem, server.key go (the CA is "
                    "made once and reused for later certificates)")
    mc.add_argument("--host", action="append", metavar="NAME",
                    help="a host name or IP address clients use (repeatable; default: localhost and 127.0.0.1)")
    mc.add_argument("--days", type=int, default=397, help="validity of the server certificate (default 397)")

    for name, (_fn, add_args, help) in COMMANDS.items():
        sp = sub.add_parser(name, parents=[common], help=help)
        add_args(sp)
    return p


def _client(a: argparse.Namespace, socket_path: str, project_id: str) -> KmsClient:
    from .auth import CredentialsError
    url = getattr(a, "url", None) or os.environ.get(URL_ENV)
    creds = getattr(a, "credentials", None) or os.environ.get(CREDENTIALS_ENV)
    ca_file = getattr(a, "ca_file", None)
    if not url:
        if getattr(a, "credentials", None):
            raise UsageError("--credentials is for --url (or serve --listen)")
        if ca_file:
            raise UsageError("--ca-file is for an https:// --url")
        return KmsClient(socket_path, project_id)
    if not creds:
        raise UsageError("--url needs --credentials FILE (Huawei access-key CSV: User Name,Access Key Id,"
                         "Secret Access Key)")
    try:
        return KmsClient.from_credentials_file(url, creds, project_id=project_id, ca_file=ca_file)
    except CredentialsError as e:
        raise UsageError(str(e)) from None
    except (OSError, ValueError) as e:     # an unreadable CA file, a malformed url
        raise UsageError(str(e)) from None


def _make_cert(a: argparse.Namespace) -> int:
    from .certs import write_cert_dir
    hosts = a.host or ["localhost", "127.0.0.1"]
    if not 1 <= a.days <= 3650:
        raise UsageError("--days must be between 1 and 3650")
    try:
        paths, new_ca = write_cert_dir(a.dir, hosts, a.days)
    except (OSError, ValueError) as e:
        raise UsageError(f"make-cert: {getattr(e, 'strerror', None) or e}") from None
    print(f"{'made a new' if new_ca else 'reused the'} CA: {paths['ca.pem']} (its key: {paths['ca.key']}, keep it private)")
    print(f"server certificate for {', '.join(hosts)}: {paths['server.pem']}, key {paths['server.key']}")
    print(f"serve:   kms serve --listen HOST:PORT --credentials FILE --tls-cert {paths['server.pem']} "
          f"--tls-key {paths['server.key']}")
    print(f"clients: encfs ... --kms-url https://{hosts[0]}:PORT --credentials FILE --kms-ca-file {paths['ca.pem']}")
    return 0


from . import cli_crypto  # noqa: E402,F401  (registers sign, verify, import-key-material...)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    socket_path = getattr(a, "socket", None) or default_socket_path()
    project_id = getattr(a, "project_id", None) or default_project_id()
    as_json = getattr(a, "json", False)
    try:
        if a.command == "make-cert":
            return _make_cert(a)
        if a.command == "serve":
            a.socket, a.project_id = socket_path, project_id
            a.data_dir = a.data_dir or default_data_dir()
            return _serve(a)
        fn = COMMANDS[a.command][0]
        with _client(a, socket_path, project_id) as client:
            reply, fmt = fn(client, a)
        if as_json or fmt is None:
            print(json.dumps(reply, indent=2))
        else:
            text = fmt(reply)
            if text:
                print(text)
        return 0
    except UsageError as e:
        print(f"kms: {e}", file=sys.stderr)
        return 2
    except KmsError as e:
        print(f"kms: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
