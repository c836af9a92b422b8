"""A SIGKILL that lands inside a multi-page pwrite, on purpose (for crash tests).

Usage: python torn_write.py PID BACKING_FILE

The kernel checks for a fatal signal between the pages of a write: a SIGKILL that arrives
while a process is in a pwrite of several pages leaves the first pages written and the
rest not, and the process dies without returning from the call. That is the one case an
undo record is for (a torn block), and a kill at a random moment almost never lands there.
This makes it land there every time: it traces every thread of process PID (ptrace, x86_64
Linux), waits for a pwrite64 of more than one page to BACKING_FILE, shortens that call's
byte count so that it stops at a page boundary inside its first block (the state a kill
between pages leaves), and SIGKILLs the process at the call's return, before a single
instruction of its own runs again. The process's code is not changed in any way.

It prints ``attached`` once every thread is traced (the caller starts the write only
then), and at the end one JSON line: ``{"offset", "count", "cut", "written"}`` of the
pwrite it tore. Exit status 0 when it tore one; 2 when the process ended first.

Runs as its own process, not in the test's: ptrace's waitpid(-1) would reap the test's
other children.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import signal
import sys

PAGE = 4096
SYS_PWRITE64 = 18  # x86_64
ENOSYS_RAX = (1 << 64) - errno.ENOSYS  # rax at a syscall-entry stop

PTRACE_SYSCALL, PTRACE_GETREGS, PTRACE_SETREGS = 24, 12, 13
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
PTRACE_O_TRACESYSGOOD, PTRACE_O_TRACECLONE = 0x1, 0x8
WALL = 0x40000000


class Regs(ctypes.Structure):
    """struct user_regs_struct of x86_64 (sys/user.h)."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags "
        "rsp ss fs_base gs_base ds es fs gs").split()]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def ptrace(request: int, tid: int, addr: int = 0, data: int | ctypes.c_void_p = 0) -> int:
    res = _libc.ptrace(request, tid, addr, data)
    if res == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"ptrace({request}, {tid}): {os.strerror(e)}")
    return res


def regs_of(tid: int) -> Regs:
    regs = Regs()
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def cut_of(offset: int, count: int) -> int:
    """How many bytes the torn call writes: up to the second page boundary after
    ``offset`` (at least one whole page, and less than ``count``)."""
    cut = PAGE - offset % PAGE + PAGE
    return cut if cut < count else PAGE - offset % PAGE


def resume(tid: int, sig: int = 0) -> None:
    try:
        ptrace(PTRACE_SYSCALL, tid, 0, sig)
    except ProcessLookupError:
        pass  # it died meanwhile


def main(pid: int, target: str) -> int:
    if platform.machine() != "x86_64":
        print(f"torn_write.py knows the registers of x86_64 only, not {platform.machine()}",
              file=sys.stderr)
        return 1
    target = os.path.realpath(target)
    threads = set()
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE)
        ptrace(PTRACE_INTERRUPT, tid)
        threads.add(tid)
    print("attached", flush=True)
    armed: dict[int, dict] = {}  # tid -> the pwrite it is in, shortened
    while threads:
        tid, status = os.waitpid(-1, WALL)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            threads.discard(tid)
            continue
        threads.add(tid)  # a new thread (PTRACE_O_TRACECLONE) reports here first
        sig = os.WSTOPSIG(status)
        if sig != signal.SIGTRAP | 0x80:  # not a syscall stop
            # an event or interrupt stop (SIGTRAP or the stop signal with an event in the
            # high bits): resume; a real signal: deliver it
            resume(tid, 0 if status >> 16 or sig in (signal.SIGTRAP, signal.SIGSTOP) else sig)
            continue
        regs = regs_of(tid)
        if tid in armed:  # the return of the shortened pwrite: die before using it
            os.kill(pid, signal.SIGKILL)
            print(json.dumps({**armed[tid], "written": ctypes.c_longlong(regs.rax).value}),
                  flush=True)
            return 0
        if (regs.rax == ENOSYS_RAX and regs.orig_rax == SYS_PWRITE64 and regs.rdx > PAGE
                and _fd_path(pid, regs.rdi) == target):
            cut = cut_of(regs.r10, regs.rdx)
            armed[tid] = {"offset": regs.r10, "count": regs.rdx, "cut": cut}
            regs.rdx = cut
            ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))
        resume(tid)
    return 2


def _fd_path(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
