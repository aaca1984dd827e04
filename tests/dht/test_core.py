"""The sans-IO core back to back, with explicit time: lookups, stores, paging, timeouts,
hostile input."""

from __future__ import annotations

import random
from collections import Counter

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbuild import LocalError, SignedRecord
from p2pbuild.dht import (
    DhtConfig,
    DhtNode,
    facet_key,
    node_key,
)
from p2pbuild.dht import _wire as wire
from p2pbuild.dht._ids import Address
from p2pbuild.testing import (
    SANSIO_EPOCH,
    SansIONetwork,
    build_network,
    example_capability,
    make_identity,
    signed_records,
)

T0 = SANSIO_EPOCH


#: A capability and a status of a throwaway publisher (other test files import it).
records = signed_records


def nodes(net: SansIONetwork) -> list[DhtNode]:
    return list(net.nodes.values())


def test_bootstrap_fills_routing_tables() -> None:
    net = build_network(40)
    for node in nodes(net):
        assert node.statistics().contacts >= 20
    # Lookups of every node's id find that node first.
    everyone = nodes(net)
    asker = everyone[7]
    for target in everyone[::5]:
        if target is asker:
            continue
        op = asker.find_nodes(target.node_id, net.now)
        net.run(lambda op=op: op.done)
        assert op.result[0].node_id == target.node_id
        assert len(op.result) == 20


def _far_buckets(joiner: DhtNode, others: list[int]) -> list[tuple[int, int, int]]:
    """``(index, held, in range)`` for each of ``joiner``'s buckets farther away than its
    closest neighbour among ``others``."""
    routing = joiner.routing
    closest = min(others, key=lambda other: other ^ routing.own_id)
    held = [routing.bucket_index(peer.node_id) for peer in routing]
    in_range = [routing.bucket_index(other) for other in others]
    far = range(routing.bucket_index(closest) + 1, 160)
    return [(index, held.count(index), in_range.count(index)) for index in far]


def test_a_join_fills_every_bucket_farther_than_its_closest_neighbour() -> None:
    # Section 2.3 of the paper: a joiner looks up its own id, then refreshes its far buckets.
    # The own-id lookup alone leaves them with the few nodes met on the way (in this
    # network a bucket of 22 nodes in range held 3), to be filled later by whoever the node
    # talks to: the holders of the keys everyone walks to.
    net = build_network(300)
    seed = next(iter(net.nodes))
    for index in (1000, 1001, 1002):
        _, joiner = net.add(index)
        op = joiner.bootstrap([seed], net.now)
        net.run(lambda op=op: op.done)
        others = [n.routing.own_id for n in nodes(net) if n is not joiner]
        far = _far_buckets(joiner, others)
        assert len(far) >= 5
        for index_, held, in_range in far:
            assert held == min(joiner.routing.k, in_range), (index_, held, in_range)
        assert op.result >= sum(held for _, held, _ in far)
    # A DHT client does not: it routes its own requests only and pings every contact it
    # lists every 2 minutes, so its table stays what its lookups fill.
    _, client = net.add(1003, DhtConfig(reachability="client"))
    op = client.bootstrap([seed], net.now)
    net.run(lambda: op.done)
    others = [n.routing.own_id for n in nodes(net) if n is not client]
    _, held, in_range = _far_buckets(client, others)[-1]
    assert in_range > client.routing.k and held < client.routing.k


def test_bootstrap_with_nobody_answering_finishes_empty() -> None:
    net = SansIONetwork()
    _, node = net.add(1)
    op = node.bootstrap([("10.9.9.9", 7420)], net.now)
    net.run(lambda: op.done)
    assert op.done and op.result == 0
    # The ping was sent three times (two resends), each with the initial timeout: no round
    # trip was ever measured.
    assert node.statistics().rpcs_timed_out == 3
    assert net.now - T0 >= 3 * DhtConfig().initial_rpc_timeout


