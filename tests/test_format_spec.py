"""docs/FORMAT.md is enough to read our files: decrypt a backing file using only that page
and the KMS client, without importing any of the filesystem's code."""

import os
import struct
import zlib

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def read_sidecar_by_spec(path: str) -> tuple[str, bytes, bytes]:
    data = open(path, "rb").read()
    assert len(data) == 1040 and data[:4] == b"ESFK"
    best = None
    for base in (16, 528):
        slot = data[base:base + 512]
        if not any(slot) or zlib.crc32(slot[:508]) != struct.unpack(">I", slot[508:])[0]:
            continue
        seq = struct.unpack(">Q", slot[:8])[0]
        file_id = slot[8:24]
        k = slot[34]
        w = struct.unpack(">H", slot[35:37])[0]
        key_id = slot[37:37 + k].decode()
        wrapped = slot[101:101 + w]
        if best is None or seq > best[0]:
            best = (seq, key_id, file_id, wrapped)
    assert best is not None
    return best[1], best[2], best[3]


def decrypt_by_spec(data_path: str, dek: bytes, file_id: bytes) -> bytes:
    data = open(data_path, "rb").read()
    if not data:
        return b""
    assert data[:4] == b"ENCF" and struct.unpack(">H", data[4:6])[0] == 1
    assert data[8:24] == file_id
    bs = 1 << data[6]
    cbs = bs + 28
    out = []
    aead = AESGCM(dek)
    for n, off in enumerate(range(24, len(data), cbs)):
        block = data[off:off + cbs]
        if len(block) == cbs and not any(block):
            out.append(bytes(bs))
            continue
        aad = struct.pack(">H", 1) + file_id + struct.pack(">Q", n)
        out.append(aead.decrypt(block[:12], block[12:], aad))
    return b"".join(out)


def test_decrypt_backing_file_from_the_spec_alone(encrypted_mount):
    m = encrypted_mount
    content = os.urandom(50_000)
    with open(f"{m.mountpoint}/doc", "wb") as f:
        f.write(content[:10_000])
        f.seek(30_000)  # leave a hole in the middle
        f.write(content[30_000:])
    expected = content[:10_000] + bytes(20_000) + content[30_000:]
    m.unmount()
    key_id, file_id, wrapped = read_sidecar_by_spec(m.backing_path("doc.sfskey"))
    reply = m.kms.client.call("decrypt-datakey", {
        "key_id": key_id, "cipher_text": wrapped.hex().upper(),
        "datakey_cipher_length": "32", "additional_authenticated_data": file_id.hex()})
    dek = bytes.fromhex(reply["data_key"])
    assert decrypt_by_spec(m.backing_path("doc"), dek, file_id) == expected
