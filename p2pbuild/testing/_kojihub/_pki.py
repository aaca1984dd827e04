"""PKI for the hub's HTTPS and ``sslLogin``: a CA, the server certificate, client
certificates for users and hosts.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@attrs.frozen
class HubPki:
    """A throwaway CA, the hub's server certificate and client certificates (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    #: Client name -> one PEM file holding certificate and key (what ``koji`` wants).
    clients: dict[str, Path]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_hub_pki(directory: Path, clients: list[str]) -> HubPki:
    """Write a CA, a server certificate for 127.0.0.1/localhost and one client certificate
    (CN = the name) per entry of ``clients`` into ``directory``."""
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("p2pbuild test koji CA"))
        .issuer_name(_name("p2pbuild test koji CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = issue("127.0.0.1", True)
    (directory / "server.pem").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    paths = {}
    for cn in clients:
        cert, key = issue(cn, False)
        path = directory / f"client-{cn}.pem"
        path.write_bytes(cert + key)
        path.chmod(0o600)
        paths[cn] = path
    return HubPki(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                  paths)


