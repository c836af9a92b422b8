"""``kms make-cert``: a private CA and a server certificate for ``kms serve --tls-cert``.

For local and test use, where no public CA vouches for the host: clients trust ``ca.pem``
(``encfs --kms-ca-file ca.pem``, the SDK's ``HttpConfig.ssl_ca_cert``). The CA key stays in
the directory (mode 0600) so that later server certificates (a renewal, another host) are
signed by the same CA and clients need nothing new. Pure except `write_cert_dir`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397   # what browsers accept for a leaf; renew with the same CA


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(common_name: str = "encfs KMS local CA", days: int = CA_DAYS,
            now: dt.datetime | None = None) -> Issued:
    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(key, cert)


def make_server_cert(ca: Issued, hosts: list[str], days: int = SERVER_DAYS,
                     not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
    """A server certificate for ``hosts`` (DNS names or IP addresses) signed by ``ca``."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name")
    now = dt.datetime.now(dt.timezone.utc)
    not_before = not_before or now - dt.timedelta(minutes=5)
    not_after = not_after or now + dt.timedelta(days=days)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issued(key, cert)


def load(cert_path: str, key_path: str) -> Issued:
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return Issued(key, cert)   # type: ignore[arg-type]


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_cert_dir(directory: str, hosts: list[str], days: int = SERVER_DAYS) -> tuple[dict[str, str], bool]:
    """ca.pem + ca.key (made once, reused after), server.pem + server.key for ``hosts``.
    Returns the paths and whether a new CA was made."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    paths = {n: os.path.join(directory, n) for n in ("ca.pem", "ca.key", "server.pem", "server.key")}
    new_ca = not (os.path.exists(paths["ca.pem"]) and os.path.exists(paths["ca.key"]))
    if new_ca:
        ca = make_ca()
        _write(paths["ca.key"], ca.key_pem(), 0o600)
        _write(paths["ca.pem"], ca.cert_pem(), 0o644)
    else:
        ca = load(paths["ca.pem"], paths["ca.key"])
    server = make_server_cert(ca, hosts, days)
    _write(paths["server.key"], server.key_pem(), 0o600)
    _write(paths["server.pem"], server.cert_pem(), 0o644)
    return paths, new_ca
