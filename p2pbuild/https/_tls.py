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

Large files (artifacts) take another path, :func:`fetch_pinned_file`: one blocking GET in a
worker thread over a stdlib ``ssl`` socket, the same pin check right after the handshake,
h11 for the response head and then the body read straight into a 1 MiB buffer. trio's TLS
stream is pure Python and httpx hands the body over one 16 KiB TLS record at a time, which
caps a download near 150 MB/s on loopback; in the thread, decryption, hashing and the file
writes run in C without the GIL, several times faster, and the event loop stays free.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import h11
import httpcore
import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .._errors import LocalError, RemoteError

__all__ = [
    "BodyTooLongError",
    "CertificatePinError",
    "FetchedFile",
    "TlsMaterial",
    "TransferError",
    "certificate_sha256",
    "fetch_pinned_file",
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


class TransferError(RemoteError):
    """A pinned file transfer failed: connection, timeout, malformed HTTP, or a body that
    ended before its declared length."""

    code = "transfer-failed"


class BodyTooLongError(TransferError):
    """The server sent, or declared, more body bytes than the caller allows."""

    code = "body-too-long"


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


# -- large files: one pinned GET in a worker thread -----------------------------------------------

#: The body is read and handed to hashing and the file in blocks of this size.
FETCH_BLOCK = 1 << 20
#: Bound on the response head, and on the body kept from an answer other than 200.
_MAX_HEAD = 16 * 1024
_MAX_ERROR_BODY = 4096


@attrs.frozen
class FetchedFile:
    """What :func:`fetch_pinned_file` received. For status 200, ``size`` and ``sha256`` are
    those of the bytes written to the file; otherwise nothing was written and ``body`` is
    the start of the answer (at most 4 KiB), for the caller's error message."""

    status: int
    size: int = 0
    sha256: bytes = b""
    body: bytes = b""


class _Abort:
    """Lets the trio side stop a transfer thread it no longer waits for: shutting the
    socket down wakes the thread from a blocked read or write, and the thread then ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.aborted = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.aborted:
                raise TransferError("transfer cancelled")
            self._socket = sock

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._socket is not None:
                # The plain socket's shutdown, also for an SSLSocket: it touches only the
                # file descriptor, which stays valid (a closed socket object has none, and
                # then this raises OSError).
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self._socket, socket.SHUT_RDWR)


async def fetch_pinned_file(
    url: str,
    pin: bytes,
    dest: Path,
    *,
    max_bytes: int,
    timeout: float = 30.0,
) -> FetchedFile:
    """GET ``url`` from the server whose certificate has SHA-256 ``pin`` and write a 200
    answer's body to ``dest`` (created or truncated), hashing it with SHA-256 on the way.

    Runs in a worker thread (see the module doc); cancelling returns at once and stops the
    thread at its next read. The body is cut off at ``max_bytes``: a larger declared length
    is refused before any body byte is read, and a body without one (chunked) is refused as
    soon as it passes the bound. ``timeout`` bounds each network operation.

    Raises :class:`CertificatePinError` (nothing was sent), :class:`BodyTooLongError`,
    :class:`TransferError` (network failure, timeout, malformed HTTP, truncated body) and
    :class:`LocalError` for a non-https URL or a file that cannot be written.
    """
    if len(pin) != 32:
        raise LocalError("a certificate pin is a 32-byte SHA-256")
    abort = _Abort()
    try:
        return await trio.to_thread.run_sync(
            _fetch_file, url, pin, dest, max_bytes, timeout, abort, abandon_on_cancel=True
        )
    except trio.Cancelled:
        abort.abort()
        raise


def _fetch_file(
    url: str, pin: bytes, dest: Path, max_bytes: int, timeout: float, abort: _Abort
) -> FetchedFile:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise LocalError(f"pinned fetches speak https only, not {url[:80]!r}")
    try:
        port = parts.port or 443
    except ValueError:
        raise LocalError(f"bad port in {url[:80]!r}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
    except OSError as exc:
        raise TransferError(f"cannot connect to {parts.netloc}: {exc}") from None
    try:
        abort.attach(sock)
        # As trio does for its sockets: without it, Nagle's algorithm holds the request
        # back behind the unacknowledged end of the handshake (a delayed-ACK stall).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = _CLIENT_CONTEXT.wrap_socket(sock, server_hostname=parts.hostname)
        sock = tls  # wrap_socket took the descriptor over (the plain object is detached)
        abort.attach(tls)
        der = tls.getpeercert(binary_form=True)
        if der is None or not hmac.compare_digest(certificate_sha256(der), pin):
            got = "no certificate" if der is None else certificate_sha256(der).hex()[:16]
            raise CertificatePinError(
                f"server certificate {got} is not the pinned {pin.hex()[:16]}"
            )
        return _get(tls, parts.netloc, target, dest, max_bytes)
    except (OSError, h11.ProtocolError) as exc:
        # ssl.SSLError and socket timeouts are OSErrors; a file we cannot write is ours.
        if isinstance(exc, OSError) and exc.filename is not None:
            raise LocalError(f"cannot write {exc.filename}: {exc.strerror}") from None
        raise TransferError(f"GET {target[:80]}: {exc.__class__.__name__}: {exc}") from None
    finally:
        abort.attach(None)
        sock.close()


def _get(tls: ssl.SSLSocket, host: str, target: str, dest: Path, max_bytes: int) -> FetchedFile:
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    tls.sendall(connection.send(h11.Request(
        method="GET", target=target,
        headers=[("Host", host), ("Accept-Encoding", "identity"), ("Connection", "close")],
    )))  # fmt: skip
    tls.sendall(connection.send(h11.EndOfMessage()) or b"")
    response = _h11_response(connection, tls)
    if response.status_code != 200:
        body = bytearray()
        for chunk in _h11_body(connection, tls):
            body += chunk
            if len(body) >= _MAX_ERROR_BODY:
                break
        return FetchedFile(response.status_code, body=bytes(body[:_MAX_ERROR_BODY]))
    declared = _content_length(response.headers)
    if declared is not None and declared > max_bytes:
        raise BodyTooLongError(f"the server declares {declared} bytes, more than {max_bytes}")
    digest = hashlib.sha256()
    size = 0
    with dest.open("wb") as f:
        if declared is None:
            # Chunked (or until close): h11 frames it; cut off as soon as it passes the bound.
            for chunk in _h11_body(connection, tls):
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLongError(f"the body passed {max_bytes} bytes")
                digest.update(chunk)
                f.write(chunk)
            return FetchedFile(200, size, digest.digest())
        # A declared length: first what h11 already holds, then the rest straight from the
        # socket into one buffer, never reading past the declared end.
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                digest.update(event.data)
                f.write(event.data)
            elif event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                break
            else:
                raise TransferError(f"unexpected {type(event).__name__} in the body")
        buffer = memoryview(bytearray(FETCH_BLOCK))
        while size < declared:
            filled = 0
            wanted = min(FETCH_BLOCK, declared - size)
            while filled < wanted:
                n = tls.recv_into(buffer[filled:wanted])
                if n == 0:
                    raise TransferError(f"the body ended after {size + filled} of {declared} bytes")
                filled += n
            block = buffer[:filled]
            digest.update(block)
            f.write(block)
            size += filled
    return FetchedFile(200, size, digest.digest())


def _h11_response(connection: h11.Connection, tls: ssl.SSLSocket) -> h11.Response:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(tls.recv(_MAX_HEAD))
        elif isinstance(event, h11.Response):
            return event
        elif not isinstance(event, h11.InformationalResponse):
            raise TransferError(f"unexpected {type(event).__name__} before the response")


def _h11_body(connection: h11.Connection, tls: ssl.SSLSocket) -> Iterable[bytes]:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(tls.recv(FETCH_BLOCK))
        elif isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise TransferError(f"unexpected {type(event).__name__} in the body")


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The declared body length, or None when the body is chunked (h11 already refused a
    malformed or conflicting Content-Length)."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length


_CLIENT_CONTEXT = pinned_ssl_context()