def test_put_then_get_from_every_node() -> None:
    net = build_network(30)
    everyone = nodes(net)
    mine = records("publisher")
    key = facet_key("arch=x86_64")
    op = everyone[3].put(key, mine, net.now)
    net.run(lambda: op.done)
    assert op.result == 20  # k holders acknowledged
    for node in everyone:
        got = node.get(key, net.now)
        net.run(lambda got=got: got.done)
        assert [r.raw for r in got.result] == sorted(
            [r.raw for r in mine], key=lambda raw: next(r for r in mine if r.raw == raw).kind
        )


def test_latest_record_per_publisher_wins() -> None:
    net = build_network(25)
    everyone = nodes(net)
    key = node_key(make_identity("p").public_key)
    old, new = records("p", seq=1), records("p", seq=2)
    for batch in (old, new):
        op = everyone[1].put(key, batch, net.now)
        net.run(lambda op=op: op.done)
    # Replaying the old records is refused by every holder: stale seq.
    op = everyone[2].put(key, old, net.now)
    net.run(lambda: op.done)
    assert op.result == 0
    rejected = sum(n.statistics().rejected.get("stale-seq", 0) for n in everyone)
    assert rejected >= 2 * 20
    got = everyone[9].get(key, net.now)
    net.run(lambda: got.done)
    assert {r.seq for r in got.result} == {2}


def test_many_publishers_are_paged_and_all_found() -> None:
    net = build_network(30)
    everyone = nodes(net)
    key = facet_key("arch=s390x")
    published = set()
    for i in range(40):
        batch = records(f"pub-{i}", arch="s390x")
        published.update(r.raw for r in batch)
        op = everyone[i % 30].put(key, batch, net.now)
        net.run(lambda op=op: op.done)
        assert op.result >= 20
    sizes_before = len(net.sent)
    got = everyone[11].get(key, net.now)
    net.run(lambda: got.done)
    assert {r.raw for r in got.result} == published
    # The holder paged: 80 records of ~300 bytes cannot travel in one datagram.
    pages = [d for d, _, _ in net.sent[sizes_before:] if b"p2p_find" in d]
    assert len(pages) > 10
    assert max(len(d) for d, _, _ in net.sent) <= 1200


def test_forged_record_is_never_stored_nor_returned() -> None:
    net = build_network(20)
    everyone = nodes(net)
    genuine = records("victim")[0]
    key = node_key(genuine.publisher)
    # Flip one byte of the body: the signature no longer verifies.
    forged = bytearray(genuine.raw)
    forged[-80] ^= 0x01
    _target_address, target = next(iter(net.nodes.items()))
    request = wire.encode_request(
        b"m" * 20, wire.P2P_STORE, wire.encode_p2p_store_args(b"s" * 20, key, [bytes(forged)])
    )
    target.receive_datagram(request, ("10.6.6.6", 1), net.now)
    assert target.store.count(key) == 0
    assert target.statistics().rejected == {"bad-signature": 1}
    reply = wire.decode_datagram(target.datagrams_to_send()[0][0], max_size=1200)
    assert isinstance(reply, wire.Response) and reply.value == ["bad-signature"]
    # A genuine record under a key it is not bound to is refused too.
    request = wire.encode_request(
        b"n" * 20, wire.P2P_STORE,
        wire.encode_p2p_store_args(b"s" * 20, facet_key("arch=s390x"), [genuine.raw]),
    )
    target.receive_datagram(request, ("10.6.6.6", 1), net.now)
    assert target.statistics().rejected["wrong-key"] == 1
    # A lying holder that returns the forged record: the reader drops it.
    op = everyone[5].get(key, net.now)
    for data, destination in everyone[5].datagrams_to_send():
        frame = wire.decode_datagram(data, max_size=1200)
        everyone[5].receive_datagram(
            wire.encode_response(frame.msg_id, [[], [bytes(forged)], b""]), destination, net.now
        )
    net.run(lambda: op.done)
    assert op.result == []
    assert everyone[5].statistics().rejected["bad-signature"] >= 1


