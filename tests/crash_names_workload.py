"""A seeded workload of renames between long and short names, for crash tests.

Usage: python crash_names_workload.py MOUNTPOINT LOGFILE SEED

Like crash_workload.py (same JSON log lines, so tests/test_crash.py's checks apply), but
every step is about the name layer: files created under 255-byte and short names, renamed
long -> short, short -> long and long -> long (also over existing files), unlinked, and
fsynced. It stops at the first OSError as crash_workload.py does: the error as JSON on
stderr, with when it came, and exit code 3.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from crash_workload import STOPPED_BY_ERROR


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

    def fresh(n: int) -> str:
        tag = f"{n}-"
        return tag + "L" * (255 - len(tag)) if rnd.random() < 0.5 else f"s{n}"

    n = 0
    try:
        while True:
            n += 1
            names = sorted(model)
            choice = rnd.random()
            if choice < 0.3 or len(names) < 3:
                name = fresh(n)
                record("begin", name)
                data = rnd.randbytes(rnd.randrange(0, 9000))
                with open(f"{mnt}/{name}", "wb") as f:
                    f.write(data)
                    f.flush()
                    model[name] = data
                    os.fsync(f.fileno())
                record("fsync", name)
            elif choice < 0.75:
                src = rnd.choice(names)
                dst = rnd.choice([n for n in names if n != src]) if rnd.random() < 0.3 \
                    else fresh(n)
                record("begin", src)
                record("begin", dst)
                os.rename(f"{mnt}/{src}", f"{mnt}/{dst}")
                model[dst] = model.pop(src)
                record("rename", dst, src=src)
            elif choice < 0.85:
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
        # The filesystem went away under us: the test judges the errno and the moment.
        print(json.dumps({"stopped": e.errno, "error": str(e), "at": time.monotonic()}),
              file=sys.stderr, flush=True)
        return STOPPED_BY_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
