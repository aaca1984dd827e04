"""Sharded facets: a sampled find is bounded and uniform over the whole facet (root key and
shards alike), its load spreads beyond the root key's holders, and an answer that holds
less than the facet says so."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from p2pbuild import LocalError, MalformedError, PublicKey, SignedRecord
from p2pbuild.dht import (
    FACET_MAX_LEVEL,
    DhtConfig,
    DhtNode,
    Directory,
    Query,
    RecordCache,
    RecordStore,
    StoreFullError,
    _lookups,
    facet_key,
    facet_shard,
    facet_shard_key,
    node_key,
)
from p2pbuild.dht import _wire as wire
from p2pbuild.dht._directory import (
    _CENSUS_TTL,
    _COUNT_MEMORY,
    _SETTLE_DELAY,
    _shards_for,
    level_read,
    levels_written,
)
from p2pbuild.dht._ids import Address
from p2pbuild.dht._lookups import part_holders
from p2pbuild.dht._operations import CandidateState, GetOperation, _Candidate
from p2pbuild.dht._store import SKETCH_WINDOW
from p2pbuild.testing import (
    SANSIO_EPOCH,
    Cluster,
    build_network,
    example_capability,
    example_status,
    make_identity,
    open_cluster,
    signed_records,
)

# A root key holds 32 publishers here (64 records), so 200 publishers make a sharded facet
# (the root and 64 shards of about 2.6) at a small cost; k = 8 keeps the puts cheap.
CONFIG = DhtConfig(k=8, max_records_per_key=64)
PUBLISHERS = 200
FACET = "arch=x86_64"
STATUS_LIFETIME = 1200


async def _publish_all(
    cluster: Cluster, count: int, *, settle: bool = True, label: str = "facet"
) -> set[bytes]:
    """``count`` publishers, each published by one of the cluster's nodes, one after the
    other (so the root key's holders agree on which publishers they hold: publishers
    racing for a root's last places can land on some of its holders and in their shard,
    with a double chance to be sampled, see docs/protocol.md); their raw keys."""
    now = int(cluster.nodes[0].now())
    labels = [f"{label}-{i}" for i in range(count)]
    for index, label in enumerate(labels):
        identity = make_identity(label)
        await cluster.nodes[index % len(cluster.nodes)].publish(
            [
                SignedRecord.create(
                    identity, example_capability(), seq=1, issued_at=now, lifetime=3600
                ),
                SignedRecord.create(
                    identity, example_status(), seq=1, issued_at=now, lifetime=STATUS_LIFETIME
                ),
            ]
        )
    if settle:
        # The first publishers learn that the facet grew past its root at their next
        # republish (at half their status's lifetime), and write their shards then.
        await trio.sleep(STATUS_LIFETIME / 2 + 30)
    return {make_identity(label).public_key.raw for label in labels}


def _closest(cluster: Cluster, key: bytes, count: int) -> list[Directory]:
    target = int.from_bytes(key, "big")
    return sorted(cluster.nodes, key=lambda d: int.from_bytes(d.node_id, "big") ^ target)[:count]


async def _root_publishers(cluster: Cluster) -> set[bytes]:
    records = await cluster.nodes[1].get(facet_key(FACET))
    return {r.publisher.raw for r in records}


@asynccontextmanager
async def _midsize_facet() -> AsyncIterator[tuple[set[bytes], Directory, Cluster]]:
    """The 200 publishers of ``_publish_all`` on 40 nodes (16 shards of about 12), and a
    reader that has not read the facet yet: the publishers' raw keys, the reader and the
    cluster."""
    async with open_cluster(40, seed=9, config=CONFIG) as cluster:
        everyone = await _publish_all(cluster, PUBLISHERS)
        yield everyone, cluster.nodes[31], cluster


@asynccontextmanager
async def _root_facet() -> AsyncIterator[tuple[set[bytes], Directory, Cluster]]:
    """30 publishers of ``_publish_all`` on 40 nodes, all in the facet's root key (no
    shard), and a reader that has not read the facet yet (node 31): the publishers' raw
    keys, the reader and the cluster."""
    async with open_cluster(40, seed=11, config=CONFIG) as cluster:
        everyone = await _publish_all(cluster, 30, settle=False)
        yield everyone, cluster.nodes[31], cluster


def _within_shards(counts: Counter[bytes], groups: Sequence[Sequence[bytes]]) -> float:
    """The chi-square statistic of each publisher's count against the mean of its shard's
    publishers: whether publishers of one shard are equally likely (publishers minus
    shards degrees of freedom)."""
    total = 0.0
    for group in groups:
        mean = sum(counts[p] for p in group) / len(group)
        total += sum((counts[p] - mean) ** 2 / mean for p in group)
    return total


def _shard_effect(batches: Sequence[Counter[bytes]], groups: Sequence[Sequence[bytes]]) -> float:
    """Whether publishers of some shards are more likely than those of others: the F
    statistic of the shards' effect on their publishers' mean count, against its
    interaction with the batch of finds (each shard's mean, weighed by its size, in
    consecutive batches), ``(shards - 1, (shards - 1) * (batches - 1))`` degrees of
    freedom.

    A find draws a few shards and several publishers of each, so a shard's publishers
    come together: the chi-square of all counts against one mean reads well above its
    degrees of freedom for a sampler that gives every publisher the same chance (a
    publisher's count varies with how often its shard was drawn). The spread of a shard's
    mean between batches measures that noise here instead of assuming it."""
    sizes = [len(group) for group in groups]
    weight = sum(sizes)
    x = [[sum(batch[p] for p in group) / len(group) for batch in batches] for group in groups]
    shards, count = len(groups), len(batches)
    row = [sum(values) / count for values in x]
    column = [sum(n * x[s][b] for s, n in enumerate(sizes)) / weight for b in range(count)]
    grand = sum(column) / count
    between = count * sum(n * (row[s] - grand) ** 2 for s, n in enumerate(sizes))
    interaction = sum(
        n * (x[s][b] - row[s] - column[b] + grand) ** 2
        for s, n in enumerate(sizes)
        for b in range(count)
    )
    return (between / (shards - 1)) / (interaction / ((shards - 1) * (count - 1)))


@pytest.mark.slow
async def test_sampled_find_is_bounded_and_uniform_over_root_and_shards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(40, seed=5, config=CONFIG) as cluster:
        everyone = await _publish_all(cluster, PUBLISHERS)
        in_root = await _root_publishers(cluster)
        assert len(in_root) >= 20
        readers = cluster.nodes[20:30]
        batches: list[Counter[bytes]] = []
        for index in range(600):
            if index % 50 == 0:
                batches.append(Counter())
            reader = readers[index % len(readers)]
            sample = await reader.find_sample(Query(arch="x86_64"), 10)
            chosen = [entry.publisher.raw for entry in sample]
            assert 1 <= len(chosen) <= 10  # bounded by want
            assert len(set(chosen)) == len(chosen)
            assert set(chosen) <= everyone
            assert not sample.complete
            assert 50 <= sample.estimated_publishers <= 600
            batches[-1].update(chosen)
        counts = sum(batches, Counter())
        assert sum(counts.values()) >= 0.95 * 10 * 600  # about want each time
        assert min(counts[p] for p in everyone) > 0
        # Every publisher as likely as any other, tested in two parts: 16 shards of 7 to
        # 18 publishers here, read at level 4. (One chi-square of all counts against one
        # mean read 152 to 234 in 16 runs of this sampler, and 291 once in CI: a find takes
        # several publishers of each shard it draws, so that statistic is not chi-square
        # distributed, see _shard_effect.)
        by_shard: dict[int, list[bytes]] = {}
        for publisher in sorted(everyone):
            by_shard.setdefault(facet_shard(PublicKey(publisher), 4), []).append(publisher)
        groups = list(by_shard.values())
        # Within a shard (a shard read gives a random subset of a fixed size, fewer
        # degrees of freedom than its 184): measured 104 to 145 over 16 runs. Favouring
        # the root key's 32 publishers two to one (what reading the root on every find
        # does unweighted) would add about their mean count, 30, each: some 900.
        assert _within_shards(counts, groups) < 190
        # Between shards: F measured 0.57 to 1.42 over 16 runs (an F(15, 165) exceeds 2.8
        # with a chance of 0.06%). Shards drawn all alike and shared out in proportion to
        # the ones read (a publisher's chance then falls with the size of its shard and of
        # the one beside it: thin shards' publishers came 1.7 to 1.85 times as often as
        # thick ones') read 3.35 to 4.00 over three runs.
        assert _shard_effect(batches, groups) < 2.8
        per_root = sum(counts[p] for p in in_root) / len(in_root)
        per_shard = sum(counts[p] for p in everyone - in_root) / len(everyone - in_root)
        assert 0.8 < per_root / per_shard < 1.25
        # Asked for more than the facet has: every shard (16 of about 12) is read, and a
        # sample of a sharded facet never claims to be all of it.
        sample = await readers[0].find_sample(Query(arch="x86_64"), 500)
        assert 0.9 * len(everyone) <= len(sample) <= len(everyone)
        assert not sample.complete


@pytest.mark.slow
async def test_sampled_finds_spread_load_beyond_the_root_holders(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(40, seed=6, config=CONFIG) as cluster:
        await _publish_all(cluster, PUBLISHERS)
        readers = cluster.nodes[30:40]
        for reader in readers:  # each learns the facet's shape once
            await reader.find_sample(Query(arch="x86_64"), 10)
        before = [d.statistics().requests_in for d in cluster.nodes]
        for index in range(100):
            await readers[index % len(readers)].find_sample(Query(arch="x86_64"), 10)
        nodes = cluster.nodes
        served = [d.statistics().requests_in - b for d, b in zip(nodes, before, strict=True)]
        root_holders = {id(d) for d in _closest(cluster, facet_key(FACET), CONFIG.k)}
        by_root = sum(s for d, s in zip(nodes, served, strict=True) if id(d) in root_holders)
        # The root's 8 holders are a fifth of the nodes: they serve little more than their
        # share (before, every find read the root, and its holders served most requests).
        # Measured 0.28 to 0.31 (55fd841 and a59776f, alone and in the whole suite: which
        # nodes hold the shards varies with the run's scheduling).
        assert by_root / sum(served) < 0.35
        busy = [s for s in served if s > 0]
        assert len(busy) > 3 * CONFIG.k
        mean = sum(served) / len(served)
        assert max(served) < 4 * mean


async def test_answers_that_hold_less_than_the_facet_say_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(24, seed=7, config=CONFIG) as cluster:
        everyone = await _publish_all(cluster, 20, settle=False)
        reader = cluster.nodes[3]
        # A small facet (all in its root key): a sample of all of it is complete, a smaller
        # one is not.
        whole = await reader.find_sample(Query(arch="x86_64"), 64)
        assert {e.publisher.raw for e in whole} == everyone
        assert whole.complete
        part = await reader.find_sample(Query(arch="x86_64"), 5)
        assert len(part) == 5 and not part.complete
        found = await reader.find(Query(arch="x86_64"))
        assert {e.publisher.raw for e in found} == everyone and found.complete
    # A full find cut by its page limit says so instead of returning a silent subset.
    async with open_cluster(24, seed=7, config=DhtConfig(k=8, max_pages=2)) as cluster:
        everyone = await _publish_all(cluster, 20, settle=False)
        found = await cluster.nodes[3].find(Query(arch="x86_64"))
        assert len(found) < len(everyone)
        assert not found.complete


def test_a_census_query_asks_for_a_few_contacts_and_the_count() -> None:
    net = build_network(40)
    holder: DhtNode = next(iter(net.nodes.values()))
    key = facet_key(FACET)

    def contacts_for(part: int) -> int:
        request = wire.encode_request(
            b"c" * 20,
            wire.P2P_FIND,
            wire.encode_p2p_find_args(b"\x07" * 20, key, wire.sample_cursor(b"s" * 8, 0, part)),
            pad_to=400,
        )
        holder.receive_datagram(request, ("10.0.0.9", 9), SANSIO_EPOCH + 1)
        (reply, _), *_ = holder.datagrams_to_send()
        response = wire.decode_datagram(reply, max_size=2048)
        assert isinstance(response, wire.Response)
        contacts, records, cursor, publishers = wire.parse_p2p_find_reply_counted(response.value)
        assert records == [] and cursor == b"" and publishers == 0
        return len(contacts)

    assert contacts_for(8) == 8  # what a sampled find's census walk asks for
    assert contacts_for(0) == 20  # k, as find_node (what a put's census walk asks for)


def test_a_holder_names_random_contacts_among_the_keys_closest_in_census_answers() -> None:
    # Parts of a sampled read go to the holders its census heard and to the contacts they
    # named: a holder that named its 8 closest sent every reader's parts to the same 8 of
    # the key's 20 holders. A node that does not hold the key names the 8 closest (the
    # walk's way on).
    net = build_network(40)
    node: DhtNode = next(iter(net.nodes.values()))
    key = facet_key(FACET)
    target = int.from_bytes(key, "big")
    closest = {p.raw_id for p in node.routing.closest(target, 20)}

    def named(asker: int) -> list[bytes]:
        cursor = wire.sample_cursor(b"s" * 8, 0, 8)
        request = wire.encode_request(
            bytes([asker]) * 20, wire.P2P_FIND,
            wire.encode_p2p_find_args(bytes([asker]) * 20, key, cursor), pad_to=400,
        )
        node.receive_datagram(request, (f"10.0.1.{asker}", 9), SANSIO_EPOCH + 1)
        (reply, _), *_ = node.datagrams_to_send()
        response = wire.decode_datagram(reply, max_size=2048)
        assert isinstance(response, wire.Response)
        contacts = wire.parse_p2p_find_reply_counted(response.value)[0]
        distances = [int.from_bytes(raw, "big") ^ target for raw, _, _ in contacts]
        assert distances == sorted(distances)
        return [raw for raw, _, _ in contacts]

    eight = sorted(closest, key=lambda raw: int.from_bytes(raw, "big") ^ target)[:8]
    assert named(1) == eight and named(2) == eight
    node.store.offer_many(key, [r.raw for r in signed_records("census-holder")], net.now)
    answers = [named(asker) for asker in range(3, 23)]
    assert all(len(a) == 8 and set(a) <= closest for a in answers)
    assert len({raw for a in answers for raw in a}) >= 16


def test_a_node_beyond_a_keys_k_closest_gives_no_count_in_census_answers() -> None:
    # Records that reached a node outside the key's k closest are a part of the key: a
    # census that ends at two such nodes takes a part's count for the key's (likely what
    # made a find in CI's bench/internet.py take a facet of 274 for one of 9, return 9
    # and say complete). Its census answer has no count; a node among the k closest
    # answers with its own.
    net = build_network(40, CONFIG)
    key = facet_key(FACET)
    target = int.from_bytes(key, "big")
    by_distance = sorted(net.nodes.values(), key=lambda n: n.own ^ target)
    records = [r.raw for r in signed_records("census-stray")]

    def census_count(node: DhtNode) -> int | None:
        node.store.offer_many(key, records, net.now)
        cursor = wire.sample_cursor(b"s" * 8, 0, 8)
        request = wire.encode_request(
            b"c" * 20, wire.P2P_FIND,
            wire.encode_p2p_find_args(b"\x07" * 20, key, cursor), pad_to=400,
        )
        node.receive_datagram(request, ("10.0.1.9", 9), SANSIO_EPOCH + 1)
        (reply, _), *_ = node.datagrams_to_send()
        response = wire.decode_datagram(reply, max_size=2048)
        assert isinstance(response, wire.Response)
        return wire.parse_p2p_find_reply_counted(response.value)[3]

    assert census_count(by_distance[0]) == 1
    far = by_distance[-1]
    assert len(far.routing.closest(target, 8)) == 8  # it knows 8 closer ones
    assert census_count(far) is None


def test_census_queries_are_padded_to_a_third_of_a_census_reply_only() -> None:
    # A census answer holds 8 contacts and a count: a request of a third of its largest
    # size (IPv6 hosts) gets it whole from a node that never heard of the asker, so the
    # census walk's queries need not be padded to a third of a datagram (400 bytes).
    net = build_network(40)
    reader: DhtNode = list(net.nodes.values())[7]
    address = next(a for a, n in net.nodes.items() if n is reader)
    before = len(net.sent)
    op = reader.get(facet_key(FACET), net.now, census=True)
    net.run(lambda: op.done)
    asked: dict[bytes, int] = {}
    answered: dict[bytes, int] = {}
    for datagram, source, _ in net.sent[before:]:
        frame = wire.decode_datagram(datagram, max_size=2048)
        if isinstance(frame, wire.Request) and source == address:
            if frame.method == wire.P2P_FIND and not frame.cookie:
                asked[frame.msg_id] = len(datagram)
        elif isinstance(frame, wire.Response) and frame.msg_id in asked:
            answered[frame.msg_id] = len(wire.parse_p2p_find_reply_counted(frame.value)[0])
    assert len(asked) >= 3
    padded = -(-wire.CENSUS_REPLY_MAX // 3)
    assert set(asked.values()) == {padded}
    assert padded < 250
    assert answered and set(answered.values()) == {8}
    # The largest census reply, 8 contacts with IPv6 hosts, fits three such requests.
    contact = (bytes(20), "ffff:" * 7 + "ffff", 65535)
    value = wire.encode_p2p_find_reply(
        [contact] * 8, [], b"", wire.MAX_PUBLISHER_COUNT, bytes(wire.COOKIE_SIZE)
    )
    assert len(wire.encode_response(bytes(20), value)) <= 3 * padded


def test_the_parts_of_a_sampled_read_carry_cookies_instead_of_padding() -> None:
    # The census walk's requests go to nodes the reader has not asked before: padded (to a
    # third of a census answer). Its holders' replies hold cookies for the reader's
    # address, so the parts it then asks them for are small requests that still get full
    # replies (docs/protocol.md, *Address cookies*).
    net = build_network(40, CONFIG)
    key = facet_key(FACET)
    nodes = list(net.nodes.values())
    for index in range(24):
        op = nodes[index].put(key, signed_records(f"cookie-{index}"), net.now)
        net.run(lambda op=op: op.done)
    reader_address, reader = list(net.nodes.items())[-1]
    net.sent.clear()
    census = reader.get(key, net.now, census=True)
    net.run(lambda: census.done)
    census_requests = [(d, to) for d, source, to in net.sent
                       if source == reader_address and d[0] == wire.REQUEST]
    answered = {source for d, source, to in net.sent
                if to == reader_address and d[0] == wire.RESPONSE}
    assert census.publishers == 24 and census_requests
    assert all(len(d) == -(-wire.CENSUS_REPLY_MAX // 3) for d, _ in census_requests)
    net.sent.clear()
    op = reader.sample_from(census, 12, net.now)
    net.run(lambda: op.done)
    parts = [(d, to) for d, source, to in net.sent
             if source == reader_address and d[0] == wire.REQUEST]
    # Parts asked of nodes that answered the census carry the cookie they gave (a part
    # asked of a k-closest candidate the census never asked is padded, as any first request).
    with_cookie = [d for d, to in parts if to in answered]
    assert with_cookie
    for datagram in with_cookie:
        request = wire.decode_datagram(datagram, max_size=2048)
        assert isinstance(request, wire.Request) and request.cookie
        assert len(datagram) < 120
    assert all(len(d) >= 400 for d, to in parts if to not in answered)
    assert len({r.publisher for r in op.result}) >= 8
    assert sum(n.statistics().replies_bounded for n in nodes) == 0


def test_a_sampled_find_censuses_shards_enough_for_a_margin() -> None:
    # A 5,000-publisher facet: 128 shards of about 39; 77 publishers wanted (64 x 1.2).
    # Two shards hold 78 on average, fewer about half of the time: a second census wave
    # would follow. Three cover 77 with two standard deviations to spare.
    assert _shards_for(77, 39.0, 128) == 3
    assert _shards_for(77, 60.0, 128) == 2
    assert _shards_for(12, 1.0, 256) == 16  # at most 16
    assert _shards_for(500, 39.0, 8) == 8  # at most all of them
    assert _shards_for(1, 100.0, 64) == 2  # at least two


def test_a_full_key_counts_every_publisher_that_offered() -> None:
    # A key with room for 8 publishers (16 records) is offered 400 publishers' capabilities:
    # its census count says about 400 (a 128-entry sketch of who offered), not 8, so the
    # census of a big facet's root key tells readers and publishers how big the facet is.
    store = RecordStore(
        max_per_key=16, max_per_publisher=100, max_total=10_000, cache=RecordCache()
    )
    key = facet_key(FACET)
    now = 1_700_000_000

    def offer(index: int, seq: int, at: int) -> bool:
        capability = SignedRecord.create(
            make_identity(f"offer-{index}"),
            example_capability(),
            seq=seq,
            issued_at=at,
            lifetime=600,
        )
        try:
            store.offer(key, capability.raw, at)
        except StoreFullError:
            return False
        return True

    assert sum(not offer(index, 1, now) for index in range(400)) == 400 - 16
    assert 320 <= store.publishers(key, now) <= 480
    # Publishers that stop republishing stop counting within two hours: 100 of them
    # republish hourly, the other 300 left.
    for index in range(300, 400):
        offer(index, 2, now + 3600)
    assert 320 <= store.publishers(key, now + 3700) <= 480
    for index in range(300, 400):
        offer(index, 3, now + 7200)
    assert store.publishers(key, now + 7300) == 100
    # A key that never refused anyone counts what it holds.
    assert store.publishers(facet_key("arch=s390x"), now) == 0


def test_shard_levels_grow_with_the_facet_and_readers_find_every_writer() -> None:
    room = 128  # publishers a key holds by default (256 records)
    assert levels_written(100, room) == (1, 2)
    assert level_read(100, room) == 1
    for size in (300, 1_000, 5_000, 20_000, 100_000, 170_000):
        level = level_read(size, room)
        # Readers read shards of about 42 publishers (30 to 60), written by everyone.
        assert 29 <= size / 2**level <= 60, size
        assert level in levels_written(size, room)
        # The fuller level a publisher writes stays below a key's room.
        assert size / 2 ** min(levels_written(size, room)) < 0.7 * room
        # Publishers whose estimates of the facet are off by up to 40% either way still
        # write the level readers read.
        for off in (0.71, 0.8, 1.25, 1.4):
            assert level in levels_written(round(size * off), room), (size, off)
    assert level_read(5_000, room) == 7  # 128 shards of 39, not 64 of 78
    assert level_read(300, room) == 3  # 8 shards of 38, not 64 of 4.7
    assert level_read(10**9, room) == FACET_MAX_LEVEL
    # A publisher's shard at one level is the union of two at the next.
    publisher = make_identity("facet-0").public_key
    for level in range(1, FACET_MAX_LEVEL):
        assert facet_shard(publisher, level + 1) >> 1 == facet_shard(publisher, level)
    assert len({facet_shard_key(FACET, level, 0) for level in range(1, 13)}) == 12


def test_the_shards_of_a_level_have_no_holder_in_common() -> None:
    # The shard keys of a level lie in as many different subtrees of the id space: at
    # least 2 ** (160 - level) apart, so the k closest nodes of one are not the k closest
    # of another while each subtree holds k nodes. (With each key a hash of its own text,
    # two of a level's keys lay close often: nodes among the k closest of both served
    # both shards' reads, the most of any node in bench/internet.py's load phase.)
    for facet in ("arch=x86_64", "arch=aarch64", "os=fedora-41", "pool=kernel"):
        for level in range(1, 9):
            keys = [facet_shard_key(facet, level, s) for s in range(1 << level)]
            prefixes = {int.from_bytes(key, "big") >> (160 - level) for key in keys}
            assert len(prefixes) == 1 << level
            # The other bits are the level's own: levels do not share keys.
            assert len(set(keys) & {facet_shard_key(facet, level + 1, s) for s in range(4)}) == 0
    # In a network of 2,000 random node ids, no node is among the 20 closest of two of
    # the 8 shards of level 3.
    rng = random.Random(3)
    nodes = [rng.getrandbits(160) for _ in range(2000)]
    held: Counter[int] = Counter()
    for key in (facet_shard_key(FACET, 3, s) for s in range(8)):
        target = int.from_bytes(key, "big")
        held.update(sorted(nodes, key=lambda n: n ^ target)[:20])
    assert max(held.values()) == 1
    with pytest.raises(MalformedError):
        facet_shard_key(FACET, 3, 8)


@pytest.mark.slow
async def test_a_facet_past_sixty_four_full_shards_refuses_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A root key holds 4 publishers here: 300 publishers are more than 64 shards of 4 held
    # (what a fixed 64 shards refused). Shards grow with the facet: a full find returns
    # every publisher and says it is complete, and a sampled find reads a few shards.
    config = DhtConfig(k=8, max_records_per_key=8)
    async with open_cluster(40, seed=8, config=config) as cluster:
        everyone = await _publish_all(cluster, 300, label="many")
        reader = cluster.nodes[5]
        found = await reader.find(Query(arch="x86_64"))
        assert {e.publisher.raw for e in found} == everyone
        assert found.complete
        sample = await reader.find_sample(Query(arch="x86_64"), 10)
        # 16 shards of about one publisher each (the most a find reads) can hold fewer than
        # 10 now and then (a Poisson count of mean ~19): the sample is then a little short.
        assert 8 <= len(sample) <= 10 and set(e.publisher.raw for e in sample) <= everyone
        # The estimate is 256 shards x the mean of the 16 read: 16 x a Poisson-like count of
        # mean ~19, so it lies in 96..576 (6 to 36 publishers) but for one find in ~10,000.
        assert sample.estimated_publishers % 16 == 0
        assert 96 <= sample.estimated_publishers <= 576
        before = reader.statistics().lookups
        sample = await reader.find_sample(Query(arch="x86_64"), 10)
        assert 8 <= len(sample) <= 10
        # 256 shards of about one publisher (a third of a key's room): 12 wanted, 16 read
        # (the census margin asks for 19; 16 at most).
        assert 12 <= reader.statistics().lookups - before <= 16
        assert sample.rounds == 2


@pytest.mark.slow
async def test_a_known_midsize_facet_is_sampled_from_two_shards_in_two_rounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 200 publishers, roots of 32: 16 shards of about 12 (a third of a key's room), not 64
    # thin ones. A reader that knows the facet censuses 2 of them (no root) and fetches
    # parts: two waves in all. A shard it censused less than a minute ago needs no walk
    # (its holders and count are known): a find of two such shards is one wave.
    async with _midsize_facet() as (everyone, reader, _):
        first = await reader.find_sample(Query(arch="x86_64"), 10)
        assert first.rounds == 3  # the root's census, two shards' censuses, the parts
        walks: list[int] = []
        sizes: list[int] = []
        for _ in range(16):
            before = reader.statistics().lookups
            sample = await reader.find_sample(Query(arch="x86_64"), 10)
            walks.append(reader.statistics().lookups - before)
            # (A wave more if the parts came short: more parts asked for.)
            assert sample.rounds - (2 if walks[-1] else 1) in (0, 1)
            # About want: 12 publishers fetched; parts that came back short are topped up.
            sizes.append(len(sample))
            assert 9 <= len(sample) <= 10 and {e.publisher.raw for e in sample} <= everyone
            assert 100 <= sample.estimated_publishers <= 320  # 16 x the mean of 2 shards
            await trio.sleep(2)
        # 16 finds of 2 of the 16 shards within 34 s: each shard is censused once at most
        # (14 not read by the first find), not 32 times.
        assert set(walks) <= {0, 1, 2} and sum(walks) <= 14
        assert sum(sizes) >= 16 * 9.5
        # A minute on, every shard is censused again.
        await trio.sleep(61)
        before = reader.statistics().lookups
        sample = await reader.find_sample(Query(arch="x86_64"), 10)
        assert reader.statistics().lookups - before == 2 and sample.rounds == 2


async def test_a_warm_find_whose_parts_came_short_asks_for_more_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The publishers in the parts a find asks for vary as a Poisson count does: a find of
    # 64 that asks for 77 gets fewer than 64 in a few finds in a hundred (62 of 64 in
    # bench/internet.py). A find with a wave to spare asks the keys it read for more of
    # their parts, as many as the shortfall needs at the yield its parts had. Here every
    # part is counted on for 8 publishers (a reply holds about 3): the first wave brings
    # about a third of what is wanted.
    async with _midsize_facet() as (everyone, reader, _):
        await reader.find_sample(Query(arch="x86_64"), 10)  # the facet's size is known
        monkeypatch.setattr(_lookups, "_PART_YIELD", 8.0)
        await trio.sleep(_CENSUS_TTL + 1)  # no census to share: the shards are walked
        sample = await reader.find_sample(Query(arch="x86_64"), 10)
        assert len(sample) == 10 and {e.publisher.raw for e in sample} <= everyone
        assert sample.rounds == 3  # shard censuses, parts, more parts
        assert reader.statistics().sample_more >= 1


async def test_finds_within_a_minute_share_a_census_and_skip_holders_gone_since(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A dispatcher finds the same facet again and again (its directory cache refreshes it
    # every 30 s, a load of builds more often): its finds within a minute share one
    # census, the key's count and the holders its walk found, and ask those holders for
    # parts at once, with no walk. Holders that left since cost one find a census and a
    # read again (three waves), and the finds after it share the new census.
    async with _root_facet() as (everyone, reader, cluster):
        first = await reader.find_sample(Query(arch="x86_64"), 10)
        assert first.rounds == 2 and len(first) == 10

        def counters() -> tuple[int, int]:
            statistics = reader.statistics()
            return statistics.lookups, statistics.rpcs_timed_out

        before = counters()
        second = await reader.find_sample(Query(arch="x86_64"), 10)
        assert second.rounds == 1 and len(second) == 10
        assert counters()[0] == before[0]  # no walk
        assert {e.publisher.raw for e in second} <= everyone
        holders = [cluster.nodes.index(d) for d in _closest(cluster, facet_key(FACET), 8)]
        for index in holders[2:]:
            if index != 31:
                cluster.stop(index)
        before = counters()
        third = await reader.find_sample(Query(arch="x86_64"), 10)
        assert len(third) == 10 and third.rounds == 3
        assert counters()[0] == before[0] + 1 and counters()[1] > before[1]
        before = counters()
        fourth = await reader.find_sample(Query(arch="x86_64"), 10)
        # No walk; parts asked of nodes the new census's holders named that have left (the
        # holders' tables still list them) time out once and are asked again of a holder.
        # About want: 5 parts of about 3 for 12 asked.
        assert 8 <= len(fourth) <= 10 and fourth.rounds == 1
        assert counters()[0] == before[0]
        # Nobody that failed a part is asked again. (Departed nodes the holders named that
        # no part went to yet may be: which ones the fourth find tried is chance.)
        census = reader._censuses[facet_key(FACET)].op
        failed = {c.address for c in census._holders if c.state == CandidateState.FAILED}
        assert failed
        asked: set[tuple[str, int]] = set()
        route = cluster.network._route
        source = cluster.endpoints[31].local_address

        def spy(sender: tuple[str, int], data: bytes, destination: tuple[str, int]) -> None:
            if sender == source:
                asked.add(destination)
            route(sender, data, destination)

        cluster.network._route = spy  # type: ignore[method-assign]
        before = counters()
        fifth = await reader.find_sample(Query(arch="x86_64"), 10)
        assert 8 <= len(fifth) <= 10 and fifth.rounds == 1
        assert counters()[0] == before[0]
        assert asked and not asked & failed


async def test_a_whole_facet_read_from_a_census_gone_stale_censuses_it_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A find for more than a small facet holds reads its root whole, paging through copies
    # of the shared census's holders. One of them gone since: the census is dropped and
    # the key censused (walked) again, not shared again from the stale census (which
    # still has a holder that answers, so it would be shareable).
    async with _root_facet() as (everyone, reader, cluster):
        first = await reader.find_sample(Query(arch="x86_64"), 40)
        assert first.rounds == 2 and len(first) == 30
        census = reader._censuses[facet_key(FACET)].op
        answered = [c.address for c in census._holders if c.state == CandidateState.OK]
        assert len(answered) >= 2  # one leaves, one stays: the census still has a holder
        for index, endpoint in enumerate(cluster.endpoints):
            if endpoint.local_address == answered[0] and index != 31:
                cluster.stop(index)
        before = reader.statistics().lookups
        second = await reader.find_sample(Query(arch="x86_64"), 40)
        assert reader.statistics().lookups == before + 1  # censused again: a walk
        assert second.rounds == 3 and {e.publisher.raw for e in second} <= everyone
        assert len(second) >= 28


async def test_a_find_that_walks_and_reads_a_census_gone_stale_stays_within_two_waves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A find that censuses one shard itself (a wave) and shares another's census whose
    # holders have left since: censusing and reading that shard again would take two more
    # waves, three beyond the walk (bench/internet.py saw it once in 20 warm finds). It
    # keeps what the shard's other holders gave; the stale census is dropped, so the next
    # find of that shard censuses it again.
    async with _midsize_facet() as (everyone, reader, cluster):
        first = await reader.find_sample(Query(arch="x86_64"), 10)
        stale = [key for key in reader._censuses if key != facet_key(FACET)]
        assert first.rounds == 3 and len(stale) == 2
        reader_index = cluster.nodes.index(reader)
        for key in stale:
            for holder in _closest(cluster, key, 8)[2:]:
                index = cluster.nodes.index(holder)
                if index != reader_index and index in cluster.alive():
                    cluster.stop(index)
        stopped = trio.current_time()
        mixed = 0
        for _ in range(20):
            before = reader.statistics()
            sample = await reader.find_sample(Query(arch="x86_64"), 10)
            after = reader.statistics()
            assert sample.rounds <= 3, sample.rounds  # at most two beyond the first wave
            assert {e.publisher.raw for e in sample} <= everyone
            walked = after.lookups > before.lookups
            if walked and after.rpcs_timed_out > before.rpcs_timed_out:
                mixed += 1
            await trio.sleep(1)
        assert mixed  # a find walked and met holders gone from a shared census
        # Each stale census was dropped when read, and its shard censused again since.
        for key in stale:
            entry = reader._censuses.get(key)
            assert entry is None or entry.started > stopped


def test_sampled_parts_go_to_holders_and_the_candidates_holders_named() -> None:
    # A census walk ends at the first two holders that answer, and its shortlist also
    # holds candidates from answers on the way, closer than some holders it never heard
    # of but holding nothing. Parts asked of those came back empty and were asked again
    # of the two holders (at N=2,000 about 13 parts per find of 64, most of their load);
    # parts go to the candidates a holder named (its closest contacts to the key).
    def candidate(rank: int, state: CandidateState, named: bool = False) -> _Candidate:
        c = _Candidate(rank, ("10.0.0.1", 1000 + rank), rank, 3)
        c.state, c.named = state, named
        c.publishers = 30 if state == CandidateState.OK and rank in (5, 6) else 0
        return c

    shortlist = (
        [candidate(r, CandidateState.NEW) for r in range(5)]
        + [candidate(5, CandidateState.OK), candidate(6, CandidateState.OK)]
        + [candidate(7, CandidateState.OK)]  # answered, holds nothing
        + [candidate(r, CandidateState.NEW) for r in range(8, 12)]
        + [candidate(12, CandidateState.FAILED, named=True)]
        + [candidate(r, CandidateState.NEW, named=True) for r in range(13, 40)]
    )
    chosen = part_holders(shortlist, 20)
    assert [c.node_id for c in chosen] == [5, 6, *range(13, 31)]
    # No names (holders whose answers named no candidate left unasked): the closest never
    # asked.
    for c in shortlist:
        c.named = False
    chosen = part_holders(shortlist, 20)
    assert [c.node_id for c in chosen] == [5, 6, 0, 1, 2, 3, 4, 8, 9, 10, 11, *range(13, 20)]


def test_parts_go_to_the_candidates_the_census_holders_named() -> None:
    # Every reader's census walk ends at nearly the same few holders closest to the key;
    # asked for parts as often as the holders they named, those few served about 1.4
    # times their share of a hot shard's parts in bench/internet.py's load phase. Parts
    # go to the named candidates (a confirmed holder too if the other named it), and to
    # all when too few were named.
    net = build_network(8)
    node: DhtNode = next(iter(net.nodes.values()))

    def census(named: set[int]) -> GetOperation:
        op = GetOperation(facet_key(FACET), net.now, sampled=True)
        op.done = True
        op.publishers = 60
        for rank in range(12):
            c = _Candidate(rank + 1, ("10.0.0.1", 2000 + rank), rank, 3)
            c.state = CandidateState.OK if rank < 2 else CandidateState.NEW
            c.publishers = 60 if rank < 2 else 0
            c.named = rank in named
            op._holders.append(c)
        return op

    def asked(op: GetOperation) -> Counter[int]:
        node.datagrams_to_send()
        for _ in range(40):
            node.sample_from(op, 12, net.now, whole=False)
        return Counter(port - 2000 for _, (_, port) in node.datagrams_to_send())

    spread = asked(census({1, *range(2, 12)}))
    assert set(spread) == set(range(1, 12))  # holder 0 was not named: no parts
    few = asked(census({5, 6, 7}))
    assert set(few) == set(range(12))


def test_more_parts_of_a_read_are_parts_it_did_not_ask_for() -> None:
    # A find whose parts came short asks for more parts of the same random partitions
    # (the same seed): parts it has not asked for, so no publisher comes twice and each
    # one's chance of coming grows alike.
    net = build_network(8)
    node: DhtNode = next(iter(net.nodes.values()))
    census = GetOperation(facet_key(FACET), net.now, sampled=True)
    census.done = True
    census.publishers = 60
    for rank in range(4):
        c = _Candidate(rank + 1, ("10.0.0.1", 2000 + rank), rank, 3)
        c.state, c.publishers = CandidateState.OK, 60
        census._holders.append(c)

    def parts_sent() -> list[tuple[bytes, int, int]]:
        cursors = []
        for data, _ in node.datagrams_to_send():
            request = wire.decode_datagram(data, max_size=4096)
            assert not isinstance(request, wire.Response)
            parsed = wire.parse_sample_cursor(wire.parse_p2p_find_args(request)[2])
            assert parsed is not None
            cursors.append(parsed)
        return cursors

    with pytest.raises(LocalError):
        node.sample_more(census, 3, net.now)  # a census, not a read by parts
    node.datagrams_to_send()
    read = node.sample_from(census, 12, net.now, whole=False)
    first = parts_sent()
    assert len(first) == 5 and read.parts_asked() == (5, 15)  # 20 parts of 3: 12 / 2.4
    read.done = True  # (its parts never come back here)
    more = node.sample_more(read, 6, net.now)
    second = parts_sent()
    assert len(second) == 6 and read.parts_asked() == (11, 9)
    assert {seed for seed, _, _ in first + second} == {read._seed}
    assert {parts for _, parts, _ in first + second} == {20}
    assert len({part for _, _, part in first + second}) == 11
    more.done = True
    node.sample_more(read, 50, net.now)
    assert len(parts_sent()) == 9 and read.parts_asked() == (20, 0)  # what was left
    with pytest.raises(LocalError):
        node.sample_more(read, 0, net.now)


@pytest.mark.slow
async def test_a_sampled_find_that_wants_whole_shards_reads_each_publisher_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Asked for more than the facet holds, a find reads every shard whole. A shard is not
    # paged through as a full read is (two holders to the end: every record twice) but
    # asked for all its parts once, of random holders.
    async with _midsize_facet() as (everyone, reader, _):
        await reader.find_sample(Query(arch="x86_64"), 10)
        sample = await reader.find_sample(Query(arch="x86_64"), 500)
        assert 0.9 * len(everyone) <= len(sample) <= len(everyone)
        records = sum(
            len(e.capability_record.raw)
            + (len(e.status_record.raw) if e.status_record is not None else 0)
            for e in sample
        )
        assert sample.bytes_in < 1.5 * records  # 1.37 here; 2.43 paged


@pytest.mark.slow
async def test_a_sampled_find_counts_its_own_bytes_not_its_nodes_other_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A benchmark that measured a find by its node's byte counters also counted the
    # node's republish when one fell during the find (a few hundred KB "finds" under
    # churn). A FacetSample carries the bytes of its own requests and replies.
    # Both finds measured walk to their shards: a find that shares the censuses of one a
    # minute before asks only for parts (likely why CI once saw 6.2 KB against 12.7).
    async with _midsize_facet() as (_, reader, _):
        await reader.find_sample(Query(arch="x86_64"), 10)

        def node_bytes() -> int:
            statistics = reader.statistics()
            return statistics.bytes_in + statistics.bytes_out

        await trio.sleep(_CENSUS_TTL + 1)
        before = node_bytes()
        quiet = await reader.find_sample(Query(arch="x86_64"), 10)
        quiet_node = node_bytes() - before
        assert quiet.bytes_out > 0 and quiet.bytes_in > 0
        # Alone, the find is (nearly) all the node sent and received.
        assert 0.8 * quiet_node <= quiet.bytes_in + quiet.bytes_out <= quiet_node
        now = int(reader.now())
        others = [
            record
            for i in range(6)
            for record in (
                SignedRecord.create(
                    make_identity(f"busy-{i}"), example_capability(arch="aarch64"),
                    seq=1, issued_at=now, lifetime=3600,
                ),
                SignedRecord.create(
                    make_identity(f"busy-{i}"), example_status(), seq=1, issued_at=now,
                    lifetime=STATUS_LIFETIME,
                ),
            )
        ]
        await trio.sleep(_CENSUS_TTL + 1)
        before = node_bytes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.publish, others)
            busy = await reader.find_sample(Query(arch="x86_64"), 10)
        busy_node = node_bytes() - before
        busy_bytes = busy.bytes_in + busy.bytes_out
        # The publish beside it is the node's traffic, not the find's.
        assert busy_node > 3 * busy_bytes
        assert 0.5 * (quiet.bytes_in + quiet.bytes_out) < busy_bytes
        assert busy_bytes < 2 * (quiet.bytes_in + quiet.bytes_out)


@pytest.mark.slow
async def test_publishers_that_entered_the_root_early_reach_the_shards_within_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A farm starting at once: the first publishers saw a small root and wrote no shard.
    # They put again 30 s after their first publish (they saw other publishers),
    # so readers find them in the shards long before the hourly republish.
    async with open_cluster(40, seed=10, config=CONFIG) as cluster:
        everyone = await _publish_all(cluster, PUBLISHERS, settle=False)
        early = {make_identity(f"facet-{i}").public_key.raw for i in range(1, 24)}
        await trio.sleep(300)
        reader = cluster.nodes[33]
        seen: set[bytes] = set()
        for _ in range(20):
            sample = await reader.find_sample(Query(arch="x86_64"), 20)
            assert {e.publisher.raw for e in sample} <= everyone
            assert 100 <= sample.estimated_publishers <= 320  # 16 x the mean of 2 shards
            seen |= {e.publisher.raw for e in sample}
        assert len(seen & early) >= 10


async def _estimates(cluster: Cluster, labels: Sequence[str]) -> list[int]:
    """What four readers that have not read the facet take its size for, each from a
    sampled find of 20 (checked: 16 or more, all of ``labels``' publishers).

    A find of 20 asks for 24 publishers in whole parts (about 28 come, 1.17 times the
    asked, in 32 such finds), a count that varies about as a Poisson count does: fewer
    than 20 came in 1 of those 32 finds, and one of the readers here got 17. 16 is
    about 2.4 standard deviations below the mean."""
    everyone = {make_identity(label).public_key.raw for label in labels}
    estimates = []
    for index in (33, 34, 35, 36):
        sample = await cluster.nodes[index].find_sample(Query(arch="x86_64"), 20)
        assert {e.publisher.raw for e in sample} <= everyone and len(sample) >= 16
        estimates.append(sample.estimated_publishers)
    return estimates


async def test_a_farm_that_starts_at_once_is_in_its_shards_a_minute_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 200 publishers publish at once: each saw a small root and wrote low shard levels
    # only. They put again _SETTLE_DELAY after (they saw other publishers), until the
    # levels they write stay. Readers read the level the root's count calls for: a minute
    # after the burst, it holds most of the facet (bench/internet.py --overlap-churn found
    # its shards holding 121 of 287 publishers less than two minutes after such a burst,
    # and took the facet for 120 to 218 publishers).
    async with open_cluster(40, seed=10, config=CONFIG) as cluster:
        now = int(cluster.nodes[0].now())
        labels = [f"burst-{i}" for i in range(PUBLISHERS)]

        async def publish(index: int) -> None:
            identity = make_identity(labels[index])
            await cluster.nodes[index % len(cluster.nodes)].publish(
                [
                    SignedRecord.create(
                        identity, example_capability(), seq=1, issued_at=now, lifetime=3600
                    ),
                    SignedRecord.create(
                        identity, example_status(), seq=1, issued_at=now,
                        lifetime=STATUS_LIFETIME,
                    ),
                ]
            )

        async with trio.open_nursery() as nursery:
            for index in range(PUBLISHERS):
                nursery.start_soon(publish, index)
        await trio.sleep(60)
        estimates = await _estimates(cluster, labels)
        assert sorted(estimates)[1] >= 150, estimates


@pytest.mark.slow
async def test_nodes_that_join_closest_to_a_full_root_do_not_shrink_the_facet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Six nodes join closer to the facet's full root key than any holder. A reader next to
    # the key asks them first, and its census ends at two of them: they must answer with
    # the full root's count. Before, the first three got a part of the key (the hand-off
    # stopped at 4 datagrams) and the others nothing (only a newcomer closer than the
    # sender was handed a key), so they counted 10 publishers of 206, and every find took
    # the facet for those 10 (``complete``; seen once in bench/internet.py after its
    # churn: 7 of 64 returned).
    async with _midsize_facet() as (everyone, _, cluster):
        key = facet_key(FACET)
        root = int.from_bytes(key, "big")
        newcomers = [await cluster.join((root ^ n).to_bytes(20, "big")) for n in range(1, 7)]
        await trio.sleep(10)  # hand-offs land
        counts = [d._core.store.publishers(key, d.now()) for d in cluster.nodes[:40]]
        assert max(counts) >= 150  # a full root counts who offered, held or not
        for newcomer in newcomers:
            assert newcomer._core.store.publishers(key, newcomer.now()) == max(counts)
        for reader in _closest(cluster, key, 46)[6:12]:
            sample = await reader.find_sample(Query(arch="x86_64"), 10)
            assert 9 <= len(sample) <= 10 and {e.publisher.raw for e in sample} <= everyone
            assert not sample.complete
            assert 100 <= sample.estimated_publishers <= 320


async def test_a_settle_republish_only_censuses_the_roots(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A publisher's first publish to a crowded facet is followed, _SETTLE_DELAY later, by
    # a settle republish: its roots' censuses may now call for other shard levels. Its
    # node key and the shard levels it wrote hold the same records as half a minute ago;
    # putting them again (as every republish did) made a farm that starts at once send
    # about 1.5 times the datagrams of its first puts. Nor does a root need them again:
    # it holds them, or (full) counted their offer, within the hour. Put to a root, they
    # went to all k of its holders at every settle republish of every publisher: at
    # N=4,000 the busiest node in bench/internet.py's load phase was such a holder (128
    # stores in 3 s). Nor a census walk: every publisher of a crowded facet settles at the
    # same delays after its publish, and their walks all ended at the root's closest
    # holders. A census query to two of the holders the whole put reached, at random.
    async with _midsize_facet() as (_, _, cluster):
        newcomer = await cluster.join()
        identity = make_identity("settler")
        capability = example_capability()
        put: list[bytes] = []
        census_only: list[bytes] = []
        censused: list[bytes] = []
        original_put, original_get = DhtNode.put, DhtNode.get

        def recording_put(
            core: DhtNode, key: bytes, records: Sequence[SignedRecord], now: float,
            *, census: bool = False, holders: Sequence[tuple[int, Address]] | None = None,
            leave_out: Collection[int] = (),
        ) -> object:
            if core is newcomer._core:
                if holders is not None and {i for i, _ in holders} <= set(leave_out):
                    census_only.append(key)
                else:
                    put.append(key)
            return original_put(
                core, key, records, now, census=census, holders=holders, leave_out=leave_out
            )

        def recording_get(
            core: DhtNode, key: bytes, now: float, *, sample: int = 0, census: bool = False
        ) -> object:
            if core is newcomer._core and census:
                censused.append(key)
            return original_get(core, key, now, sample=sample, census=census)

        monkeypatch.setattr(DhtNode, "put", recording_put)
        monkeypatch.setattr(DhtNode, "get", recording_get)
        now = int(newcomer.now())
        await newcomer.publish(signed_records("settler", issued=now))
        roots = {facet_key(name) for name in capability.facets()}
        first = set(put)
        assert roots < first and node_key(identity.public_key) in first
        assert len(first - roots) > 2  # the node key and shards of two levels per facet
        put.clear()
        censused.clear()
        census_only.clear()
        await trio.sleep(35)
        assert put == [] and censused == []
        assert sorted(census_only) == sorted(roots)
        # Settling goes on (the roots have publishers), but the whole put is due a
        # republish period after the last whole one all the same: each record is put
        # again within its life.
        await trio.sleep(newcomer._republish_period() - 35)
        # (A root that refused the records as full within the hour: its census only.)
        assert node_key(identity.public_key) in put and roots <= set(put + census_only)


async def test_a_whole_republish_censuses_the_roots_at_the_holders_its_walk_found(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every whole republish walked each facet root again with a census walk, to count the
    # facet's publishers: at N=400 in bench/internet.py about 30 p2p_find per root, four
    # roots a publisher, the largest share of its maintenance bytes after pings and
    # stores. The holders the last walk found (those that stored, and those that refused
    # the records as full: a crowded root counts the offer) get them straight, and the
    # two closest a census query; the shard levels follow the count as before. A root
    # that refused them as full (every holder that answered) counts the publishers that
    # offered within the hour (SKETCH_WINDOW): for half of that after an offer, the census
    # queries alone.
    async with _midsize_facet() as (_, _, cluster):
        newcomer = await cluster.join()
        capability = example_capability()
        calls: list[tuple[bytes, bool, bool, bool]] = []
        original_put = DhtNode.put

        def recording_put(
            core: DhtNode, key: bytes, records: Sequence[SignedRecord], now: float,
            *, census: bool = False, holders: Sequence[tuple[int, Address]] | None = None,
            leave_out: Collection[int] = (),
        ) -> object:
            if core is newcomer._core:
                # (offered: to some holder)
                offer = holders is None or any(h not in leave_out for h, _ in holders)
                calls.append((key, census, holders is not None, offer))
            return original_put(
                core, key, records, now, census=census, holders=holders, leave_out=leave_out
            )

        monkeypatch.setattr(DhtNode, "put", recording_put)
        now = int(newcomer.now())
        await newcomer.publish(signed_records("republisher", issued=now))
        roots = {facet_key(name) for name in capability.facets()}
        at_roots = [(census, direct, offer) for k, census, direct, offer in calls if k in roots]
        assert len(at_roots) == len(roots) and at_roots == [(True, False, True)] * len(roots)
        identity = make_identity("republisher")
        assert all((root, identity.public_key) in newcomer._refused for root in roots)
        assert newcomer._sharded
        levels = dict(newcomer._sharded)
        calls.clear()
        await trio.sleep(newcomer._republish_period() + 1)
        at_roots = [(census, direct, offer) for k, census, direct, offer in calls if k in roots]
        # (The settling republishes' censuses in between are census queries alike.)
        assert set(at_roots) == {(True, True, False)} and len(at_roots) >= len(roots)
        assert all(direct and offer for k, _, direct, offer in calls if k not in roots)
        assert newcomer._sharded == levels
        # Half an hour after the offer, offered again (straight to the same holders).
        calls.clear()
        await trio.sleep(SKETCH_WINDOW - newcomer._republish_period())
        at_roots = [(census, direct, offer) for k, census, direct, offer in calls if k in roots]
        assert (True, True, True) in at_roots and len(at_roots) >= len(roots)


async def _publish_growing(cluster: Cluster) -> None:
    """A facet that grows for minutes: the cluster's nodes publish one after another,
    7.5 s apart, ``PUBLISHERS / len(cluster.nodes)`` publishers each."""
    labels = [f"grow-{i}" for i in range(PUBLISHERS)]
    per_node = PUBLISHERS // len(cluster.nodes)
    for index, node in enumerate(cluster.nodes):
        now = int(node.now())
        await node.publish([
            record
            for label in labels[index * per_node : (index + 1) * per_node]
            for record in signed_records(label, issued=now, status_lifetime=STATUS_LIFETIME)
        ])
        await trio.sleep(7.5)


async def test_publishers_follow_a_facet_that_grows_for_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The 40 nodes start one every 7.5 s, each publishing 5 publishers. The early ones saw
    # a small facet and wrote low shard levels; their settle republishes stopped while
    # the facet still grew (at N=10,000, 5,000 publishers published over 14 minutes, and
    # readers, reading the level 4,500 publishers call for, took the facet for 3,541).
    # Settle republishes follow the facet at growing intervals (30, 60, 120 s, ...) up to
    # the republish period, so 90 s after the last publish the read level holds nearly all
    # (counted on its shards' holders: readers' estimates vary too much between runs).
    async with open_cluster(40, seed=12, config=CONFIG) as cluster:
        await _publish_growing(cluster)
        await trio.sleep(90)
        level = level_read(PUBLISHERS, CONFIG.max_records_per_key // 2)
        now = cluster.nodes[0].now()
        held = [
            max(d._core.store.publishers(facet_shard_key(FACET, level, shard), now)
                for d in cluster.nodes)
            for shard in range(2**level)
        ]
        assert sum(held) >= 190, held


async def test_a_low_count_moves_the_written_levels_only_once_the_larger_is_old(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two holders at random answer a root's census; one that became a holder lately has
    # counted part of the hour's offers. A low count within _COUNT_MEMORY of a larger one
    # leaves the levels a publisher writes as they are (each move is a walk to a new
    # level, and settling anew); a facet that shrank is followed once the larger is old.
    async with _midsize_facet() as (_, _, cluster):
        newcomer = await cluster.join()
        now = int(newcomer.now())
        await newcomer.publish(signed_records("counted", issued=now))
        levels = dict(newcomer._sharded)
        assert levels and all(min(written) >= 3 for written in levels.values())
        roots = {facet_key(name) for name in example_capability().facets()}
        original = RecordStore.publishers

        def a_quarter_at_roots(store: RecordStore, key: bytes, now: float) -> int:
            count = original(store, key, now)
            return count // 4 if key in roots else count

        monkeypatch.setattr(RecordStore, "publishers", a_quarter_at_roots)
        await trio.sleep(_SETTLE_DELAY + 5)  # a settling republish's census
        assert newcomer._sharded == levels
        await trio.sleep(_COUNT_MEMORY - _SETTLE_DELAY - 60)  # more settles, a whole put
        assert newcomer._sharded == levels
        await trio.sleep(newcomer._republish_period() + 60)
        assert newcomer._sharded and newcomer._sharded != levels
        assert all(
            max(newcomer._sharded[key]) < max(written) for key, written in levels.items()
        )


async def test_a_whole_republish_goes_straight_to_the_shard_levels_settles_wrote(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A facet that grows for minutes: the settling republishes write new shard levels.
    # The holders their puts reached are kept like a whole put's, so the next whole
    # republish goes straight to them. (A settling republish once took those puts for a
    # root's census query and walked again: at N=400 in bench/internet.py, find_node went
    # from 2 to 247 KB per node per hour.) No directory walks to a key it put to before.
    async with open_cluster(40, seed=12, config=CONFIG) as cluster:
        put_before: dict[tuple[int, PublicKey], set[bytes]] = {}
        walked_again: list[bytes] = []
        settle_levels = 0
        original_put = DhtNode.put

        def recording_put(
            core: DhtNode, key: bytes, records: Sequence[SignedRecord], now: float,
            *, census: bool = False, holders: Sequence[tuple[int, Address]] | None = None,
            leave_out: Collection[int] = (),
        ) -> object:
            nonlocal settle_levels
            # (A node's publishers share keys and put at once: by publisher.)
            mine = put_before.setdefault((id(core), records[0].publisher), set())
            if holders is None and key in mine:
                walked_again.append(key)
            if holders is None and not census and key not in mine:
                settle_levels += any(d._settling for d in cluster.nodes if d._core is core)
            mine.add(key)
            return original_put(
                core, key, records, now, census=census, holders=holders, leave_out=leave_out
            )

        monkeypatch.setattr(DhtNode, "put", recording_put)
        await _publish_growing(cluster)
        assert settle_levels > 0  # settles wrote new shard levels
        before = sum(d.statistics().direct_puts for d in cluster.nodes)
        # Past every directory's whole republish (half the status lifetime after its
        # publish).
        await trio.sleep(STATUS_LIFETIME / 2 + 30)
        assert sum(d.statistics().direct_puts for d in cluster.nodes) - before > 1000
        assert walked_again == []
