"""The one way names reach logs and terminals: `printable`. Pure."""

from __future__ import annotations

import os


def printable(name: bytes | str) -> str:
    """A path or name as one line of text, for logs and CLI output.

    Anyone who can write to the backing dir chooses its names: a newline would forge an
    extra log line, an invalid UTF-8 byte would crash a strict stdout. Non-printable
    characters (controls, separators, bidi overrides), backslashes and undecodable bytes are
    escaped (``\\n``, ``\\xff``); everything else,
    including non-ASCII letters, is kept as it is.
    """
    if isinstance(name, str):
        name = os.fsencode(name)
    text = name.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        o = ord(ch)
        if 0xdc80 <= o <= 0xdcff:  # an undecodable byte
            out.append(f"\\x{o - 0xdc00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable():  # controls, line/paragraph separators, bidi overrides
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(
                ch, f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                else f"\\U{o:08x}"))
        else:
            out.append(ch)
    return "".join(out)
