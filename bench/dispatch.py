"""Dispatcher throughput and overhead, as JSON.

Runs N push nodes (the real job service and HTTPS API on loopback, each with an in-process
runner) and the build engine with its real SQLite database (WAL, synchronous=FULL) and
repository sink, then measures:

* throughput: builds per minute for trivial builds (instant runner), ``--concurrency`` at a
  time, each verified on two operators and stored;
* overhead: for builds one at a time whose node build takes ``--build-seconds``, the time
  from acceptance to "verified and stored" beyond the nodes' own build time (the longer of
  the two signed results' durations), p50 and p99;

and compares with the goals: overhead <= 50 ms per build and <= 5% of a 10-second build.

Usage: ``python bench/dispatch.py [--short] [--nodes N] [--builds N] [--concurrency N]
[--build-seconds S] [--overhead-builds N]``. ``--short`` is the CI mode (a few seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import latency_summary, percentile

from p2pbuild._jobs import Job
from p2pbuild.dispatcher._db import BuildState, Database
from p2pbuild.dispatcher._engine import BuildRequest, Engine, EngineConfig
from p2pbuild.dispatcher._nodes import StaticFinder
from p2pbuild.dispatcher._sink import RepositorySink
from p2pbuild.node._service import LogSink, RunReport
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import start_push_node
from p2pbuild.testing._runner import InstantRunner

GOAL_OVERHEAD_MS = 50.0
GOAL_OVERHEAD_FRACTION = 0.05
REFERENCE_BUILD_S = 10.0


@attrs.define(eq=False)
class SleepyRunner:
    """An instant runner whose build takes ``seconds`` (set per phase)."""

    seconds: float = 0.0
    inner: InstantRunner = attrs.field(factory=InstantRunner)

    async def run(self, job: Job, workdir: Path, log: LogSink) -> RunReport:
        if self.seconds:
            await trio.sleep(self.seconds)
        return await self.inner.run(job, workdir, log)


async def wait_verified(engine: Engine, build_id: str) -> None:
    while True:
        build = engine.db.build(build_id)
        if build.state.terminal:
            if build.state is not BuildState.VERIFIED:
                raise RuntimeError(f"build {build_id} {build.state.value}: {build.reason}")
            return
        await engine.wait_changed()


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    operators = [f"op{i}" for i in range(max(args.nodes // 2, 2))]
    names = [(f"node-{i}", operators[i % len(operators)]) for i in range(args.nodes)]
    fixture = make_trust_list(nodes=names, label="bench-")
    runners = [SleepyRunner() for _ in names]
    finder = StaticFinder(fixture.trust_list)
    async with trio.open_nursery() as nursery:
        for (name, _), runner in zip(names, runners, strict=True):
            node = await start_push_node(
                nursery, tmp / name, fixture.nodes[name], fixture.trust_list, runner, slots=8
            )
            finder.put(node.entry())
        engine = Engine(
            db=Database.open(tmp / "dispatcher.db", synchronous=args.synchronous),
            identity=fixture.dispatchers["dispatcher-1"],
            trust_list=fixture.trust_list,
            finder=finder,
            sink=RepositorySink(tmp / "repo"),
            config=EngineConfig(state_dir=tmp / "state"),
            rng=random.Random(1),
        )
        await nursery.start(engine.run)
        store = engine.sources
        store.root.mkdir(parents=True, exist_ok=True)

        def request(i: int) -> BuildRequest:
            data = f"source {i}\n".encode()
            sha = hashlib.sha256(data).hexdigest()
            store.path(sha).write_bytes(data)
            return BuildRequest(f"pkg{i}-1.0-1.src.rpm", sha, len(data))

        # Throughput: trivial builds, --concurrency at a time.
        limiter = trio.CapacityLimiter(args.concurrency)
        latencies: list[float] = []

        async def one(i: int) -> None:
            async with limiter:
                start = time.perf_counter()
                build = engine.accept(request(i), "bench", None)
                await wait_verified(engine, build.id)
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        async with trio.open_nursery() as builds:
            for i in range(args.builds):
                builds.start_soon(one, i)
        elapsed = time.perf_counter() - started

        # Overhead: builds one at a time that take --build-seconds on the nodes.
        for runner in runners:
            runner.seconds = args.build_seconds
        overheads: list[float] = []
        for i in range(args.overhead_builds):
            start = time.perf_counter()
            build = engine.accept(request(100_000 + i), "bench", None)
            await wait_verified(engine, build.id)
            total = time.perf_counter() - start
            node_time = max(
                _duration(engine, attempt.id)
                for attempt in engine.db.attempts(build.id)
                if attempt.state.value == "succeeded"
            )
            overheads.append(total - node_time)
        nursery.cancel_scope.cancel()
    p50 = percentile(overheads, 0.5)
    p99 = percentile(overheads, 0.99)
    return {
        "benchmark": "dispatch",
        "mode": "short" if args.short else "full",
        "nodes": args.nodes,
        "operators": len(operators),
        "replicas": 2,
        "database": f"sqlite WAL, synchronous={args.synchronous}",
        "throughput": {
            "builds": args.builds,
            "concurrency": args.concurrency,
            "seconds": round(elapsed, 3),
            "builds_per_minute": round(args.builds / elapsed * 60, 1),
            "latency": latency_summary(latencies),
        },
        "overhead": {
            "builds": args.overhead_builds,
            "node_build_seconds": args.build_seconds,
            **latency_summary(overheads),
            "fraction_of_10s_build_p50": round(p50 / REFERENCE_BUILD_S, 5),
            "fraction_of_10s_build_p99": round(p99 / REFERENCE_BUILD_S, 5),
        },
        "goals": {
            "overhead_ms": GOAL_OVERHEAD_MS,
            "overhead_fraction_of_10s_build": GOAL_OVERHEAD_FRACTION,
            "overhead_p50_met": p50 * 1000 <= GOAL_OVERHEAD_MS,
            "overhead_p99_met": p99 * 1000 <= GOAL_OVERHEAD_MS,
            "fraction_met": p99 / REFERENCE_BUILD_S <= GOAL_OVERHEAD_FRACTION,
        },
    }


def _duration(engine: Engine, attempt_id: int) -> float:
    from p2pbuild import Result

    raw = engine.db.result_bytes(attempt_id)
    assert raw is not None
    return Result.from_bytes(raw).duration_ms / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--builds", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--build-seconds", type=float, default=1.0)
    parser.add_argument("--overhead-builds", type=int, default=20)
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    args = parser.parse_args()
    if args.short:
        args.builds, args.overhead_builds, args.build_seconds = 40, 4, 0.5
    with tempfile.TemporaryDirectory(prefix="p2pbuild-bench-") as tmp:
        result = trio.run(bench, args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
