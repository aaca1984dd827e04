"""Pull-mode queue, dispatcher side: a job the engine is done with is forgotten.

A delivered job stays until the engine releases it; a lost or withdrawn one ends at once.
Either way the queue keeps no delivery and no uploaded file for it, only a small bounded
tombstone, so the node's late requests are answered ``410``. The queue's clock is trio's
autojump clock; the routes are driven in process (ASGI), so every answer is deterministic.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from pull_fixtures import (
    ARTIFACT,
    NODE_1,
    NODE_2,
    auth,
    chunks,
    clock,
    make_queue,
)
from pull_fixtures import taken as pull_taken

from p2pbuild import (
    FileDigest,
    Identity,
    Job,
    Result,
)
from p2pbuild.dispatcher._pull import (
    JobWithdrawnError,
    LeaseExpiredError,
    LeaseProgress,
    PullQueue,
    UnknownPullJobError,
)
from p2pbuild.dispatcher._pull_routes import make_pull_app

LOG = b"make: done\n"


def digest(name: str, data: bytes) -> FileDigest:
    return FileDigest(name, len(data), hashlib.sha256(data).digest())


def result_for(node: Identity, job: Job, state: str = "succeeded") -> Result:
    return Result.create(
        node, job, state=state, exit_code=0 if state == "succeeded" else 2, started_ms=1,
        ended_ms=2, environment={}, artifacts=[digest("out/thing", ARTIFACT)],
        logs=[digest("build.log", LOG)],
    )  # fmt: skip


async def taken(queue: PullQueue, node: Identity = NODE_1) -> Job:
    return await pull_taken(queue, node, node)


async def upload(
    queue: PullQueue, job: Job, *, node: Identity = NODE_1, log: bool = True
) -> Result:
    result = result_for(node, job)
    queue.receive_result(node.public_key, job.job_id, result.to_bytes())
    await queue.receive_file(node.public_key, job.job_id, "artifacts", "out/thing",
                             chunks(ARTIFACT))
    if log:
        await queue.receive_file(node.public_key, job.job_id, "logs", "build.log", chunks(LOG))
    return result


def upload_dir(tmp_path: Path, job: Job) -> Path:
    return tmp_path / "uploads" / job.id_hex


async def late_requests_refused(
    queue: PullQueue, job: Job, error: type[Exception], node: Identity = NODE_1
) -> None:
    """Every request of the node about ``job`` is refused with ``error`` and stores
    nothing; any other node hears the job is unknown."""
    with pytest.raises(error):
        queue.renew(node.public_key, job.job_id, LeaseProgress("uploading", 1))
    with pytest.raises(error):
        queue.receive_result(node.public_key, job.job_id, result_for(node, job).to_bytes())
    with pytest.raises(error):
        await queue.receive_file(node.public_key, job.job_id, "artifacts", "out/thing",
                                 chunks(ARTIFACT))
    with pytest.raises(error):
        queue.receive_refusal(node.public_key, job.job_id, "no-free-slot", "")
    with pytest.raises(UnknownPullJobError):
        queue.renew(NODE_2.public_key, job.job_id, LeaseProgress())
    assert queue.delivery(job.job_id) is None
    assert queue.artifact(job.job_id, "out/thing") is None
    assert queue.log(job.job_id, "build.log") is None


async def test_a_released_job_is_forgotten_and_its_uploads_deleted(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path)
    job = await taken(queue)
    result = await upload(queue, job)
    assert await queue.wait_result(job.job_id) == result
    # Until released the engine can read the verified uploads.
    artifact = queue.artifact(job.job_id, "out/thing")
    assert artifact is not None and artifact.read_bytes() == ARTIFACT
    assert (upload_dir(tmp_path, job) / "logs" / "build.log").read_bytes() == LOG
    assert queue.statistics().delivered == 1

    queue.release(job.job_id)
    assert not upload_dir(tmp_path, job).exists()
    assert list((tmp_path / "uploads").iterdir()) == []
    stats = queue.statistics()
    assert (stats.pending, stats.taken, stats.delivered, stats.refused) == (0, 0, 0, 0)
    assert (stats.released, stats.tombstones) == (1, 1)
    # A retried upload or a last renewal: 410 withdrawn, and nothing is written again.
    await late_requests_refused(queue, job, JobWithdrawnError)
    assert not upload_dir(tmp_path, job).exists()
    with pytest.raises(JobWithdrawnError):
        await queue.wait_result(job.job_id)
    # Releasing again, or withdrawing after, changes nothing.
    queue.release(job.job_id)
    queue.withdraw(job.job_id)
    assert queue.statistics().tombstones == 1


async def test_a_lost_job_leaves_no_partial_uploads(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path, lease_s=60.0, heartbeat_s=15.0)
    job = await taken(queue)
    await upload(queue, job, log=False)  # the result and the artifact, not the log
    assert (upload_dir(tmp_path, job) / "artifacts" / "out" / "thing").exists()
    await trio.sleep(61)  # then the node is silent for a whole lease
    assert queue.expire_due() == 1
    assert not upload_dir(tmp_path, job).exists()
    await late_requests_refused(queue, job, LeaseExpiredError)
    assert queue.statistics().tombstones == 1


async def test_a_withdrawn_delivered_job_leaves_no_uploads(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    # The engine withdraws a delivered job whose result it will not keep (a result that
    # does not answer the job, an artifact that does not re-hash, a build already decided).
    queue = make_queue(tmp_path)
    job = await taken(queue)
    await upload(queue, job)
    queue.withdraw(job.job_id)
    assert not upload_dir(tmp_path, job).exists()
    await late_requests_refused(queue, job, JobWithdrawnError)
    stats = queue.statistics()
    assert (stats.delivered, stats.released, stats.withdrawn_taken) == (0, 0, 0)
    # Withdrawn mid-upload: the half-uploaded job's directory goes too.
    job = await taken(queue)
    await upload(queue, job, log=False)
    queue.withdraw(job.job_id)
    assert list((tmp_path / "uploads").iterdir()) == []
    assert queue.statistics().withdrawn_taken == 1


async def test_a_file_finishing_after_release_is_not_kept(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path)
    job = await taken(queue)
    await upload(queue, job)

    async def retried_upload() -> AsyncIterator[bytes]:
        yield LOG[:3]
        queue.release(job.job_id)  # the engine is done while a retry still streams in
        yield LOG[3:]

    with pytest.raises(JobWithdrawnError):
        await queue.receive_file(
            NODE_1.public_key, job.job_id, "logs", "build.log", retried_upload()
        )
    assert not upload_dir(tmp_path, job).exists()


async def test_tombstones_are_bounded(autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
    queue = make_queue(tmp_path, max_gone=2)
    jobs = [await taken(queue) for _ in range(3)]
    for job in jobs:
        await upload(queue, job)
        queue.release(job.job_id)
    assert queue.statistics().tombstones == 2
    assert list((tmp_path / "uploads").iterdir()) == []
    # The oldest is forgotten altogether: unknown (404), still not stored.
    with pytest.raises(UnknownPullJobError):
        queue.receive_result(
            NODE_1.public_key, jobs[0].job_id, result_for(NODE_1, jobs[0]).to_bytes()
        )
    assert queue.delivery(jobs[0].job_id) is None
    for job in jobs[1:]:
        with pytest.raises(JobWithdrawnError):
            queue.renew(NODE_1.public_key, job.job_id, LeaseProgress())


async def test_uploads_left_by_a_dispatcher_before_a_restart_are_deleted(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    old = make_queue(tmp_path)
    resumed, withdrawn = await taken(old), await taken(old)
    await upload(old, resumed, log=False)
    await upload(old, withdrawn, log=False)
    # The process dies; the new queue knows nothing of them and reads nothing back.
    queue = make_queue(tmp_path)
    queue.resume(NODE_1.public_key, resumed)
    assert not upload_dir(tmp_path, resumed).exists()
    assert queue.artifact(resumed.job_id, "out/thing") is None
    queue.withdraw(withdrawn.job_id)  # a build cancelled or given up on at the restart
    assert not upload_dir(tmp_path, withdrawn).exists()
    # The resumed job's node uploads again, and that is what the engine gets.
    result = await upload(queue, resumed)
    assert await queue.wait_result(resumed.job_id) == result
    artifact = queue.artifact(resumed.job_id, "out/thing")
    assert artifact is not None and artifact.read_bytes() == ARTIFACT


async def test_late_requests_for_a_released_job_are_answered_410_over_the_routes(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    queue = make_queue(tmp_path)
    job = await taken(queue)
    await upload(queue, job)
    queue.release(job.job_id)

    headers = functools.partial(auth, NODE_1, clock)  # a fresh single-use token each
    transport = httpx.ASGITransport(app=make_pull_app(queue))
    base = f"/v1/pull/jobs/{job.id_hex}"
    async with httpx.AsyncClient(transport=transport, base_url="https://dispatcher") as c:
        answers = [
            await c.post(f"{base}/lease", json={"phase": "uploading"}, headers=headers()),
            await c.put(f"{base}/result", content=result_for(NODE_1, job).to_bytes(),
                        headers=headers()),
            await c.put(f"{base}/artifacts/out/thing", content=ARTIFACT, headers=headers()),
            await c.put(f"{base}/logs/build.log", content=LOG, headers=headers()),
        ]
        for response in answers:
            assert (response.status_code, response.json()["error"]) == (410, "withdrawn")
        response = await c.post(f"{base}/lease", json={}, headers=auth(NODE_2, clock))
        assert (response.status_code, response.json()["error"]) == (404, "unknown-job")
    assert not upload_dir(tmp_path, job).exists()
