"""The DHT benchmark: p2pbuild's trio Kademlia against the stock PyPI ``kademlia`` package.

Prints one JSON object to stdout (progress goes to stderr). Both halves run the same
workload on real loopback UDP, all nodes of a half in one process:

1. **build**: start N nodes; each joins through a random node started before it.
2. **publish**: ``--keys`` random nodes each publish under their own key (p2pbuild: a
   capability and a status record through ``Directory.publish``, which also indexes them
   under the capability's facet keys; stock: ``Server.set`` of a value of the same size as
   p2pbuild's record bundle).
3. **memory**: resident set size of the process after 1 and 2, minus before, over N
   (``rss_per_node_bytes``; ``..._before_publish`` is the same after 1 only). p2pbuild's
   nodes share what a process has once: the verified-record cache (the API's default) and
   the random source of message ids.
4. **lookups, all alive**: ``--lookups`` sequential lookups of a random published key from
   a random node other than its publisher (p2pbuild: ``Directory.get(node_key)``; stock:
   ``Server.get``). Latency p50/p99, mean rounds and RPCs per lookup, lookups per second,
   success rate (the exact records or value published came back).
5. **facet queries** (p2pbuild only; a stock ``get`` reads one bundle, a first page):
   ``Directory.find(Query(arch=..., os=...))`` from random nodes, which must return every
   publisher of that arch and OS with its status.
6. **lookups, 20% dead**: 20% of the nodes are silenced (their sockets stay open; every
   datagram to them is dropped, nothing is sent back, nobody is told), then lookups of keys
   whose publisher is alive, from live nodes. p2pbuild: once sequentially (the latency
   goal) and once ``--dead-concurrency`` at a time; stock: ``--dead-concurrency`` at a time
   only, because its 5 s RPC timeout makes sequential lookups take minutes.

Each lookup phase also reports ``cpu_ms_per_lookup``, the process's CPU time over the phase
divided by its lookups (every node's work, the answering nodes' too): on a machine shared
with other work it moves far less than the wall-clock latencies do (``machine.loadavg_*``
says how busy the machine was).

Figures that are defined differently in the two implementations:

* *rounds*: p2pbuild counts the lookup's depth, the hops to the deepest node it asked (1:
  a contact of its own table; ``DhtStatistics.lookup_rounds``); stock counts calls of its
  crawler's ``_find`` (one batch of alpha queries each).
* *RPCs*: p2pbuild counts the RPCs the looking-up node sent for the lookup
  (``lookup_rpcs``); stock counts its crawler's ``find_node``/``find_value`` RPCs and the
  store a ``get`` sends to the nearest node without the value before it returns. Both
  report separately, as ``other_rpcs_per_lookup``, every other RPC any node of the
  network sent meanwhile (stock: stores to newly seen nodes, pings of full buckets' oldest
  contacts; p2pbuild: the same pings, resends of timed-out queries, record pages fetched
  after the walk (a key whose records do not fit in the walk's replies), and hand-off
  stores to newly seen nodes with the pings that precede them).
* A p2pbuild lookup of a node key (this workload) ends once one holder answered with the
  publisher's capability (``node_key_quorum``, 1), but still takes the answers of the
  queries then in flight, and asks one node at a time past its first round; a lookup of a
  facet key (phase 5) asks until the ``value_quorum`` (4) closest nodes answered, because
  it holds many publishers' records. A stock ``get`` stops at the first round with a value
  (and then stores it to the closest node without it).

The stock package runs in a child process (it is asyncio) at the largest N from
``--stock-n`` (default: N, 300, 100) that completes within ``--stock-budget`` seconds.

Usage: ``python bench/dht.py [--short] [--n N] [--lookups L] [--seed S]``. ``--short`` is
the CI mode (N=100, fewer lookups; well under a minute).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import latency_summary, rss_bytes

import p2pbuild
from p2pbuild import Capability, SignedRecord
from p2pbuild.dht import (
    DhtConfig,
    Directory,
    Query,
    UdpTransport,
    node_id_for,
    node_key,
    open_directory_on,
)
from p2pbuild.testing import example_capability, example_status, make_identity

GOALS = {
    "alive_p50_ms": 3.0,
    "alive_p99_ms": 10.0,
    "dead_p99_ms": 100.0,
    "rss_per_node_bytes": 32 * 1024,
}
_ARCHES = ("x86_64", "aarch64", "s390x", "ppc64le", "riscv64", "i686", "armv7hl", "mips64")
_OSES = ("fedora-41", "fedora-42", "debian-12", "rhel-9")


def _progress(message: str) -> None:
    print(f"bench/dht.py: {message}", file=sys.stderr, flush=True)


class SilenceableTransport:
    """A UDP transport that can be silenced: the socket stays open, but every datagram
    received is dropped and nothing is sent, without telling anyone."""

    __slots__ = ("_inner", "dead")

    def __init__(self, inner: UdpTransport) -> None:
        self._inner = inner
        self.dead = False

    @property
    def local_address(self) -> tuple[str, int]:
        return self._inner.local_address

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        if not self.dead:
            self._inner.send(data, address)

    async def receive(self) -> list[tuple[bytes, tuple[str, int]]]:
        while True:
            batch = await self._inner.receive()
            if not self.dead:
                return batch

    def close(self) -> None:
        self._inner.close()


def _publisher_records(index: int, now: int) -> list[SignedRecord]:
    identity = make_identity(f"bench-publisher-{index}")
    capability = example_capability(arch=_ARCHES[index % len(_ARCHES)],
                                    os=_OSES[index // len(_ARCHES) % len(_OSES)])
    return [
        SignedRecord.create(identity, capability, seq=1, issued_at=now, lifetime=3600),
        SignedRecord.create(identity, example_status(), seq=1, issued_at=now, lifetime=1800),
    ]


def _per(count: int, lookups: int) -> float | None:
    return round(count / lookups, 2) if lookups else None


def _totals(nodes: Sequence[Directory]) -> tuple[int, int, int, int]:
    """Lookups, lookup rounds, lookup RPCs and all RPCs sent, summed over ``nodes``."""
    lookups = rounds = rpcs = sent = 0
    for node in nodes:
        s = node.statistics()
        lookups += s.lookups
        rounds += s.lookup_rounds
        rpcs += s.lookup_rpcs
        sent += s.rpcs_sent
    return lookups, rounds, rpcs, sent


async def _timed_lookups(
    nodes: Sequence[Directory],
    plan: Sequence[tuple[int, bytes, frozenset[bytes]]],
    *,
    concurrency: int,
    lookup_timeout: float,
) -> dict[str, Any]:
    """Run ``plan`` (requester index, key, expected raw records) and measure it.

    Rounds and RPCs are the DHT's own counters summed over every node for the phase (no
    other lookups run meanwhile: the nodes' refresh and republish periods are far longer
    than the benchmark).
    """
    latencies: list[float] = []
    successes = 0
    limit = trio.CapacityLimiter(concurrency)

    async def one(requester: int, key: bytes, expected: frozenset[bytes]) -> None:
        nonlocal successes
        async with limit:
            t0 = time.perf_counter()
            got: frozenset[bytes] = frozenset()
            with trio.move_on_after(lookup_timeout):
                got = frozenset(r.raw for r in await nodes[requester].get(key))
            latencies.append(time.perf_counter() - t0)
        successes += got == expected

    before = _totals(nodes)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if concurrency == 1:
        for step in plan:
            await one(*step)
    else:
        async with trio.open_nursery() as nursery:
            for step in plan:
                nursery.start_soon(one, *step)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    lookups, rounds, rpcs, sent = (b - a for a, b in zip(before, _totals(nodes), strict=True))
    done = len(latencies)
    return {
        "lookups": done,
        "cpu_ms_per_lookup": round(cpu * 1000 / done, 3) if done else None,
        "dht_lookups": lookups,
        "concurrency": concurrency,
        "success_rate": round(successes / done, 4) if done else 0.0,
        **latency_summary(latencies),
        "rounds_per_lookup": _per(rounds, done),
        "rpcs_per_lookup": _per(rpcs, done),
        "other_rpcs_per_lookup": _per(sent - rpcs, done),
        "lookups_per_s": round(done / elapsed, 1) if elapsed else None,
        "elapsed_s": round(elapsed, 3),
    }


async def _timed_finds(
    nodes: Sequence[Directory],
    plan: Sequence[tuple[int, Query, frozenset[bytes]]],
    *,
    lookup_timeout: float,
) -> dict[str, Any]:
    """Run ``plan`` (requester index, query, expected publisher keys) sequentially: the
    dispatcher's query, a lookup (with paging) per facet and an intersection."""
    latencies: list[float] = []
    successes = matches = 0
    before = _totals(nodes)
    t0 = time.perf_counter()
    for requester, query, expected in plan:
        t1 = time.perf_counter()
        found: frozenset[bytes] = frozenset()
        with trio.move_on_after(lookup_timeout):
            entries = await nodes[requester].find(query)
            found = frozenset(e.publisher.raw for e in entries if e.status_record is not None)
        latencies.append(time.perf_counter() - t1)
        successes += found == expected
        matches += len(expected)
    elapsed = time.perf_counter() - t0
    lookups, rounds, _, sent = (b - a for a, b in zip(before, _totals(nodes), strict=True))
    done = len(latencies)
    return {
        "finds": done,
        "rounds_per_find": _per(rounds, done),
        "mean_nodes_per_find": round(matches / done, 2) if done else None,
        "dht_lookups_per_find": _per(lookups, done),
        "success_rate": round(successes / done, 4) if done else 0.0,
        **latency_summary(latencies),
        "rpcs_per_find": _per(sent, done),
        "finds_per_s": round(done / elapsed, 1) if elapsed else None,
        "elapsed_s": round(elapsed, 3),
    }


