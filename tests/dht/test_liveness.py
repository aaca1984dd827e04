"""Routing-table liveness and maintenance traffic, with explicit time: dead contacts found
out and dropped, quiet buckets left alone, republishing paced by the records' lifetimes."""

from __future__ import annotations

import itertools
import random

import pytest
import trio
import trio.testing

from p2pbuild import MalformedError, SignedRecord
from p2pbuild.dht import DhtConfig, DhtNode, Directory
from p2pbuild.dht import _wire as wire
from p2pbuild.dht._routing import RoutingTable
from p2pbuild.testing import (
    SANSIO_EPOCH,
    build_network,
    example_capability,
    example_status,
    open_cluster,
)

T0 = SANSIO_EPOCH


def _methods(sent: list[tuple[bytes, tuple[str, int], tuple[str, int]]]) -> list[str]:
    methods = []
    for data, _, _ in sent:
        frame = wire.decode_datagram(data, max_size=2048)
        if isinstance(frame, wire.Request):
            methods.append(frame.method)
    return methods


def test_a_confirmed_failure_removes_a_contact_at_once() -> None:
    table = RoutingTable(0, k=4, replacements=2, max_failures=3, now=0.0)
    table.seen(1 << 100, ("10.0.0.1", 1), 0.0, rtt=0.01)
    table.seen(2 << 100, ("10.0.0.2", 1), 0.0, rtt=0.01)
    # An unconfirmed failure (a p2p_find a stock peer would ignore) only counts...
    assert not table.failed(1 << 100)
    assert table.get(1 << 100) is not None
    # ...a confirmed one (a ping or find_node unanswered, resent, unanswered) removes.
    assert table.failed(2 << 100, confirmed=True)
    assert table.get(2 << 100) is None


def test_a_bucket_is_stale_only_when_nothing_changed_it() -> None:
    table = RoutingTable(0, k=4, replacements=2, max_failures=3, now=0.0)
    answered, asked = 1 << 150, 1 << 100
    table.seen(answered, ("10.0.0.1", 1), 0.0, rtt=0.01)
    table.seen(asked, ("10.0.0.2", 1), 0.0)
    # At 3000 s the first contact answers us again, the second only sends requests.
    table.seen(answered, ("10.0.0.1", 1), 3000.0, rtt=0.01)
    table.seen(asked, ("10.0.0.2", 1), 3000.0)
    stale = table.stale_buckets(3600.0, 3600.0)
    assert stale == [table.bucket_index(asked)]
    # A lookup through a bucket counts as a change too.
    table.touch(asked, 3600.0)
    assert table.stale_buckets(3600.0, 3600.0) == []


def test_silent_contacts_are_pinged_and_the_dead_dropped() -> None:
    # (A fixed probe period: the dead found do not shorten it, see the test below.)
    config = DhtConfig(liveness_interval=300.0, liveness_interval_min=300.0)
    net = build_network(30, config)
    net.run(limit=1.0)  # the last joiner's last lookup queries, sent as its join ended
    everyone = list(net.nodes)
    dead = set(everyone[5:10])
    net.dead.update(dead)
    live = [node for address, node in net.nodes.items() if address not in dead]
    entries = sum(len(node.routing) for node in live)
    assert any(c.address in dead for node in live for c in node.routing)
    live_contacts = {
        id(node): {c.node_id for c in node.routing if c.address not in dead} for node in live
    }
    before = len(net.sent)
    # One liveness interval and a maintenance tick: every silent contact has been pinged.
    net.run(limit=config.liveness_interval + 2 * config.maintenance_interval)
    for node in live:
        held = {c.node_id for c in node.routing}
        assert not any(c.address in dead for c in node.routing)
        assert held >= live_contacts[id(node)]  # nobody alive was dropped
    # Pings only (no bucket needed a refresh lookup), each contact's at most twice in
    # these 420 s (a dead one's: sent and resent).
    methods = _methods(net.sent[before:])
    assert set(methods) == {wire.PING}
    assert len(methods) <= 2 * entries


