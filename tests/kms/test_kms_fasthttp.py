"""kms/fasthttp.py against h11: whatever the fast path accepts, h11 reads the same way (method,
target, the first value of each header, body, bytes used), and a reply it writes is h11's byte
for byte. The fast path may refuse what h11 accepts (it then goes to h11), never the reverse."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from kms import fasthttp

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024


def h11_read(buf: bytes):
    """(method, target, headers, body, consumed) as the server reads it with h11, or None."""
    c = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    c.receive_data(buf)
    try:
        ev = c.next_event()
        if not isinstance(ev, h11.Request):
            return None
        body = b""
        while True:
            e = c.next_event()
            if isinstance(e, h11.Data):
                body += e.data
            elif isinstance(e, h11.EndOfMessage):
                break
            else:
                return None
    except h11.RemoteProtocolError:
        return None
    headers: dict[str, str] = {}
    for n, v in ev.headers:
        headers.setdefault(n.decode("latin-1"), v.decode("utf-8", "replace"))
    rest = c.trailing_data[0]
    return ev.method.decode(), ev.target.decode(), headers, body, len(buf) - len(rest)


def same(buf: bytes) -> None:
    fast = fasthttp.parse(buf, MAX_HEAD, MAX_BODY)
    if fast is None:
        return
    slow = h11_read(buf)
    assert slow is not None, buf
    assert (fast.method, fast.target, fast.headers, fast.body, fast.consumed) == slow, buf


BASE = b"POST /v1.0/local/kms/create-datakey HTTP/1.1\r\nHost: kms\r\nContent-Length: 2\r\n\r\n{}"


def test_the_common_request_takes_the_fast_path():
    r = fasthttp.parse(BASE + b"POST /next", MAX_HEAD, MAX_BODY)
    assert r is not None and r.body == b"{}" and r.consumed == len(BASE)
    assert r.headers == {"host": "kms", "content-length": "2"}
    same(BASE)


def test_what_goes_to_h11():
    for buf in (
        BASE[:-1],                                                   # body incomplete
        BASE.replace(b"Host: kms\r\n", b""),                         # no Host: h11's error
        BASE.replace(b"Host: kms", b"Host: a\r\nHost: b"),
        BASE.replace(b"Content-Length: 2", b"Content-Length: 2\r\nContent-Length: 2"),
        BASE.replace(b"Content-Length: 2", b"Transfer-Encoding: chunked"),
        BASE.replace(b"Content-Length: 2", b"Content-Length: 2\r\nExpect: 100-continue"),
        BASE.replace(b"Content-Length: 2", b"Content-Length: 2\r\nConnection: close"),
        BASE.replace(b"HTTP/1.1", b"HTTP/1.0"),
        BASE.replace(b"Host: kms", b"Host: k\xc3\xa9"),
        BASE.replace(b"Host: kms", b"Host: a\r\n b"),                 # obs-fold
        BASE.replace(b"Host: kms", b"Host: a\tb"),
        BASE.replace(b"Content-Length: 2", b"Content-Length: +2"),
        BASE.replace(b"Content-Length: 2", b"Content-Length: 99999999"),
        b"\r\n" + BASE,
        BASE.replace(b"POST", b"PATCH"),
        BASE.replace(b" /v1.0", b" http://x/v1.0"),
    ):
        assert fasthttp.parse(buf, MAX_HEAD, MAX_BODY) is None, buf


def test_reply_bytes_are_h11s():
    for status, reason in ((200, "OK"), (429, "Too Many Requests"), (599, "")):
        headers = [("Content-Type", "application/json;charset=UTF-8"), ("Content-Length", "2"),
                   ("X-Request-Id", "abc")]
        c = h11.Connection(h11.SERVER)
        c.receive_data(BASE)
        c.next_event()
        c.next_event()
        c.next_event()
        want = c.send(h11.Response(status_code=status, headers=headers, reason=reason.encode()))
        want += c.send(h11.Data(data=b"{}")) + c.send(h11.EndOfMessage())
        assert fasthttp.response(status, reason, headers, b"{}") == want


_NAME = st.sampled_from([b"Host", b"host", b"Content-Length", b"X-Project-Id", b"Connection", b"A", b"x-y",
                         b"Content-Type", b"Bad Name", b"", b"Transfer-Encoding"])
_VALUE = st.one_of(st.sampled_from([b"kms", b"2", b"0", b" 2 ", b"keep-alive", b"Keep-Alive", b"close", b"",
                                    b"a  b", b"007"]), st.binary(max_size=12))


@settings(max_examples=400, deadline=None)
@given(method=st.sampled_from([b"POST", b"GET", b"DELETE", b"post", b"PUT"]),
       target=st.one_of(st.just(b"/v1.0/local/kms/x"), st.binary(max_size=10).map(lambda b: b"/" + b)),
       headers=st.lists(st.tuples(_NAME, _VALUE), max_size=6),
       sep=st.sampled_from([b": ", b":", b" : ", b":\t"]),
       body=st.binary(max_size=8), tail=st.binary(max_size=8))
def test_generated_requests_agree_with_h11(method, target, headers, sep, body, tail):
    head = method + b" " + target + b" HTTP/1.1\r\n" + b"".join(n + sep + v + b"\r\n" for n, v in headers)
    same(head + b"\r\n" + body + tail)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, len(BASE)))
def test_mutated_requests_agree_with_h11(junk, at):
    same(BASE[:at] + junk + BASE[at:])
