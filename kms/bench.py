"""Requests per second of create-datakey and decrypt-datakey (and, with ``--ops all``, of sign
and verify with RSA_2048 and EC_P256 keys) over the Unix socket.

``python -m kms.bench --socket S [--seconds N] [--clients 1,16] [--ops datakeys|all] [--json]``:
1 and 16 concurrent keep-alive clients (threads, each with its own KmsClient and connection)
against a running ``kms serve``. The keys are ``bench/key``, ``bench/rsa2048`` and
``bench/ecp256`` in the caller's namespace, created when missing.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time

from .client import KmsClient, KmsError


def _run(socket_path: str, project_id: str | None, key_id: str, op: str, clients: int, seconds: float,
         body: dict) -> float:
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
    p.add_argument("--ops", choices=["datakeys", "all"], default="datakeys",
                   help="all: also sign/verify with RSA_2048 and EC_P256 keys")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        with KmsClient(a.socket, a.project_id) as c:
            key_id = _key(c, "bench/key", "AES_256")
            _dek, ct = c.create_datakey(key_id)
            socket_path, project_id = c.socket_path, c.project_id
            # (label, operation, key id, body)
            cells = [("create-datakey", "create-datakey", key_id, {"key_id": key_id, "datakey_length": "256"}),
                     ("decrypt-datakey", "decrypt-datakey", key_id,
                      {"key_id": key_id, "cipher_text": ct, "datakey_cipher_length": "32"})]
            if a.ops == "all":
                msg = base64.b64encode(b"kms.bench message").decode()
                for spec, alg in (("RSA_2048", "RSASSA_PSS_SHA_256"), ("EC_P256", "ECDSA_SHA_256")):
                    kid = _key(c, f"bench/{spec.lower().replace('_', '')}", spec)
                    sign = {"key_id": kid, "message": msg, "signing_algorithm": alg, "message_type": "RAW"}
                    sig = c.call("sign", sign)["signature"]
                    cells += [(f"sign {spec}", "sign", kid, sign),
                              (f"verify {spec}", "verify", kid, {**sign, "signature": sig})]
        results = []
        for label, op, kid, body in cells:
            for n in (int(x) for x in a.clients.split(",")):
                rate = _run(socket_path, project_id, kid, op, n, a.seconds, body)
                results.append({"operation": label, "clients": n, "requests_per_second": round(rate)})
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


def _key(c: KmsClient, alias: str, spec: str) -> str:
    """The id of the bench key ``alias``, created (of ``spec``) when missing."""
    try:
        return c.resolve_key(alias)["key_id"]
    except KmsError as e:
        if e.error_code != "KMS.0207":
            raise
    return c.call("create-key", {"key_alias": alias, "key_spec": spec, "key_description": "kms.bench"})["key_info"]["key_id"]


if __name__ == "__main__":
    sys.exit(main())
