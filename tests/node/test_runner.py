"""The real runner behind the job service: a signed make job built in the sandbox."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest
import trio

from p2pbuild import BuildType, Job, JobSpec, ResultState, SourceArtifact, Target
from p2pbuild.node import Limits
from p2pbuild.node._runner import ExecutorRunner
from p2pbuild.node._service import JobService
from p2pbuild.testing import hello_tarball, make_trust_list

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list()
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["node-1"]


async def test_make_job_builds_and_result_names_the_artifacts(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    package = hello_tarball(tmp_path / "hello.tar.gz")
    data = package.path.read_bytes()

    async def fetch(source: SourceArtifact, dest: Path) -> None:
        assert source.url == "https://dispatcher.invalid/hello.tar.gz"
        shutil.copyfile(package.path, dest)

    runner = ExecutorRunner(Limits(time_limit=60, max_disk_bytes=256 << 20), fetch=fetch)
    service = JobService(NODE, FIXTURE.trust_list, runner, tmp_path / "work")
    await nursery.start(service.run)
    spec = JobSpec(
        SourceArtifact("hello.tar.gz", len(data), hashlib.sha256(data).digest(),
                       "https://dispatcher.invalid/hello.tar.gz"),
        BuildType.MAKE,
        Target("x86_64", "debian-12"),
        options={"check": True, "jobs": 2},
        time_limit_s=120,
    )
    job = Job.create(DISPATCHER, spec, issued_at=int(time.time()), lifetime=600)
    service.submit(job.to_bytes())
    with trio.fail_after(60):
        result = await service.wait_result(job.job_id)
    log = b"".join([chunk async for chunk in service.follow_log(job.job_id, follow=False)])
    assert result.state is ResultState.SUCCEEDED, log
    assert [a.name for a in result.artifacts] == ["hello"]
    digest, path = service.file(job.job_id, "artifacts", "hello") or (None, None)
    assert digest is not None and path is not None
    assert hashlib.sha256(path.read_bytes()).digest() == digest.sha256
    assert b"make check passed" in log
    assert result.environment_map["make"].startswith("GNU Make")


async def test_source_with_the_wrong_digest_is_a_rejected_result(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async def fetch(source: SourceArtifact, dest: Path) -> None:
        dest.write_bytes(b"not the signed source")

    service = JobService(NODE, FIXTURE.trust_list, ExecutorRunner(fetch=fetch), tmp_path / "w")
    await nursery.start(service.run)
    spec = JobSpec(
        SourceArtifact("x.tar.gz", 21, bytes(32), "https://dispatcher.invalid/x"),
        BuildType.MAKE, Target("x86_64", "debian-12"),
    )
    job = Job.create(DISPATCHER, spec, issued_at=int(time.time()), lifetime=600)
    service.submit(job.to_bytes())
    with trio.fail_after(30):
        result = await service.wait_result(job.job_id)
    assert result.state is ResultState.REJECTED
    assert dict(service.statistics().rejected) == {"source-digest-mismatch": 1}
