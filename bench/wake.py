"""Wake-to-first-job latency of an on-demand pull node in standby, as JSON.

A real node daemon (pull mode, ``[on_demand] idle_s = 1``, an in-process instant runner)
long-polls a real dispatcher pull queue over HTTPS on loopback. Each round waits until the
node has gone to standby (it publishes a ``standby`` status), then offers it a job: a pull
node's wake-up is its long-poll, which answers at once with the job. Measured per round:

* ``offer_to_taken``: from the offer to the node taking the job (its lease starts);
* ``offer_to_awake``: from the offer to the node having left standby (hook run, status
  republished; the node notices its new job within its 0.2 s watch interval);
* ``offer_to_result``: to the signed result stored in the queue.

Goal: a woken pull node takes its job within 1 s (p99 of ``offer_to_taken``).

Usage: ``python bench/wake.py [--short] [--rounds N]``. ``--short`` is the CI mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import latency_summary, percentile

from p2pbuild import BuildType, Job, JobSpec, SourceArtifact, Target
from p2pbuild.dispatcher._pull import PullQueue
from p2pbuild.dispatcher._pull_routes import serve_pull
from p2pbuild.https import generate_tls_material
from p2pbuild.testing import hello_tarball, make_trust_list
from p2pbuild.testing._nodes import open_node_daemons, serve_files
from p2pbuild.testing._runner import InstantRunner

GOAL_TAKEN_S = 1.0


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    fixture = make_trust_list()
    dispatcher = fixture.dispatchers["dispatcher-1"]
    node_identity = fixture.nodes["node-1"]
    taken: list[float] = []
    awake: list[float] = []
    results: list[float] = []
    with tempfile.TemporaryDirectory(prefix="p2pbuild-bench-wake-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "sources").mkdir()
        package = hello_tarball(tmp / "sources" / "hello-1.0.tar.gz")
        async with trio.open_nursery() as nursery:
            files_url, _ = await nursery.start(serve_files, tmp / "sources", tmp / "files-tls")
            (tmp / "tls").mkdir()
            tls = generate_tls_material(tmp / "tls", "localhost")
            queue = PullQueue(dispatcher.public_key, fixture.trust_list, tmp / "uploads")
            port = await nursery.start(serve_pull, queue, tls)
            overrides = {
                "pull": {
                    "dispatchers": [{"url": f"https://127.0.0.1:{port}",
                                     "key": str(dispatcher.public_key),
                                     "tls_sha256": tls.sha256.hex()}],
                    "poll_timeout_s": 30,
                },
                "on_demand": {"idle_s": args.idle_s, "wake_s": 30},
            }
            async with open_node_daemons(
                tmp / "nodes", [node_identity], fixture.trust_list, push=False,
                runner=lambda _: InstantRunner(), overrides=overrides,
            ) as (daemon,):
                on_demand = daemon.on_demand
                assert on_demand is not None
                source = SourceArtifact(
                    package.path.name, package.path.stat().st_size,
                    bytes.fromhex(package.sha256), f"{files_url}/{package.path.name}",
                )
                for _ in range(args.rounds):
                    with trio.fail_after(args.idle_s + 30):
                        while not (on_demand.standby and daemon.status_record is not None
                                   and daemon.status_record.body.standby):  # type: ignore[union-attr]
                            await trio.sleep(0.02)
                    spec = JobSpec(source, BuildType.MAKE,
                                   Target(daemon.detected.arch, daemon.detected.os),
                                   time_limit_s=120)
                    job = Job.create(dispatcher, spec, issued_at=int(time.time()),
                                     lifetime=600, node=node_identity.public_key)
                    start = time.perf_counter()
                    queue.offer(node_identity.public_key, job)
                    with trio.fail_after(30):
                        await queue.wait_taken(job.job_id)
                        taken.append(time.perf_counter() - start)

                        async def until_awake(start: float = start) -> None:
                            while on_demand.standby:
                                await trio.sleep(0.005)
                            awake.append(time.perf_counter() - start)

                        async def until_result(job: Job = job, start: float = start) -> None:
                            await queue.wait_result(job.job_id)
                            results.append(time.perf_counter() - start)

                        async with trio.open_nursery() as waits:
                            waits.start_soon(until_awake)
                            waits.start_soon(until_result)
                    queue.release(job.job_id)
            nursery.cancel_scope.cancel()
    p99 = percentile(taken, 0.99)
    return {
        "rounds": args.rounds,
        "idle_s": args.idle_s,
        "offer_to_taken": latency_summary(taken),
        "offer_to_awake": latency_summary(awake),
        "offer_to_result": latency_summary(results),
        "goal": {"taken_p99_s": GOAL_TAKEN_S, "met": p99 <= GOAL_TAKEN_S},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI mode")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--idle-s", type=float, default=1.0)
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 3 if args.short else 20
    result = trio.run(_bench, args)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
