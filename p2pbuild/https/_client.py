"""The pinned HTTPS client: httpx, trusting exactly the certificate whose SHA-256 is pinned.

Design item 7: a node's certificate is self-signed and its SHA-256 (over the DER) is the
``tls_sha256`` of the node's signed capability record. To connect, the client first fetches
the server's certificate with one TLS handshake that checks nothing (:func:`pinned_context`)
and compares its SHA-256 with the pin: on a mismatch it raises
:class:`CertificatePinError` and has sent nothing but a TLS hello. On a match it builds an
``ssl.SSLContext`` whose only trust anchor is that very certificate (no CA, no host name
check) and hands it to httpx (``verify=``), so every connection of the pool is verified by
OpenSSL against the pinned certificate during its handshake, before any HTTP byte is
written; a server that shows another certificate later fails that handshake, which is
reported as :class:`CertificatePinError` too. Since the pin names one certificate exactly,
the context is cached by pin (at most :data:`_MAX_ANCHORS`).

Large files (artifacts) take another path, :func:`fetch_pinned_file`: one GET with the
standard library's ``http.client`` in a worker thread, with the same pinned context, the
body read straight into a 1 MiB buffer (``readinto``). trio's TLS stream is pure Python and
caps an async download far below what the thread reaches: there, decryption, hashing and the
file writes run in C without the GIL, and the event loop stays free. httpx's blocking
client would do too, but it hands the body over in 64 KiB pieces through h11 and reached
about half the rate here. Only public interfaces of httpx, http.client and ssl are used.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import http.client
import socket
import ssl
import threading
import urllib.parse
from pathlib import Path

import attrs
import httpx
import trio

from .._errors import LocalError, RemoteError
from ._tls import CertificatePinError, certificate_sha256, pinned_ssl_context

__all__ = [
    "BodyTooLongError",
    "FetchedFile",
    "TransferError",
    "fetch_pinned_file",
    "pinned_client",
    "pinned_context",
]

#: Pinned contexts kept (one per certificate; a dispatcher talks to this many nodes).
_MAX_ANCHORS = 4096
_anchors: collections.OrderedDict[bytes, ssl.SSLContext] = collections.OrderedDict()
_anchors_lock = threading.Lock()


class TransferError(RemoteError):
    """A pinned file transfer failed: connection, timeout, malformed HTTP, or a body that
    ended before its declared length."""

    code = "transfer-failed"


class BodyTooLongError(TransferError):
    """The server sent, or declared, more body bytes than the caller allows."""

    code = "body-too-long"


# -- the pinned context -----------------------------------------------------------------------


def _anchored_context(der: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate ``der``: TLS 1.2 or newer, no
    host name check (a node's certificate names what the node chose)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # The certificate is the anchor itself, not an issuer: accept it as the whole chain.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=der)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _cached(pin: bytes) -> ssl.SSLContext | None:
    with _anchors_lock:
        context = _anchors.get(pin)
        if context is not None:
            _anchors.move_to_end(pin)
        return context


def _remember(pin: bytes, der: bytes) -> ssl.SSLContext:
    if not hmac.compare_digest(certificate_sha256(der), pin):
        raise CertificatePinError(
            f"server certificate {certificate_sha256(der).hex()[:16]} is not the pinned "
            f"{pin.hex()[:16]}"
        )
    context = _anchored_context(der)
    with _anchors_lock:
        _anchors[pin] = context
        while len(_anchors) > _MAX_ANCHORS:
            _anchors.popitem(last=False)
    return context


def _check_pin_length(pin: bytes) -> None:
    if len(pin) != 32:
        raise LocalError("a certificate pin is a 32-byte SHA-256")


async def pinned_context(host: str, port: int, pin: bytes, timeout: float) -> ssl.SSLContext:
    """The context that trusts only the certificate with SHA-256 ``pin``, fetching the
    certificate from ``host:port`` the first time.

    Raises :class:`CertificatePinError` (the server shows another certificate, or none),
    :class:`OSError` and :class:`trio.TooSlowError` (no TLS answer within ``timeout``).
    """
    context = _cached(pin)
    if context is not None:
        return context
    with trio.fail_after(timeout):
        tcp = await trio.open_tcp_stream(host, port)
        tls = trio.SSLStream(tcp, pinned_ssl_context(), server_hostname=host)
        try:
            await tls.do_handshake()
            der = tls.getpeercert(binary_form=True)
        except trio.BrokenResourceError as exc:
            raise OSError(f"TLS handshake with {host}:{port} failed") from exc
        finally:
            await trio.aclose_forcefully(tls)
    if not der:
        raise CertificatePinError("the server sent no certificate")
    return _remember(pin, der)


def _pinned_context_sync(host: str, port: int, pin: bytes, timeout: float) -> ssl.SSLContext:
    """:func:`pinned_context` for a worker thread. Raises :class:`CertificatePinError` and
    :class:`OSError`."""
    context = _cached(pin)
    if context is not None:
        return context
    with socket.create_connection((host, port), timeout=timeout) as sock, \
            pinned_ssl_context().wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise CertificatePinError("the server sent no certificate")
    return _remember(pin, der)


def _pin_failure(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by a certificate that did not verify (another one than
    the pinned one was shown)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


# -- the async client ---------------------------------------------------------------------------


class _PinnedTransport(httpx.AsyncBaseTransport):
    """httpx's own transport, made on the first request with the pinned context."""

    def __init__(self, pin: bytes, *, limits: httpx.Limits, timeout: float) -> None:
        self._pin = pin
        self._limits = limits
        self._timeout = timeout
        self._inner: httpx.AsyncHTTPTransport | None = None
        self._lock = trio.Lock()

    async def _transport(self, request: httpx.Request) -> httpx.AsyncHTTPTransport:
        async with self._lock:
            if self._inner is None:
                host, port = request.url.host, request.url.port or 443
                try:
                    context = await pinned_context(host, port, self._pin, self._timeout)
                except trio.TooSlowError:
                    raise httpx.ConnectTimeout(f"no TLS answer from {host}:{port}",
                                               request=request) from None
                except OSError as exc:
                    raise httpx.ConnectError(str(exc), request=request) from None
                self._inner = httpx.AsyncHTTPTransport(verify=context, limits=self._limits)
            return self._inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # Plain http:// would never be pin-checked.
        if request.url.scheme != "https":
            raise LocalError(f"pinned clients speak https only, not {request.url.scheme}")
        transport = await self._transport(request)
        try:
            return await transport.handle_async_request(request)
        except httpx.ConnectError as exc:
            if _pin_failure(exc):
                raise CertificatePinError(
                    f"server certificate is not the pinned {self._pin.hex()[:16]}"
                ) from None
            raise

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()


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
    certificate (nothing but a TLS hello was sent), :class:`LocalError` for a non-https
    URL, and the usual :class:`httpx.HTTPError` subclasses for network failures and
    timeouts.
    """
    _check_pin_length(pin)
    limits = limits or httpx.Limits(max_connections=16, max_keepalive_connections=4)
    return httpx.AsyncClient(
        transport=_PinnedTransport(pin, limits=limits, timeout=timeout),
        base_url=base_url,
        timeout=timeout,
        trust_env=False,
    )


# -- large files: one pinned GET in a worker thread -----------------------------------------------

#: The body is read and handed to hashing and the file in blocks of this size.
FETCH_BLOCK = 1 << 20
#: Bound on the body kept from an answer other than 200.
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
    _check_pin_length(pin)
    abort = _Abort()
    try:
        return await trio.to_thread.run_sync(
            _fetch_file, url, pin, dest, max_bytes, timeout, abort, abandon_on_cancel=True
        )
    except trio.Cancelled:
        abort.abort()
        raise


class _Connection(http.client.HTTPSConnection):
    """The stdlib's HTTPS connection, telling ``abort`` its socket once connected."""

    def __init__(
        self, host: str, port: int, *, context: ssl.SSLContext, timeout: float, abort: _Abort
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.abort = abort

    def connect(self) -> None:
        super().connect()
        # As trio does for its sockets: without it, Nagle's algorithm holds the request
        # back behind the unacknowledged end of the handshake (a delayed-ACK stall).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.abort.attach(self.sock)


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
    connection: _Connection | None = None
    try:
        context = _pinned_context_sync(parts.hostname, port, pin, timeout)
        connection = _Connection(parts.hostname, port, context=context, timeout=timeout,
                                 abort=abort)
        connection.request("GET", target)
        return _receive(connection.getresponse(), dest, max_bytes)
    except ssl.SSLCertVerificationError:
        raise CertificatePinError(f"server certificate is not the pinned {pin.hex()[:16]}") \
            from None
    except http.client.HTTPException as exc:
        raise TransferError(f"GET {target[:80]}: {exc.__class__.__name__}: {exc}") from None
    except OSError as exc:
        # ssl.SSLError and socket timeouts are OSErrors; a file we cannot write is ours.
        if exc.filename is not None:
            raise LocalError(f"cannot write {exc.filename}: {exc.strerror}") from None
        raise TransferError(f"GET {target[:80]}: {exc.__class__.__name__}: {exc}") from None
    finally:
        abort.attach(None)
        if connection is not None:
            connection.close()


def _receive(response: http.client.HTTPResponse, dest: Path, max_bytes: int) -> FetchedFile:
    if response.status != 200:
        return FetchedFile(response.status, body=response.read(_MAX_ERROR_BODY))
    declared = response.getheader("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLongError(f"the server declares {declared} bytes, more than {max_bytes}")
    digest = hashlib.sha256()
    size = 0
    buffer = memoryview(bytearray(FETCH_BLOCK))
    with dest.open("wb") as f:
        # http.client frames the body (by length, or chunked) and reads it straight into
        # the buffer, never past the declared length.
        while True:
            n = response.readinto(buffer)
            if not n:
                break
            size += n
            if size > max_bytes:
                raise BodyTooLongError(f"the body passed {max_bytes} bytes")
            block = buffer[:n]
            digest.update(block)
            f.write(block)
    if declared is not None and declared.isdigit() and size != int(declared):
        raise TransferError(f"the body ended after {size} of {declared} bytes")
    return FetchedFile(200, size, digest.digest())
