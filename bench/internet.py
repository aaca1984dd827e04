"""The directory at internet scale: N nodes on the simulated internet of ``p2pbuild.testing``.

Prints one JSON object to stdout (progress to stderr), each figure with its goal beside it.
Every node is the real sans-IO core, trio driver and ``Directory`` (as over UDP), on
``SimulatedInternet``: Gamma-distributed round trips (median 80 ms, p99 ~390 ms; the
source and parameters are in ``p2pbuild/testing/_internet.py``), 1% loss, NAT for
``--nat`` of the nodes (they run as DHT clients, ``reachability = "client"``), on trio's
virtual clock. Times are simulated seconds unless named ``wall``.

Phases:

1. **join**: N nodes join through random earlier public nodes (a share ``--nat`` behind NAT),
   a few at a time at an even pace over one bucket-refresh interval (an hour of simulated
   time), so that buckets fall due for refresh at staggered times, as in a farm that has run
   for a while, in every later phase.
2. **publish**: ``--publishers`` nodes (N / 2 by default) publish a capability (all
   ``x86_64``, so one facet holds them all) and a status through ``Directory.publish``.
3. **lookups under churn**: ``--lookups`` node-key lookups (``Directory.get(node_key)``) of
   random live publishers from random live nodes, while ``--churn`` of the nodes are
   replaced (silent leave, a new node joins; before the next lookup, or with
   ``--overlap-churn`` while the next lookups run); p50/p99 and success (the publisher's
   capability came back).
4. **routing tables**: the share of all routing-table entries that are live, reachable
   (public) nodes; NAT'd nodes listed anywhere. Taken right after the churn (the goal's
   figure: contacts of nodes that left seconds ago are still listed until a ping finds
   them out), and again after phase 5 (``after_finds``, with the simulated seconds since
   the churn ended); each also apart for the public nodes' tables (the ones lookups
   route through) and the DHT clients' tables behind NAT.
5. **sampled facet find**: ``Directory.find_sample(Query(arch="x86_64"), 64)`` from random
   public nodes, each done twice (a first find, then a warm one): bytes of the find's own
   requests and replies (``FacetSample.bytes_in + bytes_out``; ``node_bytes_p99`` is all
   the reader's node sent and received meanwhile, a republish of its own records that fell
   then included), time, and waves of requests beyond the first walk (``FacetSample.rounds - 1``:
   a second wave of census walks, or the round trip of parts). With ``--big-facet P``, P
   more publishers (``aarch64``, records hosted by the public nodes) and the same figures
   for ``Query(arch="aarch64")``, 5 simulated minutes after they published: the full
   mode's 5,000-publisher facet at less cost (the goals then use these).
6. **load**: ``--rate`` sampled finds per second for ``--load-seconds`` from 20 dispatcher
   nodes (of the big facet with ``--big-facet``); requests served per node over the
   window, max over mean. Beside it, what the busiest node was asked (by method) and in
   how many routing tables it is (liveness pings come from those), and the same ratio
   without pings (the finds' own requests, and whatever republish fell then).
7. **placement**: a dispatcher's ``DirectoryFinder`` (sample 64, directory cache refreshed
   every 30 s in the background, as the dispatcher service runs it) and ``select_nodes``
   for ``--placements`` builds, one every second; p99 of the simulated time and of the
   wall time. (A refresh the placement waited for took a sampled find's time, about a
   second: see *sampled facet find*.)
8. **maintenance**: the network idles for ``--idle`` simulated seconds while directories
   republish (hourly, or at half the lifetime of their shortest-lived record: every 900 s
   here while the 30-minute status lives), buckets refresh and silent contacts are pinged;
   bytes sent by all nodes, per node per hour; and the routing tables' reachable share
   again at the end of it (the churn's dead contacts found out by then). With
   ``--status-interval S``, each publisher's status lives 5 minutes and a new one follows
   every ``S`` seconds from its publish on, as a node daemon's statuses do.

Each phase's figures are also printed to stderr as it ends.

Usage: ``python bench/internet.py [--short] [--n N] [--seed S]``; ``--short`` is the CI mode
(N = 2,000, 300 publishers, fewer operations; a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import random
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import latency_summary, percentile

from p2pbuild import Identity, MalformedError, SignedRecord
from p2pbuild._jobs import BuildType
from p2pbuild.dht import DhtConfig, DirectoryClosedError, Query, facet_key, node_key
from p2pbuild.dht import _wire as wire
from p2pbuild.dispatcher._nodes import DirectoryFinder
from p2pbuild.dispatcher._select import Candidate, Requirements, select_nodes
from p2pbuild.testing import (
    SwarmNode,
    example_capability,
    example_status,
    make_identity,
    make_trust_list,
    open_swarm,
)
from p2pbuild.testing._internet import RTT_SCALE, RTT_SHAPE, Swarm

# A node daemon's status lifetime (``status_lifetime_s``).
_STATUS_LIFETIME = 300

GOALS = {
    "lookup_p50_ms": ("<=", 300.0),
    "lookup_p99_ms": ("<=", 1500.0),
    "lookup_success_rate": (">=", 0.995),
    "facet_find_bytes_p99": ("<=", 65536),
    "facet_find_round_trips_beyond_walk_max": ("<=", 2),
    "placement_p99_ms": ("<=", 1000.0),
    "load_max_over_mean": ("<=", 5.0),
    "routing_entries_reachable": (">=", 0.99),
    "maintenance_bytes_per_node_hour": ("<=", 1_000_000),
}


def _progress(message: str) -> None:
    print(f"bench/internet.py: {message}", file=sys.stderr, flush=True)


class _Phases:
    """Wall time, simulated time and datagrams sent per phase (``out["phases"]``), so
    that where a run spends its time shows in every run."""

    def __init__(self, swarm: Swarm) -> None:
        self._swarm = swarm
        self.done: dict[str, dict[str, float]] = {}
        self._start()

    def _start(self) -> None:
        self._wall = time.monotonic()
        self._cpu = time.process_time()
        self._simulated = trio.current_time()
        self._sent = self._swarm.internet.counters["sent"]

    def end(self, name: str) -> None:
        self.done[name] = {
            "wall_s": round(time.monotonic() - self._wall, 1),
            "cpu_s": round(time.process_time() - self._cpu, 1),
            "simulated_s": round(trio.current_time() - self._simulated, 1),
            "datagrams": self._swarm.internet.counters["sent"] - self._sent,
        }
        _progress(f"{name}: {self.done[name]}")
        self._start()


def _records(
    node: SwarmNode, now: float, seq: int = 1, status_lifetime: int = 1800
) -> list[SignedRecord]:
    return [
        SignedRecord.create(node.identity, example_capability(), seq=seq,
                            issued_at=int(now), lifetime=4 * 3600),
        SignedRecord.create(node.identity, example_status(), seq=seq,
                            issued_at=int(now), lifetime=status_lifetime),
    ]


def _big_records(identity: Identity, now: float) -> list[SignedRecord]:
    return [
        SignedRecord.create(identity, example_capability(arch="aarch64"), seq=1,
                            issued_at=int(now), lifetime=4 * 3600),
        SignedRecord.create(identity, example_status(), seq=1,
                            issued_at=int(now), lifetime=1800),
    ]


async def _status_loop(node: SwarmNode, interval: float, phase: float) -> None:
    """Publish a new status of ``node`` every ``interval`` seconds (from ``phase`` of an
    interval on) with a 5-minute lifetime, as a node daemon does (``status_interval_s``,
    ``status_lifetime_s``), while it lives."""
    await trio.sleep(phase * interval)
    seq = 2
    while node.alive:
        now = node.directory.now()
        status = SignedRecord.create(
            node.identity, example_status(), seq=seq, issued_at=int(now),
            lifetime=_STATUS_LIFETIME,
        )
        try:
            await node.directory.publish([status])
        except DirectoryClosedError:
            return  # (it left meanwhile)
        seq += 1
        await trio.sleep(interval)


async def _finds(swarm: Swarm, query: Query, finds: int) -> dict[str, Any]:
    """``finds`` sampled finds of 64 from random public nodes, each followed by a second
    one from the same node: bytes of each find's requests and replies (``bytes_*``: a
    reader that does not know the facet yet; ``warm_bytes_*``: one that read it a moment
    ago, as a dispatcher's finds are), time, and waves of requests beyond the first walk
    (``FacetSample.rounds - 1``: a wave of census walks, or the one round trip of parts).
    ``returned_short``: finds that returned fewer than 64; ``topped_up``: finds whose parts
    came short and that asked for more parts.
    ``node_bytes_p99``: all the reader's node sent and received while its first find ran,
    its own republish or refresh when one fell then included."""
    sizes: list[int] = []
    warm: list[int] = []
    node: list[int] = []
    times: list[float] = []
    waves: list[int] = []
    returned: list[int] = []
    estimates: list[int] = []
    topped_up = 0
    for _ in range(finds):
        reader = swarm.rng.choice(swarm.alive(nat=False))
        for sizes_of in (sizes, warm):
            before_bytes = _bytes(reader)
            before_more = reader.directory.statistics().sample_more
            begun = trio.current_time()
            sample = await reader.directory.find_sample(query, 64)
            topped_up += reader.directory.statistics().sample_more > before_more
            sizes_of.append(sample.bytes_in + sample.bytes_out)
            if sizes_of is sizes:
                node.append(_bytes(reader) - before_bytes)
                times.append(trio.current_time() - begun)
            waves.append(sample.rounds - 1)
            returned.append(len(sample))
            if len(sample) < 64:
                _progress(
                    f"a find returned {len(sample)} of 64: estimated "
                    f"{sample.estimated_publishers} publishers, {sample.rounds} waves, "
                    f"complete {sample.complete}, "
                    f"{sample.bytes_in + sample.bytes_out} bytes, "
                    f"{'first' if sizes_of is sizes else 'warm'} find"
                )
            estimates.append(sample.estimated_publishers)
    return {
        "finds": finds,
        "want": 64,
        "returned_min": min(returned),
        "returned_short": sum(count < 64 for count in returned),
        "topped_up": topped_up,
        "estimated_publishers_median": sorted(estimates)[len(estimates) // 2],
        "bytes_p50": percentile(sizes, 0.5),
        "bytes_p99": percentile(sizes, 0.99),
        "warm_bytes_p50": percentile(warm, 0.5),
        "warm_bytes_p99": percentile(warm, 0.99),
        "node_bytes_p99": percentile(node, 0.99),
        **latency_summary(times),
        "round_trips_beyond_walk_max": max(waves),
    }


def _bytes(node: SwarmNode) -> int:
    statistics = node.directory.statistics()
    return statistics.bytes_in + statistics.bytes_out


async def _join(swarm: Swarm, count: int, nat_share: float) -> None:
    """``count`` nodes join at an even pace over one bucket-refresh interval (an hour), a
    few at a time: every node's buckets then fall due for refresh at its own time, so the
    later phases run at the steady refresh rate of a farm that has run for a while."""
    client = DhtConfig(reachability="client")
    interval = DhtConfig().refresh_interval
    # Waves at least 5 s apart; small while the network is.
    largest = max(1, math.ceil(count * 5.0 / interval))
    while len(swarm.nodes) < count:
        joined = len(swarm.nodes)
        await trio.sleep_until(interval * joined / count)
        size = min(largest, max(1, joined // 4), count - joined)
        nats = [joined + i >= 20 and swarm.rng.random() < nat_share for i in range(size)]
        await swarm.join_many([(nat, client if nat else None) for nat in nats])


def _routing_share(swarm: Swarm, *, nat: bool | None = None) -> tuple[int, int, int]:
    """Routing-table entries of all live nodes (of the public ones only, ``nat`` False, or
    of those behind NAT, True): in all, live public nodes, NAT'd nodes."""
    public = {n.endpoint.local_address for n in swarm.alive(nat=False)}
    nat_addresses = {n.endpoint.local_address for n in swarm.nodes if n.nat}
    entries = reachable = nat_listed = 0
    for node in swarm.alive(nat=nat):
        for contact in node.directory.contacts():
            address = (contact.host, contact.port)
            entries += 1
            reachable += address in public
            nat_listed += address in nat_addresses
    return entries, reachable, nat_listed


