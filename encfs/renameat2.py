"""rename(2) with Linux's RENAME_NOREPLACE and RENAME_EXCHANGE flags (not in the os module)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(old: bytes, new: bytes, flags: int = 0) -> None:
    """Rename ``old`` to ``new``; flags as in renameat2(2). Raises OSError like os.rename."""
    if flags == 0:
        os.rename(old, new)
        return
    if _renameat2(_AT_FDCWD, old, _AT_FDCWD, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(old), None, os.fsdecode(new))
