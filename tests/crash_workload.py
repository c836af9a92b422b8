"""A seeded mixed workload for crash tests, run in its own process against a mount.

Usage: python crash_workload.py MOUNTPOINT LOGFILE SEED

It creates, appends, overwrites, truncates, renames over existing files, unlinks and
fsyncs. It records each step as a JSON line in LOGFILE (outside the mount) before it starts
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


STOPPED_BY_ERROR = 3


def main(mnt: str, log_path: str, seed: int) -> int:
    rnd = random.Random(seed)
    model: dict[str, bytes] = {}
    log = open(log_path, "a", buffering=1)

    def record(op: str, name: str, **kw) -> None:
        entry = {"op": op, "name": name, **kw}
        if name in model:
            entry["content"] = model[name].hex()
        log.write(json.dumps(entry) + "\n")
        log.flush()

    n = 0
    try:
        while True:
            n += 1
            names = sorted(model)
            choice = rnd.random()
            if choice < 0.2 or len(names) < 3:
                name = f"f{n}"
                record("begin", name)
                data = rnd.randbytes(rnd.randrange(0, 20000))
                with open(f"{mnt}/{name}", "wb") as f:
                    f.write(data)
                    if rnd.random() < 0.5:
                        f.flush()
                        model[name] = data
                        os.fsync(f.fileno())
                        record("fsync", name)
                        continue
                model[name] = data
                record("write", name)
            elif choice < 0.35:
                name = rnd.choice(names)
                record("begin", name)
                data = rnd.randbytes(rnd.randrange(1, 3000))
                with open(f"{mnt}/{name}", "ab") as f:
                    f.write(data)
                model[name] += data
                record("write", name)
            elif choice < 0.5:
                name = rnd.choice(names)
                record("begin", name)
                off = rnd.randrange(0, len(model[name]) + 1)
                data = rnd.randbytes(rnd.randrange(1, 5000))
                with open(f"{mnt}/{name}", "r+b") as f:
                    f.seek(off)
                    f.write(data)
                cur = bytearray(model[name])
                cur[off:off + len(data)] = data
                model[name] = bytes(cur)
                record("write", name)
            elif choice < 0.6:
                name = rnd.choice(names)
                record("begin", name)
                size = rnd.randrange(0, len(model[name]) + 5000)
                os.truncate(f"{mnt}/{name}", size)
                model[name] = model[name][:size] + bytes(max(0, size - len(model[name])))
                record("write", name)
            elif choice < 0.72:
                src, dst = rnd.sample(names, 2)
                record("begin", src)
                record("begin", dst)
                os.rename(f"{mnt}/{src}", f"{mnt}/{dst}")
                model[dst] = model.pop(src)
                record("rename", dst, src=src)
            elif choice < 0.8:
                name = rnd.choice(names)
                record("begin", name)
                os.unlink(f"{mnt}/{name}")
                del model[name]
                record("unlink", name)
            else:
                name = rnd.choice(names)
                record("begin", name)
                with open(f"{mnt}/{name}", "rb+") as f:
                    os.fsync(f.fileno())
                record("fsync", name)
    except OSError as e:
        # The filesystem (or its KMS) went away under us: the test judges the errno.
        # When (CLOCK_MONOTONIC is one clock for all processes): the test checks that the
        # error came after its kill.
        print(json.dumps({"stopped": e.errno, "error": str(e), "at": time.monotonic()}),
              file=sys.stderr, flush=True)
        return STOPPED_BY_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
