"""Requests per second of create-datakey and decrypt-datakey over the Unix socket.

``python -m kms.bench --socket S [--seconds N] [--clients 1,16] [--json]``: 1 and 16 concurrent
keep-alive clients (threads, each with its own KmsClient and connection) against a running
``kms serve``. The key is ``bench/key`` in the caller's namespace, created when missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from .client import KmsClient, KmsError


def _run(socket_path: str, project_id: str | None, key_id: str, op: str, clients: int, seconds: float,
         cipher_text: str) -> float:
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        try:
            with KmsClient(socket_path, project_id) as c:
                c.call("describe-key", {"key_id": key_id})     # connect before the clock starts
                start.wait()
                n = 0
                if op == "create-datakey":
                    body = {"key_id": key_id, "datakey_length": "256"}
                else:
                    body = {"key_id": key_id, "cipher_text": cipher_text, "datakey_cipher_length": "32"}
                while time.perf_counter() < deadline[0]:
                    c.call(op, body)
                    n += 1
                counts[i] = n
        except BaseException as e:  # reported below; a broken barrier must not hang the others
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds + 0.05
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kms.bench", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=None)
    p.add_argument("--project-id", default=None)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", default="1,16", help="comma-separated client counts")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        with KmsClient(a.socket, a.project_id) as c:
            try:
                key_id = c.resolve_key("bench/key")["key_id"]
            except KmsError as e:
                if e.error_code != "KMS.0207":
                    raise
                key_id = c.create_key("bench/key", "kms.bench")["key_id"]
            _dek, ct = c.create_datakey(key_id)
            socket_path, project_id = c.socket_path, c.project_id
        results = []
        for op in ("create-datakey", "decrypt-datakey"):
            for n in (int(x) for x in a.clients.split(",")):
                rate = _run(socket_path, project_id, key_id, op, n, a.seconds, ct)
                results.append({"operation": op, "clients": n, "requests_per_second": round(rate)})
    except KmsError as e:
        print(f"kms.bench: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'operation':<18} {'clients':>7} {'requests/s':>11}")
        for r in results:
            print(f"{r['operation']:<18} {r['clients']:>7} {r['requests_per_second']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
