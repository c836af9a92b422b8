"""Requests per second of create-datakey and decrypt-datakey (and, with ``--ops all``, of sign
and verify with RSA_2048 and EC_P256 keys) over the Unix socket.

``python -m kms.bench --socket S [--seconds N] [--clients 1,16] [--ops datakeys|all]
[--client raw|threads] [--server-pid PID] [--json]``: 1 and 16 concurrent keep-alive clients
against a running ``kms serve``. The keys are ``bench/key``, ``bench/rsa2048`` and
``bench/ecp256`` in the caller's namespace, created when missing.

Clients: ``raw`` (default) are processes, each with one connection on which it writes a
request encoded once and reads the reply (status line and Content-Length checked, body
parsed every 64th request): about 15 µs of client CPU per request, so the numbers are the
server's. ``threads`` is the project's KmsClient in threads of this process (h11, one GIL:
150-180 µs of client CPU per request, which caps what 16 threads can ask for on two cores).
``--server-pid`` adds the daemon's CPU per request (user+system from /proc, its worker
processes included): a measure the load of the machine does not distort as much.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
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


def _request_bytes(project_id: str, op: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST /v1.0/{project_id}/kms/{op} HTTP/1.1\r\nHost: kms\r\n"
            f"Content-Type: application/json;charset=utf-8\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload


def _raw_client(socket_path: str, request: bytes, go: float, deadline: float, out: int) -> None:
    """One client process: request, reply, request... from ``go`` until ``deadline``
    (perf_counter, the same clock in every process of this machine); writes its count to ``out``."""
    n = 0
    status = 0
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(socket_path)
        buf = b""
        while time.perf_counter() < go:
            time.sleep(0.001)
        while time.perf_counter() < deadline:
            s.sendall(request)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[:end]
                    i = head.lower().find(b"content-length:")
                    j = head.find(b"\r\n", i)
                    length = int(head[i + 15:j if j > 0 else len(head)])
                    if len(buf) >= end + 4 + length:
                        break
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buf += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            body = buf[end + 4:end + 4 + length]
            if n % 64 == 0:
                json.loads(body)
            buf = buf[end + 4 + length:]
            n += 1
    except BaseException as e:  # the parent reports it
        status = 1
        os.write(out, f"error {type(e).__name__}: {e}".encode())
    else:
        os.write(out, str(n).encode())
    finally:
        os.close(out)
        os._exit(status)


def _run_raw(socket_path: str, project_id: str, op: str, clients: int, seconds: float, body: dict) -> float:
    """Requests per second from ``clients`` raw client processes (see the module docstring)."""
    request = _request_bytes(project_id, op, body)
    go = time.perf_counter() + 0.3 + 0.02 * clients       # every process connected by then
    deadline = go + seconds
    pipes = []
    for _ in range(clients):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _raw_client(socket_path, request, go, deadline, w)
        os.close(w)
        pipes.append((pid, r))
    total = 0
    error = None
    for pid, r in pipes:
        chunks = []
        while True:
            c = os.read(r, 4096)
            if not c:
                break
            chunks.append(c)
        os.close(r)
        os.waitpid(pid, 0)
        text = b"".join(chunks).decode()
        if text.startswith("error") or not text:
            error = error or text or "a client process died"
        else:
            total += int(text)
    if error:
        raise KmsError(500, "KMS.0101", f"bench client: {error}")
    return total / seconds


def server_cpu(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its child processes (the workers of --workers N)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kms.bench", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=None)
    p.add_argument("--project-id", default=None)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", default="1,16", help="comma-separated client counts")
    p.add_argument("--ops", choices=["datakeys", "all"], default="datakeys",
                   help="all: also sign/verify with RSA_2048 and EC_P256 keys")
    p.add_argument("--client", choices=["raw", "threads"], default="raw",
                   help="raw: client processes on raw sockets (cheap); threads: KmsClient threads")
    p.add_argument("--server-pid", type=int, default=None,
                   help="also report the daemon's CPU per request (µs), its worker processes included")
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
                cpu0 = server_cpu(a.server_pid) if a.server_pid else None
                t0 = time.perf_counter()
                if a.client == "raw":
                    rate = _run_raw(socket_path, project_id, op, n, a.seconds, body)
                else:
                    rate = _run(socket_path, project_id, kid, op, n, a.seconds, body)
                row = {"operation": label, "clients": n, "requests_per_second": round(rate)}
                if cpu0 is not None:
                    # the whole cell's CPU (set-up included) over the requests of its timed part
                    cpu = server_cpu(a.server_pid) - cpu0
                    row["server_cpu_us_per_request"] = round(cpu / max(1.0, rate * a.seconds) * 1e6)
                    row["cell_s"] = round(time.perf_counter() - t0, 2)
                results.append(row)
    except KmsError as e:
        print(f"kms.bench: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        cpu = a.server_pid is not None
        print(f"{'operation':<18} {'clients':>7} {'requests/s':>11}" + (f" {'server µs/req':>14}" if cpu else ""))
        for r in results:
            print(f"{r['operation']:<18} {r['clients']:>7} {r['requests_per_second']:>11}"
                  + (f" {r['server_cpu_us_per_request']:>14}" if cpu else ""))
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
