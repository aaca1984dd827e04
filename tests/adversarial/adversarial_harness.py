"""Shared pieces of the adversarial suite: a back-to-back sans-IO network with an attacker
address that can inject datagrams, and signed records for honest and hostile publishers."""

from __future__ import annotations

import random
from collections.abc import Callable

from p2pbuild import SignedRecord
from p2pbuild.dht import Address, DhtConfig, DhtNode, node_id_for
from p2pbuild.dht._store import RecordCache
from p2pbuild.testing import example_capability, example_status, make_identity

T0 = 1_700_000_000.0
HOP = 0.001


class Net:
    """Honest nodes on ``10.0.x.y:7420``; every datagram takes ``HOP`` seconds. Datagrams
    to an address without a node are kept in ``captured`` (an attacker or a victim)."""

    def __init__(self, config: DhtConfig | None = None) -> None:
        self.config = config
        self.now = T0
        self.nodes: dict[Address, DhtNode] = {}
        self.captured: list[tuple[bytes, Address, Address]] = []
        self.cache = RecordCache()

    def add(self, index: int) -> tuple[Address, DhtNode]:
        address = (f"10.0.{index >> 8}.{index & 255}", 7420)
        node = DhtNode(
            node_id_for(make_identity(f"adv-node-{index}").public_key),
            now=self.now,
            rng=random.Random(index),
            config=self.config,
            cache=self.cache,
        )
        self.nodes[address] = node
        return address, node

    def inject(self, data: bytes, source: Address, destination: Address) -> None:
        """Deliver ``data`` as if from ``source`` (which may be spoofed)."""
        self.nodes[destination].receive_datagram(data, source, self.now)

    def run(self, done: Callable[[], bool] = lambda: False, *, limit: float = 30.0) -> None:
        end = self.now + limit
        while not done():
            queued = []
            for source, node in self.nodes.items():
                for data, destination in node.datagrams_to_send():
                    if destination in self.nodes:
                        queued.append((data, source, destination))
                    else:
                        self.captured.append((data, source, destination))
            if queued:
                self.now += HOP
                for data, source, destination in queued:
                    self.nodes[destination].receive_datagram(data, source, self.now)
                continue
            next_timer = min(node.get_timer() for node in self.nodes.values())
            if next_timer > end:
                break
            self.now = max(self.now, next_timer)
            for node in self.nodes.values():
                if node.get_timer() <= self.now:
                    node.handle_timer(self.now)


def build(count: int, config: DhtConfig | None = None) -> Net:
    net = Net(config)
    first, _ = net.add(0)
    for index in range(1, count):
        _, node = net.add(index)
        op = node.bootstrap([first], net.now)
        net.run(lambda op=op: op.done)
    return net


def signed_pair(
    label: str, *, seq: int = 1, issued: float = T0, arch: str = "x86_64", lifetime: int = 3600
) -> list[SignedRecord]:
    identity = make_identity(label)
    return [
        SignedRecord.create(identity, example_capability(arch=arch), seq=seq,
                            issued_at=int(issued), lifetime=lifetime),
        SignedRecord.create(identity, example_status(), seq=seq, issued_at=int(issued),
                            lifetime=min(lifetime, 600)),
    ]
