"""Soak test: many builds through one dispatcher and a dozen nodes for a fixed time, while
nodes (and now and then the dispatcher) are killed and restarted at random.

Everything is real except the build itself: the dispatcher's engine with its SQLite
database (WAL) and repository sink, nodes' job services and HTTPS APIs on loopback with
pinned certificates; each node runs a trivial instant build. One node of its own operator
tampers with its output, so "wrong results stored" is a real check. Kills are abrupt
(the node's or the engine's tasks are cancelled at once, its socket closes), chosen by a
seeded RNG.

Prints one JSON object: builds accepted, completed (verified), lost (accepted but not
verified at the end; must be 0), wrong results stored (must be 0), kills, and the
process's resident memory sampled over time (dispatcher and nodes share this process, so
the figure is an upper bound for the dispatcher) with its growth between the middle and
the last third of the run.

    python bench/soak.py            # 180 s
    python bench/soak.py --short    # 25 s, for CI
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

from p2pbuild.dispatcher._db import BuildState, Database
from p2pbuild.dispatcher._engine import BuildRequest, Engine, EngineConfig
from p2pbuild.dispatcher._nodes import StaticFinder
from p2pbuild.dispatcher._sink import RepositorySink
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import FarmNode, start_push_node
from p2pbuild.testing._runner import InstantRunner

OPERATORS = ["alice", "bob", "carol", "dave", "erin", "frank"]
NODES = [(f"{op}-{i}", op) for op in OPERATORS for i in (1, 2)] + [("mallory-1", "mallory")]
FIXTURE = make_trust_list(nodes=NODES, label="soak-")
GOOD = b"soak artifact\n"
SOURCE = b"soak source\n"
SHA = hashlib.sha256(SOURCE).hexdigest()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Soak:
    def __init__(self, tmp: Path, seed: int) -> None:
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.finder = StaticFinder(FIXTURE.trust_list)
        self.nodes: dict[str, FarmNode] = {}
        self.restarts = 0
        self.node_kills = 0
        self.dispatcher_kills = 0
        self.engine: Engine | None = None
        self.engine_scope: trio.CancelScope | None = None
        self.accepted: list[str] = []

    async def start_node(self, nursery: trio.Nursery, name: str) -> None:
        self.restarts += 1
        artifacts = {"out/soak.txt": b"tampered\n" if name.startswith("mallory") else GOOD}
        node = await start_push_node(
            nursery, self.tmp / "nodes" / f"{name}-{self.restarts}", FIXTURE.nodes[name],
            FIXTURE.trust_list, InstantRunner(artifacts=artifacts, log_lines=(b"ok\n",)),
            slots=2,
        )
        self.nodes[name] = node
        self.finder.put(node.entry())

    async def start_engine(self, nursery: trio.Nursery) -> None:
        engine = Engine(
            db=Database.open(self.tmp / "dispatcher.db"),
            identity=FIXTURE.dispatchers["dispatcher-1"],
            trust_list=FIXTURE.trust_list,
            finder=self.finder,
            sink=RepositorySink(self.tmp / "repo"),
            config=EngineConfig(state_dir=self.tmp / "state", follow_interval_s=0.5,
                                unreachable_after_s=0.5, backoff_base_s=0.05,
                                backoff_max_s=0.3, node_retry_base_s=0.2, no_node_wait_s=30.0,
                                node_timeout_s=3.0, max_attempts=16),
            rng=random.Random(self.rng.getrandbits(32)),
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await engine.run(task_status=task_status)

        await nursery.start(run)
        engine.sources.root.mkdir(parents=True, exist_ok=True)
        engine.sources.path(SHA).write_bytes(SOURCE)
        self.engine, self.engine_scope = engine, scope

    def submit(self) -> None:
        assert self.engine is not None
        build = self.engine.accept(
            BuildRequest(source_name="soak-1.0-1.src.rpm", source_sha256=SHA,
                         source_size=len(SOURCE)), "soak", None,
        )
        self.accepted.append(build.id)

    def unfinished(self) -> int:
        assert self.engine is not None
        return sum(
            1 for b in self.engine.db.builds(states=[BuildState.QUEUED, BuildState.RUNNING],
                                             limit=1_000_000)
        )

    async def chaos(self, nursery: trio.Nursery, until: float) -> None:
        while trio.current_time() < until:
            await trio.sleep(self.rng.uniform(0.2, 1.0))
            name = self.rng.choice([n for n, _ in NODES])
            self.nodes[name].stop()
            self.finder.remove(self.nodes[name].identity.public_key)
            self.node_kills += 1
            await trio.sleep(self.rng.uniform(0.0, 0.5))
            await self.start_node(nursery, name)
            if self.rng.random() < 0.08:
                assert self.engine_scope is not None
                self.engine_scope.cancel()
                self.dispatcher_kills += 1
                await trio.sleep(self.rng.uniform(0.0, 0.3))
                await self.start_engine(nursery)


async def soak(duration: float, seed: int, in_flight: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="p2pbuild-soak-") as tmp_name:
        tmp = Path(tmp_name)
        state = Soak(tmp, seed)
        samples: list[tuple[float, int]] = []
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for name, _ in NODES:
                await state.start_node(nursery, name)
            await state.start_engine(nursery)
            until = started + duration
            nursery.start_soon(state.chaos, nursery, until)
            next_sample = started
            while trio.current_time() < until:
                while state.unfinished() < in_flight:
                    state.submit()
                if trio.current_time() >= next_sample:
                    gc.collect()
                    samples.append((round(trio.current_time() - started, 1), rss_bytes()))
                    next_sample += max(duration / 20, 1.0)
                await trio.sleep(0.05)
            # Drain: no new builds, no more kills; every accepted build must end verified.
            with trio.move_on_after(60):
                while state.unfinished():
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        db = Database.open(tmp / "dispatcher.db")
        states = [db.build(b).state for b in state.accepted]
        completed = states.count(BuildState.VERIFIED)
        wrong = 0
        stored = 0
        for path in (tmp / "repo").rglob("artifacts/**/*"):
            if path.is_file():
                stored += 1
                wrong += path.read_bytes() != GOOD
        third = max(len(samples) // 3, 1)
        middle = samples[third:2 * third] or samples
        last = samples[-third:]
        mid_rss = sum(r for _, r in middle) / len(middle)
        last_rss = sum(r for _, r in last) / len(last)
        return {
            "duration_s": duration,
            "seed": seed,
            "nodes": len(NODES),
            "operators": len(OPERATORS) + 1,
            "builds_accepted": len(state.accepted),
            "builds_completed": completed,
            "builds_lost": len(state.accepted) - completed,
            "wrong_results_stored": wrong,
            "artifacts_stored": stored,
            "node_kills": state.node_kills,
            "dispatcher_kills": state.dispatcher_kills,
            "rss_mb_over_time": [[t, round(r / 2**20, 1)] for t, r in samples],
            "rss_growth_last_vs_middle_third": round(last_rss / mid_rss - 1, 3),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="25 s run for CI")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=6)
    args = parser.parse_args(argv)
    duration = args.duration or (25.0 if args.short else 180.0)
    t0 = time.monotonic()
    report = trio.run(soak, duration, args.seed, args.in_flight)
    report["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report))
    ok = report["builds_lost"] == 0 and report["wrong_results_stored"] == 0
    # Memory must level off: allow 25% growth between the middle and the last third.
    ok = ok and float(report["rss_growth_last_vs_middle_third"]) < 0.25  # type: ignore[arg-type]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