def test_expired_records_are_refused_and_dropped() -> None:
    net = build_network(20)
    everyone = nodes(net)
    batch = records("short", status_lifetime=60)
    key = node_key(batch[0].publisher)
    op = everyone[0].put(key, batch, net.now)
    net.run(lambda: op.done)
    net.run(limit=61)  # past the status record's expiry, and a maintenance pass
    got = everyone[4].get(key, net.now)
    net.run(lambda: got.done)
    assert [r.kind.value for r in got.result] == ["capability"]
    # Storing the expired status again is refused.
    op = everyone[1].put(key, [batch[1]], net.now)
    net.run(lambda: op.done)
    assert op.result == 0
    assert sum(n.statistics().rejected.get("expired", 0) for n in everyone) >= 20


def test_dead_contacts_cost_a_stall_not_a_timeout() -> None:
    net = build_network(60)
    everyone = list(net.nodes.items())
    # Warm RTT estimates: every node has measured its contacts (1 hop = 1 ms each way).
    key = facet_key("pool=x")
    capability = SignedRecord.create(
        make_identity("p"), example_capability(pools=["x"]), seq=1, issued_at=int(T0),
        lifetime=3600,
    )
    op = everyone[0][1].put(key, [capability], net.now)
    net.run(lambda: op.done)
    for address, _ in everyone[1:60:5]:
        net.dead.add(address)
    reader = everyone[2][1]
    start = net.now
    got = reader.get(key, net.now)
    net.run(lambda: got.done)
    assert len(got.result) == 1
    # Far less than a timeout per dead contact: stalls let the walk go on without them.
    assert net.now - start < 0.2


def test_full_bucket_evicts_only_after_failed_ping() -> None:
    config = DhtConfig(k=2)
    net = SansIONetwork(config)
    _, node = net.add(0)
    own = node.own
    # Three ids in the same (top) bucket.
    ids = [own ^ (1 << 159) ^ n for n in (1, 2, 3)]
    addresses = [("10.1.0.1", 1), ("10.1.0.2", 2), ("10.1.0.3", 3)]
    for node_id, address in zip(ids, addresses, strict=True):
        node.routing.seen(node_id, address, net.now)
    to_ping = node.routing.seen(ids[2], addresses[2], net.now)
    assert to_ping is None  # already asked to ping ids[0] on the first overflow
    assert [p.node_id for p in node.routing] == ids[:2]
    # The ping to the oldest fails: the newcomer takes its place.
    assert node.routing.failed(ids[0])
    assert [p.node_id for p in node.routing] == [ids[1], ids[2]]


@given(st.binary(max_size=1500))
def test_any_datagram_is_handled_or_dropped_and_counted(data: bytes) -> None:
    node = DhtNode(b"\x01" * 20, now=T0, rng=random.Random(0))
    node.receive_datagram(data, ("10.0.0.2", 5), T0)
    stats = node.statistics()
    answered = len(node.datagrams_to_send())
    assert stats.datagrams_in == 1
    assert answered + stats.dropped_total == 1
    for datagram, _ in node.datagrams_to_send():
        assert len(datagram) <= 1200


@given(
    method=st.sampled_from([*sorted(wire.METHODS), "stun", ""]),
    args=st.lists(
        st.one_of(
            st.binary(min_size=0, max_size=40),
            st.integers(-(2**63), 2**64 - 1),
            st.text(max_size=10),
            st.none(),
            st.lists(st.binary(max_size=30), max_size=3),
        ),
        max_size=4,
    ),
)
def test_any_request_shape_is_answered_or_counted(method: str, args: list[object]) -> None:
    node = DhtNode(b"\x01" * 20, now=T0, rng=random.Random(0))
    node.receive_datagram(wire.encode_request(b"i" * 20, method, args), ("10.0.0.2", 5), T0)
    stats = node.statistics()
    assert len(node.datagrams_to_send()) + stats.dropped_total == 1


def test_unexpected_and_spoofed_responses_are_dropped() -> None:
    net = build_network(3)
    _address, node = next(iter(net.nodes.items()))
    node.receive_datagram(wire.encode_response(b"x" * 20, True), ("10.0.0.9", 1), net.now)
    op = node.find_nodes(b"\x00" * 20, net.now)
    data, _destination = node.datagrams_to_send()[0]
    msg_id = data[1:21]
    # The right message id from the wrong address does not count as the answer.
    node.receive_datagram(wire.encode_response(msg_id, []), ("10.0.0.99", 7), net.now)
    assert node.statistics().dropped["unexpected-response"] == 2
    assert not op.done
    net.run(lambda: op.done)