def _count_request(
    methods: Counter[tuple[tuple[str, int], str]],
    finds: Counter[tuple[tuple[str, int], str]],
    roots: frozenset[bytes],
    source: tuple[str, int],
    data: bytes,
    destination: tuple[str, int],
) -> None:
    """Count a request datagram by destination and method (a ``SimulatedInternet.tap``),
    and each ``p2p_find`` by what it asks (:func:`_find_kind`) in ``finds``."""
    try:
        message = wire.decode_datagram(data, max_size=len(data))
    except MalformedError:
        return
    if isinstance(message, wire.Request):
        methods[(destination, message.method)] += 1
        if message.method == wire.P2P_FIND:
            finds[(destination, _find_kind(message, roots))] += 1


def _find_kind(request: wire.Request, roots: frozenset[bytes]) -> str:
    """What a ``p2p_find`` asks: ``census`` (a count and contacts: a census walk's step
    or a direct census query), ``part`` (a part of a sampled read) or ``page`` (a full
    read's page), of a facet's ``root`` key or another (a shard or a node key)."""
    try:
        _, key, cursor = wire.parse_p2p_find_args(request)
        sample = wire.parse_sample_cursor(cursor)
    except MalformedError:
        return "malformed"
    kind = "page" if sample is None else "census" if sample[1] == 0 else "part"
    return f"{kind} {'root' if key in roots else 'other'}"


