"""Hostile clients against a running ``kms serve``, over raw socket bytes (issue 8 item 3).

Every test ends by checking that the daemon still answers a polite client; the module ends by
checking that it never logged an internal error or a traceback.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import threading
import time

import pytest

from encfs.pytest_plugin import short_tempdir, run_as_uid, start_kms_server
from kms.client import KmsClient, KmsError

# Short timeouts so that the slow-client tests end quickly; the assertions never depend on them
# being met precisely, only on the daemon ending the connection eventually.
LIMITS = ["--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "2",
          "--max-connections", "400", "--max-connections-per-uid", "120"]
WAIT = 30.0     # generous upper bound for "eventually" on a loaded machine


#: file descriptors the flood tests need: 2,000 client sockets here, plus the daemon's own
FDS_NEEDED = 2000 + 1000


@pytest.fixture(scope="module")
def enough_fds():
    """Raise our soft RLIMIT_NOFILE (inherited by the daemons started after) for the flood
    tests: many machines default to 1,024. Restored at the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FDS_NEEDED if hard == resource.RLIM_INFINITY else min(FDS_NEEDED, hard)
    assert want >= FDS_NEEDED, f"hard RLIMIT_NOFILE {hard} < {FDS_NEEDED}: raise it (ulimit -Hn)"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def hostile_kms(enough_fds):
    workdir = short_tempdir("kms-hostile-")
    os.chmod(workdir, 0o711)            # another uid may reach the socket (test_other_uid_...)
    server = start_kms_server(workdir, extra_args=LIMITS + ["--socket-mode", "666"])
    try:
        yield server
        assert server.process.poll() is None, server.log()
        log = server.log()
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def connect(server, timeout: float = WAIT) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(server.socket_path)
    return s


