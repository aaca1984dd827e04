"""Pull mode: a node with no listening port takes a job through the dispatcher's PullQueue."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
import trio
from pull_fixtures import (
    DISPATCHER,
    FIXTURE,
    NODE_1,
    NODE_2,
    SOURCE,
    pull_overrides,
    serve_queue,
)
from waits import wait_until

from p2pbuild import (
    BuildType,
    FileDigest,
    Identity,
    Job,
    JobSpec,
    PullAuth,
    Result,
    ResultState,
    SourceArtifact,
    Target,
)
from p2pbuild.dispatcher._errors import NodeRefusedError
from p2pbuild.https import pinned_client
from p2pbuild.node._pull import auth_header
from p2pbuild.testing import hello_tarball, make_identity
from p2pbuild.testing._nodes import open_node_daemons, serve_files
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

def job_for(arch: str, os_name: str, source: SourceArtifact, **kwargs: object) -> Job:
    spec = JobSpec(source, BuildType.MAKE, Target(arch, os_name), time_limit_s=120)
    return Job.create(
        DISPATCHER, spec, issued_at=int(time.time()), lifetime=600, **kwargs  # type: ignore[arg-type]
    )


async def test_pull_node_without_a_port_builds_and_uploads(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    package = hello_tarball(sources / "hello-1.0.tar.gz")
    files_url, _ = await nursery.start(serve_files, sources, tmp_path / "files-tls")
    queue, url, tls = await serve_queue(nursery, tmp_path)
    async with open_node_daemons(
        tmp_path / "nodes", [NODE_1], FIXTURE.trust_list, push=False,
        overrides=pull_overrides(url, tls),
    ) as (daemon,):  # fmt: skip
        assert daemon.api_port is None and daemon.endpoint == ""
        assert daemon.capability_record is not None
        assert daemon.capability_record.body.pull_only  # type: ignore[union-attr]
        source = SourceArtifact(
            package.path.name, package.path.stat().st_size, bytes.fromhex(package.sha256),
            f"{files_url}/{package.path.name}",
        )  # fmt: skip
        job = job_for(daemon.detected.arch, daemon.detected.os, source, node=NODE_1.public_key)
        queue.offer(NODE_1.public_key, job)
        with trio.fail_after(60):
            result = await queue.wait_result(job.job_id)
        result.check_answers(job, NODE_1.public_key)
        assert result.state is ResultState.SUCCEEDED
        assert [a.name for a in result.artifacts] == ["hello"]
        path = queue.artifact(job.job_id, "hello")
        assert path is not None
        assert hashlib.sha256(path.read_bytes()).digest() == result.artifacts[0].sha256
        assert queue.log(job.job_id, "build.log") is not None
        # Delivered: the node collected the job and freed its files.
        with trio.fail_after(5):
            await daemon.pull_clients[0].wait_uploads()
        assert daemon.service.statistics().finished == 0
        assert daemon.pull_clients[0].uploaded == 1


async def test_pulled_job_the_node_cannot_serve_is_refused_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    queue, url, tls = await serve_queue(nursery, tmp_path)
    async with open_node_daemons(
        tmp_path / "nodes", [NODE_1], FIXTURE.trust_list, push=False,
        runner=lambda _: InstantRunner(), overrides=pull_overrides(url, tls),
    ) as (daemon,):  # fmt: skip
        source = SOURCE
        wrong = job_for("s390x", daemon.detected.os, source)
        queue.offer(None, wrong)
        with trio.fail_after(10), pytest.raises(NodeRefusedError) as info:
            await queue.wait_result(wrong.job_id)
        assert info.value.node_code == "unservable"
        # An instant job for the right platform still goes through afterwards.
        right = job_for(daemon.detected.arch, daemon.detected.os, source)
        queue.offer(None, right)
        with trio.fail_after(10):
            result = await queue.wait_result(right.job_id)
        assert result.state is ResultState.SUCCEEDED
        assert result.node == NODE_1.public_key


async def test_pull_endpoints_refuse_bad_tokens_and_bad_uploads(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    queue, url, tls = await serve_queue(nursery, tmp_path, max_wait=1.0)
    now = int(time.time())

    def token(identity: Identity = NODE_1, issued_at: int = now) -> dict[str, str]:
        auth = PullAuth.create(identity, DISPATCHER.public_key, issued_at=issued_at)
        return {"authorization": auth_header(auth)}

    stranger = make_identity("stranger")
    for_other = PullAuth.create(NODE_1, NODE_2.public_key, issued_at=now)
    replayed = token()
    async with pinned_client(tls.sha256, base_url=url, timeout=10) as c:
        cases = [
            ({}, 401, "unauthenticated"),
            ({"authorization": "P2PBuild-Pull !!!"}, 400, "malformed"),
            (token(stranger), 401, "untrusted-key"),
            ({"authorization": auth_header(for_other)}, 421, "wrong-node"),
            (token(issued_at=now - 600), 410, "expired"),
        ]
        for headers, status, code in cases:
            response = await c.post("/v1/pull", params={"wait": "0"}, headers=headers)
            assert response.status_code == status, (code, response.text)
            assert response.json()["error"] == code
        assert (await c.post("/v1/pull", params={"wait": "0"}, headers=replayed)).status_code == 204
        response = await c.post("/v1/pull", params={"wait": "0"}, headers=replayed)
        assert response.status_code == 409 and response.json()["error"] == "replayed"

        # A job offered to node-2 is not given to node-1.
        job = job_for("x86_64", "fedora-41", SOURCE)
        queue.offer(NODE_2.public_key, job)
        response = await c.post("/v1/pull", params={"wait": "0.2"}, headers=token())
        assert response.status_code == 204
        response = await c.post("/v1/pull", params={"wait": "1"}, headers=token(NODE_2))
        assert response.status_code == 200
        assert Job.from_bytes(response.content) == job
        # Uploads only from the node that took it, result first, digests must match.
        base = f"/v1/pull/jobs/{job.id_hex}"
        data = b"the artifact"
        result = Result.create(
            NODE_2, job, state="succeeded", exit_code=0, started_ms=1, ended_ms=2,
            environment={}, artifacts=[_digest("out/a", data)], logs=[],
        )  # fmt: skip
        response = await c.put(f"{base}/artifacts/out/a", content=data, headers=token(NODE_2))
        assert response.status_code == 409 and response.json()["error"] == "no-result-yet"
        response = await c.put(f"{base}/result", content=result.to_bytes(), headers=token())
        assert response.status_code == 404
        response = await c.put(f"{base}/result", content=result.to_bytes(), headers=token(NODE_2))
        assert response.status_code == 200, response.text
        response = await c.put(f"{base}/artifacts/out/a", content=b"X" + data[1:],
                               headers=token(NODE_2))
        assert response.status_code == 422
        assert response.json()["error"] == "artifact-digest-mismatch"
        response = await c.put(f"{base}/artifacts/out/a", content=data + b"!",
                               headers=token(NODE_2))
        assert response.status_code == 413
        assert queue.artifact(job.job_id, "out/a") is None
        response = await c.put(f"{base}/artifacts/out/a", content=data, headers=token(NODE_2))
        assert response.status_code == 200
        with trio.fail_after(1):
            assert (await queue.wait_result(job.job_id)) == result
    stats = queue.statistics()
    assert stats.delivered == 1 and dict(stats.rejected)["replayed"] == 1


def _digest(name: str, data: bytes) -> FileDigest:
    return FileDigest(name, len(data), hashlib.sha256(data).digest())


async def test_long_poll_wakes_up_when_a_job_is_offered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    queue, url, _ = await serve_queue(nursery, tmp_path, max_wait=10.0)
    job = job_for("x86_64", "fedora-41", SOURCE)
    offered_at: list[float] = []

    async def offer_later() -> None:
        # Once the request waits in the queue: the answer comes with the offer, not before.
        await wait_until(lambda: queue.statistics().waiting_nodes, 5, "the node's poll waits")
        offered_at.append(trio.current_time())
        queue.offer_bytes(job.to_bytes())

    nursery.start_soon(offer_later)
    auth = PullAuth.create(NODE_1, DISPATCHER.public_key, issued_at=int(time.time()))
    async with httpx.AsyncClient(verify=False, base_url=url, timeout=15) as c:
        start = trio.current_time()
        response = await c.post(
            "/v1/pull", params={"wait": "10"}, headers={"authorization": auth_header(auth)}
        )
        end = trio.current_time()
    assert response.status_code == 200 and Job.from_bytes(response.content) == job
    # Asked before the offer, answered after it, long before the 10 s poll ran out.
    assert start < offered_at[0] < end < start + 5
