"""A simulated internet for the DHT: internet round trips, loss, NAT and session churn on trio's
virtual clock, so that ten thousand real DHT nodes (the same sans-IO core, driver and
:class:`~p2pbuild.dht.Directory` as over UDP) run in one process faster than real time.

**Round trips.** Each host draws a one-way "access" delay ``a ~ Gamma(shape / 2, scale)``
when it binds; the base round trip of a pair is ``a + b``, so round trips are
``Gamma(shape, scale)`` distributed (the sum of two gammas of one scale), and a host on a
slow link is slow to everyone, as on the internet. Every datagram's one-way delay is half
the pair's round trip times ``1 + Exp(jitter)``. Defaults: ``shape = 1.5``, ``scale =
0.0678`` s, giving a median round trip of 80 ms, a mean of 102 ms and a 99th percentile of
about 390 ms. The family and the tail follow Valadão, Guedes and Duarte, *Caracterização de
tempos de ida-e-volta na Internet* (RBRC 3, 2010; arXiv:1202.2153), 550 million round trips
between 81 PlanetLab hosts, for which a Gamma distribution fitted best and 99% of pairs had
a mean round trip under 500 ms; the parameters are fitted to those two summary figures
(median about 80 ms, p99 of several hundred ms), not to the raw data.

**Loss.** Each datagram is lost with probability ``loss`` (default 1%).

**NAT.** An endpoint bound with ``nat=True`` receives a datagram from ``X`` only if it sent
one to ``X`` within ``nat_timeout`` seconds (an address- and port-restricted NAT with a
30 s UDP mapping lifetime, a common default): replies pass, unsolicited requests vanish
(counted ``nat-dropped``).

**Churn.** :class:`Swarm` starts nodes (public or behind NAT) that join through random
live ones, and stops them silently (:meth:`Swarm.leave`), so sessions end and new ones begin
while lookups run.

Everything random comes from the seeded ``random.Random`` objects passed in: the same seed
and the same calls give the same run (:func:`open_swarm`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from .._identity import Identity
from ..dht import Address, DhtConfig, Directory, RecordCache, node_id_for, open_directory_on
from ._cluster import CLUSTER_EPOCH
from ._keys import make_identity
from ._network import MemoryEndpoint, MemoryNetwork

__all__ = ["SimulatedInternet", "Swarm", "SwarmNode", "open_swarm"]

#: Round trips ~ Gamma(RTT_SHAPE, RTT_SCALE): median 80 ms, p99 ~390 ms (module docstring).
RTT_SHAPE = 1.5
RTT_SCALE = 0.0678


class SimulatedInternet(MemoryNetwork):
    """A :class:`MemoryNetwork` whose delays, loss and NAT behave as the module docstring
    says. Run it with :meth:`run` in a nursery (:func:`open_swarm` does)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        loss: float = 0.01,
        rtt_shape: float = RTT_SHAPE,
        rtt_scale: float = RTT_SCALE,
        jitter: float = 0.05,
        nat_timeout: float = 30.0,
        tick: float = 0.001,
    ) -> None:
        super().__init__(rng, loss=loss, tick=tick)
        self.rtt_shape = rtt_shape
        self.rtt_scale = rtt_scale
        self.jitter = jitter
        self.nat_timeout = nat_timeout
        #: Per host: its one-way access delay (half of its share of a round trip).
        self._access: dict[str, float] = {}
        #: Per NAT'd endpoint: when it last sent to each address (its open mappings).
        self._mappings: dict[Address, dict[Address, float]] = {}

    def endpoint(self, address: Address | None = None, *, nat: bool = False) -> MemoryEndpoint:
        """Bind an endpoint (see :meth:`MemoryNetwork.endpoint`); ``nat``: behind a NAT."""
        endpoint = super().endpoint(address)
        host = endpoint.local_address[0]
        if host not in self._access:
            self._access[host] = self.rng.gammavariate(self.rtt_shape / 2, self.rtt_scale)
        if nat:
            self._mappings[endpoint.local_address] = {}
        else:
            self._mappings.pop(endpoint.local_address, None)
        return endpoint

    def behind_nat(self, address: Address) -> bool:
        return address in self._mappings

    def rtt(self, a: str, b: str) -> float:
        """The base round trip between hosts ``a`` and ``b`` (seconds)."""
        return self._access.get(a, 0.0) + self._access.get(b, 0.0)

    def _route(self, source: Address, data: bytes, destination: Address) -> None:
        counters = self.counters
        counters["sent"] += 1
        counters["bytes"] += len(data)
        if len(data) > counters["largest"]:
            counters["largest"] = len(data)
        if len(data) > self.max_datagram:
            counters["oversize"] += 1
            return
        now = trio.current_time()
        mappings = self._mappings
        opened = mappings.get(source)
        if opened is not None:
            opened[destination] = now
            if len(opened) > 512:
                horizon = now - self.nat_timeout
                for address in [a for a, at in opened.items() if at < horizon]:
                    del opened[address]
        if destination not in self._endpoints:
            counters["unreachable"] += 1
            return
        filtering = mappings.get(destination)
        if filtering is not None and now - filtering.get(source, -math.inf) > self.nat_timeout:
            counters["nat-dropped"] += 1
            return
        groups = self._groups
        if groups is not None and groups.get(source[0], -1) != groups.get(destination[0], -1):
            counters["partitioned"] += 1
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            counters["lost"] += 1
            return
        one_way = self.rtt(source[0], destination[0]) / 2
        at = now + one_way * (1.0 + rng.expovariate(1.0 / self.jitter))
        tick = self.tick
        if tick > 0:
            at = math.ceil(at / tick) * tick
        self._sequence += 1
        heapq.heappush(self._queue, (at, self._sequence, data, source, destination))
        counters["delivered"] += 1
        if at < self._sleeping_until:
            self._wake.set()


