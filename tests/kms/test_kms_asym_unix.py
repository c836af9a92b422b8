"""Asymmetric, MAC and imported keys over the Unix socket with the project's client and the
`kms` CLI: interop with the real openssl binary (signatures from `kms sign` verify with
`openssl dgst -verify` against `kms get-public-key`; an OAEP ciphertext made by openssl decrypts
in the KMS), strict request validation, and restart durability (kill -9 during imports and
during signing)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from encfs.pytest_plugin import short_tempdir, start_kms_server
from kms.cli import main
from kms.client import KmsError

OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def unix_kms():
    workdir = short_tempdir("kms-asym-")
    server = start_kms_server(workdir)
    try:
        yield server, workdir
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def cli(server, capsys, *args) -> tuple[int, str, str]:
    code = main(["--socket", server.socket_path, *args])
    out, err = capsys.readouterr()
    return code, out, err


def openssl(*args) -> subprocess.CompletedProcess:
    assert OPENSSL, "the openssl binary is needed for the interop tests"
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("spec,alg,sigopts", [
    ("RSA_2048", "RSASSA_PSS_SHA_256", ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"]),
    ("RSA_3072", "RSASSA_PKCS1_V1_5_SHA_384", []),
    ("RSA_2048", "RSASSA_PSS_SHA_512", ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"]),
    ("EC_P256", "ECDSA_SHA_256", []),
    ("EC_P384", "ECDSA_SHA_384", []),
    ("SECP256K1", "ECDSA_SHA_256", []),
])
def test_openssl_verifies_kms_signatures(unix_kms, capsys, spec, alg, sigopts):
    server, workdir = unix_kms
    alias = f"ossl/{spec}/{alg}"
    assert cli(server, capsys, "create-key", "--alias", alias, "--spec", spec)[0] == 0
    d = os.path.join(workdir, alias.replace("/", "-"))
    os.makedirs(d)
    pem, sig, msg = (os.path.join(d, n) for n in ("pub.pem", "sig.bin", "msg.txt"))
    with open(msg, "wb") as f:
        f.write(b"a message signed inside the KMS\n" * 10)
    code, out, _ = cli(server, capsys, "get-public-key", alias, "--out", pem)
    assert code == 0 and out.startswith("-----BEGIN PUBLIC KEY-----")
    code, out, err = cli(server, capsys, "sign", alias, "--file", msg, "--algorithm", alg, "--out", sig)
    assert code == 0, err
    md = "-sha" + alg[-3:]
    r = openssl("dgst", md, "-verify", pem, "-signature", sig, *sigopts, msg)
    assert r.returncode == 0 and "Verified OK" in r.stdout, r.stdout + r.stderr
    # the CLI's own verify, and a tampered message that openssl and the KMS both refuse
    code, out, _ = cli(server, capsys, "--json", "verify", alias, "--file", msg, "--algorithm", alg, "--signature", sig)
    assert code == 0 and json.loads(out)["signature_valid"] == "true"
    with open(msg, "ab") as f:
        f.write(b"!")
    assert openssl("dgst", md, "-verify", pem, "-signature", sig, *sigopts, msg).returncode != 0
    code, out, _ = cli(server, capsys, "--json", "verify", alias, "--file", msg, "--algorithm", alg, "--signature", sig)
    assert code == 0 and json.loads(out)["signature_valid"] == "false"


def test_openssl_oaep_ciphertext_decrypts_in_kms(unix_kms, capsys):
    server, workdir = unix_kms
    assert cli(server, capsys, "create-key", "--alias", "ossl/oaep", "--spec", "RSA_2048", "--usage",
               "ENCRYPT_DECRYPT")[0] == 0
    pem, plain, ct = (os.path.join(workdir, n) for n in ("oaep.pem", "oaep.txt", "oaep.bin"))
    assert cli(server, capsys, "get-public-key", "ossl/oaep", "--out", pem)[0] == 0
    with open(plain, "w") as f:
        f.write("encrypted by openssl")
    r = openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pem, "-in", plain, "-out", ct,
                "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256")
    assert r.returncode == 0, r.stderr
    with server.client as c:
        kid = c.key_id("ossl/oaep")
        reply = c.call("decrypt-data", {"key_id": kid, "encryption_algorithm": "RSAES_OAEP_SHA_256",
                                        "cipher_text": base64.b64encode(open(ct, "rb").read()).decode()})
    assert reply["plain_text"] == "encrypted by openssl"


def test_cli_mac_pair_and_import(unix_kms, capsys):
    server, workdir = unix_kms
    assert cli(server, capsys, "create-key", "--alias", "cli/mac", "--spec", "HMAC_256")[0] == 0
    code, out, _ = cli(server, capsys, "--json", "generate-mac", "cli/mac", "--message", "m", "--algorithm",
                       "HMAC_SHA_256")
    mac = json.loads(out)["mac"]
    code, out, _ = cli(server, capsys, "verify-mac", "cli/mac", "--message", "m", "--algorithm", "HMAC_SHA_256",
                       "--mac", mac)
    assert code == 0 and "mac_valid" in out and "true" in out
    code, out, _ = cli(server, capsys, "verify-mac", "cli/mac", "--message", "n", "--algorithm", "HMAC_SHA_256",
                       "--mac", mac)
    assert code == 0 and "false" in out
    code, _, err = cli(server, capsys, "sign", "cli/mac", "--message", "m", "--algorithm", "ECDSA_SHA_256")
    assert code == 1 and "KMS.0308" in err and "Traceback" not in err
    # a data key pair
    assert cli(server, capsys, "create-key", "--alias", "cli/cmk")[0] == 0
    code, out, _ = cli(server, capsys, "--json", "create-datakey-pair", "cli/cmk", "--spec", "ECC_NIST_P256",
                       "--without-plaintext")
    r = json.loads(out)
    assert code == 0 and "private_key_plain_text" not in r and r["public_key"]
    # import FILE
    assert cli(server, capsys, "create-key", "--alias", "cli/ext", "--external")[0] == 0
    key = os.path.join(workdir, "aes.key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    code, out, err = cli(server, capsys, "import-key-material", "cli/ext", key, "--expires-days", "30")
    assert code == 0, err
    code, out, _ = cli(server, capsys, "describe-key", "cli/ext")
    assert "2 (enabled)" in out
    assert cli(server, capsys, "delete-imported-key-material", "cli/ext")[0] == 0
    code, out, _ = cli(server, capsys, "--json", "describe-key", "cli/ext")
    assert json.loads(out)["key_info"]["key_state"] == "5"
    code, _, err = cli(server, capsys, "import-key-material", "cli/ext", os.path.join(workdir, "missing"))
    assert code == 2 and "cannot read" in err


@pytest.mark.parametrize("spec,genpkey,alg,sigopts", [
    ("EC_P256", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"], "ECDSA_SHA_256", []),
    ("RSA_2048", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"], "RSASSA_PSS_SHA_256",
     ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"]),
])
def test_openssl_wrapped_private_key_imports(unix_kms, capsys, spec, genpkey, alg, sigopts):
    """Huawei's documented openssl steps for an asymmetric import, run with the openssl binary:
    genpkey, PKCS#8 DER, `enc -id-aes256-wrap-pad` under a temporary AES-256 key, `pkeyutl
    -encrypt` of that key with the wrapping public key; then a signature made in the KMS with the
    imported key verifies with openssl against the original key's public half."""
    server, workdir = unix_kms
    d = short_tempdir("kms-ossl-imp-")
    try:
        alias = f"ossl-import/{spec}"
        assert cli(server, capsys, "create-key", "--alias", alias, "--spec", spec, "--external")[0] == 0
        f = {n: os.path.join(d, n) for n in ("key.pem", "key.der", "pub.pem", "wrap.der", "tmp.bin",
                                             "tmp.wrapped", "key.wrapped", "msg", "sig")}
        for args in (["genpkey", *genpkey, "-out", f["key.pem"]],
                     ["pkcs8", "-topk8", "-nocrypt", "-in", f["key.pem"], "-outform", "DER", "-out", f["key.der"]],
                     ["pkey", "-in", f["key.pem"], "-pubout", "-out", f["pub.pem"]],
                     ["rand", "-out", f["tmp.bin"], "32"]):
            r = openssl(*args)
            assert r.returncode == 0, r.stderr
        with server.client as c:
            kid = c.key_id(alias)
            p = c.call("get-parameters-for-import", {"key_id": kid, "wrapping_algorithm": "RSAES_OAEP_SHA_256"})
            with open(f["wrap.der"], "wb") as out:
                out.write(base64.b64decode(p["public_key"]))
            tmp_hex = open(f["tmp.bin"], "rb").read().hex()
            for args in (["pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey", f["wrap.der"],
                          "-in", f["tmp.bin"], "-out", f["tmp.wrapped"], "-pkeyopt", "rsa_padding_mode:oaep",
                          "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256"],
                         ["enc", "-id-aes256-wrap-pad", "-K", tmp_hex, "-iv", "A65959A6",
                          "-in", f["key.der"], "-out", f["key.wrapped"]]):
                r = openssl(*args)
                assert r.returncode == 0, r.stderr
            assert c.call("import-key-material", {
                "key_id": kid, "import_token": p["import_token"],
                "encrypted_key_material": base64.b64encode(open(f["tmp.wrapped"], "rb").read()).decode(),
                "encrypted_privatekey": base64.b64encode(open(f["key.wrapped"], "rb").read()).decode()}) == {}
        with open(f["msg"], "wb") as out:
            out.write(b"signed with an imported key\n")
        code, _, err = cli(server, capsys, "sign", alias, "--file", f["msg"], "--algorithm", alg, "--out", f["sig"])
        assert code == 0, err
        r = openssl("dgst", "-sha256", "-verify", f["pub.pem"], "-signature", f["sig"], *sigopts, f["msg"])
        assert r.returncode == 0 and "Verified OK" in r.stdout, r.stdout + r.stderr
        # the CLI's own import FILE takes the PEM private key and does both layers itself
        alias2 = f"cli-import/{spec}"
        assert cli(server, capsys, "create-key", "--alias", alias2, "--spec", spec, "--external")[0] == 0
        code, out, err = cli(server, capsys, "import-key-material", alias2, f["key.pem"])
        assert code == 0 and f"a {spec} private key" in out, err
        code, out, _ = cli(server, capsys, "get-public-key", alias2)
        assert code == 0 and out.strip() == open(f["pub.pem"]).read().strip()
        # a file that is no private key: one line, no traceback
        assert cli(server, capsys, "delete-imported-key-material", alias2)[0] == 0
        code, _, err = cli(server, capsys, "import-key-material", alias2, f["msg"])
        assert code == 2 and "is not an unencrypted private key" in err and "Traceback" not in err
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_strict_request_fields(unix_kms):
    server, _ = unix_kms
    with server.client as c:
        kid = c.create_key("strict/key")["key_id"]
        sig = c.call("create-key", {"key_alias": "strict/sig", "key_spec": "EC_P256"})["key_info"]["key_id"]

        def code(op, body):
            with pytest.raises(KmsError) as e:
                c.call(op, body)
            return e.value.error_code
        assert code("create-datakey", {"key_id": kid, "encryption_context": {"file": "x"}}) == "KMS.0208"
        assert code("decrypt-datakey", {"key_id": kid, "cipher_text": "00", "datakey_cipher_length": "32",
                                        "encryption_context": {}}) == "KMS.0208"
        assert code("create-datakey", {"key_id": kid, "datakey_lenght": "256"}) == "KMS.0308"    # a typo
        assert code("sign", {"key_id": sig, "message": "bQ==", "signing_algorithm": "ECDSA_SHA_256",
                             "message_type": "RAW", "extra": 1}) == "KMS.0308"
        assert code("create-key", {"key_alias": "strict/x", "key_spec": 256}) == "KMS.0308"
        assert code("create-datakey", {"key_id": kid, "sequence": "x" * 37}) == "KMS.0206"
        assert code("create-datakey", {"key_id": kid, "pin": "1234"}) == "KMS.0308"
        assert code("sign", {"key_id": sig, "message": "not base64!", "signing_algorithm": "ECDSA_SHA_256",
                             "message_type": "RAW"}) == "KMS.0308"
        assert code("sign", {"key_id": sig, "message": "bQ==", "signing_algorithm": "ECDSA_SHA_256",
                             "message_type": "TEXT"}) == "KMS.0308"
        assert code("generate-mac", {"key_id": kid, "mac_algorithm": "HMAC_SHA_256", "message": "bQ=="}) == "KMS.0308"
        # accepted: sequence and Huawei's optional enterprise project
        c.call("create-datakey", {"key_id": kid, "sequence": "919c82d4-8046-4722-9094-35c3c6524cff"})
        c.call("create-key", {"key_alias": "strict/ep", "enterprise_project_id": "0"})


def test_kill9_during_imports_and_signing(capsys):
    workdir = short_tempdir("kms-asym-kill-")
    server = start_kms_server(workdir)
    try:
        with server.client as c:
            sig_key = c.call("create-key", {"key_alias": "kill/sig", "key_spec": "EC_P256"})["key_info"]["key_id"]
            pub = c.call("get-publickey", {"key_id": sig_key})["public_key"]
        acked_imports: list[str] = []
        acked_sigs: list[tuple[bytes, str]] = []
        material = os.urandom(32)
        stop = threading.Event()
        keyfile = os.path.join(workdir, "k.bin")
        with open(keyfile, "wb") as f:
            f.write(material)

        # every other import is of an EC private key (Huawei's two-layer wrapping)
        ec_private = ec.generate_private_key(ec.SECP256R1())
        ec_file = os.path.join(workdir, "ec.pem")
        with open(ec_file, "wb") as f:
            f.write(ec_private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        ec_pub = ec_private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        acked_ec: list[str] = []

        def importer():
            i = 0
            while not stop.is_set():
                asym = i % 2 == 1
                try:
                    with server.client as c:
                        body = {"key_alias": f"kill/ext{i}", "origin": "external"}
                        if asym:
                            body["key_spec"] = "EC_P256"
                        kid = c.call("create-key", body)["key_info"]["key_id"]
                        i += 1
                        if main(["--socket", server.socket_path, "import-key-material", kid,
                                 ec_file if asym else keyfile]) == 0:
                            (acked_ec if asym else acked_imports).append(kid)
                except (KmsError, OSError):
                    return

        def signer():
            n = 0
            while not stop.is_set():
                msg = f"m{n}".encode()
                n += 1
                try:
                    with server.client as c:
                        r = c.call("sign", {"key_id": sig_key, "message": base64.b64encode(msg).decode(),
                                            "signing_algorithm": "ECDSA_SHA_256", "message_type": "RAW"})
                    acked_sigs.append((msg, r["signature"]))
                except (KmsError, OSError):
                    return
        threads = [threading.Thread(target=importer), threading.Thread(target=signer)]
        for t in threads:
            t.start()
        deadline = __import__("time").monotonic() + 60
        while (len(acked_imports) < 3 or len(acked_ec) < 3 or len(acked_sigs) < 20) \
                and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.05)
        server.kill()                 # in the middle of an import and of a signature, most likely
        stop.set()
        for t in threads:
            t.join(30)
        capsys.readouterr()
        assert len(acked_imports) >= 3 and len(acked_ec) >= 3 and len(acked_sigs) >= 20
        server.start()
        with server.client as c:
            assert c.call("get-publickey", {"key_id": sig_key})["public_key"] == pub
            for msg, s in acked_sigs:
                assert c.call("verify", {"key_id": sig_key, "message": base64.b64encode(msg).decode(),
                                         "signature": s, "signing_algorithm": "ECDSA_SHA_256",
                                         "message_type": "RAW"})["signature_valid"] == "true"
            for kid in acked_imports:
                assert c.describe_key(kid)["key_state"] == "2", kid
                dek, ct = c.create_datakey(kid)
                assert c.decrypt_datakey(kid, ct) == dek
            for kid in acked_ec:
                assert c.describe_key(kid)["key_state"] == "2", kid
                assert c.call("get-publickey", {"key_id": kid})["public_key"].strip() == ec_pub.strip()
                sig = c.call("sign", {"key_id": kid, "message": base64.b64encode(b"after").decode(),
                                      "signing_algorithm": "ECDSA_SHA_256", "message_type": "RAW"})["signature"]
                ec_private.public_key().verify(base64.b64decode(sig), b"after", ec.ECDSA(hashes.SHA256()))
            # a key caught between create and import waits for its import, and takes it
            waiting = [k for k in c.call("list-keys", {"key_spec": "ALL", "key_state": "5"})["keys"]]
            for kid in waiting[:2]:
                asym = c.describe_key(kid)["key_spec"] == "EC_P256"
                assert main(["--socket", server.socket_path, "import-key-material", kid,
                             ec_file if asym else keyfile]) == 0
                assert c.describe_key(kid)["key_state"] == "2"
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


SIGN_SPECS = {"RSA_2048": "RSASSA_PKCS1_V1_5_SHA_256", "RSA_3072": "RSASSA_PSS_SHA_384",
              "RSA_4096": "RSASSA_PSS_SHA_512", "EC_P256": "ECDSA_SHA_256", "EC_P384": "ECDSA_SHA_384",
              "SECP256K1": "ECDSA_SHA_256"}
MAC_SPECS = {"HMAC_256": "HMAC_SHA_256", "HMAC_384": "HMAC_SHA_384", "HMAC_512": "HMAC_SHA_512",
             "HMAC_SM3": "HMAC_SM3"}


@pytest.mark.parametrize("spec", [*SIGN_SPECS, *MAC_SPECS, "SM4", "AES_256"])
def test_every_spec_over_the_socket(unix_kms, spec):
    """Each spec through the project's client on the Unix socket: its operation works, the
    others are refused with KMS.0308, disabling stops it (KMS.0209) and enabling restores it."""
    server, _ = unix_kms
    m = base64.b64encode(b"socket message").decode()
    with server.client as c:
        kid = c.call("create-key", {"key_alias": f"sock/{spec}", "key_spec": spec})["key_info"]["key_id"]

        def refused(op, body, want="KMS.0308"):
            with pytest.raises(KmsError) as e:
                c.call(op, {"key_id": kid, **body})
            assert e.value.error_code == want, (op, e.value)
        sign_body = {"message": m, "signing_algorithm": SIGN_SPECS.get(spec, "ECDSA_SHA_256"), "message_type": "RAW"}
        mac_body = {"message": m, "mac_algorithm": MAC_SPECS.get(spec, "HMAC_SHA_256")}

        def use():
            if spec in SIGN_SPECS:
                sig = c.call("sign", {"key_id": kid, **sign_body})["signature"]
                assert c.call("verify", {"key_id": kid, **sign_body, "signature": sig})["signature_valid"] == "true"
            elif spec in MAC_SPECS:
                mac = c.call("generate-mac", {"key_id": kid, **mac_body})["mac"]
                assert c.call("verify-mac", {"key_id": kid, **mac_body, "mac": mac})["mac_valid"] is True
            else:
                dek, ct = c.create_datakey(kid, aad="f")
                assert c.decrypt_datakey(kid, ct, aad="f") == dek
        use()
        if spec not in SIGN_SPECS:
            refused("sign", sign_body)
        if spec not in MAC_SPECS:
            refused("generate-mac", mac_body)
        if spec in SIGN_SPECS or spec in MAC_SPECS:
            refused("create-datakey", {})
            refused("encrypt-data", {"plain_text": "x"})
        c.call("disable-key", {"key_id": kid})
        with pytest.raises(KmsError) as e:
            use()
        assert e.value.error_code == "KMS.0209"
        c.call("enable-key", {"key_id": kid})
        use()