def read_all(s: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the daemon closes the connection (or resets it after replying)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def parse_replies(data: bytes) -> list[tuple[int, dict, dict]]:
    """(status, headers, json body) of each HTTP reply in ``data`` (Content-Length framed)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:200]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(headers["content-length"])
        out.append((status, headers, json.loads(rest[:n])))
        data = rest[n:]
    return out


def exchange(server, raw: bytes, shut: bool = False) -> list[tuple[int, dict, dict]]:
    with connect(server) as s:
        s.sendall(raw)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return parse_replies(read_all(s))


def request(op: str, body: bytes | str, method: str = "POST", extra: str = "", close: bool = True) -> bytes:
    if isinstance(body, str):
        body = body.encode()
    conn = "Connection: close\r\n" if close else ""
    return (f"{method} /v1.0/local/kms/{op} HTTP/1.1\r\nHost: kms\r\n{conn}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def error_of(reply) -> tuple[int, str]:
    status, _headers, body = reply
    assert set(body) == {"error"} and set(body["error"]) == {"error_code", "error_msg"}, body
    return status, body["error"]["error_code"]


def still_serves(server) -> None:
    with KmsClient(server.socket_path, project_id=server.project_id) as c:
        assert c.call("list-keys", {"limit": "1"})["truncated"] in ("true", "false")


# ---- malformed HTTP ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"\x00\xff\xfe garbage\r\n\r\n",
    b"GET\r\n\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1\r\nHost: k\r\n\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\nContent-Length: 12abc\r\n\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"f" * 5000 + b"\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\nBad Header\r\n\r\n",
    b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\n\r\n",                      # no Host
])
def test_malformed_http_gets_400_and_close(hostile_kms, raw):
    replies = exchange(hostile_kms, raw)
    assert len(replies) == 1
    assert error_of(replies[0]) == (400, "KMS.0201")
    assert replies[0][1]["connection"] == "close"
    assert "garbage" not in replies[0][2]["error"]["error_msg"]      # never echoes the bytes
    still_serves(hostile_kms)


def test_random_binary_flood_is_refused(hostile_kms):
    junk = os.urandom(200_000).replace(b"\r\n", b"xx")
    with connect(hostile_kms) as s:
        try:
            s.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass                                    # refused before we finished sending
        data = read_all(s)
    # The daemon replies before it closes; on a Unix socket what it wrote stays readable
    # after the close (the reset comes after it), also when our send was cut off.
    assert data, "closed without a reply"
    assert error_of(parse_replies(data)[0])[1] in ("KMS.0201", "KMS.0203")
    still_serves(hostile_kms)


def test_huge_headers_431(hostile_kms):
    many = "".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(300)).encode()
    replies = exchange(hostile_kms, b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\n" + many + b"\r\n{}")
    assert error_of(replies[0]) == (431, "KMS.0203")
    long_target = b"GET /v1.0/local/kms/" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: k\r\n\r\n"
    assert error_of(exchange(hostile_kms, long_target)[0]) == (431, "KMS.0203")
    still_serves(hostile_kms)


@pytest.mark.parametrize("length", ["65537", "99999999999999999999999999999999", str(2**64)])
def test_huge_declared_body_refused_before_reading(hostile_kms, length):
    raw = (f"POST /v1.0/local/kms/create-key HTTP/1.1\r\nHost: k\r\nContent-Length: {length}\r\n\r\n"
           "{").encode()
    # h11 itself refuses a Content-Length it cannot represent (KMS.0201); the rest is KMS.0203
    assert error_of(exchange(hostile_kms, raw)[0]) in ((400, "KMS.0203"), (400, "KMS.0201"))
    still_serves(hostile_kms)


def test_huge_chunked_body_refused(hostile_kms):
    chunk = b"8000\r\n" + b" " * 0x8000 + b"\r\n"
    raw = (b"POST /v1.0/local/kms/create-key HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunk * 3 + b"0\r\n\r\n")
    assert error_of(exchange(hostile_kms, raw)[0]) == (400, "KMS.0203")
    still_serves(hostile_kms)


def test_odd_methods_and_targets(hostile_kms):
    for method, target in [("BREW", "/v1.0/local/kms/list-keys"), ("GET", "/v1.0/local/kms/%00%ff/../x"),
                           ("POST", "/v2.0/local/kms/list-keys"), ("POST", "*"), ("PUT", "/v1.0/local/kms/list-keys"),
                           ("POST", "/v1.0/%E2%80%AEcol/kms/list-keys"), ("POST", "/v1.0/local/kms/" + "%2F" * 50)]:
        raw = f"{method} {target} HTTP/1.1\r\nHost: k\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        status, code = error_of(exchange(hostile_kms, raw)[0])
        assert code in ("KMS.0201", "KMS.0321"), (method, target, code)
    still_serves(hostile_kms)


# ---- hostile JSON ------------------------------------------------------------------------------

@pytest.mark.parametrize("op, body, codes", [
    ("list-keys", "[" * 30000 + "]" * 30000, {"KMS.0202"}),
    ("list-keys", "[" * 60000 + "]" * 60000, {"KMS.0203"}),
    ("list-keys", '{"a":' * 1000 + "1" + "}" * 1000, {"KMS.0202"}),
    ("list-keys", '{"a":' * 33 + "1" + "}" * 33, {"KMS.0202"}),
    ("list-keys", '{"limit": ' + "9" * 50000 + "}", {"KMS.0202"}),
    ("list-keys", '{"limit": 1e400}', {"KMS.1601"}),
    ("list-keys", '{"limit": -1}', {"KMS.1601"}),
    ("list-keys", '{"limit": 123456789012345678901234567890}', {"KMS.1601"}),
    ("list-keys", '{"limit": "-1"}', {"KMS.1601"}),
    ("list-keys", '{"limit": "1\\n"}', {"KMS.1601"}),
    ("list-keys", '{"limit": NaN}', {"KMS.1601"}),
    ("list-keys", '"just a string"', {"KMS.0202"}),
    ("list-keys", b'{"limit": "\xff\xfe"}', {"KMS.0202"}),
    ("create-datakey", '{"key_id": "\\ud800"}', {"KMS.0202"}),
    ("create-key", '{"key_alias": "a", "key_description": "\\udfff"}', {"KMS.0202"}),
    ("create-key", '{"key_alias": ["x"]}', {"KMS.1101"}),
    ("create-key", '{"key_alias": {"a": 1}}', {"KMS.1101"}),
    ("create-key", '{"key_alias": null}', {"KMS.0204"}),
    ("create-key", '{"key_alias": true}', {"KMS.1101"}),
    ("create-datakey", '{"key_id": 12}', {"KMS.0308"}),
    ("create-datakey", '{"key_id": "00000000-0000-0000-0000-000000000000\\n"}', {"KMS.0205"}),
    ("gen-random", '{"random_data_length": 1e9}', {"KMS.1801"}),
    ("gen-random", '{"random_data_length": "99999999999999999999"}', {"KMS.1801"}),
    ("gen-random", '{"random_data_length": -8}', {"KMS.1801"}),
    ("decrypt-datakey", '{"key_id": "00000000-0000-0000-0000-000000000000", "cipher_text": "ABC\\n", '
                        '"datakey_cipher_length": "32"}', {"KMS.0207"}),
    ("resource_instances/action", '{"action": "filter", "tags": [{"key": ["x"]}]}', {"KMS.0308"}),
    ("resource_instances/action", '{"action": "filter", "tags": [{"key": "k", "values": 5}]}', {"KMS.0308"}),
    ("resource_instances/action", '{"action": "count", "matches": [{"key": "resource_name", "value": 7}]}',
     {"KMS.0308"}),
    ("x-encfs-list-audit", '{"since": 99999999999999999999999}', {"KMS.0308"}),
])
def test_hostile_json_gets_documented_error(hostile_kms, op, body, codes):
    replies = exchange(hostile_kms, request(op, body))
    status, code = error_of(replies[0])
    assert code in codes and status in (400, 404), (op, body[:80], status, code)
    still_serves(hostile_kms)


@pytest.mark.parametrize("alias", ["sfs\u202edefault", "a\x00b", "\u0430lias", "alias\n", "alias\r\nX: y", "ａlias",
                                   "a" * 256, "", "x/default", "..", "a b", "a\u200bb"])
def test_unicode_tricks_in_aliases_refused(hostile_kms, alias):
    body = json.dumps({"key_alias": alias})
    status, code = error_of(exchange(hostile_kms, request("create-key", body))[0])
    assert code in ("KMS.1101", "KMS.0204") and status == 400, (alias, code)
    # and never resolvable either
    status, code = error_of(exchange(hostile_kms, request("x-encfs-resolve-key", json.dumps({"key": alias})))[0])
    assert code in ("KMS.0207", "KMS.0204")


def test_pipelined_good_then_garbage(hostile_kms):
    raw = request("list-keys", "{}", close=False) + b"\x16\x03\x01 not http\r\n\r\n"
    replies = exchange(hostile_kms, raw)
    assert replies[0][0] == 200
    assert error_of(replies[1]) == (400, "KMS.0201")
    still_serves(hostile_kms)


# ---- slow clients --------------------------------------------------------------------------------

def test_slowloris_headers_do_not_block_others_and_are_cut(hostile_kms):
    s = connect(hostile_kms)
    s.sendall(b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\n")
    stop = threading.Event()

    def dribble():
        # One header byte at a time, forever: absolute deadlines must still end it.
        try:
            while not stop.is_set():
                s.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        still_serves(hostile_kms)                   # not blocked by the slow one
        data = read_all(s)                          # the daemon ends it (408) after --header-timeout
    finally:
        stop.set()
        t.join()
        s.close()
    # Written before the close, the reply stays readable although our writes get a reset.
    assert data, "cut without a reply"
    assert error_of(parse_replies(data)[0]) == (408, "KMS.0201")


def test_slow_body_is_cut(hostile_kms):
    with connect(hostile_kms) as s:
        s.sendall(b"POST /v1.0/local/kms/list-keys HTTP/1.1\r\nHost: k\r\nContent-Length: 100\r\n\r\n{")
        replies = parse_replies(read_all(s))
    assert error_of(replies[0]) == (408, "KMS.0201")
    still_serves(hostile_kms)


def test_silent_and_half_open_connections_are_closed(hostile_kms):
    socks = [connect(hostile_kms) for _ in range(20)]
    try:
        still_serves(hostile_kms)
        for s in socks:
            assert read_all(s) == b""               # idle timeout: closed without a reply
    finally:
        for s in socks:
            s.close()


def test_client_that_never_reads(hostile_kms):
    # Pipelines many requests and never reads a reply: the daemon must not stall for others.
    s = connect(hostile_kms)
    try:
        s.settimeout(5)
        try:
            for _ in range(2000):
                s.sendall(request("list-keys", '{"limit": "1000"}', close=False))
        except (socket.timeout, OSError):
            pass
        still_serves(hostile_kms)
    finally:
        s.close()


# ---- many connections ----------------------------------------------------------------------------

def flood(server, n: int) -> dict[str, int]:
    """Open n connections at once, send a request on each, classify the answers."""
    socks = []
    answers = {"ok": 0, "busy": 0, "dropped": 0}
    try:
        for _ in range(n):
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    socks.append(connect(server))
                    break
                except BlockingIOError:             # the listen backlog is full: the kernel's backpressure
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
        for s in socks:
            try:
                s.sendall(request("list-keys", '{"limit": "1"}', close=False))
            except OSError:
                pass
        for s in socks:
            try:
                head = s.recv(65536)
            except OSError:
                head = b""
            if head.startswith(b"HTTP/1.1 200"):
                answers["ok"] += 1
            elif head.startswith(b"HTTP/1.1 503"):
                (reply,) = parse_replies(head + read_all(s))
                assert error_of(reply) == (503, "KMS.0103") and reply[1]["connection"] == "close"
                assert reply[1]["retry-after"] == "1"
                answers["busy"] += 1
            else:
                answers["dropped"] += 1             # closed without a reply under the flood
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + WAIT
    while True:                                     # the slots come back once we closed ours
        try:
            still_serves(server)
            break
        except KmsError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    return answers


def test_per_uid_connection_cap_thousands_of_connections(hostile_kms):
    answers = flood(hostile_kms, 2000)              # per-uid cap 120
    assert answers["ok"] <= 120 and answers["busy"] > 0, answers
    assert answers["ok"] + answers["busy"] + answers["dropped"] == 2000
    assert "refusing more with 503" in hostile_kms.log()


def test_global_connection_limit(enough_fds):
    workdir = short_tempdir("kms-conns-")
    server = start_kms_server(workdir, extra_args=["--max-connections", "50", "--max-connections-per-uid", "1000"])
    try:
        answers = flood(server, 300)
        assert answers["ok"] <= 50 and answers["busy"] > 0, answers
        assert "connection limit (50) reached" in server.log()
        assert server.process.poll() is None
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ---- another uid's keys --------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_other_uid_cannot_use_keys_over_raw_socket(hostile_kms):
    with hostile_kms.client as c:
        kid = c.create_key("hostile/owned")["key_id"]
        _dek, ct = c.create_datakey(kid, aad="f")
    requests = [
        ("describe-key", {"key_id": kid}),
        ("create-datakey", {"key_id": kid}),
        ("decrypt-datakey", {"key_id": kid, "cipher_text": ct, "datakey_cipher_length": "32",
                             "additional_authenticated_data": "f"}),
        ("disable-key", {"key_id": kid}),
        ("create-grant", {"key_id": kid, "grantee_principal": "65534", "operations": ["decrypt-datakey"]}),
        ("re-encrypt", {"cipher_text": ct, "destination_key_id": kid, "source_additional_authenticated_data": "f"}),
    ]
    kind, replies = run_as_uid(65534, lambda: [
        exchange(hostile_kms, request(op, json.dumps(body)))[0] for op, body in requests])
    assert kind == "ok", replies
    assert [error_of(x) for x in replies] == [(403, "KMS.0306")] * 6
    still_serves(hostile_kms)


# ---- rate limit ----------------------------------------------------------------------------------

def test_rate_limit_429():
    workdir = short_tempdir("kms-rate-")
    server = start_kms_server(workdir, extra_args=["--rate-limit", "1/s"])
    try:
        with connect(server) as s:
            statuses = []
            for _ in range(30):
                s.sendall(request("list-keys", "{}", close=False))
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                        data.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
                    data += s.recv(65536)
                statuses.append(parse_replies(data)[0])
        limited = [x for x in statuses if x[0] == 429]
        assert limited, [x[0] for x in statuses]
        assert error_of(limited[0]) == (429, "APIGW.0308") and limited[0][1]["retry-after"] == "1"
        deadline = time.monotonic() + WAIT
        while True:                                 # the bucket refills
            try:
                still_serves(server)
                break
            except KmsError as e:
                assert e.status == 429 and e.error_code == "APIGW.0308"
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert "exceeds the rate limit" in server.log()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_rate_limit_is_per_uid():
    """Each uid has a bucket of its own: one uid over the limit slows nobody else. A bucket
    of one request refilled every 100 s, so no refill can happen during the test; the
    daemon's readiness check spent uid 0's."""
    workdir = short_tempdir("kms-rate-uid-")
    os.chmod(workdir, 0o711)
    server = start_kms_server(workdir, extra_args=["--rate-limit", "0.01/s", "--socket-mode", "666"])

    def list_keys():
        with KmsClient(server.socket_path, project_id=server.project_id) as c:
            return c.call("list-keys", {"limit": "1"})["truncated"]

    limited = ("kms", (429, "APIGW.0308"))
    try:
        with pytest.raises(KmsError) as e:
            list_keys()
        assert (e.value.status, e.value.error_code) == limited[1]           # uid 0: spent
        kind, value = run_as_uid(65534, list_keys)
        assert (kind, value) == ("ok", "false")                             # uid 65534: its own
        kind, value = run_as_uid(65534, list_keys)
        assert (kind, value[:2]) == limited, (kind, value)                  # ... now spent too
        kind, value = run_as_uid(4242, list_keys)
        assert (kind, value) == ("ok", "false")                             # a third uid: its own
        assert "uid=65534 exceeds the rate limit" in server.log(), server.log()[-2000:]
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
