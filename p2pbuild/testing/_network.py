"""An in-memory datagram network with seeded loss, duplication, delay and partitions.

Every endpoint is a :class:`~p2pbuild.dht.DatagramTransport`, so DHT nodes run over it
unchanged. Delivery times come from trio's clock, so under ``MockClock(autojump_threshold=0)``
(pytest-trio's ``autojump_clock`` fixture) a test of a 200-node network runs in virtual time:
exact, repeatable, and as fast as the CPU allows.

One delivery task per network (:func:`open_memory_network` runs it) moves datagrams into
endpoints' inboxes when they are due. Delays are rounded up to a ``tick``, so the clock
jumps once per tick for the whole network, not once per datagram per endpoint.

All randomness comes from the ``random.Random`` passed in; the same seed and the same
sequence of sends give the same fates. Like UDP, nothing here ever raises on send: a
datagram to a closed endpoint, across a partition, or over ``max_datagram`` just vanishes
(and is counted in :attr:`MemoryNetwork.counters`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TypedDict, Unpack

import trio

from ..dht import Address

__all__ = ["MemoryEndpoint", "MemoryNetwork", "open_memory_network"]


class MemoryEndpoint:
    """One bound address on a :class:`MemoryNetwork`. A :class:`~p2pbuild.dht.PushTransport`:
    a DHT driver on it takes its datagrams by callback, in the network's delivery task."""

    __slots__ = ("_address", "_arrived", "_handler", "_inbox", "_network", "closed")

    def __init__(self, network: MemoryNetwork, address: Address) -> None:
        self._network = network
        self._address = address
        self._inbox: list[tuple[bytes, Address]] = []
        self._arrived = trio.Event()
        self._handler: Callable[[list[tuple[bytes, Address]]], None] | None = None
        self.closed = False

    @property
    def local_address(self) -> Address:
        return self._address

    def send(self, data: bytes, address: Address) -> None:
        if not self.closed:
            self._network._route(self._address, data, address)

    async def receive(self) -> list[tuple[bytes, Address]]:
        if self._inbox:
            await trio.lowlevel.checkpoint()
        while not self._inbox:
            self._arrived = trio.Event()
            await self._arrived.wait()
        batch = self._inbox
        self._inbox = []
        return batch

    def deliver_to(self, handler: Callable[[list[tuple[bytes, Address]]], None] | None) -> None:
        """Hand arriving datagrams to ``handler`` (None: queue them for :meth:`receive`)."""
        self._handler = handler
        if handler is not None and self._inbox:
            batch, self._inbox = self._inbox, []
            handler(batch)

    def _deliver(self, data: bytes, source: Address) -> None:
        handler = self._handler
        if handler is not None:
            handler([(data, source)])
        else:
            self._inbox.append((data, source))
            self._arrived.set()

    def close(self) -> None:
        """Leave the network: from now on datagrams to this address vanish (a node that
        died silently)."""
        if not self.closed:
            self.closed = True
            self._inbox.clear()
            self._handler = None
            self._network._endpoints.pop(self._address, None)