class _BytesByMethod:
    """Bytes sent per method (a request and its reply count as its method's), by public
    nodes and by DHT clients apart (a ``SimulatedInternet.tap``)."""

    def __init__(self, swarm: Swarm) -> None:
        self._internet = swarm.internet
        self.sent: Counter[tuple[str, str]] = Counter()
        self._asked: dict[bytes, str] = {}

    def __call__(self, source: tuple[str, int], data: bytes, destination: tuple[str, int]) -> None:
        sender = "clients" if self._internet.behind_nat(source) else "public"
        msg_id = data[1:1 + wire.MSG_ID_SIZE]
        if data[:1] == b"\x01":
            self.sent[(sender, self._asked.pop(msg_id, "unknown"))] += len(data)
            return
        try:
            message = wire.decode_datagram(data, max_size=len(data))
        except MalformedError:
            return
        if isinstance(message, wire.Request):
            if len(self._asked) > 1_000_000:  # (unanswered requests)
                self._asked.clear()
            self._asked[msg_id] = message.method
            self.sent[(sender, message.method)] += len(data)

    def per_node_hour(self, nodes: int, seconds: float) -> dict[str, dict[str, int]]:
        """``{sender: {method: bytes per node per hour}}`` (over all ``nodes``)."""
        table: dict[str, dict[str, int]] = {}
        for (sender, method), sent in sorted(self.sent.items()):
            table.setdefault(sender, {})[method] = round(sent / nodes / (seconds / 3600))
        return table


