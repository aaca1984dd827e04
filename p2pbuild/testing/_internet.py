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
and the same calls give the same run (:func:`open_swarm`), in any process. trio runs the
tasks due at one virtual instant in an order it breaks by object addresses, which differ
from one process to the next; so each sending address draws the fate of its datagrams
(loss, delay) from a stream of its own, seeded from the internet's seed and the address,
and datagrams due at the same tick are delivered by sender, each sender's in the order
sent. (With one shared stream, ``bench/internet.py`` at N=300 sent 182,033 datagrams in
its join phase in one process and 184,296 in another, for the same seed.) Delays are
rounded up to a microsecond (``tick``), not a millisecond: a node's timers fall a
delivery's instant plus a round delay later, and on a millisecond grid they met other
deliveries to the same node often enough that which ran first, trio's choice, changed
what the node did next (two 20-minute runs of one seed with a churn parted ways); a
microsecond grid costs about 15% more wall time in ``bench/churn.py``.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from .._identity import Identity
from ..dht import Address, DhtConfig, Directory, RecordCache, node_id_for
from ._cluster import run_node
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
        tick: float = 0.000001,
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
        #: Per sending address: its random stream and how many datagrams it sent.
        self._seed = rng.getrandbits(64)
        self._senders: dict[Address, random.Random] = {}
        self._sent_by: dict[Address, int] = {}

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

    def _dropped(self, source: Address, destination: Address, now: float) -> str:
        mappings = self._mappings
        opened = mappings.get(source)
        if opened is not None:
            opened[destination] = now
            if len(opened) > 512:
                horizon = now - self.nat_timeout
                for address in [a for a, at in opened.items() if at < horizon]:
                    del opened[address]
        filtering = mappings.get(destination)
        if filtering is not None and now - filtering.get(source, -math.inf) > self.nat_timeout:
            return "nat-dropped"
        return super()._dropped(source, destination, now)

    def _rng_of(self, source: Address) -> random.Random:
        """One random stream per sending address, seeded from the internet's seed and the
        address: what befalls a node's datagrams does not depend on the order in which
        nodes due at the same virtual instant happen to run (trio breaks such ties by
        object addresses, which differ from one process to the next)."""
        rng = self._senders.get(source)
        if rng is None:
            rng = self._senders[source] = random.Random(f"{self._seed}/{source[0]}/{source[1]}")
        return rng

    def _order(self, source: Address) -> tuple[str | int, ...]:
        """Datagrams due at the same tick are delivered by sender and, per sender, in the
        order sent (for the reason of :meth:`_rng_of`)."""
        sent = self._sent_by[source] = self._sent_by.get(source, 0) + 1
        return (source[0], source[1], sent)

    def _delay(self, source: Address, destination: Address, rng: random.Random) -> float:
        one_way = self.rtt(source[0], destination[0]) / 2
        return one_way * (1.0 + rng.expovariate(1.0 / self.jitter))


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


def _record_cache() -> RecordCache:
    # One cache for the whole swarm, as a process of nodes shares one: large enough for
    # every distinct record of ten thousand publishing nodes, so none is verified twice
    # only because the cache was smaller than the farm (an LRU cycled through would miss
    # every time). Every node still checks what it is sent; only the signature check of
    # bytes already verified is skipped.
    return RecordCache(maxsize=1 << 16)


@attrs.define(eq=False)
class Swarm:
    """Nodes joining and leaving a :class:`SimulatedInternet` (build with
    :func:`open_swarm`). Node ``i`` has the identity ``make_identity(f"{label}node-{i}")``
    and the node id derived from it."""

    internet: SimulatedInternet
    rng: random.Random
    label: str
    _nursery: trio.Nursery
    cache: RecordCache = attrs.field(factory=_record_cache)
    nodes: list[SwarmNode] = attrs.field(factory=list)
    # Live nodes by index, in joining order: all, and public or behind NAT.
    _live: dict[int, SwarmNode] = attrs.field(factory=dict)
    _by_nat: dict[bool, dict[int, SwarmNode]] = attrs.field(
        factory=lambda: {False: {}, True: {}}
    )
    # The index of the next node to start (calls of join_many may overlap).
    _next_index: int = 0

    def alive(self, *, nat: bool | None = None) -> list[SwarmNode]:
        """Nodes that have not left, in joining order (only those behind NAT, or not, if
        ``nat`` is given)."""
        return list((self._live if nat is None else self._by_nat[nat]).values())

    async def join(self, *, nat: bool = False, config: DhtConfig | None = None) -> SwarmNode:
        """Start a node (behind NAT if ``nat``) that bootstraps through up to two random
        live public nodes; returns once it has joined."""
        (node,) = await self.join_many([(nat, config)])
        return node

    async def join_many(
        self, nodes: Sequence[tuple[bool, DhtConfig | None]]
    ) -> list[SwarmNode]:
        """Start nodes together, each ``(nat, config)`` as :meth:`join` takes them, each
        bootstrapping through up to two random public nodes that were live before the
        call; returns once all have joined, in the order given (their indexes). Calls may
        overlap (each takes its indexes when it starts; :attr:`nodes` lists nodes in the
        order their calls returned)."""
        public = list(self._by_nat[False].values())
        starts = []
        first = self._next_index
        self._next_index += len(nodes)
        for offset, (nat, config) in enumerate(nodes):
            index = first + offset
            identity = make_identity(f"{self.label}node-{index}")
            endpoint = self.internet.endpoint(nat=nat)
            seeds = self.rng.sample(public, min(2, len(public)))
            bootstrap = [seed.endpoint.local_address for seed in seeds]
            node_rng = random.Random(self.rng.getrandbits(64))
            starts.append((index, identity, endpoint, nat, config, bootstrap, node_rng))
        started: dict[int, tuple[Directory, trio.CancelScope]] = {}

        async def start(index: int, *args: Any) -> None:
            started[index] = await self._nursery.start(run_node, *args)

        async with trio.open_nursery() as nursery:
            for index, identity, endpoint, _, config, bootstrap, node_rng in starts:
                nursery.start_soon(
                    start, index, endpoint, bootstrap, node_id_for(identity.public_key),
                    config, node_rng, self.cache,
                )
        joined = []
        for index, identity, endpoint, nat, _, _, _ in starts:
            directory, scope = started[index]
            node = SwarmNode(index, identity, directory, endpoint, nat, scope)
            self.nodes.append(node)
            self._live[index] = node
            self._by_nat[nat][index] = node
            joined.append(node)
        return joined

    def leave(self, node: SwarmNode) -> None:
        """End ``node``'s session silently: its address stops answering at once."""
        node.endpoint.close()
        node._scope.cancel()
        self._live.pop(node.index, None)
        self._by_nat[node.nat].pop(node.index, None)


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
