"""The HTTPS app server: an ASGI app on hypercorn's trio worker, behind connection bounds.

hypercorn speaks HTTP (h11) and TLS for each connection (``hypercorn.trio.tcp_server``);
this module owns the listening socket and the accept loop in front of it, because hypercorn's
own loop (``trio.serve_listeners``) takes every connection the kernel hands over and logs a
traceback for each failed ``accept``. Here:

* at most ``max_connections`` connections are open at once, and at most
  ``max_connections_per_address`` from one client address (an IPv6 client counts by its
  /64, which one host usually has whole). A connection over a bound is closed at once,
  before any TLS state exists, so holding thousands of connections costs this process
  almost nothing;
* ``max_connections`` is kept below the process's open-file limit (``RLIMIT_NOFILE``) with
  room for the database, files and outgoing connections;
* an ``accept`` that fails for lack of resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``,
  ``ENOMEM``) is counted and logged at most once per ``log_interval`` seconds, without a
  traceback, and the loop pauses briefly and goes on; a connection aborted before it was
  accepted is only counted;
* idle keep-alive connections close after ``keep_alive_timeout`` seconds, TLS handshakes
  that do not finish within ``tls_handshake_timeout`` are dropped, request heads are bounded
  by ``max_header_bytes`` (hypercorn's settings).

:class:`ConnectionGate` is the sans-IO part (counts and decisions), :func:`serve_asgi` the
trio part.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import resource
import socket
import struct
from collections import Counter
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from .._errors import LocalError
from ._tls import TlsMaterial

__all__ = [
    "ByteBudget",
    "ConnectionGate",
    "ServerConfig",
    "ServerStatistics",
    "address_key",
    "serve_asgi",
]

_log = logging.getLogger("p2pbuild.https.server")

#: ``accept`` errors that mean "out of a resource": pause and go on (as trio does).
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``accept`` errors about one connection that died before it was accepted.
_ABORTED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET})
#: File descriptors kept free of connections for the database, files and outgoing requests.
FD_RESERVE = 128


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise LocalError(f"{attribute.name} must be positive")


@attrs.frozen
class ServerConfig:
    """Where an HTTPS server listens and its bounds. ``port`` 0 picks a free port."""

    tls: TlsMaterial
    host: str = "127.0.0.1"
    port: int = 0
    #: Bytes of an incomplete request head (request line and headers).
    max_header_bytes: int = attrs.field(default=16 * 1024, validator=_positive)
    #: Idle keep-alive connections, and partial request heads, are closed after this.
    keep_alive_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: The TLS handshake must finish within this.
    tls_handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Connections the kernel queues before we accept them; a deep queue keeps a burst of
    #: connection attempts (a flood) from dropping genuine ones (capped by somaxconn).
    backlog: int = attrs.field(default=1024, validator=_positive)
    #: Time running requests get to finish on shutdown.
    graceful_timeout: float = 3.0
    #: Open connections at most, in all (kept below the open-file limit).
    max_connections: int = attrs.field(default=1000, validator=_positive)
    #: Open connections at most from one client address (an IPv6 /64).
    max_connections_per_address: int = attrs.field(default=64, validator=_positive)
    #: Resource errors of ``accept`` are logged at most once per this many seconds.
    log_interval: float = 10.0


@attrs.frozen
class ServerStatistics:
    """Counters and gauges of a :class:`ConnectionGate`."""

    open: int
    addresses: int
    accepted: int
    #: Connections closed at once because of a bound, by the bound.
    refused: tuple[tuple[str, int], ...]
    #: ``accept`` failures by errno name (``EMFILE``, ``ECONNABORTED``, ...).
    accept_errors: tuple[tuple[str, int], ...]

    def to_json(self) -> dict[str, object]:
        return {
            "open": self.open,
            "addresses": self.addresses,
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "accept_errors": dict(self.accept_errors),
        }


def address_key(host: str) -> str:
    """What a client address counts as: itself for IPv4, its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


@attrs.define(eq=False)
class ConnectionGate:
    """Open connections, in all and per client address; decides whether one more may open.

    Sans-IO: :meth:`admit` when a connection was accepted, :meth:`release` when it closed,
    :meth:`accept_failed` when ``accept`` raised; ``now`` is passed in.
    """

    max_connections: int
    max_per_address: int
    log_interval: float = 10.0
    _open: Counter[str] = attrs.field(factory=Counter, init=False)
    _total: int = attrs.field(default=0, init=False)
    _accepted: int = attrs.field(default=0, init=False)
    _refused: Counter[str] = attrs.field(factory=Counter, init=False)
    _errors: Counter[str] = attrs.field(factory=Counter, init=False)
    _last_log: float | None = attrs.field(default=None, init=False)
    _unlogged: int = attrs.field(default=0, init=False)

    def admit(self, key: str) -> bool:
        """Count a new connection from ``key`` (see :func:`address_key`) and return True,
        or return False (and count the refusal) if it would pass a bound."""
        if self._total >= self.max_connections:
            self._refused["max-connections"] += 1
            return False
        if self._open[key] >= self.max_per_address:
            self._refused["max-connections-per-address"] += 1
            return False
        self._open[key] += 1
        self._total += 1
        self._accepted += 1
        return True

    def release(self, key: str) -> None:
        """A connection admitted for ``key`` closed."""
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
        self._total -= 1

    def accept_failed(self, error: OSError, now: float) -> str | None:
        """Count a failed ``accept``; returns the line to log now, if any (at most one per
        ``log_interval``, saying how many failed since the last one)."""
        name = errno.errorcode.get(error.errno or 0, str(error.errno))
        self._errors[name] += 1
        if error.errno in _ABORTED_ERRNOS:
            return None
        self._unlogged += 1
        if self._last_log is not None and now - self._last_log < self.log_interval:
            return None
        line = (
            f"accept failed {self._unlogged} time(s) ({name}: {error.strerror}); "
            f"{self._total} connections open"
        )
        self._last_log, self._unlogged = now, 0
        return line

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            open=self._total,
            addresses=len(self._open),
            accepted=self._accepted,
            refused=tuple(sorted(self._refused.items())),
            accept_errors=tuple(sorted(self._errors.items())),
        )


