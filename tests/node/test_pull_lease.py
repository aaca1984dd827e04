"""Pull-mode leases, node side: the node renews while it builds, and stops on "gone".

A real node daemon (pull only, no port) against a real :class:`PullQueue` served over
loopback HTTPS; the runner blocks mid-build until the test lets it go, so a build is
certainly running when the dispatcher withdraws it or gives up on its lease.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from pull_fixtures import (
    DISPATCHER,
    FIXTURE,
    NODE_1,
    SOURCE,
    pull_overrides,
    serve_moved_queue,
)
from waits import wait_until

from p2pbuild import BuildType, Job, JobSpec, ResultState, Target
from p2pbuild.node._pull import MIN_HEARTBEAT_S, PullClient
from p2pbuild.testing._nodes import open_node_daemons
from p2pbuild.testing._runner import InstantRunner


def job_for(arch: str, os_name: str) -> Job:
    spec = JobSpec(SOURCE, BuildType.MAKE, Target(arch, os_name), time_limit_s=120)
    return Job.create(
        DISPATCHER, spec, issued_at=int(time.time()), lifetime=600, node=NODE_1.public_key
    )


@pytest.mark.slow
async def test_a_gone_answer_stops_the_build_and_nothing_is_uploaded(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The dispatcher asks for a renewal every second (the node's own default is 15 s).
    queue, url, tls, offset = await serve_moved_queue(
        nursery, tmp_path, lease_s=3.0, heartbeat_s=1.0
    )
    gate = trio.Event()
    runner = InstantRunner(gate=gate)
    overrides = pull_overrides(url, tls, poll=2)
    async with open_node_daemons(
        tmp_path / "nodes", [NODE_1], FIXTURE.trust_list, push=False,
        runner=lambda _: runner, overrides=overrides,
    ) as (daemon,):  # fmt: skip
        client = daemon.pull_clients[0]
        assert client.heartbeat_s == 15.0
        service = daemon.service
        arch, os_name = daemon.detected.arch, daemon.detected.os

        # 1. Withdrawn (the build was cancelled): the running build is stopped.
        cancelled = job_for(arch, os_name)
        queue.offer(NODE_1.public_key, cancelled)
        await wait_until(lambda: (d := queue.delivery(cancelled.job_id)) and d.renewals >= 2,
                         10, "the node renewed its lease twice")
        delivery = queue.delivery(cancelled.job_id)
        assert delivery is not None and delivery.progress.phase == "building"
        assert service.statistics().running == 1
        queue.withdraw(cancelled.job_id)
        with trio.fail_after(5):  # the delivery ends once the job is stopped and forgotten
            await client.wait_uploads()
        assert client.stopped == 1
        stats = service.statistics()
        assert (stats.running, stats.finished) == (0, 0)  # stopped, then forgotten
        assert not gate.is_set() and len(runner.runs) == 1
        assert client.uploaded == 0

        # 2. Lease expired (the dispatcher heard nothing in time; here its clock jumps):
        # the same, on the answer "lease-expired".
        lost = job_for(arch, os_name)
        queue.offer(NODE_1.public_key, lost)
        await wait_until(lambda: (d := queue.delivery(lost.job_id)) and d.renewals >= 1,
                         10, "the node renewed its lease")
        offset[0] = 10.0
        with trio.fail_after(5):
            await client.wait_uploads()
        assert client.stopped == 2
        assert service.statistics().running == 0
        assert queue.statistics().leases_expired == 1
        assert dict(queue.statistics().rejected) == {"lease-expired": 1, "withdrawn": 1}

        # 3. The slot is free again, and a job the dispatcher still wants is delivered.
        kept = job_for(arch, os_name)
        queue.offer(NODE_1.public_key, kept)
        await wait_until(lambda: (d := queue.delivery(kept.job_id)) and d.renewals >= 1,
                         10, "the node renewed its lease")
        gate.set()
        with trio.fail_after(10):
            result = await queue.wait_result(kept.job_id)
        assert result.state is ResultState.SUCCEEDED
        assert queue.artifact(kept.job_id, "out/hello.txt") is not None
        with trio.fail_after(10):
            await client.wait_uploads()
        assert client.uploaded == 1
        assert client.stopped == 2 and client.renewals >= 4


def test_the_heartbeat_is_the_shorter_of_ours_and_the_dispatchers(tmp_path: Path) -> None:
    client = PullClient(None, NODE_1, None, heartbeat_s=15.0)  # type: ignore[arg-type]
    assert client._heartbeat(None) == 15.0
    assert client._heartbeat("5") == 5.0
    assert client._heartbeat("60") == 15.0
    assert client._heartbeat("0.01") == MIN_HEARTBEAT_S
    assert client._heartbeat("nan") == 15.0
    assert client._heartbeat("soon") == 15.0
