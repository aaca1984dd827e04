"""The thin trio adapter: a datagram transport and the two tasks that drive a :class:`DhtNode`.

One task feeds received datagrams to the core, one (the caller of :meth:`Driver.run`) sleeps
until the core's timer; after every core call the adapter flushes (sends what the core
queued and wakes the callers whose operations finished), as aioquic's
``asyncio/protocol.py::transmit`` does.

Sending is synchronous on purpose: a UDP send either goes out at once or is dropped by the
kernel, exactly like a datagram lost on the path, so there is nothing to await. This keeps a
flush free of checkpoints and lets one process drive a thousand nodes.

A transport that can hand datagrams over by calling back (:class:`PushTransport`, the
in-memory networks of ``p2pbuild.testing``) gets no receive task: its deliveries go straight
to :meth:`Driver.received`, the same per-datagram step the receive loop takes, without a
task switch per datagram (ten thousand simulated nodes spend most of their time there).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from typing import NoReturn, Protocol, runtime_checkable

import trio

from .._errors import LocalError
from ._ids import Address
from ._protocol import DhtNode, Operation
from ._routing import intern_address

__all__ = [
    "DatagramTransport",
    "DirectoryClosedError",
    "Driver",
    "PushTransport",
    "UdpTransport",
    "resolve",
]

# Datagrams drained from a socket per wake-up, before yielding to other tasks.
_BATCH = 64


class DirectoryClosedError(LocalError):
    """The node was closed while an operation was waiting on it."""

    code = "closed"


class DatagramTransport(Protocol):
    """What the adapter needs from a datagram socket (UDP, or ``p2pbuild.testing``'s
    in-memory network)."""

    @property
    def local_address(self) -> Address:
        """The bound ``(host, port)``."""
        ...

    def send(self, data: bytes, address: Address) -> None:
        """Send one datagram without blocking; may silently drop it. May raise
        :class:`OSError`, which the adapter counts as ``send-error``."""
        ...

    async def receive(self) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram; return all that are ready. May raise
        :class:`OSError`, which the adapter counts as ``receive-error``."""
        ...

    def close(self) -> None:
        """Release the socket; further sends are dropped."""
        ...


@runtime_checkable
class PushTransport(Protocol):
    """A :class:`DatagramTransport` that can also deliver by calling back: while a handler
    is set, each batch of datagrams that arrives is passed to it (synchronously, inside the
    transport's own task) instead of being queued for :meth:`~DatagramTransport.receive`."""

    def deliver_to(self, handler: Callable[[list[tuple[bytes, Address]]], None] | None) -> None:
        """Set (or with None, clear) the handler of arriving datagrams."""
        ...


class UdpTransport:
    """A non-blocking UDP socket driven with trio's readiness waits."""

    __slots__ = ("_address", "_max_size", "_sock")

    def __init__(self, sock: socket.socket, *, max_size: int) -> None:
        self._sock = sock
        self._max_size = max_size
        host, port = sock.getsockname()[:2]
        self._address: Address = (host, port)

    @classmethod
    async def bind(cls, host: str, port: int, *, max_size: int = 2048) -> UdpTransport:
        """Bind a UDP socket to ``(host, port)``; port 0 picks a free port.

        Raises :class:`OSError` if the address cannot be bound or resolved.
        """
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(sockaddr)
        except OSError:
            sock.close()
            raise
        return cls(sock, max_size=max_size)

    @property
    def local_address(self) -> Address:
        return self._address

    def send(self, data: bytes, address: Address) -> None:
        self._sock.sendto(data, address)

    async def receive(self) -> list[tuple[bytes, Address]]:
        sock = self._sock
        # Addresses are interned (one tuple and host string per peer for the process, not
        # one per datagram: what the core keeps of them would otherwise be copies).
        # Read one byte more than the limit: a datagram that fills the buffer was larger
        # than max_size, and the core drops it as oversize.
        size = self._max_size + 1
        while True:
            batch: list[tuple[bytes, Address]] = []
            for _ in range(_BATCH):
                try:
                    data, address = sock.recvfrom(size)
                except BlockingIOError:
                    break
                batch.append((data, intern_address((address[0], address[1]))))
            if batch:
                await trio.lowlevel.checkpoint()
                return batch
            await trio.lowlevel.wait_readable(sock)

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()


async def resolve(address: tuple[str, int]) -> Address:
    """Turn ``(name or IP, port)`` into an IP literal address (the core never resolves).

    Raises :class:`OSError` (``socket.gaierror``) if the name does not resolve.
    """
    infos = await trio.socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    sockaddr = infos[0][4]
    return (str(sockaddr[0]), int(sockaddr[1]))


