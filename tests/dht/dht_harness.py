"""Back-to-back driving of sans-IO DHT cores with an explicit clock (no trio)."""

from __future__ import annotations

import random
from collections.abc import Callable

from p2pbuild.dht import Address, DhtConfig, DhtNode, node_id_for
from p2pbuild.dht._store import RecordCache
from p2pbuild.testing import make_identity

T0 = 1_700_000_000.0
HOP = 0.001


class Net:
    """Nodes on addresses ``10.0.0.i``; datagrams take ``HOP`` seconds; dead nodes drop all."""

    def __init__(self, config: DhtConfig | None = None) -> None:
        self.config = config
        self.now = T0
        self.nodes: dict[Address, DhtNode] = {}
        self.dead: set[Address] = set()
        self.sent: list[tuple[bytes, Address, Address]] = []
        self.cache = RecordCache()

    def add(self, index: int) -> tuple[Address, DhtNode]:
        address = (f"10.0.{index >> 8}.{index & 255}", 7420)
        node = DhtNode(
            node_id_for(make_identity(f"node-{index}").public_key),
            now=self.now,
            rng=random.Random(index),
            config=self.config,
            cache=self.cache,
        )
        self.nodes[address] = node
        return address, node

    def run(self, done: Callable[[], bool] = lambda: False, *, limit: float = 30.0) -> None:
        """Deliver datagrams and fire timers until ``done()`` or ``limit`` seconds pass."""
        end = self.now + limit
        while not done():
            queued = []
            for source, node in self.nodes.items():
                for data, destination in node.datagrams_to_send():
                    self.sent.append((data, source, destination))
                    if source not in self.dead and destination not in self.dead:
                        queued.append((data, source, destination))
            if queued:
                self.now += HOP
                for data, source, destination in queued:
                    target = self.nodes.get(destination)
                    if target is not None:
                        target.receive_datagram(data, source, self.now)
                continue
            live = [n for a, n in self.nodes.items() if a not in self.dead]
            next_timer = min(node.get_timer() for node in live)
            if next_timer > end:
                break
            self.now = max(self.now, next_timer)
            for node in live:
                if node.get_timer() <= self.now:
                    node.handle_timer(self.now)


def build(count: int, config: DhtConfig | None = None) -> Net:
    """``count`` nodes, each bootstrapped through node 0 and settled."""
    net = Net(config)
    first, _ = net.add(0)
    for index in range(1, count):
        _, node = net.add(index)
        op = node.bootstrap([first], net.now)
        net.run(lambda op=op: op.done)
    return net
