"""Routing tables right after a fast churn, on the simulated internet: prints one JSON object.

What ``bench/internet.py`` measures once at the end of its lookups (the share of routing
entries that are live, reachable nodes), here alone, cheaper, and taken apart, to tune the
liveness rules (``docs/protocol.md``, *Liveness*) without a 10,000-node run:

1. ``--n`` nodes join over an hour of simulated time as in ``bench/internet.py`` (``--nat``
   of them behind NAT, as DHT clients);
2. ``--churn`` of them are replaced at an even pace over ``--churn-seconds`` (the full
   ``bench/internet.py`` run replaces 10% of 10,000 nodes in about 150 s: a contact's
   death rate of 6.7e-4 a second, kept here by default), each newcomer joining while the
   others go on, and node-key lookups of random nodes from random nodes run beside them
   (``--lookups`` of them, evenly spread);
3. at the end, for the routing tables of the public nodes and of the DHT clients apart:
   the share of entries that are live public nodes (the goal of ``bench/internet.py``:
   >= 99% of all entries), how long the dead ones had been dead and silent, and the
   nodes' probe periods (p10, p50, p90).

Usage: ``python bench/churn.py [--short] [--n N] [--seed S]``; ``--short`` (CI): N=500.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import percentile
from internet import _join

from p2pbuild.dht import DhtConfig, node_key
from p2pbuild.testing import Swarm, open_swarm

#: bench/internet.py's goal for all routing-table entries.
GOAL_REACHABLE = 0.99


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p10": None, "p50": None, "p90": None}
    return {f"p{q}": round(percentile(values, q / 100), 1) for q in (10, 50, 90)}


def _tables(swarm: Swarm, died: dict[tuple[str, int], float], now: float) -> dict[str, Any]:
    """The routing tables of the live public nodes and of the DHT clients, apart."""
    out: dict[str, Any] = {}
    for name, nat in (("public_tables", False), ("client_tables", True)):
        entries = dead = 0
        dead_for: list[float] = []
        silent_for: list[float] = []
        periods: list[float] = []
        for node in swarm.alive(nat=nat):
            directory = node.directory
            clock = directory.now()
            core = directory._core
            periods.append(core.probe_period(clock))
            for peer in core.routing:
                entries += 1
                gone = died.get(peer.address)
                if gone is not None:
                    dead += 1
                    dead_for.append(now - gone)
                    silent_for.append(clock - peer.seen_at)
        out[name] = {
            "nodes": len(swarm.alive(nat=nat)),
            "entries": entries,
            "dead": dead,
            "reachable_share": round(1 - dead / entries, 4) if entries else None,
            "dead_for_s": _spread(dead_for),
            "dead_silent_for_s": _spread(silent_for),
            "probe_period_s": _spread(periods),
        }
    entries = sum(t["entries"] for t in out.values())
    dead = sum(t["dead"] for t in out.values())
    out["entries_reachable"] = round(1 - dead / entries, 4)
    return out


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.monotonic()
    async with open_swarm(args.seed, label="churn-") as swarm:
        rng = swarm.rng
        await _join(swarm, args.n, args.nat)
        joined_wall = time.monotonic() - wall
        died: dict[tuple[str, int], float] = {}
        replace = round(args.churn * args.n)
        client = DhtConfig(reachability="client")
        start = trio.current_time()

        async def lookup() -> None:
            target, reader = rng.choice(swarm.alive()), rng.choice(swarm.alive())
            await reader.directory.get(node_key(target.identity.public_key))

        async with trio.open_nursery() as churn:
            for index in range(replace):
                await trio.sleep_until(start + args.churn_seconds * index / replace)
                leaving = rng.choice(swarm.alive()[20:])  # (the first 20: the seeds)
                swarm.leave(leaving)
                died[leaving.endpoint.local_address] = trio.current_time()
                nat = rng.random() < args.nat
                churn.start_soon(partial(swarm.join, nat=nat, config=client if nat else None))
                if index * args.lookups // replace != (index + 1) * args.lookups // replace:
                    churn.start_soon(lookup)
        now = trio.current_time()
        return {
            "join_wall_s": round(joined_wall, 1),
            "churn": {
                "replaced": replace,
                "simulated_s": round(now - start, 1),
                "death_rate_per_s": round(replace / args.n / args.churn_seconds, 6),
            },
            "routing_tables": _tables(swarm, died, now),
            "wall_s": round(time.monotonic() - wall, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--short", action="store_true", help="CI mode: N=500")
    parser.add_argument("--n", type=int, help="nodes (default 2,000; 500 with --short)")
    parser.add_argument("--nat", type=float, default=0.3, help="share behind NAT (0.3)")
    parser.add_argument("--churn", type=float, default=0.1,
                        help="share of the nodes replaced (0.1)")
    parser.add_argument("--churn-seconds", type=float, default=150.0,
                        help="simulated seconds the churn takes (150)")
    parser.add_argument("--lookups", type=int, help="node-key lookups beside the churn "
                        "(500; 125 short)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.churn_seconds <= 0 or not 0 < args.churn < 1:
        parser.error("--churn must be in (0, 1) and --churn-seconds positive")
    args.n = args.n or (500 if args.short else 2000)
    if args.n < 100:
        parser.error("--n must be at least 100")
    args.lookups = args.lookups if args.lookups is not None else (125 if args.short else 500)
    out = trio.run(_bench, args, clock=trio.testing.MockClock(autojump_threshold=0))
    figure = out["routing_tables"]["entries_reachable"]
    result = {
        "benchmark": "churn",
        "mode": "short" if args.short else "full",
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "workload": {k: v for k, v in vars(args).items() if k != "short"},
        **out,
        "goals": [{
            "figure": "routing_entries_reachable", "goal": f">= {GOAL_REACHABLE:g}",
            "measured": figure, "met": figure >= GOAL_REACHABLE,
        }],
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