async def _bench_ours(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    config = DhtConfig()
    phases: dict[str, float] = {}
    result: dict[str, Any] = {
        "n": args.n, "k": config.k, "alpha": config.alpha, "elapsed_s": phases,
    }
    now = int(time.time())
    publisher_of = rng.sample(range(args.n), min(args.keys, args.n))
    records = {node: _publisher_records(j, now) for j, node in enumerate(publisher_of)}
    # Identities and records are made before the memory baseline: they are the workload,
    # not the nodes' cost.
    gc.collect()
    rss0 = rss_bytes()
    # One random source for every node's message ids, as one cache for every node's
    # verified records: per-process state a deployment has once, not once per node.
    message_ids = random.SystemRandom()
    async with AsyncExitStack() as stack:
        t0 = time.perf_counter()
        nodes: list[Directory] = []
        transports: list[SilenceableTransport] = []
        for index in range(args.n):
            transport = SilenceableTransport(await UdpTransport.bind(
                "127.0.0.1", 0, max_size=config.max_incoming_datagram
            ))
            if index in records:
                node_id = node_id_for(records[index][0].publisher)
            else:
                node_id = rng.randbytes(20)
            seeds = [rng.choice(nodes).address] if nodes else []
            node = await stack.enter_async_context(open_directory_on(
                transport, bootstrap=seeds, node_id=node_id, config=config,
                rng=message_ids,
            ))
            nodes.append(node)
            transports.append(transport)
        phases["build"] = round(time.perf_counter() - t0, 3)
        gc.collect()
        result["rss_per_node_bytes_before_publish"] = round((rss_bytes() - rss0) / args.n)
        _progress(f"p2pbuild: {args.n} nodes up in {phases['build']} s")

        t0 = time.perf_counter()
        acknowledged = 0
        for index, mine in records.items():
            counts = await nodes[index].publish(mine)
            acknowledged += min(counts.values())
        phases["publish"] = round(time.perf_counter() - t0, 3)
        result["published"] = {
            "keys": len(records),
            "records_per_key": 2,
            "bundle_bytes": len(records[publisher_of[0]][0].raw)
            + len(records[publisher_of[0]][1].raw),
            "mean_min_acks": round(acknowledged / len(records), 2),
        }
        gc.collect()
        result["rss_per_node_bytes"] = round((rss_bytes() - rss0) / args.n)
        _progress(f"p2pbuild: published {len(records)} keys in {phases['publish']} s")

        def plan(alive: Sequence[int], publishers: Sequence[int], count: int) -> list[Any]:
            steps = []
            for _ in range(count):
                publisher = rng.choice(publishers)
                requester = rng.choice(alive)
                while requester == publisher:
                    requester = rng.choice(alive)
                mine = records[publisher]
                steps.append((requester, node_key(mine[0].publisher),
                              frozenset(r.raw for r in mine)))
            return steps

        everyone = list(range(args.n))
        t0 = time.perf_counter()
        result["alive"] = await _timed_lookups(
            nodes, plan(everyone, publisher_of, args.lookups), concurrency=1,
            lookup_timeout=args.lookup_timeout,
        )
        phases["lookups_alive"] = round(time.perf_counter() - t0, 3)
        _progress(f"p2pbuild: alive lookups done in {phases['lookups_alive']} s")

        # The dispatcher's query: nodes of one arch and OS (a facet holding every matching
        # publisher's capability and status, read page by page).
        combos: dict[tuple[str, str], set[bytes]] = {}
        for mine in records.values():
            body = mine[0].body
            assert isinstance(body, Capability)
            combos.setdefault((body.arch, body.os), set()).add(mine[0].publisher.raw)
        choices = sorted(combos)
        find_plan = []
        for _ in range(args.finds):
            arch, os_release = rng.choice(choices)
            find_plan.append((rng.choice(everyone), Query(arch=arch, os=os_release),
                              frozenset(combos[arch, os_release])))
        t0 = time.perf_counter()
        result["facet_find"] = await _timed_finds(nodes, find_plan,
                                                  lookup_timeout=args.lookup_timeout)
        phases["facet_finds"] = round(time.perf_counter() - t0, 3)
        _progress(f"p2pbuild: facet finds done in {phases['facet_finds']} s")

        dead = set(rng.sample(everyone, int(args.n * args.dead_fraction)))
        for index in dead:
            transports[index].dead = True
        alive = [i for i in everyone if i not in dead]
        live_publishers = [p for p in publisher_of if p not in dead]
        t0 = time.perf_counter()
        sequential = await _timed_lookups(
            nodes, plan(alive, live_publishers, args.lookups), concurrency=1,
            lookup_timeout=args.lookup_timeout,
        )
        phases["lookups_dead"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        concurrent = await _timed_lookups(
            nodes, plan(alive, live_publishers, args.dead_lookups),
            concurrency=args.dead_concurrency, lookup_timeout=args.lookup_timeout,
        )
        phases["lookups_dead_concurrent"] = round(time.perf_counter() - t0, 3)
        result["dead"] = {"dead_nodes": len(dead), **sequential}
        result["dead_concurrent"] = {"dead_nodes": len(dead), **concurrent}
        _progress(f"p2pbuild: dead-node lookups done in {phases['lookups_dead']} s "
                  f"+ {phases['lookups_dead_concurrent']} s")
        t0 = time.perf_counter()
        await stack.aclose()
        phases["shutdown"] = round(time.perf_counter() - t0, 3)
    return result


def _run_stock(args: argparse.Namespace, value_size: int) -> dict[str, Any]:
    sizes = sorted({n for n in args.stock_n if n <= args.n}, reverse=True) or [args.n]
    attempts = []
    script = Path(__file__).resolve().parent / "_stock.py"
    for n in sizes:
        _progress(f"stock kademlia: trying N={n} (budget {args.stock_budget:g} s)")
        argv = [
            sys.executable, str(script), "--n", str(n), "--keys", str(min(args.keys, n)),
            "--lookups", str(args.lookups), "--dead-lookups", str(args.dead_lookups),
            "--dead-concurrency", str(args.dead_concurrency), "--seed", str(args.seed),
            "--value-size", str(value_size), "--budget", str(args.stock_budget),
            "--dead-fraction", str(args.dead_fraction),
        ]
        t0 = time.perf_counter()
        try:
            completed = subprocess.run(
                argv, capture_output=True, text=True, check=False,
                timeout=args.stock_budget + 120,
            )
        except subprocess.TimeoutExpired:
            attempts.append({"n": n, "completed": False, "error": "killed: over budget"})
            continue
        elapsed = round(time.perf_counter() - t0, 3)
        if completed.returncode != 0:
            tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
            attempts.append({"n": n, "completed": False, "error": tail[0][:200]})
            continue
        outcome: dict[str, Any] = json.loads(completed.stdout)
        outcome["process_elapsed_s"] = elapsed
        if outcome.get("completed"):
            outcome["attempts"] = attempts
            return outcome
        attempts.append({"n": n, "completed": False,
                         "aborted_in": outcome.get("aborted_in"), "elapsed_s": elapsed})
    return {"completed": False, "attempts": attempts}


# Figures whose definitions differ between the two (see the module docstring).
_DEFINED_DIFFERENTLY = frozenset({"rounds_per_lookup", "rpcs_per_lookup"})

_COMPARED = (
    # (path, lower is better)
    (("alive", "p50_ms"), True),
    (("alive", "p99_ms"), True),
    (("alive", "rounds_per_lookup"), True),
    (("alive", "rpcs_per_lookup"), True),
    (("alive", "other_rpcs_per_lookup"), True),
    (("alive", "lookups_per_s"), False),
    (("alive", "cpu_ms_per_lookup"), True),
    (("alive", "success_rate"), False),
    (("rss_per_node_bytes_before_publish",), True),
    (("rss_per_node_bytes",), True),
    (("dead_concurrent", "success_rate"), False),
    (("dead_concurrent", "p50_ms"), True),
    (("dead_concurrent", "p99_ms"), True),
    (("dead_concurrent", "rounds_per_lookup"), True),
    (("dead_concurrent", "rpcs_per_lookup"), True),
    (("dead_concurrent", "other_rpcs_per_lookup"), True),
    (("dead_concurrent", "lookups_per_s"), False),
    (("dead_concurrent", "cpu_ms_per_lookup"), True),
    (("elapsed_s", "build"), True),
    (("elapsed_s", "publish"), True),
)


def _lookup(data: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = data
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _compare(ours: dict[str, Any], stock: dict[str, Any]) -> dict[str, Any]:
    # Stock's dead phase runs concurrently only; compare like with like.
    stock = dict(stock)
    stock["dead_concurrent"] = stock.get("dead")
    figures = []
    for path, lower_better in _COMPARED:
        mine, theirs = _lookup(ours, path), _lookup(stock, path)
        if mine is None or theirs is None:
            better = None
        elif lower_better:
            better = mine < theirs or (mine == theirs == 0)
        else:
            better = mine > theirs or (mine == theirs and path[-1] == "success_rate")
        figure = {
            "figure": ".".join(path), "p2pbuild": mine, "stock": theirs,
            "better_is": "lower" if lower_better else "higher", "p2pbuild_better": better,
        }
        if path[-1] in _DEFINED_DIFFERENTLY:
            figure["note"] = "counted differently by the two; see bench/dht.py's docstring"
        figures.append(figure)
    return {
        "stock_n": stock.get("n"),
        "p2pbuild_n": ours["n"],
        "same_n": stock.get("n") == ours["n"],
        "figures": figures,
        "p2pbuild_better_on_every_figure": all(f["p2pbuild_better"] for f in figures),
    }


def _goals(ours: dict[str, Any], comparison: dict[str, Any] | None) -> list[dict[str, Any]]:
    measured = {
        "alive_p50_ms": _lookup(ours, ("alive", "p50_ms")),
        "alive_p99_ms": _lookup(ours, ("alive", "p99_ms")),
        "dead_p99_ms": _lookup(ours, ("dead", "p99_ms")),
        "rss_per_node_bytes": ours.get("rss_per_node_bytes"),
    }
    goals = [
        {"goal": f"{name} <= {limit:g}", "measured": measured[name],
         "met": measured[name] is not None and measured[name] <= limit}
        for name, limit in GOALS.items()
    ]
    goals.append({
        "goal": "faster than stock kademlia on every figure",
        "measured": None if comparison is None else
        [f["figure"] for f in comparison["figures"] if not f["p2pbuild_better"]],
        "met": comparison is not None and comparison["p2pbuild_better_on_every_figure"],
    })
    return goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--short", action="store_true", help="CI mode: N=100, fewer lookups")
    parser.add_argument("--n", type=int, help="nodes (default 1000; 100 with --short)")
    parser.add_argument("--lookups", type=int,
                        help="timed lookups per phase (default 1000; 200 with --short)")
    parser.add_argument("--keys", type=int,
                        help="published keys (default 300; 50 with --short)")
    parser.add_argument("--dead-lookups", type=int,
                        help="lookups of the concurrent dead-node phase (default 100; 50 "
                        "with --short)")
    parser.add_argument("--finds", type=int,
                        help="timed facet queries, p2pbuild only (default 200; 50 with "
                        "--short)")
    parser.add_argument("--dead-concurrency", type=int, default=10)
    parser.add_argument("--dead-fraction", type=float, default=0.2)
    parser.add_argument("--lookup-timeout", type=float, default=60.0,
                        help="a lookup still running after this counts as failed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stock-n", type=int, nargs="+",
                        help="stock sizes to try, largest first (default: N 300 100)")
    parser.add_argument("--stock-budget", type=float,
                        help="seconds for one stock attempt (default 240; 60 with --short)")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock package")
    args = parser.parse_args(argv)
    short = args.short
    args.n = args.n or (100 if short else 1000)
    args.lookups = args.lookups or (200 if short else 1000)
    args.keys = args.keys or (50 if short else 300)
    args.dead_lookups = args.dead_lookups or (50 if short else 100)
    args.finds = args.finds or (50 if short else 200)
    args.stock_n = args.stock_n or [args.n, 300, 100]
    args.stock_budget = args.stock_budget or (60.0 if short else 240.0)

    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "dht",
        "mode": "short" if short else "full",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    # Other work on the machine skews every figure; this says how much ran.
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"p2pbuild": p2pbuild.__version__},
        "workload": {"n": args.n, "keys": args.keys, "lookups": args.lookups,
                     "dead_lookups": args.dead_lookups, "finds": args.finds,
                     "dead_concurrency": args.dead_concurrency,
                     "dead_fraction": args.dead_fraction, "seed": args.seed,
                     "lookup_timeout_s": args.lookup_timeout},
    }
    t0 = time.perf_counter()
    ours = trio.run(_bench_ours, args)
    report["p2pbuild"] = ours
    report["elapsed_s"] = {"p2pbuild": round(time.perf_counter() - t0, 3)}
    comparison = None
    if not args.no_stock:
        t0 = time.perf_counter()
        from importlib.metadata import version

        report["versions"]["kademlia"] = version("kademlia")
        report["versions"]["rpcudp"] = version("rpcudp")
        stock = _run_stock(args, ours["published"]["bundle_bytes"])
        report["stock_kademlia"] = stock
        report["elapsed_s"]["stock_kademlia"] = round(time.perf_counter() - t0, 3)
        if stock.get("completed"):
            comparison = _compare(ours, stock)
            report["comparison"] = comparison
    report["goals"] = _goals(ours, comparison)
    report["elapsed_s"]["total"] = round(time.perf_counter() - started, 3)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