def _load_breakdown(
    swarm: Swarm,
    public: list[SwarmNode],
    served: list[int],
    methods: Counter[tuple[tuple[str, int], str]],
    finds: Counter[tuple[tuple[str, int], str]],
) -> dict[str, Any]:
    """What the busiest public node was asked over the load window (requests sent to it,
    by method, and its ``p2p_find`` by kind; some were lost on the way), in how many
    public nodes' routing tables it is against the mean (liveness pings come from those
    tables), and the load without pings (the finds' own requests, republishes,
    refreshes), max over mean."""
    busiest = public[served.index(max(served))]
    address = busiest.endpoint.local_address
    by_method = {m: c for (d, m), c in sorted(methods.items()) if d == address}
    finds_by_kind = {k: c for (d, k), c in sorted(finds.items()) if d == address}
    listed = sum(len(n.directory.contacts()) for n in public)
    node_id = int.from_bytes(busiest.directory.node_id, "big")
    in_tables = sum(
        n.directory._core.routing.get(node_id) is not None for n in public if n is not busiest
    )
    # Where it stands to the publishers' facet roots (their republishes and settling
    # censuses end at each root's closest holders): its rank by distance to each root
    # among the live public nodes (0: the closest).
    ranks = {}
    for name in example_capability().facets():
        root = int.from_bytes(facet_key(name), "big")
        mine = node_id ^ root
        ranks[name] = sum(
            (int.from_bytes(n.directory.node_id, "big") ^ root) < mine for n in public
        )
    others: Counter[tuple[str, int]] = Counter()
    for (destination, method), count in methods.items():
        if method != wire.PING:
            others[destination] += count
    without = [others[n.endpoint.local_address] for n in public]
    mean = sum(without) / len(without)
    return {
        "busiest": {
            "requests_by_method": by_method,
            "p2p_find_by_kind": finds_by_kind,
            "in_public_tables": in_tables,
            "public_tables_mean_size": round(listed / len(public), 1),
            "rank_to_facet_roots": ranks,
        },
        "without_pings": {
            "requests_mean": round(mean, 2),
            "requests_max": max(without),
            "max_over_mean": round(max(without) / mean, 2) if mean else None,
        },
    }


