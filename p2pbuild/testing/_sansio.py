"""Sans-IO drivers of DHT cores with an explicit clock (no trio): the one harness of the DHT's
exact tests.

* :class:`SansIONetwork` -- many :class:`~p2pbuild.dht.DhtNode` objects back to back:
  every datagram takes ``hop`` seconds, dead nodes drop everything, datagrams to an
  address without a node are kept in ``captured`` (an attacker or a victim), and
  :meth:`~SansIONetwork.inject` delivers bytes from any (spoofed) source.
* :class:`ScriptedLookup` -- one reader node whose contacts are scripted: the test sees
  each ``p2p_find`` it sends and chooses the answer (or silence), datagram by datagram.
* :func:`signed_records` -- a capability and a status record of a throwaway publisher.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .._records import SignedRecord
from ..dht import Address, DhtConfig, DhtNode, GetOperation, RecordCache, node_id_for
from ..dht import _wire as wire
from ._keys import example_capability, example_status, make_identity

__all__ = [
    "HOP",
    "SANSIO_EPOCH",
    "ScriptedLookup",
    "SansIONetwork",
    "SentQuery",
    "build_network",
    "signed_records",
]

#: Unix time at which sans-IO networks start.
SANSIO_EPOCH = 1_700_000_000.0
T0 = SANSIO_EPOCH
#: One-way delay of every datagram in a :class:`SansIONetwork` (seconds).
HOP = 0.001


class SansIONetwork:
    """Nodes on addresses ``10.0.x.y:7420``, node ``i`` with the identity
    ``make_identity(f"{label}{i}")``; every datagram takes ``hop`` seconds.

    ``sent`` lists every datagram any node sent, as ``(data, source, destination)``;
    ``captured`` those addressed to no node; ``dead`` addresses neither send nor receive
    and their timers do not fire.
    """

    def __init__(
        self, config: DhtConfig | None = None, *, label: str = "node-", hop: float = HOP
    ) -> None:
        self.config = config
        self.label = label
        self.hop = hop
        self.now = T0
        self.nodes: dict[Address, DhtNode] = {}
        self.dead: set[Address] = set()
        self.sent: list[tuple[bytes, Address, Address]] = []
        self.captured: list[tuple[bytes, Address, Address]] = []
        self.cache = RecordCache()

    def add(self, index: int, config: DhtConfig | None = None) -> tuple[Address, DhtNode]:
        """Add node ``index`` (with ``config``, else the network's)."""
        address = (f"10.0.{index >> 8}.{index & 255}", 7420)
        node = DhtNode(
            node_id_for(make_identity(f"{self.label}{index}").public_key),
            now=self.now,
            rng=random.Random(index),
            config=config if config is not None else self.config,
            cache=self.cache,
        )
        self.nodes[address] = node
        return address, node

    def inject(self, data: bytes, source: Address, destination: Address) -> None:
        """Deliver ``data`` to ``destination`` now, as if from ``source`` (may be spoofed)."""
        self.nodes[destination].receive_datagram(data, source, self.now)

    def run(self, done: Callable[[], bool] = lambda: False, *, limit: float = 30.0) -> None:
        """Deliver datagrams and fire timers until ``done()`` or ``limit`` seconds pass."""
        end = self.now + limit
        dead = self.dead
        nodes = self.nodes
        while not done():
            queued = []
            for source, node in nodes.items():
                for data, destination in node.datagrams_to_send():
                    self.sent.append((data, source, destination))
                    if source in dead or destination in dead:
                        continue
                    if destination in nodes:
                        queued.append((data, source, destination))
                    else:
                        self.captured.append((data, source, destination))
            if queued:
                self.now += self.hop
                for data, source, destination in queued:
                    nodes[destination].receive_datagram(data, source, self.now)
                continue
            live = [node for address, node in nodes.items() if address not in dead]
            next_timer = min(node.get_timer() for node in live)
            if next_timer > end:
                break
            self.now = max(self.now, next_timer)
            for node in live:
                if node.get_timer() <= self.now:
                    node.handle_timer(self.now)


def build_network(
    count: int, config: DhtConfig | None = None, *, label: str = "node-"
) -> SansIONetwork:
    """``count`` nodes, each bootstrapped through node 0 and settled."""
    net = SansIONetwork(config, label=label)
    first, _ = net.add(0)
    for index in range(1, count):
        _, node = net.add(index)
        op = node.bootstrap([first], net.now)
        net.run(lambda op=op: op.done)  # type: ignore[misc]
    return net


def signed_records(
    label: str,
    *,
    seq: int = 1,
    issued: float = T0,
    arch: str = "x86_64",
    lifetime: int = 3600,
    status_lifetime: int = 600,
) -> list[SignedRecord]:
    """A capability (``lifetime`` seconds) and a status (at most ``status_lifetime``) of the
    throwaway publisher ``make_identity(label)``."""
    identity = make_identity(label)
    return [
        SignedRecord.create(
            identity, example_capability(arch=arch), seq=seq, issued_at=int(issued),
            lifetime=lifetime,
        ),
        SignedRecord.create(
            identity, example_status(), seq=seq, issued_at=int(issued),
            lifetime=min(lifetime, status_lifetime),
        ),
    ]


class SentQuery:
    """One ``p2p_find`` a :class:`ScriptedLookup` reader sent."""

    def __init__(self, data: bytes, address: Address) -> None:
        request = wire.decode_datagram(data, max_size=2048)
        assert isinstance(request, wire.Request) and request.method == wire.P2P_FIND
        self.msg_id = request.msg_id
        self.address = address
        _, self.key, self.cursor = wire.parse_p2p_find_args(request)


class ScriptedLookup:
    """A reader node that knows ``len(distances)`` contacts, contact ``i`` at XOR distance
    ``distances[i]`` from ``key`` (so a walk asks them in that order), with round trips
    ``rtts[i]`` as measured (default ``rtt``). The test answers each query it sent."""

    def __init__(
        self,
        key: bytes,
        distances: list[int],
        config: DhtConfig | None = None,
        rtts: dict[int, float] | None = None,
        *,
        rtt: float = 0.001,
    ) -> None:
        self.key = key
        self.target = int.from_bytes(key, "big")
        self.now = T0
        # Far from the key: every contact falls in one bucket of the reader's table.
        own = self.target ^ (1 << 159) ^ 12345
        self.node = DhtNode(
            own.to_bytes(20, "big"),
            now=T0,
            rng=random.Random(1),
            config=config,
            cache=RecordCache(),
        )
        self.addresses = [self.address_of(d) for d in distances]
        rtts = rtts or {}
        for index, (distance, address) in enumerate(zip(distances, self.addresses, strict=True)):
            self.node.routing.seen(self.target ^ distance, address, T0, rtt=rtts.get(index, rtt))

    def address_of(self, distance: int) -> Address:
        return (f"10.{distance.bit_length()}.{distance & 255}.{(distance >> 8) & 255}", 7420)

    def triple(self, distance: int) -> wire.ContactTriple:
        host, port = self.address_of(distance)
        return ((self.target ^ distance).to_bytes(20, "big"), host, port)

    def get(self) -> GetOperation:
        return self.node.get(self.key, self.now)

    def sent(self) -> list[SentQuery]:
        return [SentQuery(data, address) for data, address in self.node.datagrams_to_send()]

    def answer(
        self,
        query: SentQuery,
        found: Sequence[SignedRecord] = (),
        contacts: Sequence[int] = (),
        cursor: bytes = b"",
    ) -> None:
        value = wire.encode_p2p_find_reply(
            [self.triple(d) for d in contacts], [r.raw for r in found], cursor
        )
        self.node.receive_datagram(
            wire.encode_response(query.msg_id, value), query.address, self.now
        )

    def at(self, now: float) -> None:
        self.now = now
        self.node.handle_timer(now)