def test_config_rejects_nonsense() -> None:
    import pytest

    from p2pbuild import LocalError

    with pytest.raises(LocalError):
        DhtConfig(k=0)
    assert attrs.evolve(DhtConfig(), alpha=5).alpha == 5


def _late_joiners(
    config: DhtConfig | None = None,
) -> tuple[SansIONetwork, list[bytes], list[list[SignedRecord]]]:
    """A seed, 3 publishers that publish, then 40 empty nodes join (through the seed)."""
    net = build_network(4, config)
    first = next(iter(net.nodes))
    everyone = nodes(net)
    keys, published = [], []
    for index in (1, 2, 3):
        mine = records(f"late-pub-{index}")
        key = node_key(mine[0].publisher)
        op = everyone[index].put(key, mine, net.now)
        net.run(lambda op=op: op.done)
        keys.append(key)
        published.append(mine)
    for index in range(4, 44):
        _, node = net.add(index)
        op = node.bootstrap([first], net.now)
        net.run(lambda op=op: op.done)
    net.run(limit=1.0)  # let hand-offs land
    return net, keys, published


def _late_misses(
    net: SansIONetwork,
    keys: list[bytes],
    published: list[list[SignedRecord]],
    *,
    within_k: bool = False,
) -> int:
    """Lookups (of 20) that missed records. ``within_k``: count only those where a holder
    of the records is among the ``k`` nodes closest to the key (but the reader), which is
    as far as a lookup widened over empty answers reads."""
    everyone = nodes(net)
    k = (net.config or DhtConfig()).k
    misses = 0
    rng = random.Random(3)
    for _ in range(20):
        reader = everyone[rng.randrange(4, 44)]
        which = rng.randrange(3)
        op = reader.get(keys[which], net.now)
        net.run(lambda op=op: op.done)
        missed = {r.raw for r in op.result} != {r.raw for r in published[which]}
        if missed and within_k:
            target = int.from_bytes(keys[which], "big")
            others = sorted((n for n in everyone if n is not reader), key=lambda n: n.own ^ target)
            missed = any(n.store.count(keys[which]) for n in others[:k])
        misses += missed
    return misses


def test_records_are_handed_to_nodes_that_join_later() -> None:
    net, keys, published = _late_joiners()
    assert _late_misses(net, keys, published) == 0
    everyone = nodes(net)
    handed = sum(node.statistics().handoff_stores for node in everyone)
    # Bounded: the few holders closest to a key (as far as each knows) send it to each new
    # contact among its k closest. In this network grown from 4 nodes, holders that do not
    # know the closer ones yet send too: 602 datagrams, 2 to 12 per newcomer and key (3
    # keys of one datagram each; 3 per newcomer and key once the tables are full).
    assert 0 < handed <= 40 * 3 * 6
    # The closest nodes of each key got its records, though they joined after the put.
    for key in keys:
        target = int.from_bytes(key, "big")
        closest = sorted(everyone, key=lambda n: n.own ^ target)[:4]
        assert sum(n.store.count(key) == 2 for n in closest) >= 3


def test_late_joiners_hand_off_alone_is_enough() -> None:
    # Lookups that end at the 4 closest even when all answered empty, as before: the
    # hand-off alone must put the records where lookups end.
    original = DhtNode._found_nothing
    DhtNode._found_nothing = lambda self, walk: False  # type: ignore[method-assign]
    try:
        net, keys, published = _late_joiners()
        assert _late_misses(net, keys, published) == 0
    finally:
        DhtNode._found_nothing = original  # type: ignore[method-assign]