def _refreshes(answered_at: float) -> list[str]:
    """Methods a node sends at its maintenance tick an hour after it met its contacts,
    which last answered it at ``answered_at``."""
    config = DhtConfig()
    node = DhtNode(b"\x00" * 20, now=T0, rng=random.Random(1), config=config)
    contacts = [(node.own ^ (1 << 159) ^ n, (f"10.1.0.{n}", 1)) for n in range(1, 4)]
    for node_id, address in contacts:
        node.routing.seen(node_id, address, T0, rtt=0.05)
        node.routing.seen(node_id, address, answered_at, rtt=0.05)
    node.handle_timer(T0 + config.refresh_interval + 1)
    return [
        frame.method
        for data, _ in node.datagrams_to_send()
        if isinstance(frame := wire.decode_datagram(data, max_size=2048), wire.Request)
    ]


def test_a_bucket_that_answered_lately_is_not_refreshed() -> None:
    # Contacts that answered 10 minutes ago: silent ones are pinged, no refresh lookup.
    assert set(_refreshes(T0 + 3000)) == {wire.PING}
    # Nothing answered for an hour: the bucket is refreshed (a find_node walk) too.
    assert wire.FIND_NODE in _refreshes(T0)


def test_touching_a_bucket_pings_its_silent_oldest_and_drops_it_dead() -> None:
    config = DhtConfig(k=4)
    node = DhtNode(b"\x00" * 20, now=T0, rng=random.Random(1), config=config)
    own = node.own
    old, other = own ^ (1 << 159) ^ 1, own ^ (1 << 159) ^ 2
    node.routing.seen(old, ("10.1.0.1", 1), T0, rtt=0.05)
    node.routing.seen(other, ("10.1.0.2", 1), T0 + 30, rtt=0.05)
    # A request from the other contact of the bucket, 61 s later: the oldest has been
    # silent for longer than eviction_ping_after, so it is pinged.
    now = T0 + 61
    node.receive_datagram(
        wire.encode_request(b"q" * 20, wire.PING, [other.to_bytes(20, "big")]),
        ("10.1.0.2", 1), now,
    )
    out = node.datagrams_to_send()
    pings = [address for data, address in out
             if isinstance(wire.decode_datagram(data, max_size=2048), wire.Request)]
    assert pings == [("10.1.0.1", 1)]
    # It never answers: resent once, then dropped although no replacement waits.
    while node.routing.get(old) is not None and now < T0 + 120:
        now = node.get_timer()
        node.handle_timer(now)
        pings += [address for data, address in node.datagrams_to_send()
                  if isinstance(wire.decode_datagram(data, max_size=2048), wire.Request)]
    assert node.routing.get(old) is None
    assert pings == [("10.1.0.1", 1)] * 2
    assert node.routing.get(other) is not None


def test_a_fresh_bucket_sends_no_ping_when_touched() -> None:
    node = DhtNode(b"\x00" * 20, now=T0, rng=random.Random(1), config=DhtConfig(k=4))
    own = node.own
    first, second = own ^ (1 << 159) ^ 1, own ^ (1 << 159) ^ 2
    node.routing.seen(first, ("10.1.0.1", 1), T0, rtt=0.05)
    node.routing.seen(second, ("10.1.0.2", 1), T0, rtt=0.05)
    node.receive_datagram(
        wire.encode_request(b"q" * 20, wire.PING, [second.to_bytes(20, "big")]),
        ("10.1.0.2", 1), T0 + 59,
    )
    out = node.datagrams_to_send()
    assert [type(wire.decode_datagram(d, max_size=2048)) for d, _ in out] == [wire.Response]


def _puts(directory: Directory) -> int:
    """Puts a directory began: walked, or straight to the holders a walk found."""
    statistics = directory.statistics()
    return statistics.lookups + statistics.direct_puts