class MemoryNetwork:
    """A network of :class:`MemoryEndpoint` objects; deliveries happen while
    :meth:`run` runs (use :func:`open_memory_network`).

    ``loss`` and ``duplication`` are probabilities per datagram; each copy is delayed by a
    uniform time in ``[min_delay, max_delay]`` seconds (so datagrams may be reordered),
    rounded up to a multiple of ``tick`` seconds. All of these may be changed between sends.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        loss: float = 0.0,
        duplication: float = 0.0,
        min_delay: float = 0.0005,
        max_delay: float = 0.002,
        tick: float = 0.00025,
        max_datagram: int = 65507,
    ) -> None:
        self.rng = rng
        self.loss = loss
        self.duplication = duplication
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.tick = tick
        self.max_datagram = max_datagram
        self._endpoints: dict[Address, MemoryEndpoint] = {}
        self._groups: dict[str, int] | None = None
        # (deliver_at, order, data, source, destination); ``order`` (:meth:`_order`) breaks
        # ties between datagrams due at the same tick.
        self._queue: list[tuple[float, tuple[str | int, ...], bytes, Address, Address]] = []
        self._sequence = 0
        self._next_host = 1
        self._wake = trio.Event()
        self._sleeping_until = -math.inf
        #: ``sent`` (and their ``bytes``), ``delivered``, ``lost``, ``duplicated``,
        #: ``unreachable``, ``partitioned``, ``oversize``, and ``largest`` (the largest
        #: datagram sent).
        self.counters: Counter[str] = Counter()
        #: Called with (source, data, destination) for every datagram sent, before loss
        #: and delay (a benchmark's or test's view of the traffic); None: nobody looks.
        self.tap: Callable[[Address, bytes, Address], None] | None = None

    def endpoint(self, address: Address | None = None) -> MemoryEndpoint:
        """Bind an endpoint; by default on a fresh host ``10.x.y.z`` and port 7420.

        Raises :class:`OSError` (``EADDRINUSE``-like) if ``address`` is taken.
        """
        if address is None:
            n = self._next_host
            self._next_host += 1
            address = (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", 7420)
        if address in self._endpoints:
            raise OSError(f"address {address} is in use")
        endpoint = MemoryEndpoint(self, address)
        self._endpoints[address] = endpoint
        return endpoint

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: hosts in different groups cannot reach each other; hosts in no
        group form one more group together. Datagrams already in flight still arrive."""
        self._groups = {host: index for index, group in enumerate(groups) for host in group}

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        self._groups = None

    async def run(self) -> None:
        """Deliver datagrams as they fall due, until cancelled."""
        queue = self._queue
        while True:
            self._wake = trio.Event()
            self._sleeping_until = queue[0][0] if queue else math.inf
            with trio.move_on_at(self._sleeping_until):
                await self._wake.wait()
            self._sleeping_until = -math.inf
            now = trio.current_time()
            endpoints = self._endpoints
            while queue and queue[0][0] <= now:
                _, _, data, source, destination = heapq.heappop(queue)
                endpoint = endpoints.get(destination)
                if endpoint is None:
                    self.counters["unreachable"] += 1
                    continue
                endpoint._deliver(data, source)

    def _route(self, source: Address, data: bytes, destination: Address) -> None:
        if self.tap is not None:
            self.tap(source, data, destination)
        counters = self.counters
        counters["sent"] += 1
        counters["bytes"] += len(data)
        if len(data) > counters["largest"]:
            counters["largest"] = len(data)
        if len(data) > self.max_datagram:
            counters["oversize"] += 1
            return
        if destination not in self._endpoints:
            counters["unreachable"] += 1
            return
        now = trio.current_time()
        dropped = self._dropped(source, destination, now)
        if dropped:
            counters[dropped] += 1
            return
        rng = self._rng_of(source)
        if self.loss and rng.random() < self.loss:
            counters["lost"] += 1
            return
        copies = 2 if self.duplication and rng.random() < self.duplication else 1
        if copies == 2:
            counters["duplicated"] += 1
        tick = self.tick
        for _ in range(copies):
            at = now + self._delay(source, destination, rng)
            if tick > 0:
                at = math.ceil(at / tick) * tick
            heapq.heappush(self._queue, (at, self._order(source), data, source, destination))
            counters["delivered"] += 1
            if at < self._sleeping_until:
                self._wake.set()

    def _dropped(self, source: Address, destination: Address, now: float) -> str:
        """Why a datagram from ``source`` to the bound ``destination`` vanishes (the name of
        its counter), or ``""`` if it goes on to the loss draw."""
        groups = self._groups
        if groups is not None and groups.get(source[0], -1) != groups.get(destination[0], -1):
            return "partitioned"
        return ""

    def _rng_of(self, source: Address) -> random.Random:
        """The random source of the fate (loss, duplication, delay) of what ``source``
        sends: here the network's own, one stream in the order datagrams are sent."""
        return self.rng

    def _order(self, source: Address) -> tuple[str | int, ...]:
        """The tie-break of a datagram sent now by ``source`` among those due at the same
        tick: here the order of sending."""
        self._sequence += 1
        return (self._sequence,)

    def _delay(self, source: Address, destination: Address, rng: random.Random) -> float:
        """The one-way delay of one copy of a datagram (before rounding to the tick)."""
        return rng.uniform(self.min_delay, self.max_delay)


class NetworkConditions(TypedDict, total=False):
    """The conditions :func:`open_memory_network` passes on to :class:`MemoryNetwork`."""

    loss: float
    duplication: float
    min_delay: float
    max_delay: float
    tick: float


@asynccontextmanager
async def open_memory_network(
    rng: random.Random, **conditions: Unpack[NetworkConditions]
) -> AsyncIterator[MemoryNetwork]:
    """A :class:`MemoryNetwork` (``conditions`` as it takes them) whose delivery task runs
    for the duration of the block."""
    network = MemoryNetwork(rng, **conditions)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(network.run)
        yield network
        nursery.cancel_scope.cancel()
