"""Build an N-node DHT cluster on an in-memory network, for tests, demos and benchmarks.

Node ``i`` has the throwaway identity ``make_identity(f"{label}node-{i}")`` and the node id
derived from it (:func:`~p2pbuild.dht.node_id_for`), so it is the closest holder of its own
records. Nodes join one after another, each through node 0 and one random earlier node
(early nodes learn of later ones from the lookups those make).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import trio

from .._identity import Identity
from ..dht import DhtConfig, Directory, RecordCache, node_id_for, open_directory_on
from ._keys import make_identity
from ._network import MemoryEndpoint, MemoryNetwork, open_memory_network

__all__ = ["Cluster", "open_cluster"]

#: Unix time at trio time 0 in clusters: a fixed, plausible "now" for records.
CLUSTER_EPOCH = 1_700_000_000.0


@attrs.define(eq=False)
class Cluster:
    """A running cluster. ``nodes[i]`` is node ``i``'s directory (also after it stopped)."""

    network: MemoryNetwork
    nodes: list[Directory]
    identities: list[Identity]
    endpoints: list[MemoryEndpoint]
    _scopes: list[trio.CancelScope] = attrs.field(factory=list)
    _nursery: trio.Nursery | None = None
    _rng: random.Random = attrs.field(factory=random.Random)
    _config: DhtConfig | None = None
    _cache: RecordCache = attrs.field(factory=RecordCache)
    _label: str = ""

    @property
    def epoch(self) -> float:
        return CLUSTER_EPOCH

    def stop(self, index: int) -> None:
        """Kill node ``index`` silently: its address stops answering at once."""
        self.endpoints[index].close()
        self._scopes[index].cancel()

    def alive(self) -> list[int]:
        """Indexes of nodes not stopped."""
        return [i for i, endpoint in enumerate(self.endpoints) if not endpoint.closed]

    async def join(self, node_id: bytes | None = None) -> Directory:
        """Start one more node, node ``len(nodes)`` (its id ``node_id`` if given, to place
        it next to a key), joining through node 0 and one random earlier node as the first
        ones did; its directory once it has joined."""
        assert self._nursery is not None, "the cluster has stopped"
        index = len(self.nodes)
        identity = make_identity(f"{self._label}node-{index}")
        endpoint = self.network.endpoint()
        bootstrap: list[tuple[str, int]] = []
        if index:
            bootstrap.append(self.endpoints[0].local_address)
            other = self._rng.randrange(index)
            if other:
                bootstrap.append(self.endpoints[other].local_address)
        started: tuple[Directory, trio.CancelScope] = await self._nursery.start(
            run_node,
            endpoint,
            bootstrap,
            node_id or node_id_for(identity.public_key),
            self._config,
            random.Random(self._rng.getrandbits(64)),
            self._cache,
        )
        directory, scope = started
        self.identities.append(identity)
        self.nodes.append(directory)
        self.endpoints.append(endpoint)
        self._scopes.append(scope)
        return directory


async def run_node(
    endpoint: MemoryEndpoint,
    bootstrap: list[tuple[str, int]],
    node_id: bytes,
    config: DhtConfig | None,
    rng: random.Random,
    cache: RecordCache,
    task_status: trio.TaskStatus[tuple[Directory, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node on ``endpoint`` until its cancel scope (passed to ``started`` with its
    directory, once it has joined through ``bootstrap``) is cancelled."""
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


@asynccontextmanager
async def open_cluster(
    size: int,
    *,
    seed: int = 0,
    network: MemoryNetwork | None = None,
    config: DhtConfig | None = None,
    label: str = "",
) -> AsyncIterator[Cluster]:
    """Start ``size`` nodes on ``network`` (which must be running, see
    :func:`open_memory_network`; by default a fresh lossless one seeded from ``seed``) and
    yield the :class:`Cluster` once all have joined. Every node stops when the block exits.
    Each node's clock is trio's plus :data:`CLUSTER_EPOCH`.
    """
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        if network is None:
            network = await stack.enter_async_context(
                open_memory_network(random.Random(rng.getrandbits(64)))
            )
        async with _start(size, rng, network, config, label) as cluster:
            yield cluster


@asynccontextmanager
async def _start(
    size: int, rng: random.Random, network: MemoryNetwork, config: DhtConfig | None, label: str
) -> AsyncIterator[Cluster]:
    cluster = Cluster(network, [], [], [], rng=rng, config=config, label=label)
    async with trio.open_nursery() as nursery:
        cluster._nursery = nursery
        for _ in range(size):
            await cluster.join()
        yield cluster
        cluster._nursery = None
        nursery.cancel_scope.cancel()
