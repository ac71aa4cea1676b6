"""The project's own certificate authority: the CA and the broker's certificate, made on first
start (`ensure_certificates`), kept as private files beside the broker's data, and re-issued when
the broker must answer on an address its certificate does not name. The CA signs broker
certificates only, so a certificate it signed is a broker of this deployment.

Only the processes that start brokers (devtools) import this module: `cryptography`'s x509 costs
a process about 8 MiB, and a guest, which only verifies the broker (`berth.tls`), never loads it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from berth.paths import create_once, replace_file

CA_VALID_DAYS = 3650
CERT_VALID_DAYS = 825


@dataclass(frozen=True)
class Certificates:
    """The files a TLS broker serves with (all PEM)."""

    ca: Path
    cert: Path
    key: Path

    def ca_pem(self) -> str:
        return self.ca.read_text()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} holds no EC private key")
    return key


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    still_valid = cert.not_valid_after_utc - datetime.timedelta(days=30) > datetime.datetime.now(datetime.UTC)
    return still_valid and set(_names(hosts)) <= names


def ensure_certificates(folder: Path, hosts: list[str]) -> Certificates:
    """The CA (made once) and a broker certificate naming loopback and ``hosts``, under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    files = Certificates(folder / "ca.pem", folder / "broker.pem", folder / "broker.key")
    now = datetime.datetime.now(datetime.UTC)
    create_once(folder / "ca.key", _key_pem(ec.generate_private_key(ec.SECP256R1())))
    ca_key = _load_key(folder / "ca.key")
    if not files.ca.exists():
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Berth broker CA")])
        ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        replace_file(files.ca, ca.public_bytes(serialization.Encoding.PEM).decode(), mode=0o600)
    if _covers(files.cert, hosts):
        return files
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Berth broker")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    replace_file(files.key, _key_pem(key), mode=0o600)
    replace_file(files.cert, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o600)
    return files
