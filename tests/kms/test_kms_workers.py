"""`kms serve --workers N`: several processes on one socket and one store.

What must hold whatever worker a connection lands on: a write acknowledged by one worker is in
force in every other at its next request (a disabled key is refused, a new key is found), two
workers never both take one alias, a worker that dies is started again, SIGTERM stops them all,
and a kill -9 of every process loses nothing that was acknowledged. Connections are told apart
by worker through the X-Request-Id prefix, which is one per process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time

import pytest

from encfs.pytest_plugin import short_tempdir, start_kms_server
from kms.client import KmsError
from kms.server import ServerConfig
from kms.workers import per_worker

PROJECT = "local"


class Conn:
    """One raw keep-alive connection: requests on it all go to the worker that accepted it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""
        self.worker = self.call("list-keys", {"limit": "1"})[2]

    def call(self, op: str, body: dict) -> tuple[int, dict, str]:
        payload = json.dumps(body).encode()
        self.sock.sendall((f"POST /v1.0/{PROJECT}/kms/{op} HTTP/1.1\r\nHost: kms\r\n"
                           f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            rest += self._recv()
        self.buf = rest[length:]
        return int(lines[0].split()[1]), json.loads(rest[:length]), headers["x-request-id"][:20]

    def ok(self, op: str, body: dict) -> dict:
        status, reply, _ = self.call(op, body)
        assert status == 200, (op, reply)
        return reply

    def code(self, op: str, body: dict) -> str:
        status, reply, _ = self.call(op, body)
        assert status != 200, (op, reply)
        return reply["error"]["error_code"]

    def _recv(self) -> bytes:
        b = self.sock.recv(65536)
        if not b:
            raise ConnectionError("closed")
        return b

    def close(self) -> None:
        self.sock.close()


def two_workers(path: str) -> tuple[Conn, Conn]:
    """Connections to two different workers (the kernel picks which worker accepts)."""
    conns: list[Conn] = []
    try:
        for _ in range(400):
            c = Conn(path)
            other = next((x for x in conns if x.worker != c.worker), None)
            if other is not None:
                conns.remove(other)
                return other, c
            conns.append(c)
        raise AssertionError("400 connections, all accepted by one worker")
    finally:
        for c in conns:
            c.close()


def pids_of(parent: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{parent}/task"):
        with open(f"/proc/{parent}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while not all(gone(p) for p in pids):
        assert time.monotonic() < deadline, "processes did not go"
        time.sleep(0.02)


@pytest.fixture
def workers_kms():
    workdir = short_tempdir("kms-workers-")
    server = start_kms_server(workdir, extra_args=["--workers", "2", "--rate-limit", "0"])
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_writes_of_one_worker_are_in_force_in_the_other(workers_kms):
    a, b = two_workers(workers_kms.socket_path)
    try:
        kid = a.ok("create-key", {"key_alias": "w/one"})["key_info"]["key_id"]
        made = b.ok("create-datakey", {"key_id": kid})                 # found at once by the other
        dec = {"key_id": kid, "cipher_text": made["cipher_text"], "datakey_cipher_length": "32"}
        assert a.ok("decrypt-datakey", dec)["data_key"] == made["plain_text"]
        b.ok("disable-key", {"key_id": kid})
        assert a.code("decrypt-datakey", dec) == "KMS.0209"          # refused at the next request
        assert a.code("create-datakey", {"key_id": kid}) == "KMS.0209"
        a.ok("enable-key", {"key_id": kid})
        assert b.ok("decrypt-datakey", dec)["data_key"] == made["plain_text"]
        # signing runs in threads outside the write lock: it too sees the other worker's writes
        sk = a.ok("create-key", {"key_alias": "w/sig", "key_spec": "EC_P256"})["key_info"]["key_id"]
        sign = {"key_id": sk, "message": "bWVzc2FnZQ==", "signing_algorithm": "ECDSA_SHA_256", "message_type": "RAW"}
        assert b.ok("sign", sign)["signature"]
        a.ok("disable-key", {"key_id": sk})
        assert b.code("sign", sign) == "KMS.0209"
        # a grant made through one worker works through the other; revoked, it stops there too
        g = a.ok("create-grant", {"key_id": kid, "grantee_principal": "uid0x", "operations": ["describe-key"]})
        assert any(x["grant_id"] == g["grant_id"] for x in b.ok("list-grants", {"key_id": kid})["grants"])
        b.ok("revoke-grant", {"key_id": kid, "grant_id": g["grant_id"]})
        assert not a.ok("list-grants", {"key_id": kid})["grants"]
        # one alias, asked for by both workers at once, many times: exactly one key takes each
        results: dict[str, list[int]] = {}

        def race(conn: Conn, i: int) -> None:
            results.setdefault(f"r{i}", []).append(conn.call("create-key", {"key_alias": f"w/race{i}"})[0])
        for i in range(15):
            ts = [threading.Thread(target=race, args=(c, i)) for c in (a, b)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        assert all(sorted(v) == [200, 400] for v in results.values()), results
        aliases = [d["key_alias"] for d in a.ok("list-keys", {"limit": "1000"})["key_details"]]
        assert len(aliases) == len(set(aliases)) == 16      # list-keys: AES_256 by default
        # a worker killed is started again; the daemon keeps answering
        counter = os.path.join(workers_kms.data_dir, "generation")
        before = int.from_bytes(open(counter, "rb").read(), "little")
        victim = next(p for p in pids_of(workers_kms.process.pid))
        os.kill(victim, signal.SIGKILL)
        wait_gone([victim])
        deadline = time.monotonic() + 30
        while "starting it again" not in workers_kms.log():
            assert time.monotonic() < deadline, workers_kms.log()[-2000:]
            time.sleep(0.05)
        assert len(pids_of(workers_kms.process.pid)) == 2
        # the parent bumped the counter for the dead worker (it may have died between a commit
        # and its own bump): every worker reloads
        assert int.from_bytes(open(counter, "rb").read(), "little") > before
        with workers_kms.client as c:
            assert c.describe_key(kid)["key_state"] == "2"
    finally:
        a.close()
        b.close()
    # SIGTERM to the daemon stops every worker, and the socket goes
    kids = pids_of(workers_kms.process.pid)
    workers_kms.process.send_signal(signal.SIGTERM)
    assert workers_kms.process.wait(30) == 0
    wait_gone(kids)
    assert not os.path.exists(workers_kms.socket_path)


def test_kill9_of_every_worker_loses_nothing_acknowledged(workers_kms):
    """Writers on several connections (so on both workers); every process killed with SIGKILL
    at once; after a restart every acknowledged key, state and data key is there."""
    keys: list[tuple[str, str]] = []             # (key_id, alias) acknowledged
    disabled: list[str] = []
    disabling: list[str] = []                    # asked for; in flight at the kill: either state
    deks: list[tuple[str, str, str]] = []        # (key_id, cipher_text, plain_text)
    stop = threading.Event()
    lock = threading.Lock()

    def writer(w: int) -> None:
        i = 0
        try:
            conn = Conn(workers_kms.socket_path)
            while not stop.is_set():
                alias = f"k/{w}/{i}"
                i += 1
                kid = conn.ok("create-key", {"key_alias": alias})["key_info"]["key_id"]
                with lock:
                    keys.append((kid, alias))
                d = conn.ok("create-datakey", {"key_id": kid})
                with lock:
                    deks.append((kid, d["cipher_text"], d["plain_text"]))
                if i % 3 == 0:
                    with lock:
                        disabling.append(kid)
                    conn.ok("disable-key", {"key_id": kid})
                    with lock:
                        disabled.append(kid)
        except (OSError, AssertionError, ValueError, KeyError):
            return                          # the kill: whatever was in flight is not acknowledged
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while (len(keys) < 40 or len(disabled) < 8) and time.monotonic() < deadline:
        time.sleep(0.02)
    procs = [workers_kms.process.pid, *pids_of(workers_kms.process.pid)]
    assert len(procs) == 3
    for p in procs:
        os.kill(p, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(30)
    workers_kms.process.wait(30)
    wait_gone(procs)
    with lock:
        acked_keys, acked_disabled, acked_deks = list(keys), set(disabled), list(deks)
        in_flight = set(disabling) - acked_disabled
    assert len(acked_keys) >= 40 and len(acked_disabled) >= 8
    workers_kms.start()
    with workers_kms.client as c:
        listed = {d["key_id"]: d for d in c.call("list-keys", {"limit": "1000"})["key_details"]}
        for kid, alias in acked_keys:
            assert kid in listed and listed[kid]["key_alias"] == alias, kid
            want = {"2", "3"} if kid in in_flight else {"3"} if kid in acked_disabled else {"2"}
            assert listed[kid]["key_state"] in want, listed[kid]
        for kid, ct, plain in acked_deks:
            if kid in in_flight:
                continue
            if kid in acked_disabled:
                with pytest.raises(KmsError) as e:
                    c.decrypt_datakey(kid, ct)
                assert e.value.error_code == "KMS.0209"
            else:
                assert c.decrypt_datakey(kid, ct).hex().upper() == plain.upper()


def test_limits_are_shared_out():
    c = ServerConfig(socket_path="s", data_dir="d", project_id="p", rate_limit=20000.0, max_connections=1024,
                     max_connections_per_peer=255)
    w = per_worker(c, 2)
    assert (w.rate_limit, w.max_connections, w.max_connections_per_peer) == (10000.0, 512, 128)
    assert per_worker(ServerConfig(socket_path="s", data_dir="d", project_id="p", rate_limit=0,
                                   max_connections=1, max_connections_per_peer=1), 4).rate_limit == 0