def _routing_tables(swarm: Swarm) -> dict[str, Any]:
    """The reachable share of all routing-table entries, and apart for the tables of the
    public nodes (the ones lookups route through) and of the DHT clients behind NAT."""
    entries, reachable, nat_listed = _routing_share(swarm)
    table: dict[str, Any] = {
        "entries": entries,
        "reachable_share": round(reachable / entries, 4),
        "nat_nodes_listed": nat_listed,
    }
    for name, nat in (("public_tables", False), ("client_tables", True)):
        entries, reachable, _ = _routing_share(swarm, nat=nat)
        table[name] = {
            "entries": entries,
            "reachable_share": round(reachable / entries, 4) if entries else None,
        }
    return table


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wall = time.monotonic()
    async with open_swarm(args.seed, label="inet-") as swarm:
        rng = swarm.rng
        phases = _Phases(swarm)
        # 1. join
        await _join(swarm, args.n, args.nat)
        out["join"] = {
            "nodes": args.n,
            "behind_nat": len(swarm.alive(nat=True)),
            "simulated_s": round(trio.current_time(), 1),
            "wall_s": round(time.monotonic() - wall, 1),
        }
        _progress(f"joined {args.n} nodes in {out['join']['wall_s']} s")

        phases.end("join")
        gc.freeze()  # the nodes and records so far live on: no more cycle scans of them
        # 2. publish (with --status-interval, each publisher's statuses follow from then
        # on, living 5 minutes, as a node daemon's do; else one status living 30 minutes)
        started = time.monotonic()
        publishers = rng.sample(swarm.nodes, args.publishers)
        stack = contextlib.AsyncExitStack()
        statuses = await stack.enter_async_context(trio.open_nursery())
        lifetime = _STATUS_LIFETIME if args.status_interval else 1800
        for chunk in range(0, len(publishers), args.publish_batch):
            async with trio.open_nursery() as batch:
                for node in publishers[chunk:chunk + args.publish_batch]:
                    records = _records(node, node.directory.now(), status_lifetime=lifetime)
                    batch.start_soon(node.directory.publish, records)
            if args.status_interval:
                for node in publishers[chunk:chunk + args.publish_batch]:
                    statuses.start_soon(_status_loop, node, args.status_interval, rng.random())
        out["publish"] = {
            "publishers": len(publishers),
            "wall_s": round(time.monotonic() - started, 1),
        }
        _progress(f"published {len(publishers)} in {out['publish']['wall_s']} s")

        phases.end("publish")
        gc.freeze()  # (and now the records)
        # 3. node-key lookups while nodes are replaced
        latencies: list[float] = []
        successes = 0
        replaced = 0
        to_replace = round(args.churn * args.n)
        spacing = args.lookups / max(to_replace, 1)
        async with trio.open_nursery() as joining:
            for index in range(args.lookups):
                while replaced < to_replace and index >= replaced * spacing:
                    leaving = rng.choice(swarm.alive()[20:])
                    swarm.leave(leaving)
                    nat = rng.random() < args.nat
                    config = DhtConfig(reachability="client") if nat else None
                    if args.overlap_churn:
                        joining.start_soon(partial(swarm.join, nat=nat, config=config))
                    else:
                        await swarm.join(nat=nat, config=config)
                    replaced += 1
                live_publishers = [p for p in publishers if p.alive]
                target = rng.choice(live_publishers)
                reader = rng.choice(swarm.alive())
                begun = trio.current_time()
                got = await reader.directory.get(node_key(target.identity.public_key))
                latencies.append(trio.current_time() - begun)
                successes += any(r.publisher == target.identity.public_key for r in got)
        out["lookups"] = {
            "lookups": args.lookups,
            "nodes_replaced": replaced,
            **latency_summary(latencies),
            "success_rate": round(successes / args.lookups, 4),
        }
        _progress(f"lookups {out['lookups']}")

        phases.end("lookups")
        # 4. routing tables (right after the churn; again after the finds below)
        churn_ended = trio.current_time()
        out["routing_tables"] = _routing_tables(swarm)

        phases.end("routing_tables")
        # 5. sampled facet finds (and, with --big-facet, of a facet of that many publishers)
        query = Query(arch="x86_64")
        out["facet_find"] = {
            "facet_publishers": len([p for p in publishers if p.alive]),
            **await _finds(swarm, query, args.finds),
        }
        _progress(f"facet finds {out['facet_find']}")
        if args.big_facet:
            hosts = swarm.alive(nat=False)
            begun_wall = time.monotonic()
            for chunk in range(0, args.big_facet, 100):
                async with trio.open_nursery() as batch:
                    for index in range(chunk, min(chunk + 100, args.big_facet)):
                        host = hosts[index % len(hosts)].directory
                        identity = make_identity(f"inet-big-{index}")
                        batch.start_soon(host.publish, _big_records(identity, host.now()))
            _progress(f"published {args.big_facet} aarch64 publishers in "
                      f"{time.monotonic() - begun_wall:.1f} s")
            # As in the full mode, where the lookups phase lies between: the publishers'
            # settle republish (30 s after a first publish to a crowded facet) writes
            # the shard level the final count calls for.
            await trio.sleep(300)
            out["big_facet_find"] = {
                "facet_publishers": args.big_facet,
                **await _finds(swarm, Query(arch="aarch64"), args.finds),
            }
            _progress(f"big facet finds {out['big_facet_find']}")

        phases.end("facet_find")
        out["routing_tables"]["after_finds"] = {
            "seconds_after_churn": round(trio.current_time() - churn_ended, 1),
            **_routing_tables(swarm),
        }
        # 6. load under a rate of sampled finds (of the big facet, with --big-facet)
        if args.big_facet:
            query = Query(arch="aarch64")
        dispatchers = rng.sample(swarm.alive(nat=False), 20)
        served_before = {id(n): n.directory.statistics().requests_in for n in swarm.alive()}
        total_finds = int(args.rate * args.load_seconds)
        methods: Counter[tuple[tuple[str, int], str]] = Counter()
        finds: Counter[tuple[tuple[str, int], str]] = Counter()
        roots = frozenset(
            facet_key(name)
            for arch in ("x86_64", "aarch64")
            for name in example_capability(arch=arch).facets()
        )
        swarm.internet.tap = partial(_count_request, methods, finds, roots)
        async with trio.open_nursery() as nursery:
            for index in range(total_finds):
                nursery.start_soon(dispatchers[index % 20].directory.find_sample, query, 64)
                await trio.sleep(1.0 / args.rate)
        swarm.internet.tap = None
        public = [n for n in swarm.alive() if id(n) in served_before and not n.nat]
        served = [n.directory.statistics().requests_in - served_before[id(n)] for n in public]
        mean = sum(served) / len(served)
        out["load"] = {
            "facet": query.arch,
            "finds_per_s": args.rate,
            "seconds": args.load_seconds,
            "requests_served_mean": round(mean, 2),
            "requests_served_max": max(served),
            "max_over_mean": round(max(served) / mean, 2),
            "what": "requests received per public node over the window, all kinds",
            **_load_breakdown(swarm, public, served, methods, finds),
        }
        _progress(f"load {out['load']}")

        phases.end("load")
        # 7. placement with a warm directory cache
        dispatcher = rng.choice(swarm.alive(nat=False))
        trust = make_trust_list(
            nodes=[(f"node-{p.index}", f"op-{p.index % 40}") for p in publishers], label="inet-"
        ).trust_list
        requirements = Requirements(arch="x86_64", os="fedora-41", build_type=BuildType.RPM)
        simulated: list[float] = []
        walls: list[float] = []
        placed = 0
        async with trio.open_nursery() as refreshes:
            # As the dispatcher service runs it: a due refresh in the background.
            finder = DirectoryFinder(
                dispatcher.directory, trust, refresh_interval=30.0, sample=64,
                nursery=refreshes,
            )
            await finder.find(Query(arch="x86_64", os="fedora-41"))  # warm
            for index in range(args.placements):
                begun, begun_wall = trio.current_time(), time.perf_counter()
                entries = await finder.find(Query(arch="x86_64", os="fedora-41"))
                candidates = [
                    Candidate(e.publisher, e.capability, e.status, e.trust) for e in entries
                ]
                chosen = select_nodes(candidates, requirements, random.Random(index))
                placed += len(chosen) == 2
                walls.append(time.perf_counter() - begun_wall)
                simulated.append(trio.current_time() - begun)
                await trio.sleep(1.0)
            refreshes.cancel_scope.cancel()
        out["placement"] = {
            "placements": args.placements,
            "placed": placed,
            "simulated": latency_summary(simulated),
            "wall": latency_summary(walls),
            "p99_ms": round(max(percentile(simulated, 0.99), 0) * 1000
                            + percentile(walls, 0.99) * 1000, 3),
            "what": "simulated time of DirectoryFinder.find (a cache hit; a due refresh runs "
                    "in the background, as in the dispatcher service) plus wall time of find "
                    "and selection",
        }
        _progress(f"placement {out['placement']}")
        phases.end("placement")
        # 8. maintenance (last: the longest phase)
        before = sum(n.directory.statistics().bytes_out for n in swarm.nodes)
        swarm.internet.tap = by_method = _BytesByMethod(swarm)
        await trio.sleep(args.idle)
        statuses.cancel_scope.cancel()
        await stack.aclose()
        swarm.internet.tap = None
        sent = sum(n.directory.statistics().bytes_out for n in swarm.nodes) - before
        listed, live, _ = _routing_share(swarm)
        out["maintenance"] = {
            "idle_simulated_s": args.idle,
            "bytes_per_node_hour": round(sent / args.n / (args.idle / 3600)),
            "routing_reachable_share_after": round(live / listed, 4),
            "by_method": by_method.per_node_hour(args.n, args.idle),
            "status_interval_s": args.status_interval or None,
            "what": "republish of every directory's records (hourly, or at half the "
                    "shortest lifetime of its records), bucket refresh, liveness pings of "
                    "silent contacts; with status_interval_s, each publisher's new status "
                    "as a node daemon publishes it (by default every 60 s, living 300 s)",
        }
        _progress(f"maintenance {out['maintenance']['bytes_per_node_hour']} B/node/h")

        phases.end("maintenance")
        out["phases"] = phases.done
        out["network"] = dict(swarm.internet.counters)
    out["wall_s"] = round(time.monotonic() - wall, 1)
    return out