def test_without_hand_off_late_joiners_hide_records() -> None:
    # The control (the bug): no hand-off, lookups ending at the 4 closest empty answers.
    original = DhtNode._found_nothing
    DhtNode._found_nothing = lambda self, walk: False  # type: ignore[method-assign]
    try:
        net, keys, published = _late_joiners(DhtConfig(handoff_datagrams=0))
        control = _late_misses(net, keys, published)
        assert control > 0
        # Widening lookups over empty answers alone finds them again wherever a holder is
        # among the k closest to the key (here some holders are not: in 44 nodes, the 4
        # first ones' place is anywhere; that is what the hand-off is for).
        DhtNode._found_nothing = original  # type: ignore[method-assign]
        assert _late_misses(net, keys, published, within_k=True) == 0
        assert _late_misses(net, keys, published) < control
    finally:
        DhtNode._found_nothing = original  # type: ignore[method-assign]


_HOLDERS_COUNT = 40


def _handed_big_key(config: DhtConfig) -> tuple[DhtNode, bytes, list[wire.Request], float]:
    """3 holders of a facet key of 24 records (about 6 datagrams of ``p2p_store``) that
    count ``_HOLDERS_COUNT`` publishers, and a newcomer right next to the key, which every
    holder should hand the key to: the newcomer, the key, the hand-off stores it was sent,
    and the time."""
    net = build_network(3, config)
    first = next(iter(net.nodes))
    key = facet_key("arch=x86_64")
    for holder in nodes(net):
        for i in range(12):  # 24 records of ~260 bytes
            holder.store.offer_many(key, [r.raw for r in records(f"big-{i}")], net.now)
        # A full key counts the publishers that offered, held or not: more than it holds.
        holder.store.counted(key, _HOLDERS_COUNT, net.now)
    before = len(net.sent)
    address = ("10.0.9.9", 7420)
    joiner = net.nodes[address] = DhtNode(
        (int.from_bytes(key, "big") ^ 1).to_bytes(20, "big"), now=net.now,
        rng=random.Random(99), config=config, cache=net.cache,
    )
    op = joiner.bootstrap([first], net.now)
    net.run(lambda: op.done)
    net.run(limit=1.0)
    stores = []
    for datagram, _, to in net.sent[before:]:
        if to == address and datagram[0] == wire.REQUEST:
            request = wire.decode_datagram(datagram, max_size=2048)
            assert isinstance(request, wire.Request)
            if request.method == wire.P2P_STORE:
                assert len(datagram) <= 1200
                stores.append(request)
    return joiner, key, stores, net.now


def test_hand_off_sends_a_key_whole_with_its_count() -> None:
    joiner, key, stores, now = _handed_big_key(DhtConfig())
    # Each of the 3 holders sends the whole key, paged, each page stating the count.
    assert 3 * 5 <= len(stores) <= 3 * 8
    assert all(wire.parse_p2p_store_args(r)[3] == _HOLDERS_COUNT for r in stores)
    assert joiner.store.count(key) == 24
    # The newcomer's census answers give the holders' count, not the 12 it holds.
    assert joiner.store.publishers(key, now) == _HOLDERS_COUNT


def test_hand_off_leaves_out_a_key_that_does_not_fit_its_budget() -> None:
    # A part of a key would make the newcomer answer censuses with a part's count.
    joiner, key, stores, _ = _handed_big_key(DhtConfig(handoff_datagrams=4))
    assert not stores
    assert joiner.store.count(key) == 0


def test_full_bucket_pings_its_oldest_only_if_not_heard_from_lately() -> None:
    config = DhtConfig(k=2)
    net = SansIONetwork(config)
    _, node = net.add(0)
    own = node.own
    ids = [own ^ (1 << 159) ^ n for n in (1, 2, 3, 4)]
    addresses = [("10.1.0.1", 1), ("10.1.0.2", 2), ("10.1.0.3", 3), ("10.1.0.4", 4)]
    for node_id, address in zip(ids[:2], addresses[:2], strict=True):
        node.routing.seen(node_id, address, net.now)
    # A newcomer while the oldest was heard from within eviction_ping_after: no ping, the
    # newcomer waits in the replacement cache.
    assert node.routing.seen(ids[2], addresses[2], net.now + 30) is None
    assert [p.node_id for p in node.routing] == ids[:2]
    # Through the core: a request from a newcomer sends no ping either.
    node.receive_datagram(
        wire.encode_request(b"p" * 20, wire.PING, [ids[3].to_bytes(20, "big")]),
        addresses[3], net.now + 30,
    )
    out = node.datagrams_to_send()
    assert [wire.decode_datagram(d, max_size=2048).__class__ for d, _ in out] == [wire.Response]
    # Once the oldest has been silent for longer, the next newcomer gets it pinged...
    to_ping = node.routing.seen(ids[3], addresses[3], net.now + 61)
    assert to_ping is not None and to_ping.node_id == ids[0]
    # ...and it is replaced only if that ping fails (least-recently-seen eviction).
    assert node.routing.failed(ids[0])
    assert ids[0] not in [p.node_id for p in node.routing]
    assert len(list(node.routing)) == 2


