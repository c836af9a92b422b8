"""Seeded workloads for crash tests, run in their own process against a mount.

Usage: python crash_workload.py MOUNTPOINT LOGFILE SEED [mixed|names]

``mixed`` (the default) creates, appends, overwrites, truncates, renames over existing
files, unlinks and fsyncs. ``names`` is about the name layer: files created under 255-byte
and short names, renamed long -> short, short -> long and long -> long (also over existing
files), unlinked and fsynced.

Each step is recorded as a JSON line in LOGFILE (outside the mount) before it starts
("begin") and again once it completed, flushed each time, so that whoever kills the
filesystem can wait until some steps were done and tell what each file may contain: the
content after its last completed fsync, or any state after it.

It stops at the first OSError (the filesystem, or its KMS, died under it): it prints
``{"stopped": ERRNO, "error": TEXT, "at": MONOTONIC}`` as the last line of stderr and exits
with 3, so that the test can tell an error of its kill from any other. Any other exception
is a traceback and exit code 1.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

STOPPED_BY_ERROR = 3


@dataclass
class Workload:
    """The state of a run: what each file holds (the model) and the step log."""

    mnt: str
    rnd: random.Random
    log: TextIO
    model: dict[str, bytes] = field(default_factory=dict)
    n: int = 0  # the step number, for fresh names

    def record(self, op: str, name: str, **kw) -> None:
        entry = {"op": op, "name": name, **kw}
        if name in self.model:
            entry["content"] = self.model[name].hex()
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()

    def path(self, name: str) -> str:
        return f"{self.mnt}/{name}"

    # --- steps both workloads take ---------------------------------------------------------

    def rename(self, src: str, dst: str) -> None:
        self.record("begin", src)
        self.record("begin", dst)
        os.rename(self.path(src), self.path(dst))
        self.model[dst] = self.model.pop(src)
        self.record("rename", dst, src=src)

    def unlink(self, name: str) -> None:
        self.record("begin", name)
        os.unlink(self.path(name))
        del self.model[name]
        self.record("unlink", name)

    def fsync(self, name: str) -> None:
        self.record("begin", name)
        with open(self.path(name), "rb+") as f:
            os.fsync(f.fileno())
        self.record("fsync", name)


def mixed_step(w: Workload) -> None:
    rnd, model, names = w.rnd, w.model, sorted(w.model)
    choice = rnd.random()
    if choice < 0.2 or len(names) < 3:
        name = f"f{w.n}"
        w.record("begin", name)
        data = rnd.randbytes(rnd.randrange(0, 20000))
        with open(w.path(name), "wb") as f:
            f.write(data)
            if rnd.random() < 0.5:
                f.flush()
                model[name] = data
                os.fsync(f.fileno())
                w.record("fsync", name)
                return
        model[name] = data
        w.record("write", name)
    elif choice < 0.35:
        name = rnd.choice(names)
        w.record("begin", name)
        data = rnd.randbytes(rnd.randrange(1, 3000))
        with open(w.path(name), "ab") as f:
            f.write(data)
        model[name] += data
        w.record("write", name)
    elif choice < 0.5:
        name = rnd.choice(names)
        w.record("begin", name)
        off = rnd.randrange(0, len(model[name]) + 1)
        data = rnd.randbytes(rnd.randrange(1, 5000))
        with open(w.path(name), "r+b") as f:
            f.seek(off)
            f.write(data)
        cur = bytearray(model[name])
        cur[off:off + len(data)] = data
        model[name] = bytes(cur)
        w.record("write", name)
    elif choice < 0.6:
        name = rnd.choice(names)
        w.record("begin", name)
        size = rnd.randrange(0, len(model[name]) + 5000)
        os.truncate(w.path(name), size)
        model[name] = model[name][:size] + bytes(max(0, size - len(model[name])))
        w.record("write", name)
    elif choice < 0.72:
        w.rename(*rnd.sample(names, 2))
    elif choice < 0.8:
        w.unlink(rnd.choice(names))
    else:
        w.fsync(rnd.choice(names))


def names_step(w: Workload) -> None:
    rnd, names = w.rnd, sorted(w.model)

    def fresh() -> str:
        tag = f"{w.n}-"
        return tag + "L" * (255 - len(tag)) if rnd.random() < 0.5 else f"s{w.n}"

    choice = rnd.random()
    if choice < 0.3 or len(names) < 3:
        name = fresh()
        w.record("begin", name)
        data = rnd.randbytes(rnd.randrange(0, 9000))
        with open(w.path(name), "wb") as f:
            f.write(data)
            f.flush()
            w.model[name] = data
            os.fsync(f.fileno())
        w.record("fsync", name)
    elif choice < 0.75:
        src = rnd.choice(names)
        dst = rnd.choice([n for n in names if n != src]) if rnd.random() < 0.3 else fresh()
        w.rename(src, dst)
    elif choice < 0.85:
        w.unlink(rnd.choice(names))
    else:
        w.fsync(rnd.choice(names))


STEPS: dict[str, Callable[[Workload], None]] = {"mixed": mixed_step, "names": names_step}


def main(mnt: str, log_path: str, seed: int, kind: str = "mixed") -> int:
    step = STEPS[kind]
    w = Workload(mnt, random.Random(seed), open(log_path, "a", buffering=1))
    try:
        while True:
            w.n += 1
            step(w)
    except OSError as e:
        # The filesystem (or its KMS) went away under us: the test judges the errno.
        # When (CLOCK_MONOTONIC is one clock for all processes): the test checks that the
        # error came after its kill.
        print(json.dumps({"stopped": e.errno, "error": str(e), "at": time.monotonic()}),
              file=sys.stderr, flush=True)
        return STOPPED_BY_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]))