def _goals(out: dict[str, Any]) -> list[dict[str, Any]]:
    measured = {
        "lookup_p50_ms": out["lookups"]["p50_ms"],
        "lookup_p99_ms": out["lookups"]["p99_ms"],
        "lookup_success_rate": out["lookups"]["success_rate"],
        "facet_find_bytes_p99": out.get("big_facet_find", out["facet_find"])["bytes_p99"],
        "facet_find_round_trips_beyond_walk_max": out.get(
            "big_facet_find", out["facet_find"])["round_trips_beyond_walk_max"],
        "placement_p99_ms": out["placement"]["p99_ms"],
        "load_max_over_mean": out["load"]["max_over_mean"],
        "routing_entries_reachable": out["routing_tables"]["reachable_share"],
        "maintenance_bytes_per_node_hour": out["maintenance"]["bytes_per_node_hour"],
    }
    goals = []
    for name, (op, limit) in GOALS.items():
        value = measured[name]
        met = value <= limit if op == "<=" else value >= limit
        goals.append({"figure": name, "goal": f"{op} {limit:g}", "measured": value, "met": met})
    return goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--short", action="store_true", help="CI mode: N=2,000")
    parser.add_argument("--n", type=int, help="nodes (default 10,000; 2,000 with --short)")
    parser.add_argument("--nat", type=float, default=0.3, help="share behind NAT (0.3)")
    parser.add_argument("--churn", type=float, default=0.1,
                        help="share of nodes replaced during the lookups (0.1)")
    parser.add_argument("--publishers", type=int, help="publishers (default N / 2; 300 short)")
    parser.add_argument("--publish-batch", type=int, default=50,
                        help="publishers that publish at once, a batch after the other "
                        "(50; more make the phase shorter in simulated time, and the "
                        "farm's own traffic meanwhile smaller)")
    parser.add_argument("--lookups", type=int, help="node-key lookups (1,000; 200 short)")
    parser.add_argument("--overlap-churn", action="store_true",
                        help="replacement nodes join while the next lookups run (default: "
                        "each joins before the next lookup, so the phase lasts as long as "
                        "all the joins one after another)")
    parser.add_argument("--finds", type=int, help="sampled facet finds (100; 20 short)")
    parser.add_argument("--rate", type=float, default=100.0, help="finds per second (100)")
    parser.add_argument("--load-seconds", type=float, help="load window (20 s; 3 s short)")
    parser.add_argument("--placements", type=int, help="placements (200; 30 short)")
    parser.add_argument("--idle", type=float, help="maintenance window, simulated s "
                        "(3,600: an hour; 900 short: one republish period of the bench's "
                        "records while their 30-minute status lives)")
    parser.add_argument("--big-facet", type=int, default=0,
                        help="also publish this many aarch64 publishers (records only, "
                        "hosted by the public nodes) and measure finds of that facet, "
                        "e.g. 5000 for the full mode's facet size at --short's cost (0)")
    parser.add_argument("--status-interval", type=float, default=0.0,
                        help="each publisher's status lives 5 minutes and a new one "
                        "follows this often from its publish on (through every phase), as "
                        "a node daemon's does (its status_interval_s: 60); 0: one status "
                        "living 30 minutes (0)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.publish_batch < 1:
        parser.error("--publish-batch must be at least 1")
    if args.status_interval < 0:
        parser.error("--status-interval must be 0 (off) or more")
    short = args.short
    args.n = args.n or (2000 if short else 10_000)
    # --short keeps CI cheap: 2,000 nodes, but a 300-publisher facet (still sharded).
    args.publishers = args.publishers or (300 if short else args.n // 2)
    args.lookups = args.lookups or (200 if short else 1000)
    args.finds = args.finds or (20 if short else 100)
    args.load_seconds = args.load_seconds or (3.0 if short else 20.0)
    args.placements = args.placements or (30 if short else 200)
    args.idle = args.idle or (900.0 if short else 3600.0)
    out = trio.run(_bench, args, clock=trio.testing.MockClock(autojump_threshold=0))
    result = {
        "benchmark": "internet",
        "mode": "short" if short else "full",
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "internet": {
            "rtt": f"Gamma(shape={RTT_SHAPE}, scale={RTT_SCALE} s): median 80 ms, p99 ~390 ms",
            "loss": 0.01,
            "nat": f"{args.nat:.0%} of nodes, replies only (30 s mappings), as DHT clients",
            "churn": f"{args.churn:.0%} of nodes replaced during the lookups",
        },
        "workload": {k: v for k, v in vars(args).items() if k != "short"},
        **out,
    }
    result["goals"] = _goals(out)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