class Driver:
    """Runs one :class:`DhtNode` over one transport. ``now`` is trio's clock plus
    ``clock_offset`` (Unix seconds at trio time 0), so a ``MockClock`` drives record expiry
    too."""

    __slots__ = ("_offset", "_sleeping_until", "_timer_scope", "closed", "core", "transport")

    def __init__(self, core: DhtNode, transport: DatagramTransport, *, clock_offset: float) -> None:
        self.core = core
        self.transport = transport
        self._offset = clock_offset
        # The timer task's sleep (None while it is awake) and the core deadline it sleeps to.
        self._timer_scope: trio.CancelScope | None = None
        self._sleeping_until = -math.inf
        self.closed = False

    @staticmethod
    def default_offset() -> float:
        """The offset that makes ``now`` the wall clock."""
        return time.time() - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._offset

    def flush(self) -> None:
        """Send what the core queued, wake finished operations' waiters, and re-arm the
        timer task if the core's next deadline moved earlier. Call after every core call."""
        core = self.core
        send = self.transport.send
        for data, address in core.datagrams_to_send():
            try:
                send(data, address)
            except OSError:
                # Unreachable network, a full buffer, a family mismatch: as good as lost.
                core.note_transport_error("send-error")
        for op in core.finished_operations():
            waiter = op.waiter
            if isinstance(waiter, trio.Event):
                waiter.set()
        timer = core.get_timer()
        if timer != self._sleeping_until and self._timer_scope is not None:
            # Move the sleep's deadline to the core's: no task switch per RPC sent (earlier),
            # and none for a deadline that went away (later: a reply came before its RPC's
            # timeout), which would only wake the timer task to go back to sleep.
            self._sleeping_until = timer
            self._timer_scope.deadline = timer - self._offset

    async def wait(self, op: Operation) -> None:
        """Wait until ``op`` (just started on the core) finishes.

        Raises :class:`DirectoryClosedError` if the node stops first.
        """
        if self.closed:
            raise DirectoryClosedError("the DHT node is closed")
        event = trio.Event()
        op.waiter = event
        self.flush()
        if not op.done:
            await event.wait()
        if not op.done:
            raise DirectoryClosedError("the DHT node closed during the operation")

    async def run(
        self,
        nursery: trio.Nursery | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Drive the core until cancelled; ``started()`` once both loops run. The receive
        loop runs in ``nursery`` if given (the caller's: one nursery fewer per node, as a
        thousand nodes share a process in tests and benchmarks), else in a nursery of its
        own; the timer loop runs in this task."""
        transport = self.transport
        try:
            if isinstance(transport, PushTransport):
                transport.deliver_to(self.received)
                task_status.started()
                await self._timer_loop()
            if nursery is not None:
                nursery.start_soon(self._receive_loop)
                task_status.started()
                await self._timer_loop()
            async with trio.open_nursery() as own:
                own.start_soon(self._receive_loop)
                task_status.started()
                await self._timer_loop()
        finally:
            self.closed = True
            if isinstance(transport, PushTransport):
                transport.deliver_to(None)
            transport.close()
            self._wake_all()
        raise AssertionError("unreachable")  # pragma: no cover

    def _wake_all(self) -> None:
        # Operations still running can never finish now: wake their waiters, who raise.
        for op in self.core.abandon():
            waiter = op.waiter
            if isinstance(waiter, trio.Event):
                waiter.set()

    def received(self, batch: list[tuple[bytes, Address]]) -> None:
        """Hand datagrams that arrived to the core, flushing after each."""
        core = self.core
        for data, address in batch:
            core.receive_datagram(data, address, self.now())
            self.flush()

    async def _receive_loop(self) -> None:
        receive = self.transport.receive
        while True:
            try:
                batch = await receive()
            except OSError:
                self.core.note_transport_error("receive-error")
                await trio.lowlevel.checkpoint()
                continue
            self.received(batch)

    async def _timer_loop(self) -> NoReturn:
        core = self.core
        while True:
            timer = core.get_timer()
            with trio.CancelScope(deadline=timer - self._offset) as scope:
                self._timer_scope = scope
                self._sleeping_until = timer
                await trio.sleep_forever()
            # Only the deadline ends the sleep (flush may have moved it earlier).
            timer = self._sleeping_until
            self._timer_scope = None
            self._sleeping_until = -math.inf
            # Float rounding may put ``now`` a hair before the deadline we slept to.
            now = max(self.now(), timer)
            if now >= core.get_timer():
                core.handle_timer(now)
                self.flush()