def test_eviction_ping_answered_keeps_the_old_contact() -> None:
    config = DhtConfig(k=2, eviction_ping_after=1.0)
    net = SansIONetwork(config)
    _, node = net.add(0)
    own = node.own
    ids = [own ^ (1 << 159) ^ n for n in (1, 2, 3)]
    for n, node_id in enumerate(ids[:2]):
        node.routing.seen(node_id, (f"10.1.0.{n}", 1), net.now)
    to_ping = node.routing.seen(ids[2], ("10.1.0.9", 1), net.now + 5)
    assert to_ping is not None and to_ping.node_id == ids[0]
    node.routing.seen(ids[0], ("10.1.0.0", 1), net.now + 5.01, rtt=0.01)  # it answered
    node.routing.ping_answered(ids[0])
    assert sorted(p.node_id for p in node.routing) == sorted(ids[:2])


def test_a_part_asked_of_a_node_without_the_key_is_asked_again_of_a_holder() -> None:
    # Two of the key's closest nodes hold it, the others it names do not (a key whose
    # other holders left, or a shard written by few): the parts asked of those come back
    # empty, are asked again of a holder, and counted.
    net = build_network(40)
    key = facet_key("arch=x86_64")
    target = int.from_bytes(key, "big")
    ordered = sorted(nodes(net), key=lambda n: n.own ^ target)
    for holder in ordered[:2]:
        for i in range(30):
            holder.store.offer_many(key, [r.raw for r in records(f"reask-{i}")], net.now)
    reader = ordered[-1]
    op = reader.get(key, net.now, sample=20)
    net.run(lambda: op.done)
    assert reader.statistics().sample_parts_reasked > 0
    assert len({r.publisher.raw for r in op.result}) >= 15


def test_a_full_read_reads_on_while_its_holders_gave_fewer_than_one_counted() -> None:
    # Twelve publishers under a key; the publisher whose records sort last reached every
    # holder but the two closest (its put missed them under loss). The walk's replies
    # carry first pages only, so the two closest holders, read to the end, give eleven,
    # while a holder the walk heard counted twelve: the read goes on to that one.
    net = build_network(40)
    key = facet_key("arch=s390x")
    target = int.from_bytes(key, "big")
    ordered = sorted(net.nodes.items(), key=lambda item: item[1].own ^ target)
    labels = sorted(
        (f"counted-{i}" for i in range(12)), key=lambda x: make_identity(x).public_key.raw
    )
    for rank, (_, holder) in enumerate(ordered[:20]):
        for label in labels if rank >= 2 else labels[:-1]:
            holder.store.offer_many(key, [r.raw for r in records(label, arch="s390x")], net.now)
    reader = ordered[-1][1]
    op = reader.get(key, net.now)
    net.run(lambda: op.done)
    assert {r.publisher for r in op.result} == {make_identity(x).public_key for x in labels}
    assert op.complete


