"""The Directory API: queries, trust filtering, publishing rules, republishing."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from p2pbuild import Capability, Identity, LocalError, MachineType, MalformedError, SignedRecord
from p2pbuild.dht import DhtConfig, DhtNode, Directory, Query, node_key
from p2pbuild.testing import (
    example_capability,
    example_status,
    make_trust_list,
    open_cluster,
)


def test_query_facets_and_matching() -> None:
    assert Query(arch="s390x", os="fedora-41").facets() == ["arch=s390x/os=fedora-41"]
    assert Query(os="fedora-41", machine="metal", pool="kernel").facets() == [
        "os=fedora-41", "machine=metal", "pool=kernel"
    ]
    assert Query().facets() == []
    capability = example_capability(arch="s390x", pools=["kernel"])
    assert Query(arch="s390x", pool="kernel").matches(capability)
    assert not Query(machine=MachineType.METAL).matches(capability)
    with pytest.raises(MalformedError):
        Query(arch="s390x/os=x")
    with pytest.raises(MalformedError):
        Query(machine="cloud")


async def test_find_filters_by_trust_list_and_query(autojump_clock: trio.testing.MockClock) -> None:
    trust = make_trust_list(nodes=[("node-0", "alice"), ("node-1", "bob")], label="")
    async with open_cluster(12, seed=4) as cluster:
        now = int(cluster.nodes[0].now())
        for index in range(4):
            identity = cluster.identities[index]
            await cluster.nodes[index].publish([
                SignedRecord.create(identity, example_capability(arch="s390x"), seq=1,
                                    issued_at=now, lifetime=3600),
            ])
        everyone = await cluster.nodes[9].find(Query(arch="s390x"))
        assert len(everyone) == 4
        assert all(entry.status is None for entry in everyone)
        trusted = await cluster.nodes[9].find(Query(arch="s390x"), trust_list=trust.trust_list)
        assert {e.publisher for e in trusted} == {
            cluster.identities[0].public_key, cluster.identities[1].public_key
        }
        assert {e.trust.operator for e in trusted if e.trust} == {"alice", "bob"}
        assert await cluster.nodes[9].find(Query(arch="s390x", pool="nope")) == []
        with pytest.raises(LocalError):
            await cluster.nodes[9].find(Query())


async def test_publish_rules(autojump_clock: trio.testing.MockClock) -> None:
    async with open_cluster(5, seed=1) as cluster:
        directory, identity = cluster.nodes[0], cluster.identities[0]
        now = int(directory.now())
        status = SignedRecord.create(identity, example_status(), seq=1, issued_at=now,
                                     lifetime=600)
        with pytest.raises(LocalError):
            await directory.publish([status])
        expired = SignedRecord.create(identity, example_capability(), seq=1,
                                      issued_at=now - 7200, lifetime=3600)
        from p2pbuild import ExpiredError

        with pytest.raises(ExpiredError):
            await directory.publish([expired])
        capability = SignedRecord.create(identity, example_capability(), seq=2,
                                         issued_at=now, lifetime=3600)
        acks = await directory.publish([capability, status])
        assert set(acks) == {f"p2pbuild/node/{identity.public_key}"} | {
            f"p2pbuild/facet/{facet}" for facet in capability.body.facets()  # type: ignore[union-attr]
        }
        assert all(count == 5 for count in acks.values())
        from p2pbuild import StaleSeqError

        older = SignedRecord.create(identity, example_capability(), seq=1, issued_at=now,
                                    lifetime=3600)
        with pytest.raises(StaleSeqError):
            await directory.publish([older])
        assert {r.seq for r in directory.published()} == {1, 2}


async def test_a_directory_whose_records_all_expired_waits_for_the_next_publish(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_cluster(4, seed=6) as cluster:
        directory = cluster.nodes[0]
        identity = cluster.identities[0]
        interval = directory.config.republish_interval
        # The republish loop asks its period once a wake; spinning (a period that never
        # comes back positive) would hold trio's virtual clock still: fail instead.
        asked = 0
        period = directory._republish_period

        def counted() -> float:
            nonlocal asked
            asked += 1
            assert asked < 100, "the republish loop spins"
            return period()

        monkeypatch.setattr(directory, "_republish_period", counted)
        now = int(directory.now())
        await directory.publish([
            SignedRecord.create(identity, example_capability(), seq=1, issued_at=now,
                                lifetime=120),
        ])
        # Republished at 60 s, expired at 120 s; nothing left to put from then on.
        await trio.sleep(3 * interval)
        assert directory.published() == []
        lookups = directory.statistics().lookups
        now = int(directory.now())
        await directory.publish([
            SignedRecord.create(identity, example_capability(), seq=2, issued_at=now,
                                lifetime=120),
        ])
        assert directory.statistics().lookups > lookups
        await trio.sleep(61)
        assert directory.statistics().lookups > lookups + 1  # republished again
        assert asked < 20


async def test_a_republish_stores_straight_to_the_holders_its_walk_found(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = DhtConfig(republish_interval=900.0)
    async with open_cluster(40, seed=4, config=config) as cluster:
        directory = cluster.nodes[0]
        identity = cluster.identities[0]
        now = int(directory.now())
        capability = example_capability()
        await directory.publish([
            SignedRecord.create(identity, capability, seq=1, issued_at=now, lifetime=4 * 3600),
        ])
        roots = len(capability.facets())
        key = node_key(identity.public_key)
        before = directory.statistics()
        assert before.direct_puts == 0
        # The republish: every key straight to the holders its walk stored to, no walk
        # (the facets' roots with a census query to two of them: they count publishers).
        await trio.sleep(901)
        after = directory.statistics()
        assert after.direct_puts == 1 + roots and after.lookups == before.lookups
        # Most of those holders leave: too few acknowledge, so the put walks again and
        # stores to the nodes closest now.
        target = int.from_bytes(key, "big")
        closest = sorted(
            cluster.alive()[1:], key=lambda i: int.from_bytes(cluster.nodes[i].node_id, "big")
            ^ target,
        )
        for index in closest[:12]:
            cluster.stop(index)
        walked: list[bytes] = []
        original = DhtNode.put

        def put(core: DhtNode, key: bytes, *args: Any, **kwargs: Any) -> Any:
            if core is directory._core and kwargs.get("holders") is None:
                walked.append(key)
            return original(core, key, *args, **kwargs)

        monkeypatch.setattr(DhtNode, "put", put)
        await trio.sleep(900)
        again = directory.statistics()
        assert again.direct_puts == after.direct_puts + 1 + roots and key in walked
        held = [cluster.nodes[i].statistics().records_held for i in closest[12:32]]
        assert sum(count > 0 for count in held) >= 15
        assert len(await cluster.nodes[closest[-1]].get(key)) == 1
        # Straight to those while that walk is younger than an hour, then a walk again.
        walked.clear()
        await trio.sleep(3 * 900)
        assert key not in walked
        await trio.sleep(900)
        assert key in walked


async def test_republishing_reaches_nodes_that_join_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(25, seed=6) as cluster:
        publisher = cluster.nodes[0]
        identity = cluster.identities[0]
        now = int(publisher.now())
        # Living two republish periods: republished once after the interval.
        await publisher.publish([
            SignedRecord.create(identity, example_capability(), seq=1, issued_at=now,
                                lifetime=2 * int(publisher.config.republish_interval)),
        ])
        key = node_key(identity.public_key)
        # Most of the original holders die; nobody else has the record for long.
        for index in range(1, 20):
            cluster.stop(index)
        before = sum(cluster.nodes[i].statistics().records_held for i in cluster.alive())
        await trio.sleep(publisher.config.republish_interval + 1)
        after = sum(cluster.nodes[i].statistics().records_held for i in cluster.alive())
        assert after > before  # republished onto the survivors
        assert len(await cluster.nodes[22].get(key)) == 1
        stats = publisher.statistics()
        assert stats.lookups > 0 and stats.rpcs_sent > 0 and stats.datagrams_out > 0


def _recording_puts(
    monkeypatch: pytest.MonkeyPatch, core: DhtNode
) -> list[tuple[bytes, bool, bool, list[str]]]:
    """Record ``core``'s puts: key, whether it walked (no holders), whether it censused,
    and the kinds of the records it sent."""
    puts: list[tuple[bytes, bool, bool, list[str]]] = []
    original = DhtNode.put

    def put(node: DhtNode, key: bytes, records: Any, *args: Any, **kwargs: Any) -> Any:
        if node is core:
            puts.append((
                key, kwargs.get("holders") is None, bool(kwargs.get("census")),
                [r.kind.value for r in records],
            ))
        return original(node, key, records, *args, **kwargs)

    monkeypatch.setattr(DhtNode, "put", put)
    return puts


async def _published(cluster: Any) -> tuple[Directory, Identity, Capability]:
    """Node 0 of ``cluster`` publishes a capability (6 hours) and a status living 5
    minutes, as a node daemon does; its directory, identity and capability."""
    directory, identity = cluster.nodes[0], cluster.identities[0]
    capability = example_capability()
    now = int(directory.now())
    await directory.publish([
        SignedRecord.create(identity, capability, seq=1, issued_at=now, lifetime=6 * 3600),
        SignedRecord.create(identity, example_status(), seq=1, issued_at=now, lifetime=300),
    ])
    return directory, identity, capability


def _status(directory: Directory, identity: Identity, seq: int, **state: Any) -> SignedRecord:
    """A new status of ``identity`` (``example_status(**state)``) issued now, living 5
    minutes."""
    return SignedRecord.create(
        identity, example_status(**state), seq=seq, issued_at=int(directory.now()),
        lifetime=300,
    )


async def test_a_status_update_sends_the_status_alone_to_the_holders_the_put_reached(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node daemon publishes a new status every minute (living 5 minutes). Each was a
    # whole put: the capability again (243 bytes beside the status's 130), a census of
    # every facet root, and the republish period restarted. At N=400 in
    # bench/internet.py (--status-interval 60) that was 3.26 MB per node per hour. Now
    # the status alone goes to the holders the last whole put reached, and the whole put
    # comes when a record has gone half its life (or the republish interval) since it
    # was last put: the capability hourly, a status no longer updated after 150 s.
    async with open_cluster(30, seed=6) as cluster:
        directory, identity, capability = await _published(cluster)
        reader = cluster.nodes[17]
        puts = _recording_puts(monkeypatch, directory._core)
        for seq in range(2, 12):  # ten minutes, a status a minute
            await trio.sleep(60)
            status = _status(directory, identity, seq, slots_free=(seq + 1) % 3)
            acks = await directory.publish([status])
            assert acks and all(count >= 15 for count in acks.values())
        # (Beside the census queries of the settling republishes after the first publish.)
        updates = [(walked, kinds) for _, walked, census, kinds in puts if not census]
        assert len(updates) == 10 * (1 + len(capability.facets()))  # node key and roots
        assert set(map(str, updates)) == {str((False, ["status"]))}
        entries = await reader.find(Query(arch=capability.arch))
        assert [e.status_record.seq for e in entries if e.status_record] == [11]
        held = await reader.get(node_key(identity.public_key))
        assert sorted(r.seq for r in held) == [1, 11]
        # No more updates: the whole put comes half the last status's life after it.
        puts.clear()
        await trio.sleep(140)
        assert puts == []
        await trio.sleep(20)
        assert puts and all(kinds == ["capability", "status"] for *_, kinds in puts)


async def test_a_status_update_that_holders_refuse_becomes_a_whole_put(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Holders that lost the capability (a restart) refuse a status under a facet key
    # (it is bound to its node key only, and to the facets through the capability they
    # hold): an update that fewer than 3/4 of the holders took is put whole instead.
    async with open_cluster(30, seed=6) as cluster:
        directory, identity, capability = await _published(cluster)
        for node in cluster.nodes[1:]:
            node._core.store.expire(node.now() + 10**6)  # every record gone
        puts = _recording_puts(monkeypatch, directory._core)
        await trio.sleep(60)
        # (A new state: the facet keys get it too, see the next test.)
        await directory.publish([_status(directory, identity, 2, slots_free=1)])
        assert ["status"] in [kinds for *_, kinds in puts]  # the update first
        assert ["capability", "status"] in [kinds for *_, kinds in puts]  # then whole
        entries = await cluster.nodes[17].find(Query(arch=capability.arch))
        assert [e.status_record.seq for e in entries if e.status_record] == [2]


async def test_a_status_whose_state_holds_reaches_the_facet_keys_only_before_theirs_expires(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node daemon's status a minute to every key was most of a node's traffic (2.30 MB
    # per node per hour at N=400, bench/internet.py --status-interval 60). A facet key's
    # status only tells a finder that the node lives and what state it is in: while the
    # state (slots, running, draining, standby) holds, the facet keys get a new status
    # only when the one they hold would expire within 1.5 of the publisher's intervals;
    # the node key gets every one.
    async with open_cluster(30, seed=6) as cluster:
        directory, identity, capability = await _published(cluster)
        reader = cluster.nodes[17]
        puts = _recording_puts(monkeypatch, directory._core)
        own = node_key(identity.public_key)
        for seq in range(2, 12):  # ten minutes, a status a minute, the same state
            await trio.sleep(60)
            acks = await directory.publish([_status(directory, identity, seq)])
            assert acks and all(count >= 15 for count in acks.values())
        updates = [(key, kinds) for key, _, census, kinds in puts if not census]
        assert {str(kinds) for _, kinds in updates} == {str(["status"])}
        assert sum(key == own for key, _ in updates) == 10
        # The status of minute 0 expires at 300 s: the facet roots get minute 4's (less
        # than 90 s left then), which lives until about 540 s, then minute 8's.
        assert len(updates) == 10 + 2 * len(capability.facets())
        entries = await reader.find(Query(arch=capability.arch))
        assert [e.status_record.seq for e in entries if e.status_record] == [9]
        held = await reader.get(own)
        assert sorted(r.seq for r in held) == [1, 11]
        # A new state (a build started: a slot fewer free) goes to every key at once.
        puts.clear()
        await trio.sleep(60)
        await directory.publish([_status(directory, identity, 12, slots_free=1)])
        assert len([p for p in puts if not p[2]]) == 1 + len(capability.facets())
        entries = await reader.find(Query(arch=capability.arch))
        assert [e.status_record.seq for e in entries if e.status_record] == [12]
