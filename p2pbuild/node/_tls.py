"""TLS without a CA: the node's self-signed certificate, and a client that pins it.

Design item 7: a node serves HTTPS with a self-signed certificate, and the SHA-256 of that
certificate (over its DER encoding) is in the node's signed capability record as
``tls_sha256``. A dispatcher connects with :func:`pinned_client`, which completes the TLS
handshake without CA or host name checks and then compares the server certificate's
SHA-256 with the pinned one. On a mismatch it closes the connection and raises
:class:`CertificatePinError` *before any HTTP byte is written*, so not even the request
line, let alone a job, reaches a server that is not the node.

The check sits in an httpcore network backend: the stream's ``start_tls`` is the one place
every HTTPS connection of the pool passes through, right after the handshake. This uses
``httpx.AsyncHTTPTransport._pool`` (private in httpx 0.28.1, pinned in pyproject.toml) to
give the pool that backend; the test suite checks the whole path end to end.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import httpcore
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .._errors import LocalError, RemoteError

__all__ = [
    "CertificatePinError",
    "TlsMaterial",
    "certificate_sha256",
    "generate_tls_material",
    "load_tls_material",
    "pinned_client",
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


# -- the pinned client --------------------------------------------------------------------------


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


class _PinnedStream(httpcore.AsyncNetworkStream):
    """A TCP stream whose ``start_tls`` refuses any server certificate but the pinned one."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, pin: bytes) -> None:
        self._inner = inner
        self._pin = pin

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None or not hmac.compare_digest(certificate_sha256(der), self._pin):
            await tls.aclose()
            got = "no certificate" if der is None else certificate_sha256(der).hex()[:16]
            raise CertificatePinError(
                f"server certificate {got} is not the pinned {self._pin.hex()[:16]}"
            )
        return tls


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, pin: bytes) -> None:
        self._inner = httpcore.TrioBackend()
        self._pin = pin

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options,
        )
        return _PinnedStream(stream, self._pin)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise LocalError("pinned connections are TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request conversion, error mapping) over the pinned backend."""

    def __init__(self, pin: bytes, *, limits: httpx.Limits) -> None:
        super().__init__(verify=pinned_ssl_context(), limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=pinned_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(pin),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # Plain http:// would never reach start_tls, so it would never be pin-checked.
        if request.url.scheme != "https":
            raise LocalError(f"pinned clients speak https only, not {request.url.scheme}")
        return await super().handle_async_request(request)


def pinned_client(
    pin: bytes,
    *,
    base_url: str = "",
    timeout: float = 30.0,
    limits: httpx.Limits | None = None,
) -> httpx.AsyncClient:
    """An httpx client (trio) that talks only to the server whose certificate has SHA-256
    ``pin`` (the ``tls_sha256`` of the node's capability record).

    Use it as ``async with pinned_client(pin, base_url=capability.endpoint) as client``.
    A request raises :class:`CertificatePinError` if the server presents another
    certificate (the connection is closed before any request byte is sent),
    :class:`LocalError` for a non-https URL, and the usual :class:`httpx.HTTPError`
    subclasses for network failures and timeouts.
    """
    if len(pin) != 32:
        raise LocalError("a certificate pin is a 32-byte SHA-256")
    limits = limits or httpx.Limits(max_connections=16, max_keepalive_connections=4)
    return httpx.AsyncClient(
        transport=_PinnedTransport(pin, limits=limits),
        base_url=base_url,
        timeout=timeout,
        trust_env=False,
    )
