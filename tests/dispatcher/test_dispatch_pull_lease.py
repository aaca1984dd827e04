"""Pull-mode leases, dispatcher side: a taken job lives while its node renews the lease.

The queue's own tests run on trio's autojump clock with the queue's ``clock`` tied to it, so
every deadline is exact virtual time; the routes are then checked over real loopback HTTPS.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from pull_fixtures import (
    ARTIFACT,
    NODE_1,
    NODE_2,
    auth,
    chunks,
    job_for,
    make_queue,
    serve_moved_queue,
    taken,
)

from p2pbuild import (
    FileDigest,
    Identity,
    Job,
    Result,
)
from p2pbuild._errors import MalformedError
from p2pbuild.dispatcher._errors import NodeError
from p2pbuild.dispatcher._pull import (
    HEARTBEAT_HEADER,
    LEASE_HEADER,
    JobWithdrawnError,
    LeaseExpiredError,
    LeaseProgress,
    UnknownPullJobError,
)
from p2pbuild.https import pinned_client


def result_for(node: Identity, job: Job, *, files: bool = True) -> Result:
    """A signed result naming one artifact, or none (complete once the result is in: file
    uploads run in worker threads, during which the autojump clock would race ahead)."""
    digest = FileDigest("out/thing", len(ARTIFACT), hashlib.sha256(ARTIFACT).digest())
    return Result.create(
        node, job, state="succeeded", exit_code=0, started_ms=1, ended_ms=2,
        environment={}, artifacts=[digest] if files else [], logs=[],
    )  # fmt: skip


def test_lease_must_cover_two_heartbeats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least twice heartbeat_s"):
        make_queue(tmp_path, lease_s=20.0, heartbeat_s=15.0)
    with pytest.raises(ValueError, match="heartbeat_s must be positive"):
        make_queue(tmp_path, heartbeat_s=0.0)


async def test_renewals_keep_a_taken_job_alive_past_the_lease(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path)  # lease 60 s, heartbeat 15 s
    job = await taken(queue, NODE_1, NODE_1)
    result = result_for(NODE_1, job, files=False)
    start = trio.current_time()

    async def node() -> None:
        # Five lease periods of building, renewing every heartbeat, then the upload.
        for beat in range(1, 21):
            await trio.sleep(15)
            queue.renew(NODE_1.public_key, job.job_id, LeaseProgress("building", beat * 15))
        queue.receive_result(NODE_1.public_key, job.job_id, result.to_bytes())

    nursery.start_soon(node)
    assert await queue.wait_result(job.job_id) == result
    assert trio.current_time() - start == 300
    delivery = queue.delivery(job.job_id)
    assert delivery is not None and delivery.renewals == 20
    assert delivery.progress == LeaseProgress("building", 300)
    stats = queue.statistics()
    assert (stats.leases_expired, stats.renewals, stats.delivered) == (0, 20, 1)


async def test_without_renewals_wait_result_ends_with_lease_expired_at_lease_s(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path, lease_s=60.0, heartbeat_s=15.0)
    job = await taken(queue, NODE_1)
    start = trio.current_time()
    with pytest.raises(LeaseExpiredError) as info:
        await queue.wait_result(job.job_id)
    assert trio.current_time() - start == 60
    assert info.value.code == "lease-expired"
    assert isinstance(info.value, NodeError)  # the engine's "node lost" family
    assert "did not renew the lease" in str(info.value)

    # One renewal 40 s in moves the deadline to 40 + 60 s.
    job = await taken(queue, NODE_1)
    start = trio.current_time()

    async def renew_once() -> None:
        await trio.sleep(40)
        queue.renew(NODE_1.public_key, job.job_id, LeaseProgress("uploading", 40))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(renew_once)
        with pytest.raises(LeaseExpiredError) as info:
            await queue.wait_result(job.job_id)
    assert trio.current_time() - start == 100
    assert "uploading, 40 s in" in str(info.value) and "1 renewal" in str(info.value)
    stats = queue.statistics()
    assert (stats.leases_expired, stats.taken, stats.renewals) == (2, 0, 1)


async def test_a_renewal_by_another_node_is_refused_and_extends_nothing(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path)
    job = await taken(queue, NODE_1)  # offered to any node, taken by node-1
    start = trio.current_time()
    await trio.sleep(50)
    with pytest.raises(UnknownPullJobError):
        queue.renew(NODE_2.public_key, job.job_id, LeaseProgress())
    with pytest.raises(UnknownPullJobError):
        queue.receive_result(NODE_2.public_key, job.job_id, result_for(NODE_2, job).to_bytes())
    with pytest.raises(LeaseExpiredError):
        await queue.wait_result(job.job_id)
    assert trio.current_time() - start == 60
    # The tombstone answers only the node that held the lease.
    with pytest.raises(UnknownPullJobError):
        queue.renew(NODE_2.public_key, job.job_id, LeaseProgress())
    with pytest.raises(LeaseExpiredError):
        queue.renew(NODE_1.public_key, job.job_id, LeaseProgress())


async def test_a_withdrawn_job_answers_gone(autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    job = await taken(queue, NODE_1, NODE_1)
    queue.renew(NODE_1.public_key, job.job_id, LeaseProgress("building", 1))
    queue.withdraw(job.job_id)
    with pytest.raises(JobWithdrawnError) as info:
        queue.renew(NODE_1.public_key, job.job_id, LeaseProgress("building", 2))
    assert info.value.code == "withdrawn"
    with pytest.raises(JobWithdrawnError):
        queue.receive_result(NODE_1.public_key, job.job_id, result_for(NODE_1, job).to_bytes())
    with pytest.raises(JobWithdrawnError):
        await queue.wait_result(job.job_id)
    assert queue.delivery(job.job_id) is None
    assert queue.statistics().withdrawn_taken == 1
    # A withdrawn offer nobody took yet is not handed out.
    untaken = job_for()
    queue.offer(None, untaken)
    queue.withdraw(untaken.job_id)
    assert await queue.take(NODE_1.public_key, 5) is None
    assert queue.statistics().pending == 0


async def test_a_late_result_after_expiry_is_refused_and_not_stored(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path)
    job = await taken(queue, NODE_1, NODE_1)
    await trio.sleep(61)  # nobody waits: the expiry is judged when the node comes back
    late = result_for(NODE_1, job)
    with pytest.raises(LeaseExpiredError):
        queue.receive_result(NODE_1.public_key, job.job_id, late.to_bytes())
    with pytest.raises(LeaseExpiredError):
        await queue.receive_file(
            NODE_1.public_key, job.job_id, "artifacts", "out/thing", chunks(ARTIFACT)
        )
    assert queue.delivery(job.job_id) is None
    assert queue.artifact(job.job_id, "out/thing") is None
    assert not (tmp_path / "uploads").exists()
    with pytest.raises(LeaseExpiredError):
        await queue.wait_result(job.job_id)
    assert queue.statistics().leases_expired == 1


async def test_a_file_finishing_after_the_job_was_withdrawn_is_not_kept(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path)
    job = await taken(queue, NODE_1, NODE_1)
    queue.receive_result(NODE_1.public_key, job.job_id, result_for(NODE_1, job).to_bytes())

    async def slow_upload() -> AsyncIterator[bytes]:
        yield ARTIFACT[:4]
        queue.withdraw(job.job_id)  # the build is cancelled while the file streams in
        yield ARTIFACT[4:]

    with pytest.raises(JobWithdrawnError):
        await queue.receive_file(
            NODE_1.public_key, job.job_id, "artifacts", "out/thing", slow_upload()
        )
    assert not list((tmp_path / "uploads").rglob("thing*"))


async def test_after_a_restart_a_resumed_job_gets_a_whole_fresh_lease(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    # A new queue (the old one died with the dispatcher) told by the engine that node-1
    # had taken these jobs.
    queue = make_queue(tmp_path)
    dead, alive = job_for(NODE_1), job_for(NODE_1)
    queue.resume(NODE_1.public_key, dead)
    queue.resume(NODE_1.public_key, alive)
    # Nobody can take them; they are node-1's.
    assert await queue.take(NODE_2.public_key, 0) is None
    assert await queue.take(NODE_1.public_key, 0) is None
    start = trio.current_time()

    async def still_building() -> None:
        await trio.sleep(45)
        queue.renew(NODE_1.public_key, alive.job_id, LeaseProgress("building", 500))
        await trio.sleep(45)
        result = result_for(NODE_1, alive, files=False)
        queue.receive_result(NODE_1.public_key, alive.job_id, result.to_bytes())

    nursery.start_soon(still_building)
    with pytest.raises(LeaseExpiredError):
        await queue.wait_result(dead.job_id)
    assert trio.current_time() - start == 60  # not at once: one whole lease period
    assert (await queue.wait_result(alive.job_id)).node == NODE_1.public_key
    assert trio.current_time() - start == 90


# -- the routes, over real loopback HTTPS -----------------------------------------------------


@pytest.mark.slow
async def test_lease_route_renews_refuses_and_answers_gone(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    queue, url, tls, offset = await serve_moved_queue(
        nursery, tmp_path, lease_s=20.0, heartbeat_s=5.0
    )
    async with pinned_client(tls.sha256, base_url=url, timeout=10) as c:
        kept, withdrawn, lost = job_for(NODE_1), job_for(NODE_1), job_for(NODE_1)
        for job in (kept, withdrawn, lost):
            queue.offer(NODE_1.public_key, job)
            response = await c.post("/v1/pull", params={"wait": "1"}, headers=auth())
            assert response.status_code == 200 and Job.from_bytes(response.content) == job
            assert response.headers[LEASE_HEADER] == "20"
            assert response.headers[HEARTBEAT_HEADER] == "5"

        def lease(job: Job) -> str:
            return f"/v1/pull/jobs/{job.id_hex}/lease"

        progress = {"phase": "building", "elapsed_s": 12, "log_bytes": 345}
        response = await c.post(lease(kept), json=progress, headers=auth())
        assert response.status_code == 200, response.text
        assert response.json() == {"job_id": kept.id_hex, "state": "taken", "lease_s": 20.0,
                                   "heartbeat_s": 5.0}
        delivery = queue.delivery(kept.job_id)
        assert delivery is not None and delivery.progress == LeaseProgress("building", 12, 345)
        refusals = [
            (lease(kept), {}, auth(NODE_2), 404, "unknown-job"),
            (lease(kept), {"phase": "dreaming"}, auth(), 400, "malformed"),
            (lease(kept), {"phase": ["building"]}, auth(), 400, "malformed"),
            (lease(kept), ["building"], auth(), 400, "malformed"),
            (lease(kept), {"elapsed_s": -1}, auth(), 400, "malformed"),
            (lease(kept), {}, {}, 401, "unauthenticated"),
            ("/v1/pull/jobs/00/lease", {}, auth(), 404, "unknown-job"),
        ]
        for path, body, headers, status, code in refusals:
            response = await c.post(path, json=body, headers=headers)
            assert (response.status_code, response.json()["error"]) == (status, code), path

        queue.withdraw(withdrawn.job_id)
        response = await c.post(lease(withdrawn), json=progress, headers=auth())
        assert (response.status_code, response.json()["error"]) == (410, "withdrawn")

        # 15 s later the renewed job is alive, the other one (last heard 15 s + the
        # request) is too; 10 s more and only the renewed-again one is.
        offset[0] = 15.0
        response = await c.post(lease(kept), content=b"", headers=auth())
        assert response.status_code == 200
        offset[0] = 25.0
        assert queue.expire_due() == 1
        response = await c.post(lease(kept), content=b"", headers=auth())
        assert response.status_code == 200
        response = await c.put(
            f"/v1/pull/jobs/{lost.id_hex}/result",
            content=result_for(NODE_1, lost).to_bytes(), headers=auth(),
        )
        assert (response.status_code, response.json()["error"]) == (410, "lease-expired")
        assert "did not renew the lease" in response.json()["reason"]
        assert queue.delivery(lost.job_id) is None
    stats = queue.statistics()
    assert stats.leases_expired == 1 and stats.renewals == 3
    assert dict(stats.rejected)["withdrawn"] == 1 and dict(stats.rejected)["lease-expired"] == 1


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'"x"', b'{"phase": 5}', b'{"phase": {}}', b'{"elapsed_s": 1.5}',
     b'{"log_bytes": true}', b'{"elapsed_s": 9007199254740992}', b"\xff"],
)
def test_a_renewal_body_that_is_not_progress_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedError):
        LeaseProgress.from_json(body)


def test_renewal_bodies_that_are_progress() -> None:
    assert LeaseProgress.from_json(b"") == LeaseProgress()
    assert LeaseProgress.from_json(b'{"phase": "uploading", "newer": 1}') == LeaseProgress(
        "uploading"
    )
    assert LeaseProgress.from_json(b'{"elapsed_s": 0, "log_bytes": 7}') == LeaseProgress(
        "", 0, 7
    )
