"""Layer 3, issue #15: encfs against a KMS that is only Huawei's public API.

`kms serve --strict-huawei` refuses every x-encfs-* extension exactly as an unknown path and
presents data-key ciphertexts in a foreign layout; it also listens with TLS (a CA and server
certificate made by `kms make-cert`) and AK/SK signatures. The whole encfs flow runs against
it: mounts by key id and by alias, per-directory keys, revocation, rotation and rewrap
(mounted and offline, with no KMS option: the mount's recorded connection), fsck, inspect,
decrypt, rekey, a mount over https, Huawei's SDK over https, and one clear line for every TLS
mistake and for a KMS that does not answer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from encfs import format as fmt
from encfs.pytest_plugin import EncryptedMount, KmsServer, short_tempdir, start_kms_server
from kms import blob, certs
from kms.client import KmsClient, KmsError, KmsExtensionUnsupported

from huawei_sdk import free_port, sdk_client

PROJECT = "0123456789abcdef0123456789abcdef"
AK, SK = "STRICTAK0123456789AB", "strict-secret-key-0123456789"
BOB_AK, BOB_SK = "BOBAK0123456789ABCDE", "bob-secret-key-0123456789"
S = fmt.SIDECAR_SUFFIX
GRACE = 1.0


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def one_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@dataclass
class Strict:
    kms: KmsServer
    work: str
    port: int
    creds: str
    certs: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return f"{self.certs}/ca.pem"

    def socket_args(self) -> list[str]:
        return ["--kms-socket", self.kms.socket_path, "--project-id", PROJECT]

    def tls_args(self, ca: str | None = None) -> list[str]:
        return ["--kms-url", self.url, "--credentials", self.creds, "--kms-ca-file", ca or self.ca,
                "--project-id", PROJECT]

    def tls_client(self) -> KmsClient:
        return KmsClient.from_credentials_file(self.url, self.creds, project_id=PROJECT, ca_file=self.ca)


def write_credentials(path: str, rows: tuple = (("strictuser", AK, SK), ("bob", BOB_AK, BOB_SK))) -> str:
    with open(path, "w") as f:
        f.write("User Name,Access Key Id,Secret Access Key\n")
        f.writelines(f"{u},{a},{s}\n" for u, a, s in rows)
    os.chmod(path, 0o600)
    return path


def tls_kms(workdir: str, creds: str, cert: str, key: str, port: int, strict: bool = True) -> KmsServer:
    args = ["--listen", f"127.0.0.1:{port}", "--credentials", creds, "--tls-cert", cert, "--tls-key", key]
    return start_kms_server(workdir, project_id=PROJECT, extra_args=(["--strict-huawei"] if strict else []) + args)


@pytest.fixture(scope="module")
def strict() -> Iterator[Strict]:
    work = short_tempdir("encfs-strict-")
    creds = write_credentials(f"{work}/credentials.csv")
    res = run("kms", "make-cert", "--dir", f"{work}/certs", "--host", "127.0.0.1", "--host", "localhost")
    assert res.returncode == 0 and "made a new CA" in res.stdout, res.stderr
    port = free_port()
    kms = tls_kms(f"{work}/kms", creds, f"{work}/certs/server.pem", f"{work}/certs/server.key", port)
    try:
        yield Strict(kms, work, port, creds, f"{work}/certs")
    finally:
        kms.stop()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def mounted(st: Strict, key: str, extra: list[str] | None = None,
            kms_args: list[str] | None = None) -> Iterator[EncryptedMount]:
    """A fresh backing dir mounted with ``--key KEY`` exactly as given (an alias stays an
    alias) against the strict KMS; unmounted and removed on exit."""
    work = short_tempdir("encfs-strict-m-")
    os.makedirs(f"{work}/backing")
    os.makedirs(f"{work}/mnt")
    m = EncryptedMount(mountpoint=f"{work}/mnt", backing=f"{work}/backing", key_id=key, kms=st.kms,
                       log_path=f"{work}/encfs.log", extra_args=list(extra or []),
                       kms_args=kms_args if kms_args is not None else st.socket_args())
    try:
        m.mount()
        yield m
    finally:
        m.unmount()
        shutil.rmtree(work, ignore_errors=True)


def record(m: EncryptedMount, rel: str) -> fmt.KeyRecord:
    with open(f"{m.backing}/{rel}{S}", "rb") as f:
        return fmt.decode_sidecar(f.read())


def wait_errno(fn, expected: int, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            fn()
        except OSError as e:
            if e.errno == expected:
                return
            raise
        assert time.monotonic() < deadline, f"still works after {within}s"
        time.sleep(0.05)


def fresh_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def wait_content(path: str, expected: bytes, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            assert fresh_read(path) == expected
            return
        except OSError:
            assert time.monotonic() < deadline, "still unreadable"
            time.sleep(0.05)


def wait_new_files_under(m: EncryptedMount, version: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        open(f"{m.mountpoint}/probe", "wb").close()
        got = record(m, "probe").key_version
        os.unlink(f"{m.mountpoint}/probe")
        if got == version:
            return
        assert time.monotonic() < deadline, f"new files still record key version {got}"
        time.sleep(0.1)


# ---- the fixture itself ---------------------------------------------------------------------

def test_strict_kms_answers_like_huawei(strict):
    with strict.kms.client as c:
        with pytest.raises(KmsExtensionUnsupported) as ext:
            c.call("x-encfs-resolve-key", {"key": "sfs/default"})
        with pytest.raises(KmsError) as unknown:
            c.call("no-such-operation", {})
        assert (ext.value.status, ext.value.error_code) == (unknown.value.status, unknown.value.error_code) \
            == (400, "KMS.0201")
        assert "extension of encfs's own KMS daemon" in str(ext.value)
        with pytest.raises(KmsExtensionUnsupported):
            c.call("x-encfs-list-audit", {})
        kid = c.create_key("strict/probe")["key_id"]
        dek, ct = c.create_datakey(kid, aad="ab" * 16)
        with pytest.raises(blob.BlobError):     # not our daemon's layout
            blob.parse(bytes.fromhex(ct), blob.KIND_DATAKEY)
        assert c.decrypt_datakey(kid, ct, aad="ab" * 16) == dek
        with pytest.raises(KmsError) as bad:
            c.decrypt_datakey(kid, ct[:-8], aad="ab" * 16)
        assert bad.value.error_code == "KMS.2201"
        # Aliases through Huawei's public operations only: the key's own, then the aliases API.
        assert c.resolve_key("strict/probe")["key_id"] == kid
        c.call("aliases", {"key_id": kid, "alias": "strict/probe-extra"})
        assert c.resolve_key("strict/probe-extra")["key_id"] == kid
        with pytest.raises(KmsError) as none:
            c.resolve_key("strict/none")
        assert none.value.error_code == "KMS.0207" and "strict/none" in str(none.value)
    # A feature only our daemon has says so, in one line.
    res = run("kms", "--socket", strict.kms.socket_path, "--project-id", PROJECT, "audit")
    assert res.returncode == 1 and "extension of encfs's own KMS daemon" in one_line(res)


# ---- encfs against it -------------------------------------------------------------------------

def test_mount_by_alias_then_by_id_and_a_copied_tree(strict):
    kid = strict.kms.client.create_key("strict/alias-a")["key_id"]
    files = {f"f{i}": os.urandom(1000 + 4099 * i) for i in range(4)}
    src = short_tempdir("encfs-strict-src-")
    try:
        os.makedirs(f"{src}/tree/sub")
        for i in range(5):
            with open(f"{src}/tree/sub/{i}.bin", "wb") as f:
                f.write(os.urandom(20000 * i + 1))
        os.symlink("sub/0.bin", f"{src}/tree/link")
        with mounted(strict, "strict/alias-a") as m:
            for rel, data in files.items():
                with open(f"{m.mountpoint}/{rel}", "wb") as f:
                    f.write(data)
            before = time.time_ns()
            subprocess.run(["cp", "-a", f"{src}/tree", f"{m.mountpoint}/tree"], check=True)
            rec = record(m, "tree/sub/3.bin")
            assert rec.key_id == kid and rec.key_version == 1
            assert before - 60 * 10**9 < rec.wrapped_ns <= time.time_ns()
            with pytest.raises(blob.BlobError):
                blob.parse(rec.wrapped_dek, blob.KIND_DATAKEY)
            m.remount()
            for rel, data in files.items():
                assert fresh_read(f"{m.mountpoint}/{rel}") == data
            m.unmount()
            m.key_id = kid     # the same backing dir, now by key id
            m.mount()
            assert subprocess.run(["diff", "-r", f"{src}/tree", f"{m.mountpoint}/tree"]).returncode == 0
            with open(f"{m.mountpoint}/by-id", "wb") as f:
                f.write(b"by id")
            assert record(m, "by-id").key_id == kid
            m.unmount()
            # The backing tree copied elsewhere (another machine, a restore) mounts as it is.
            subprocess.run(["cp", "-a", m.backing, f"{src}/copy"], check=True)
            os.makedirs(f"{src}/copy-mnt")
            copy = EncryptedMount(mountpoint=f"{src}/copy-mnt", backing=f"{src}/copy", key_id="strict/alias-a",
                                  kms=strict.kms, log_path=f"{src}/copy.log", kms_args=strict.socket_args())
            try:
                copy.mount()
                assert subprocess.run(["diff", "-r", f"{src}/tree", f"{copy.mountpoint}/tree"]).returncode == 0
                assert fresh_read(f"{copy.mountpoint}/by-id") == b"by id"
            finally:
                copy.unmount()
    finally:
        shutil.rmtree(src, ignore_errors=True)


def test_unknown_alias_is_one_line_naming_it(strict):
    work = short_tempdir("encfs-strict-u-")
    try:
        os.makedirs(f"{work}/b")
        os.makedirs(f"{work}/m")
        res = run("encfs", "mount", f"{work}/b", f"{work}/m", *strict.socket_args(), "--key", "strict/missing")
        line = one_line(res)
        assert res.returncode == 1 and "'strict/missing'" in line and "kms create-key --alias strict/missing" in line
        assert not os.path.ismount(f"{work}/m")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_dir_keys_revocation_rotation_rewrap_and_the_tools(strict):
    c = strict.kms.client
    tenant = c.create_key("strict/tenant")["key_id"]
    dir_key = c.create_key("strict/dir-b")["key_id"]
    with mounted(strict, "strict/tenant", extra=["--key-cache-ttl", str(GRACE)]) as m:
        files = {}
        for i in range(6):
            files[f"f{i}"] = os.urandom(3000 * i + 7)
        os.makedirs(f"{m.mountpoint}/d")
        os.setxattr(f"{m.mountpoint}/d", "user.encfs.key", b"strict/dir-b")    # an alias, resolved publicly
        assert os.getxattr(f"{m.mountpoint}/d", "user.encfs.key") == dir_key.encode()
        files["d/x"] = b"under the directory's key"
        for rel, data in files.items():
            with open(f"{m.mountpoint}/{rel}", "wb") as f:
                f.write(data)
        assert record(m, "d/x").key_id == dir_key and record(m, "f0").key_id == tenant

        # Revocation by disable-key, and restore, without a remount.
        c.call("disable-key", {"key_id": tenant})
        wait_errno(lambda: fresh_read(f"{m.mountpoint}/f1"), errno.EKEYREVOKED, GRACE + 3)
        assert fresh_read(f"{m.mountpoint}/d/x") == files["d/x"]    # another key: unaffected
        c.call("enable-key", {"key_id": tenant})
        wait_content(f"{m.mountpoint}/f1", files["f1"], GRACE + 5)

        # Rotation: new files follow it; `encfs rewrap BACKING` with no KMS option finds this
        # KMS through the mount's record and moves the old DEKs, mounted.
        c.call("rotate-on-demand", {"key_id": tenant})
        wait_new_files_under(m, 2)
        assert record(m, "f0").key_version == 1
        res = run("encfs", "rewrap", m.backing)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "6 rewrapped, 1 already current, 0 failed"
        assert {record(m, f"f{i}").key_version for i in range(6)} == {2}
        assert record(m, "d/x").key_version == 1       # its own key was not rotated
        info = json.loads(run("encfs", "inspect", f"{m.mountpoint}/f2", "--json").stdout)
        assert (info["cmk_id"], info["key_version"], info["cmk_alias"], info["cmk_state"]) == \
            (tenant, 2, "strict/tenant", "2")
        old_id = record(m, "d/x").file_id
        res = run("encfs", "rekey", f"{m.mountpoint}/d")
        assert res.returncode == 0 and res.stdout.strip().endswith("1 rekeyed, 0 skipped, 0 failed"), res.stderr
        assert record(m, "d/x").file_id != old_id and record(m, "d/x").key_id == dir_key
        assert fresh_read(f"{m.mountpoint}/d/x") == files["d/x"]
        m.unmount()

        # Offline: rotate again, rewrap, fsck, decrypt; all with the recorded connection.
        c.call("rotate-on-demand", {"key_id": tenant})
        res = run("encfs", "rewrap", m.backing)
        assert res.returncode == 0 and res.stdout.strip() == "6 rewrapped, 1 already current, 0 failed", \
            res.stdout + res.stderr
        assert {record(m, f"f{i}").key_version for i in range(6)} == {3}
        res = run("encfs", "fsck", m.backing)
        assert res.returncode == 0, res.stdout + res.stderr
        res = subprocess.run([sys.executable, "-m", "encfs", "decrypt", f"{m.backing}/f5"],
                             capture_output=True, timeout=60)
        assert res.returncode == 0 and res.stdout == files["f5"], res.stderr
        m.mount()
        for rel, data in files.items():
            assert fresh_read(f"{m.mountpoint}/{rel}") == data


def test_no_kms_answering_is_one_line_per_tool(strict):
    with mounted(strict, strict.kms.client.create_key("strict/gone")["key_id"]) as m:
        for i in range(5):
            with open(f"{m.mountpoint}/f{i}", "wb") as f:
                f.write(b"x" * 5000)
        m.unmount()
        dead = ["--kms-socket", f"{m.backing}.none.sock", "--project-id", PROJECT]
        for cmd in (("encfs", "rewrap", m.backing), ("encfs", "fsck", m.backing),
                    ("encfs", "decrypt", f"{m.backing}/f0"), ("encfs", "inspect", f"{m.backing}/f0",
                                                             f"{m.backing}/f1")):
            res = run(*cmd, *dead)
            assert res.returncode != 0 or cmd[1] == "inspect", res.stderr
            assert f"no KMS answers at {m.backing}.none.sock" in one_line(res), cmd


# ---- TLS and AK/SK -------------------------------------------------------------------------

def test_mount_over_tls_with_aksk_and_tools_follow_it(strict):
    with strict.tls_client() as c:
        kid = c.create_key("tls/tenant")["key_id"]     # the access key's own key
    with mounted(strict, "tls/tenant", kms_args=strict.tls_args()) as m:
        with open(f"{m.mountpoint}/over-tls", "wb") as f:
            f.write(b"t" * 70000)
        assert record(m, "over-tls").key_id == kid
        with open(f"{m.backing}/.encfs/kms.json") as f:
            rec = json.load(f)
        assert rec["url"] == strict.url and rec["ca_file"] == strict.ca and SK not in json.dumps(rec)
        res = run("encfs", "rewrap", m.backing)      # no options: https, AK/SK, the CA, as the mount
        assert res.returncode == 0 and res.stdout.strip() == "0 rewrapped, 1 already current, 0 failed", \
            res.stdout + res.stderr
        m.remount()
        assert fresh_read(f"{m.mountpoint}/over-tls") == b"t" * 70000
        m.unmount()
        # Another access key, granted only the data-key operations (not describe-key, which
        # Huawei would need for a lookup): the key id is used as it is.
        with strict.tls_client() as c:
            c.call("create-grant", {"key_id": kid, "grantee_principal": "bob",
                                    "operations": ["create-datakey", "decrypt-datakey"]})
        bob = write_credentials(f"{m.backing}.bob.csv", (("bob", BOB_AK, BOB_SK),))
        m.key_id = kid
        m.kms_args = [*strict.tls_args(), "--credentials", bob]
        m.mount()
        assert fresh_read(f"{m.mountpoint}/over-tls") == b"t" * 70000
        with open(f"{m.mountpoint}/by-bob", "wb") as f:
            f.write(b"granted")
        assert fresh_read(f"{m.mountpoint}/by-bob") == b"granted" and record(m, "by-bob").key_id == kid
        os.unlink(f"{m.backing}.bob.csv")


def test_huawei_sdk_over_https(strict):
    from huaweicloudsdkcore.exceptions.exceptions import SdkException
    from huaweicloudsdkkms.v2 import (CreateDatakeyRequest, CreateDatakeyRequestBody, CreateKeyRequest,
                                      CreateKeyRequestBody, DecryptDatakeyRequest, DecryptDatakeyRequestBody,
                                      ListKeysRequest, ListKeysRequestBody)

    def sdk(ca: str | None):
        return sdk_client(strict.url, AK, SK, PROJECT, ca=ca or None, timeout=(5, 10))

    client = sdk(strict.ca)
    kid = client.create_key(CreateKeyRequest(body=CreateKeyRequestBody(key_alias="sdk/https"))).key_info.key_id
    keys = client.list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="100"))).keys
    assert kid in keys
    made = client.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(
        key_id=kid, datakey_length="256", additional_authenticated_data="cd" * 16)))
    got = client.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=kid, cipher_text=made.cipher_text, datakey_cipher_length="32",
        additional_authenticated_data="cd" * 16)))
    assert got.data_key == made.plain_text
    with pytest.raises(SdkException):      # the system's trust store does not know our CA
        sdk(None).list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="1")))


@pytest.fixture(scope="module")
def bad_tls(strict):
    """Two more TLS listeners: a certificate that expired, one for another host name."""
    work = short_tempdir("encfs-badtls-")
    ca = certs.load(strict.ca, f"{strict.certs}/ca.key")
    now = dt.datetime.now(dt.timezone.utc)
    servers = {}
    try:
        for name, issued in (
                ("expired", certs.make_server_cert(ca, ["127.0.0.1"], not_before=now - dt.timedelta(days=30),
                                                   not_after=now - dt.timedelta(days=1))),
                ("other-host", certs.make_server_cert(ca, ["other.example"]))):
            d = f"{work}/{name}"
            os.makedirs(d)
            for fname, data in (("server.pem", issued.cert_pem()), ("server.key", issued.key_pem())):
                with open(f"{d}/{fname}", "wb") as f:
                    f.write(data)
            os.chmod(f"{d}/server.key", 0o600)
            port = free_port()
            servers[name] = (tls_kms(f"{d}/kms", strict.creds, f"{d}/server.pem", f"{d}/server.key", port),
                             f"https://127.0.0.1:{port}")
        yield {name: url for name, (_, url) in servers.items()}
    finally:
        for server, _ in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_every_tls_mistake_is_one_clear_line(strict, bad_tls):
    other = f"{strict.work}/other-ca"
    assert run("kms", "make-cert", "--dir", other).returncode == 0

    def kms_cli(url: str, *extra: str) -> str:
        res = run("kms", "--url", url, "--credentials", strict.creds, "--project-id", PROJECT, *extra, "list-keys")
        assert res.returncode == 1, res.stdout + res.stderr
        return one_line(res)

    assert "certificate not trusted" in kms_cli(strict.url, "--ca-file", f"{other}/ca.pem")      # wrong CA
    assert "certificate not trusted" in kms_cli(strict.url)          # no CA: the system's store
    assert "certificate has expired" in kms_cli(bad_tls["expired"], "--ca-file", strict.ca)
    assert "for another host name" in kms_cli(bad_tls["other-host"], "--ca-file", strict.ca)
    plain = kms_cli(strict.url.replace("https://", "http://"))       # a plain-HTTP client
    assert "KMS.0201" in plain and "use an https:// URL" in plain
    # The same through an encfs tool, and for the mount itself.
    empty = short_tempdir("encfs-strict-e-")
    try:
        res = run("encfs", "rewrap", empty, *strict.tls_args(ca=f"{other}/ca.pem"))
        assert res.returncode == 2 and "certificate not trusted" in one_line(res)
        os.makedirs(f"{empty}/b")
        os.makedirs(f"{empty}/m")
        res = run("encfs", "mount", f"{empty}/b", f"{empty}/m", *strict.tls_args(ca=f"{other}/ca.pem"),
                  "--key", "tls/tenant")
        assert res.returncode == 1 and "certificate not trusted" in one_line(res)
        res = run("encfs", "fsck", f"{empty}/b", "--kms-url", f"http://10.0.0.1:{strict.port}",
                  "--credentials", strict.creds)
        assert res.returncode == 8 and "use https://" in one_line(res)
    finally:
        shutil.rmtree(empty, ignore_errors=True)


def test_serve_refuses_plain_http_off_loopback_and_bad_cert_files(strict):
    sock = f"{strict.work}/refused.sock"
    data = f"{strict.work}/refused-data"
    res = run("kms", "serve", "--socket", sock, "--data-dir", data, "--listen", f"0.0.0.0:{free_port()}",
              "--credentials", strict.creds, timeout=30)
    assert res.returncode == 2 and "refusing plain HTTP" in one_line(res)
    garbage = f"{strict.work}/garbage.pem"
    with open(garbage, "w") as f:
        f.write("not a certificate\n")
    res = run("kms", "serve", "--socket", sock, "--data-dir", data, "--listen", f"127.0.0.1:{free_port()}",
              "--credentials", strict.creds, "--tls-cert", garbage, "--tls-key", garbage, timeout=30)
    assert res.returncode == 2 and "cannot use --tls-cert" in one_line(res)
    assert not os.path.exists(sock)


def test_version_1_sidecars_stay_readable_and_rewrap_upgrades_them(strict):
    """Backing dirs written before sidecar version 2 (no wrap time, no key version)."""
    import zlib
    kid = strict.kms.client.create_key("strict/old-dir")["key_id"]
    with mounted(strict, kid) as m:
        files = {f"old{i}": os.urandom(5000 + i) for i in range(3)}
        for rel, data in files.items():
            with open(f"{m.mountpoint}/{rel}", "wb") as f:
                f.write(data)
        m.unmount()
        for rel in files:       # as an older encfs wrote them: trailer zero, head version 1
            with open(f"{m.backing}/{rel}{S}", "r+b") as f:
                data = bytearray(f.read())
                for base in (16, 528):
                    data[base + fmt.TRAILER_OFFSET:base + 508] = bytes(508 - fmt.TRAILER_OFFSET)
                    if any(data[base:base + 508]):
                        data[base + 508:base + 512] = struct.pack(">I", zlib.crc32(bytes(data[base:base + 508])))
                data[4:6] = struct.pack(">H", 1)
                f.seek(0)
                f.write(data)
            assert record(m, rel).key_version == 0 and record(m, rel).wrapped_ns == 0
        m.mount()
        for rel, data in files.items():
            assert fresh_read(f"{m.mountpoint}/{rel}") == data
        res = run("encfs", "rewrap", m.backing)       # version unknown: re-encrypted, recorded
        assert res.stdout.strip() == "3 rewrapped, 0 already current, 0 failed", res.stdout + res.stderr
        for rel in files:
            with open(f"{m.backing}/{rel}{S}", "rb") as f:
                assert fmt.sidecar_version(f.read()) == 2
            assert record(m, rel).key_version == 1 and record(m, rel).wrapped_ns > 0
        assert run("encfs", "rewrap", m.backing).stdout.strip() == "0 rewrapped, 3 already current, 0 failed"
        m.remount()
        for rel, data in files.items():
            assert fresh_read(f"{m.mountpoint}/{rel}") == data
