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
    cache = RecordCache()
    identities = [make_identity(f"{label}node-{i}") for i in range(size)]
    cluster = Cluster(network, [], identities, [])
    async with trio.open_nursery() as nursery:
        for index, identity in enumerate(identities):
            endpoint = network.endpoint()
            bootstrap: list[tuple[str, int]] = []
            if index:
                bootstrap.append(cluster.endpoints[0].local_address)
                other = rng.randrange(index)
                if other:
                    bootstrap.append(cluster.endpoints[other].local_address)
            directory, scope = await nursery.start(
                run_node,
                endpoint,
                bootstrap,
                node_id_for(identity.public_key),
                config,
                random.Random(rng.getrandbits(64)),
                cache,
            )
            cluster.nodes.append(directory)
            cluster.endpoints.append(endpoint)
            cluster._scopes.append(scope)
        yield cluster
        nursery.cancel_scope.cancel()
