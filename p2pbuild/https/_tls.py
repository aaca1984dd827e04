"""TLS without a CA: a node's (or dispatcher's) self-signed certificate and its pin.

Design item 7: a node serves HTTPS with a self-signed certificate, and the SHA-256 of that
certificate (over its DER encoding) is in the node's signed capability record as
``tls_sha256``. This module makes and loads the certificate (:class:`TlsMaterial`) and
computes the pin; the client that enforces it is ``_client.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .._errors import LocalError, RemoteError

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "CertificatePinError",
    "TlsMaterial",
    "certificate_sha256",
    "generate_tls_material",
    "load_tls_material",
    "pinned_ssl_context",
]

CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"


class CertificatePinError(RemoteError):
    """The server's TLS certificate is not the one pinned (or it sent none)."""

    code = "tls-pin-mismatch"


def certificate_sha256(der: bytes) -> bytes:
    """SHA-256 of a DER certificate: the ``tls_sha256`` of a capability record."""
    return hashlib.sha256(der).digest()


@attrs.frozen
class TlsMaterial:
    """A node's certificate and key files and the certificate's SHA-256 fingerprint."""

    cert_path: Path
    key_path: Path
    sha256: bytes


def generate_tls_material(
    directory: Path,
    hostname: str = "localhost",
    *,
    valid_days: int = 3650,
    now: datetime.datetime | None = None,
) -> TlsMaterial:
    """Create a self-signed ECDSA P-256 certificate and key in ``directory``.

    The certificate names ``hostname`` (as CN and SAN) and always also ``localhost`` and
    ``127.0.0.1`` and ``::1``; it is valid for ``valid_days`` from ``now``. The key file is
    created with mode 0600 and never overwritten. Raises :class:`LocalError` if either file
    exists or cannot be written.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    addresses = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        addresses.add(ipaddress.ip_address(hostname))
    except ValueError:
        if hostname != "localhost":
            names.append(x509.DNSName(hostname))
    names += [x509.IPAddress(a) for a in sorted(addresses, key=str)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise LocalError(f"cannot write TLS material in {directory}: {exc}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return TlsMaterial(cert_path, key_path, certificate_sha256(der))


def load_tls_material(directory: Path) -> TlsMaterial:
    """Load the certificate and key written by :func:`generate_tls_material`.

    Raises :class:`LocalError` if a file is missing, unreadable or not a certificate.
    """
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if not key_path.is_file():
            raise LocalError(f"{key_path} is missing")
    except (OSError, ValueError) as exc:
        raise LocalError(f"cannot load TLS certificate from {directory}: {exc}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return TlsMaterial(cert_path, key_path, certificate_sha256(der))


# -- the unchecked context the pin check starts from ------------------------------------------


def pinned_ssl_context() -> ssl.SSLContext:
    """A client context for pinned connections: TLS 1.2 or newer, no CA, no host name check.

    Alone it authenticates nothing; the pin check after the handshake does.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context