@attrs.define(eq=False)
class SwarmNode:
    """One node of a :class:`Swarm`: its directory (also after it left)."""

    index: int
    identity: Identity
    directory: Directory
    endpoint: MemoryEndpoint
    nat: bool
    _scope: trio.CancelScope

    @property
    def alive(self) -> bool:
        return not self.endpoint.closed


async def _run_node(
    endpoint: MemoryEndpoint,
    bootstrap: list[tuple[str, int]],
    node_id: bytes,
    config: DhtConfig | None,
    rng: random.Random,
    cache: RecordCache,
    task_status: trio.TaskStatus[tuple[Directory, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        async with open_directory_on(
            endpoint,
            bootstrap=bootstrap,
            node_id=node_id,
            config=config,
            rng=rng,
            clock_offset=CLUSTER_EPOCH,
            cache=cache,
        ) as directory:
            task_status.started((directory, scope))
            await trio.sleep_forever()


@attrs.define(eq=False)
class Swarm:
    """Nodes joining and leaving a :class:`SimulatedInternet` (build with
    :func:`open_swarm`). Node ``i`` has the identity ``make_identity(f"{label}node-{i}")``
    and the node id derived from it."""

    internet: SimulatedInternet
    rng: random.Random
    label: str
    _nursery: trio.Nursery
    cache: RecordCache = attrs.field(factory=RecordCache)
    nodes: list[SwarmNode] = attrs.field(factory=list)

    def alive(self, *, nat: bool | None = None) -> list[SwarmNode]:
        """Nodes that have not left (only those behind NAT, or not, if ``nat`` is given)."""
        return [
            node
            for node in self.nodes
            if node.alive and (nat is None or node.nat == nat)
        ]

    async def join(self, *, nat: bool = False, config: DhtConfig | None = None) -> SwarmNode:
        """Start a node (behind NAT if ``nat``) that bootstraps through up to two random
        live public nodes; returns once it has joined."""
        index = len(self.nodes)
        identity = make_identity(f"{self.label}node-{index}")
        endpoint = self.internet.endpoint(nat=nat)
        public = [node for node in self.nodes if node.alive and not node.nat]
        seeds = self.rng.sample(public, min(2, len(public)))
        directory, scope = await self._nursery.start(
            _run_node,
            endpoint,
            [seed.endpoint.local_address for seed in seeds],
            node_id_for(identity.public_key),
            config,
            random.Random(self.rng.getrandbits(64)),
            self.cache,
        )
        node = SwarmNode(index, identity, directory, endpoint, nat, scope)
        self.nodes.append(node)
        return node

    def leave(self, node: SwarmNode) -> None:
        """End ``node``'s session silently: its address stops answering at once."""
        node.endpoint.close()
        node._scope.cancel()


def _seed_trio_scheduler(seed: int) -> None:
    """Seed the choice trio makes of the order of tasks ready at the same time (it reverses
    a batch at random): with it, a run is the same for the same seed. This is the random
    source trio's own Hypothesis plugin registers (``trio._core._run._r``); if a trio
    version lacks it, runs are still valid, only not repeatable."""
    scheduler = getattr(getattr(getattr(trio, "_core", None), "_run", None), "_r", None)
    if isinstance(scheduler, random.Random):
        scheduler.seed(seed)


@asynccontextmanager
async def open_swarm(
    seed: int = 0, *, label: str = "", internet: SimulatedInternet | None = None
) -> AsyncIterator[Swarm]:
    """A :class:`Swarm` on ``internet`` (by default a fresh :class:`SimulatedInternet` seeded
    from ``seed``), its delivery task running for the duration of the block; every node
    stops when the block exits. Use under trio's ``MockClock(autojump_threshold=0)``."""
    rng = random.Random(seed)
    _seed_trio_scheduler(rng.getrandbits(64))
    if internet is None:
        internet = SimulatedInternet(random.Random(rng.getrandbits(64)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(internet.run)
        async with trio.open_nursery() as nodes:
            yield Swarm(internet, random.Random(rng.getrandbits(64)), label, nodes)
            nodes.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