async def test_republishing_follows_the_shortest_record_lifetime(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(8, seed=3) as cluster:
        directory = cluster.nodes[0]
        identity = cluster.identities[0]
        interval = directory.config.republish_interval
        now = int(directory.now())
        await directory.publish([
            SignedRecord.create(identity, example_capability(), seq=1, issued_at=now,
                                lifetime=4 * int(interval)),
            SignedRecord.create(identity, example_status(), seq=1, issued_at=now,
                                lifetime=1800),
        ])
        puts = _puts(directory)
        # The status lives 30 minutes: republished at half its life, not before.
        await trio.sleep(899)
        assert _puts(directory) == puts
        await trio.sleep(2)
        first = _puts(directory)
        assert first > puts
        # Once the status is gone, the capability alone goes hourly.
        await trio.sleep(1800 - 901 + 1)
        second = _puts(directory)
        await trio.sleep(interval - 2)
        assert _puts(directory) == second
        await trio.sleep(4)
        assert _puts(directory) > second


def _pings_answered(
    node: DhtNode, alive: dict[tuple[str, int], int], until: float
) -> list[tuple[float, tuple[str, int]]]:
    """Fire ``node``'s timers until ``until``, the contacts at ``alive`` (address: id)
    answering its pings at once and the others never; returns the pings sent, with times."""
    pings: list[tuple[float, tuple[str, int]]] = []
    now = node.get_timer()
    while now <= until:
        node.handle_timer(now)
        for data, address in node.datagrams_to_send():
            frame = wire.decode_datagram(data, max_size=2048)
            assert isinstance(frame, wire.Request) and frame.method == wire.PING
            pings.append((now, address))
            if address in alive:
                reply = wire.encode_ping_reply(alive[address].to_bytes(20, "big"))
                node.receive_datagram(wire.encode_response(frame.msg_id, reply), address, now)
        now = node.get_timer()
    return pings


def _node_with_contacts(
    count: int, config: DhtConfig | None = None
) -> tuple[DhtNode, dict[tuple[str, int], int]]:
    node = DhtNode(b"\x00" * 20, now=T0, rng=random.Random(1), config=config or DhtConfig())
    contacts = {(f"10.1.0.{n}", 1): node.own ^ (1 << 159) ^ n for n in range(1, count + 1)}
    for address, node_id in contacts.items():
        node.routing.seen(node_id, address, T0, rtt=0.05)
    return node, contacts


def test_a_contact_being_pinged_is_not_pinged_again() -> None:
    node, contacts = _node_with_contacts(20)
    # All 20 fall silent together and are pinged at 300 s. The first answer touches the
    # bucket, whose oldest contact is then one of those being pinged: no second ping.
    pings = _pings_answered(node, contacts, T0 + 1000)
    assert [at - T0 for at, _ in pings] == [300.0] * 20 + [600.0] * 20 + [900.0] * 20
    assert sorted(address for _, address in pings) == sorted([*contacts] * 3)


def test_the_probe_period_shortens_when_contacts_die_and_relaxes_when_none_do() -> None:
    config = DhtConfig()
    node, contacts = _node_with_contacts(20)
    # A quiet network: every contact answers, each is pinged once per liveness_interval.
    pings = _pings_answered(node, contacts, T0 + 1000)
    assert node.probe_period(T0 + 1000) == config.liveness_interval
    assert len(pings) == 3 * 20
    # Then half of them die. The pings of the next round find them dead: a contact dies
    # at a rate of about 10 per 20 contacts' 300 s of silence, and the period that keeps
    # 0.5% of the table dead is 0.005 * 6000 / (0.6 * 10) = 5 s: the floor, 15 s.
    alive = dict(list(contacts.items())[:10])
    pings = _pings_answered(node, alive, T0 + 1210)
    floor = config.liveness_interval_min
    assert floor == 15.0
    assert node.probe_period(T0 + 1210) == floor
    dead = [address for address in contacts if address not in alive]
    assert sorted(address for _, address in pings) == sorted([*contacts, *dead])  # resent
    assert {c.address for c in node.routing} == set(alive)
    # The survivors, which answered at 1200 s, are checked again after 15 s of silence
    # (at the first check, a fifth of the period apart, from then on), not at 1500 s.
    again = _pings_answered(node, alive, T0 + 1200 + 1.5 * floor)
    assert sorted(address for _, address in again) == sorted(alive)
    assert all(1200 + floor <= at - T0 <= 1200 + floor + floor / 5 + 1 for at, _ in again)
    # No contact dies any more: the pings that find them alive lengthen the period again,
    # back to the quiet network's within half an hour.
    _pings_answered(node, alive, T0 + 3300)
    assert node.probe_period(T0 + 3300) == config.liveness_interval


def test_a_liveness_ping_answered_late_keeps_its_contact() -> None:
    node, contacts = _node_with_contacts(1)
    (address, node_id), = contacts.items()
    # Measured at 50 ms: an RPC's timeout is about 150 ms. Pinged at 300 s, it answers
    # after 500 ms (a slow moment of its link), within max_rpc_timeout.
    node.handle_timer(T0 + 300)
    (data, to), = node.datagrams_to_send()
    assert to == address
    frame = wire.decode_datagram(data, max_size=2048)
    assert isinstance(frame, wire.Request)
    while node.get_timer() < T0 + 300.5:
        node.handle_timer(node.get_timer())
    reply = wire.encode_ping_reply(node_id.to_bytes(20, "big"))
    node.receive_datagram(wire.encode_response(frame.msg_id, reply), address, T0 + 300.5)
    node.handle_timer(T0 + 310)
    assert node.routing.get(node_id) is not None
    assert node.statistics().dropped == {}


def test_a_dht_client_checks_its_quiet_contacts_every_minute() -> None:
    # No unsolicited request reaches a client: only its own requests show it who is
    # alive, so in a quiet network it checks each contact after a minute of silence (a
    # public node, whose contacts' requests touch its buckets, after 5).
    config = DhtConfig(reachability="client")
    node, contacts = _node_with_contacts(20, config)
    pings = _pings_answered(node, contacts, T0 + 1000)
    assert node.probe_period(T0 + 1000) == config.client_liveness_interval == 60.0
    # Checked every 12 s (a fifth of the period) from 60 s on: first at 60 s.
    rounds = [60.0 * n for n in range(1, 17)]
    assert [at - T0 for at, _ in pings] == [at for at in rounds for _ in range(20)]
    assert sorted(address for _, address in pings) == sorted([*contacts] * 16)


def test_a_node_that_finds_itself_behind_nat_checks_its_contacts_as_a_client() -> None:
    config = DhtConfig(reachability="auto")
    node, contacts = _node_with_contacts(20, config)
    assert node.probe_period(T0) == config.liveness_interval
    _pings_answered(node, contacts, T0 + config.reachability_timeout + 1)
    assert node.client
    assert node.probe_period(T0 + config.reachability_timeout + 1) == 60.0


def test_a_probe_factor_rides_after_a_response_and_nothing_else_does() -> None:
    msg_id = b"m" * 20
    reply = wire.encode_ping_reply(b"\x07" * 20)
    plain = wire.encode_response(msg_id, reply)
    assert wire.encode_response(msg_id, reply, probe_factor=1) == plain
    framed = wire.encode_response(msg_id, reply, probe_factor=3)
    assert framed == plain + wire.PROBE_FLAG + b"\x03"
    decoded = wire.decode_datagram(framed, max_size=2048)
    assert isinstance(decoded, wire.Response)
    assert decoded.value == reply and decoded.probe_factor == 3
    assert wire.decode_datagram(plain, max_size=2048) == wire.Response(msg_id, reply, 1)
    assert wire.encode_response(msg_id, reply, probe_factor=1000)[-1] == wire.MAX_PROBE_FACTOR
    for tail in (wire.PROBE_FLAG, wire.PROBE_FLAG + b"\x01", wire.PROBE_FLAG + b"\x03\x00",
                 b"\x00", b"\x04\x03", wire.COOKIE_FLAG + b"\x03"):
        with pytest.raises(MalformedError):
            wire.decode_datagram(plain + tail, max_size=2048)


def _pinged_by(
    node: DhtNode, pingers: int, every: float, until: float, start: float = 0.0
) -> list[int]:
    """``pingers`` nodes ping ``node`` every ``every`` seconds (spread over the period) for
    ``until`` seconds from ``start`` seconds after T0; the probe factors of its answers,
    in order."""
    factors = []
    steps = int(until / every)
    for step in range(steps):
        for n in range(pingers):
            now = T0 + start + step * every + every * n / pingers
            address = (f"10.2.{n // 250}.{n % 250 + 1}", 1)
            sender = (0xAB << 152) ^ (n + 1)
            request = wire.encode_request(
                bytes([n % 256]) * 20, wire.PING, [sender.to_bytes(20, "big")]
            )
            node.receive_datagram(request, address, now)
            for data, _ in node.datagrams_to_send():
                frame = wire.decode_datagram(data, max_size=2048)
                if isinstance(frame, wire.Response):
                    factors.append(frame.probe_factor)
    return factors


def test_a_node_pinged_by_far_more_nodes_than_a_table_holds_asks_them_to_back_off() -> None:
    # A node with 20 contacts (its probe period the quiet 300 s), pinged every 300 s by
    # 40 nodes (twice its table: the mean a node of a NAT'd farm sees) answers plainly;
    # by 200 (a node listed in ten times as many tables as the mean, where early joiners
    # end up) it asks them to wait 5 times longer, and keeps asking as they do.
    quiet = DhtConfig().liveness_interval
    node, _ = _node_with_contacts(20)
    assert set(_pinged_by(node, 40, quiet, 4 * quiet)) == {1}
    node, _ = _node_with_contacts(20)
    factors = _pinged_by(node, 200, quiet, 4 * quiet)
    assert factors[0] == 1 and factors[-1] == 5
    # Its pingers back off, but none waits longer than the quiet period, the window it
    # counts them over: it still counts 200 of them, and keeps asking.
    assert set(_pinged_by(node, 200, quiet, 2 * quiet, start=4 * quiet)) == {5}


def test_a_contact_that_asked_for_a_probe_factor_is_pinged_that_much_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under churn: the probe period at its 15 s floor (held there; how churn brings it
    # down is the test above).
    config = DhtConfig()
    floor, quiet = config.liveness_interval_min, config.liveness_interval
    monkeypatch.setattr(DhtNode, "probe_period", lambda self, now: floor)
    node = DhtNode(b"\x00" * 20, now=T0, rng=random.Random(1), config=config)
    # One contact per bucket (the liveness check alone pings them; see the next test).
    contacts = {(f"10.1.0.{n}", 1): node.own ^ (1 << (160 - n)) for n in range(1, 4)}
    for address, node_id in contacts.items():
        node.routing.seen(node_id, address, T0, rtt=0.05)
    factors = dict(zip(contacts, (1, 2, 100), strict=True))
    pings: dict[tuple[str, int], list[float]] = {address: [] for address in contacts}
    node.handle_timer(T0)
    now = node.get_timer()
    while now <= T0 + 1000:
        node.handle_timer(now)
        for data, address in node.datagrams_to_send():
            frame = wire.decode_datagram(data, max_size=2048)
            assert isinstance(frame, wire.Request) and frame.method == wire.PING
            pings[address].append(now - T0)
            reply = wire.encode_ping_reply(contacts[address].to_bytes(20, "big"))
            node.receive_datagram(
                wire.encode_response(frame.msg_id, reply, probe_factor=factors[address]),
                address, now,
            )
        now = node.get_timer()

    def gaps(times: list[float]) -> set[float]:
        return {round(later - earlier) for earlier, later in itertools.pairwise(times)}

    calm, busy, busiest = pings.values()
    # First checked at a fifth of the quiet period, then every fifth of the period:
    # pinged 15 to 18 s after it was last heard.
    assert calm[0] == quiet / 5 and gaps(calm) <= {15, 18} and len(calm) > 50
    # Pinged once after the period (it had said nothing), then after twice the period.
    assert busy[0] == calm[0] and gaps(busy) <= {30, 33} and len(busy) > 25
    # 100 times the period is more than eviction_ping_after (a minute): that, then.
    assert config.eviction_ping_after == 60.0
    assert busiest[0] == calm[0] and gaps(busiest) <= {60, 63} and len(busiest) > 13


def test_a_bucket_pings_its_oldest_contact_when_touched_no_sooner_than_it_asked() -> None:
    table = RoutingTable(0, k=4, replacements=2, max_failures=3, now=0.0, fresh_for=60.0)
    oldest, chatty = (1 << 150, ("10.0.0.1", 1)), ((1 << 150) + 1, ("10.0.0.2", 1))
    table.seen(*oldest, 0.0, rtt=0.01)
    table.seen(*chatty, 0.0, rtt=0.01)
    # A contact heard from: its bucket's least recently seen one is checked once silent
    # for fresh_for, here 60 s...
    peer = table.seen(*chatty, 61.0, rtt=0.01)
    assert peer is not None and peer.node_id == oldest[0]
    table.ping_answered(oldest[0])
    table.seen(*oldest, 61.0, rtt=0.01)
    # ...or that times the probe factor it asked for.
    peer = table.get(oldest[0])
    assert peer is not None
    peer.probe_factor = 4
    assert table.seen(*chatty, 61.0 + 239.0, rtt=0.01) is None
    peer = table.seen(*chatty, 61.0 + 241.0, rtt=0.01)
    assert peer is not None and peer.node_id == oldest[0]


def test_a_client_that_sees_contacts_die_now_and_then_keeps_probing_often() -> None:
    # A DHT client's table is small: under steady churn it sees a death only every minute
    # or so, irregularly. Its probe period must not relax back to the quiet network's in
    # every longer gap between deaths, or the next death stays listed for minutes.
    config = DhtConfig(reachability="client")
    node, contacts = _node_with_contacts(20, config)
    alive = dict(contacts)
    _pings_answered(node, alive, T0 + 600)
    assert node.probe_period(T0 + 600) == config.client_liveness_interval
    # Then one contact dies after gaps of 40, 40 and 160 s, over and over (a contact's
    # death rate about 1 / (20 * 80 s): a period of 0.005 * 1600 / 0.6 = 13 s, the
    # floor), each replaced by a newcomer that answers.
    victims = iter(list(contacts))
    gaps = itertools.cycle([40, 40, 160])
    deaths = list(itertools.accumulate(next(gaps) for _ in range(12)))
    died: dict[tuple[str, int], float] = {}
    gone: dict[tuple[str, int], float] = {}
    for second in range(601, 601 + deaths[-1] + 200):
        now = T0 + second
        if second - 600 in deaths:
            victim = next(victims)
            del alive[victim]
            died[victim] = now
            newcomer = (f"10.2.0.{len(died)}", 1)
            alive[newcomer] = node.own ^ (1 << 158) ^ len(died)
            node.routing.seen(alive[newcomer], newcomer, now, rtt=0.05)
        _pings_answered(node, alive, now)
        listed = {c.address for c in node.routing}
        gone.update((v, now) for v in died if v not in listed and v not in gone)
    delays = [gone[v] - died[v] for v in died]
    # The first deaths are found late (the node had seen none die); from the fifth on,
    # each is found within 30 s: the period stayed near its floor (15 s) through the gaps.
    assert all(delay <= 30.0 for delay in delays[4:]), delays
    # Once no contact has died for a few of those gaps, the churn is over: the quiet
    # network's period again (not a long memory's pings for ten minutes more).
    last = T0 + 600 + deaths[-1]
    _pings_answered(node, alive, last + 300)
    assert node.probe_period(last + 300) == config.client_liveness_interval
