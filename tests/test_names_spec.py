"""docs/FORMAT.md "Encrypted names" is enough to read a backing dir's names: decrypt a
file name, a long name, a name in a subdirectory, a symlink target and an xattr name using
only that page, the `cryptography` package and the KMS client, importing none of the
filesystem's code."""

from __future__ import annotations

import base64
import os
import shutil
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.pytest_plugin import make_mount, short_tempdir
from test_format_spec import read_sidecar_by_spec  # the sidecar format, by the spec too

pytestmark = pytest.mark.fuse


def b64d(s: bytes) -> bytes:
    return base64.urlsafe_b64decode(s + b"=" * (-len(s) % 4))


def unpad(b: bytes) -> bytes:
    assert 1 <= b[-1] <= 16 and b.endswith(bytes([b[-1]]) * b[-1])
    return b[:-b[-1]]


def test_decrypt_names_from_the_spec_alone(kms_server):
    work = short_tempdir("encfs-names-spec-")
    m = make_mount(kms_server, work, extra_args=["--encrypt-names"])
    try:
        mp = m.mountpoint
        os.mkdir(f"{mp}/Quarterly reports")
        open(f"{mp}/Quarterly reports/q3-results.ods", "w").close()
        long_name = "a-long-name-" + "z" * 200
        open(f"{mp}/{long_name}", "w").close()
        os.symlink("/srv/secret/target", f"{mp}/a-link")
        open(f"{mp}/tagged", "w").close()
        os.setxattr(f"{mp}/tagged", "user.classification", b"x")
        m.unmount()
        b = m.backing
        # the name key: a sidecar-format record in .encfs/names.key, unwrapped by the KMS
        key_id, file_id, wrapped = read_sidecar_by_spec(f"{b}/.encfs/names.key")
        reply = kms_server.client.call("decrypt-datakey", {
            "key_id": key_id, "cipher_text": wrapped.hex().upper(),
            "datakey_cipher_length": "32", "additional_authenticated_data": file_id.hex()})
        dek = bytes.fromhex(reply["data_key"])
        siv = AESSIV(HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                          info=b"encfs names v1").derive(dek))

        def name(dir_id: bytes, stored: bytes) -> str:
            return unpad(siv.decrypt(b64d(stored), [b"name", dir_id])).decode()

        root_id = bytes(16)
        shown = {}
        for entry in os.listdir(os.fsencode(b)):
            if entry == b".encfs" or entry.endswith((b".sfskey", b".name")):
                continue
            if entry.startswith(b"encfs.long."):
                stored = open(os.path.join(os.fsencode(b), entry + b".name"), "rb").read()
                h = base64.urlsafe_b64encode(
                    __import__("hashlib").sha256(stored).digest()).rstrip(b"=")
                assert entry == b"encfs.long." + h
            else:
                stored = entry
            shown[name(root_id, stored)] = entry
        assert sorted(shown) == sorted(["Quarterly reports", long_name, "a-link", "tagged"])
        # a subdirectory's children: associated data is its id, in user.encfs.dirid
        sub = os.path.join(os.fsencode(b), shown["Quarterly reports"])
        dir_id = os.getxattr(sub, "user.encfs.dirid")
        assert len(dir_id) == 16
        inner = [e for e in os.listdir(sub) if not e.endswith(b".sfskey")]
        assert [name(dir_id, e) for e in inner] == ["q3-results.ods"]
        # a symlink target: nonce (16) || AES-SIV(pad(target), [b"symlink", nonce])
        raw = b64d(os.readlink(os.path.join(os.fsencode(b), shown["a-link"])))
        assert unpad(siv.decrypt(raw[16:], [b"symlink", raw[:16]])) == b"/srv/secret/target"
        # an xattr name: user. + AES-SIV(pad(suffix), [b"xattr"])
        xnames = [x for x in os.listxattr(os.path.join(os.fsencode(b), shown["tagged"]))
                  if x.startswith("user.")]
        assert [unpad(siv.decrypt(b64d(x[5:].encode()), [b"xattr"])) for x in xnames] == \
            [b"classification"]
    finally:
        m.unmount()
        shutil.rmtree(work, ignore_errors=True)
