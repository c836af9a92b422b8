"""A fast path for the common HTTP/1.1 request: parsed here instead of by h11 when it is simple.

h11 was a third of the daemon's CPU per request (py-spy, docs/PERFORMANCE.md). Most requests
are the same small shape: ``POST /v1.0/...`` with a Host and a Content-Length header, ASCII
only, and the whole request in one read. ``parse`` accepts exactly such a request, a strict
subset of what h11 accepts, and returns what h11 would have given (lower-case header names,
values without surrounding blanks, the body); for anything else (incomplete, non-ASCII,
chunked, Expect, Connection other than keep-alive, a repeated Host/Content-Length, oversized)
it returns None and the server hands the bytes to h11, whose checks and errors then apply
unchanged. tests/kms/test_kms_fasthttp.py checks the subset against h11 on generated input.
Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REQUEST_LINE = re.compile(rb"(GET|POST|DELETE) (/[!-~]*) HTTP/1\.1")
# token ":" OWS value OWS, the value visible ASCII and inner spaces only (no tab: h11 allows it,
# we just leave such a request to h11)
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[!-~]+(?: +[!-~]+)*)?)[ \t]*")
_DIGITS = re.compile(rb"[0-9]{1,7}")
# Headers whose presence h11 acts on beyond carrying them: left to h11.
_SPECIAL = frozenset({"transfer-encoding", "expect", "upgrade"})


@dataclass(frozen=True)
class FastRequest:
    method: str
    target: str
    headers: dict[str, str]     # first value of each header, as the server keeps them
    body: bytes
    consumed: int               # bytes of the buffer this request took (the rest is pipelined)


def parse(buf: bytes, max_head: int, max_body: int) -> FastRequest | None:
    """The first request in ``buf`` if it is complete and simple, else None (use h11)."""
    end = buf.find(b"\r\n\r\n", 0, max_head)
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return None
    headers: dict[str, str] = {}
    seen_host = False
    length = None
    for line in lines[1:]:
        h = _HEADER.fullmatch(line)
        if h is None:
            return None
        name = h.group(1).decode("ascii").lower()
        value = h.group(2)
        if name in _SPECIAL:
            return None
        if name == "host":
            if seen_host:
                return None
            seen_host = True
        elif name == "content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
            if length > max_body:
                return None
        elif name == "connection" and value.lower() != b"keep-alive":
            return None
        headers.setdefault(name, value.decode("ascii"))
    if not seen_host:
        return None
    start = end + 4
    stop = start + (length or 0)
    if len(buf) < stop:
        return None
    return FastRequest(m.group(1).decode("ascii"), m.group(2).decode("ascii"), headers,
                       bytes(buf[start:stop]), stop)


def response(status: int, reason: str, headers: list[tuple[str, str]], payload: bytes) -> bytes:
    """A response with a Content-Length body, byte for byte as h11 writes it."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"HTTP/1.1 {status} {reason}\r\n{head}\r\n".encode("ascii") + payload