@attrs.define(eq=False)
class ByteBudget:
    """Bytes in flight (uploads being received), at most ``limit`` of them together.

    :meth:`take` before a request holds more bytes (its declared length up front, or each
    chunk as it arrives), :meth:`give` back what it took when it ends, whatever the outcome.
    """

    limit: int
    used: int = attrs.field(default=0, init=False)
    refused: int = attrs.field(default=0, init=False)

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes and return True, or return False (and count it) if that
        would pass the limit."""
        if self.used + size > self.limit:
            self.refused += 1
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


def _hypercorn_config(config: ServerConfig) -> HypercornConfig:
    hc = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.certfile = str(config.tls.cert_path)
    hc.keyfile = str(config.tls.key_path)
    hc.alpn_protocols = ["http/1.1"]
    hc.h11_max_incomplete_size = config.max_header_bytes
    hc.keep_alive_timeout = config.keep_alive_timeout
    hc.ssl_handshake_timeout = config.tls_handshake_timeout
    hc.graceful_timeout = config.graceful_timeout
    hc.backlog = config.backlog
    hc.accesslog = None
    hc.errorlog = logging.getLogger("p2pbuild.https.hypercorn")
    hc.include_server_header = False
    return hc


def connection_limit(wanted: int, reserve: int = FD_RESERVE) -> int:
    """``wanted`` lowered, if need be, to what the open-file limit leaves after ``reserve``
    descriptors (at least 1)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve))


async def serve_asgi(
    app: Any,
    config: ServerConfig,
    *,
    gate: ConnectionGate | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` over HTTPS with ``config``'s certificate and bounds until
    cancelled. ``gate`` (made from ``config`` when None) counts the connections; pass one
    to read its :meth:`~ConnectionGate.statistics`.

    Calls ``task_status.started(port)`` once listening. Raises :class:`OSError` if the
    address cannot be bound; nothing a client does ends it.
    """
    hc = _hypercorn_config(config)
    limit = connection_limit(config.max_connections)
    if limit < config.max_connections:
        _log.warning(
            "max_connections %d lowered to %d: the open-file limit (ulimit -n) is %d",
            config.max_connections, limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
    if gate is None:
        gate = ConnectionGate(limit, config.max_connections_per_address, config.log_interval)
    else:
        gate.max_connections = min(gate.max_connections, limit)
    ssl_context = hc.create_ssl_context()
    assert ssl_context is not None  # a certificate is configured
    wrapped = wrap_app(app, hc.wsgi_max_body_size, "asgi")
    sockets = hc.create_sockets()
    listener = trio.socket.from_stdlib_socket(sockets.secure_sockets[0])
    listener.listen(config.backlog)
    port = int(listener.getsockname()[1])
    context = WorkerContext(None)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, hc, lifespan_state)

    async def connection(sock: trio.socket.SocketType, key: str) -> None:
        try:
            stream = trio.SSLStream(
                trio.SocketStream(sock), ssl_context, server_side=True, https_compatible=True
            )
            try:
                await TCPServer(wrapped, hc, context, dict(lifespan_state), stream).run()
            finally:
                # TCPServer leaves the socket open when the handshake fails.
                await trio.aclose_forcefully(stream)
        finally:
            gate.release(key)
            sock.close()

    with listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            _log.info("HTTPS listening on %s:%d", config.host, port)
            task_status.started(port)
            while True:
                try:
                    sock, address = await listener.accept()
                except OSError as exc:
                    line = gate.accept_failed(exc, trio.current_time())
                    if line is not None:
                        _log.warning("%s", line)
                    if exc.errno in _CAPACITY_ERRNOS:
                        await trio.sleep(0.1)
                    elif exc.errno not in _ABORTED_ERRNOS:
                        raise
                    continue
                key = address_key(address[0])
                if not gate.admit(key):
                    _reset(sock)
                    continue
                nursery.start_soon(connection, sock, key)


def _reset(sock: trio.socket.SocketType) -> None:
    """Close at once with a reset: nothing of the connection stays in this process or in
    the kernel's TIME_WAIT."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
