"""`stagemesh certs`: a small CA and one certificate per component, for mutual TLS inside a cluster.

Every certificate is valid as server and client (components are both), with the given host names and
IP addresses as subject alternative names. Private keys are written readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from stagemesh.errors import InvalidArgument


def make_certs(
    out: str | Path, names: list[str], hosts: list[str], days: int = 365, cluster: str = "stagemesh"
) -> list[Path]:
    """Writes ca.crt/ca.key and <name>.crt/<name>.key for each name; returns the paths written."""
    if not names:
        raise InvalidArgument("--names: give at least one component name")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    written = [_write(out / "ca.crt", ca), _write_key(out / "ca.key", ca_key)]
    sans = [_san(h) for h in dict.fromkeys(hosts)]
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} {name}")])
        cert = (
            _builder(subject, ca_name, key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), *sans]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        written += [_write(out / f"{name}.crt", cert), _write_key(out / f"{name}.key", key)]
    return written


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    path.touch(mode=0o600)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path