def test_a_part_asked_of_a_holder_gone_is_asked_again_for_the_same_part() -> None:
    # A census found the key's eight closest nodes holding it; six of them leave before
    # its parts are read (a directory shares a census for a minute). A part asked of one
    # of those is sent, resent, unanswered: it is asked again of a holder, for that part.
    # (It was asked for the first page instead: the same few publishers each time.)
    net = build_network(40)
    key = facet_key("arch=x86_64")
    target = int.from_bytes(key, "big")
    ordered = sorted(net.nodes.items(), key=lambda item: item[1].own ^ target)
    for _, holder in ordered[:8]:
        for i in range(30):
            holder.store.offer_many(key, [r.raw for r in records(f"gone-{i}")], net.now)
    reader = ordered[-1][1]
    census = reader.get(key, net.now, census=True)
    net.run(lambda: census.done)
    net.dead.update(address for address, _ in ordered[2:8])
    op = reader.sample_from(census, 20, net.now, whole=False)
    net.run(lambda: op.done)
    assert reader.statistics().sample_parts_reasked >= 3
    assert len({r.publisher.raw for r in op.result}) >= 15


def test_a_direct_census_put_asks_two_holders_for_the_count_and_walks_nowhere() -> None:
    # A republish of a facet root: the records straight to the holders the last walk
    # found, and a census query to two of them at random (every publisher of a crowded
    # facet censuses its roots at each republish: asked of the two closest, those two
    # served them all); the count is the larger answer. No find_node, no walk.
    net = build_network(30)
    everyone = nodes(net)
    key = facet_key("arch=x86_64")
    first = everyone[3].put(key, records("walker"), net.now, census=True)
    net.run(lambda: first.done)
    holders = list(first.stored)
    assert len(holders) == 20
    counts = {address: 40 + index for index, (_, address) in enumerate(holders)}
    for address, count in counts.items():
        net.nodes[address].store.counted(key, count, net.now)

    def requests_since(before: int) -> dict[str, list[Address]]:
        asked: dict[str, list[Address]] = {}
        for datagram, _, to in net.sent[before:]:
            if datagram[0] == wire.REQUEST:
                request = wire.decode_datagram(datagram, max_size=2048)
                assert isinstance(request, wire.Request)
                asked.setdefault(request.method, []).append(to)
        return asked

    censused: Counter[Address] = Counter()
    for _ in range(10):
        before = len(net.sent)
        op = everyone[3].put(key, records("walker"), net.now, census=True, holders=holders)
        net.run(lambda op=op: op.done)
        asked = requests_since(before)
        assert op.direct and op.result == 20
        assert sorted(asked) == [wire.P2P_FIND, wire.P2P_STORE]
        assert len(set(asked[wire.P2P_FIND])) == len(asked[wire.P2P_FIND]) == 2
        assert op.publishers == max(counts[address] for address in asked[wire.P2P_FIND])
        assert sorted(asked[wire.P2P_STORE]) == sorted(address for _, address in holders)
        censused.update(asked[wire.P2P_FIND])
    # Spread over the holders: 20 queries reach far more than the same two.
    assert len(censused) >= 8 and max(censused.values()) <= 6
    # Leaving every holder out (a full root counted the offer within the hour): the
    # census queries only.
    before = len(net.sent)
    only = everyone[3].put(key, records("walker"), net.now, census=True, holders=holders,
                           leave_out={node_id for node_id, _ in holders})
    net.run(lambda: only.done)
    assert only.result == 0 and only.publishers is not None and only.publishers >= 40
    sent = [wire.decode_datagram(d, max_size=2048) for d, _, _ in net.sent[before:]]
    requests = [r for r in sent if isinstance(r, wire.Request)]
    assert [r.method for r in requests] == [wire.P2P_FIND] * 2
    # Leaving some out: the census queries all the same, records to the rest.
    left_out = holders[:2]
    before = len(net.sent)
    some = everyone[3].put(key, records("walker"), net.now, census=True, holders=holders,
                           leave_out={node_id for node_id, _ in left_out})
    net.run(lambda: some.done)
    assert some.result == 18
    sent_to = requests_since(before)
    assert len(set(sent_to[wire.P2P_FIND])) == 2
    assert set(sent_to[wire.P2P_STORE]) == {a for _, a in holders} - {a for _, a in left_out}
    with pytest.raises(LocalError):
        everyone[3].put(key, records("walker"), net.now, census=True, leave_out={1})
