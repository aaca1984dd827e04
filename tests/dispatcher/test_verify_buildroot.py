"""Verification compares buildroots as well as artifacts: unit tests over signed results,
and real builds on two operators' nodes from a repository served over HTTPS."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from p2pbuild import (
    BuildrootPackage,
    BuildrootRecord,
    BuildrootSpec,
    BuildType,
    FileDigest,
    Identity,
    Job,
    JobSpec,
    Repository,
    Result,
    ResultState,
    Role,
    SourceArtifact,
    Target,
    TrustEntry,
)
from p2pbuild.dispatcher._verify import (
    NeedTieBreak,
    Replica,
    Verified,
    assess,
    difference_report,
)
from p2pbuild.node import BuildrootCache, ExecutorRunner, Limits
from p2pbuild.node._service import RunReport
from p2pbuild.testing import (
    GREET_HEADER,
    greet_devel_rpm,
    greet_srpm,
    make_identity,
    make_trust_list,
    publish_repository,
    serve_files,
    write_rpm,
)

FIXTURE = make_trust_list(nodes=(("alice-1", "alice"), ("bob-1", "bob")))
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
ALICE, BOB = FIXTURE.nodes["alice-1"], FIXTURE.nodes["bob-1"]
SNAP_1, SNAP_2 = hashlib.sha256(b"snapshot 1").digest(), hashlib.sha256(b"snapshot 2").digest()
RPM = {"greet-1.0-1.x86_64.rpm": b"identical bytes"}


def record(repomd: bytes) -> BuildrootRecord:
    return BuildrootRecord(
        (("test", repomd),),
        (BuildrootPackage("p2pbuild-greet-devel-1.0-1.noarch", hashlib.sha256(b"d").digest()),),
    )


def signed(node: Identity, job: Job, files: Mapping[str, bytes],
           buildroot: BuildrootRecord | None) -> Result:
    return Result.create(
        node, job, state="succeeded", exit_code=0, started_ms=0, ended_ms=1, environment={},
        artifacts=[FileDigest(n, len(c), hashlib.sha256(c).digest()) for n, c in files.items()],
        logs=[], buildroot=buildroot,
    )


def job() -> Job:
    spec = JobSpec(SourceArtifact("greet-1.0-1.src.rpm", 1, bytes(32)), BuildType.RPM,
                   Target("x86_64", "debian-12"))
    return Job.create(DISPATCHER, spec, issued_at=1000, lifetime=600)


def test_identical_artifacts_from_different_buildroots_never_verify() -> None:
    j = job()
    alice = Replica(ALICE.public_key, "alice", signed(ALICE, j, RPM, record(SNAP_1)), 1)
    bob = Replica(BOB.public_key, "bob", signed(BOB, j, RPM, record(SNAP_2)), 2)
    verdict = assess([alice, bob])
    assert isinstance(verdict, NeedTieBreak)
    report = difference_report(verdict.groups)
    assert "ran in different buildroots" in report
    assert f"  group 1: {SNAP_1.hex()}" in report and f"  group 2: {SNAP_2.hex()}" in report
    # Same buildroot: verified.
    bob_same = Replica(BOB.public_key, "bob", signed(BOB, j, RPM, record(SNAP_1)), 2)
    assert isinstance(assess([alice, bob_same]), Verified)
    # A result with a buildroot and one without do not verify each other either.
    plain = Replica(BOB.public_key, "bob", signed(BOB, j, RPM, None), 2)
    verdict = assess([alice, plain])
    assert isinstance(verdict, NeedTieBreak)
    assert "no buildroot" in difference_report(verdict.groups)


# -- real builds --------------------------------------------------------------------------------


async def _run(node: Identity, runner: ExecutorRunner, j: Job, workdir: Path) -> Result:
    async def log(data: bytes) -> None:
        pass

    report: RunReport = await runner.run(j, workdir, log)
    return Result.create(
        node, j, state=report.state, exit_code=report.exit_code, started_ms=0, ended_ms=1,
        environment=report.environment, artifacts=[f.digest for f in report.artifacts],
        logs=[f.digest for f in report.logs], buildroot=report.buildroot,
    )


@pytest.mark.slow
async def test_two_operators_verify_a_build_in_a_served_buildroot(tmp_path: Path) -> None:
    assert not Path(GREET_HEADER).exists(), "the host must not have the test header"
    www = tmp_path / "www"
    devel = greet_devel_rpm(tmp_path / "rpms")
    snapshot_1 = publish_repository(www / "one", [devel])
    other = write_rpm(tmp_path / "rpms", "unrelated", files={"/usr/share/unrelated/x": "x"})
    snapshot_2 = publish_repository(www / "two", [devel, other])
    srpm = greet_srpm(tmp_path / "srpm")

    async def fetch(source: SourceArtifact, dest: Path) -> None:
        dest.write_bytes(srpm.path.read_bytes())

    limits = Limits(time_limit=120, max_output_bytes=1 << 20, max_disk_bytes=256 << 20)
    runners = {
        name: ExecutorRunner(limits, fetch=fetch,
                             buildroots=BuildrootCache(tmp_path / f"{name}-cache"))
        for name in ("alice", "bob")
    }

    def make_job(url: str, repomd: bytes, node: Identity) -> Job:
        spec = JobSpec(
            SourceArtifact(srpm.path.name, srpm.path.stat().st_size,
                           bytes.fromhex(srpm.sha256), "https://unused.invalid/s"),
            BuildType.RPM, Target("x86_64", "debian-12"), {}, 600,
            BuildrootSpec((Repository("test", url, repomd),)),
        )
        return Job.create(DISPATCHER, spec, issued_at=1000, lifetime=600, node=node.public_key)

    async with trio.open_nursery() as nursery:
        base, _ = await nursery.start(serve_files, www, tmp_path / "tls")
        one = f"{base}/one/"
        alice = await _run(ALICE, runners["alice"], make_job(one, snapshot_1.repomd_sha256,
                                                             ALICE), tmp_path / "a1")
        bob = await _run(BOB, runners["bob"], make_job(one, snapshot_1.repomd_sha256, BOB),
                         tmp_path / "b1")
        # Bob again, on the other snapshot (the same greet-devel, one more unrelated package).
        bob_2 = await _run(BOB, runners["bob"],
                           make_job(f"{base}/two/", snapshot_2.repomd_sha256, BOB),
                           tmp_path / "b2")
        nursery.cancel_scope.cancel()

    for result in (alice, bob, bob_2):
        assert result.state is ResultState.SUCCEEDED
        assert result.buildroot is not None
    verdict = assess([Replica(ALICE.public_key, "alice", alice, 1),
                      Replica(BOB.public_key, "bob", bob, 2)])
    assert isinstance(verdict, Verified)
    assert alice.buildroot == bob.buildroot
    assert alice.buildroot is not None
    assert alice.buildroot.repos == (("test", snapshot_1.repomd_sha256),)

    # Different snapshots: the artifacts are the same bytes, yet they never verify.
    assert bob_2.artifacts == alice.artifacts
    verdict = assess([Replica(ALICE.public_key, "alice", alice, 1),
                      Replica(BOB.public_key, "bob", bob_2, 2)])
    assert isinstance(verdict, NeedTieBreak)
    assert "ran in different buildroots" in difference_report(verdict.groups)


def test_buildroot_jobs_go_only_to_nodes_that_can_make_buildroots() -> None:
    import random

    import attrs

    from p2pbuild.dispatcher._errors import NoCapableNodeError
    from p2pbuild.dispatcher._select import Candidate, Requirements, select_nodes
    from p2pbuild.testing import example_capability, example_status

    def candidate(name: str, operator: str, build_types: tuple[str, ...]) -> Candidate:
        key = make_identity(name).public_key
        capability = attrs.evolve(example_capability(), build_types=build_types)
        return Candidate(key, capability, example_status(),
                         TrustEntry(key, Role.NODE, operator), 0.8)

    farm = [candidate("a", "alice", ("make", "rpm")), candidate("b", "bob", ("rpm", "rpm.dnf")),
            candidate("c", "carol", ("rpm", "rpm.dnf"))]
    need = Requirements("x86_64", "fedora-41", BuildType.RPM, count=2, buildroot=True)
    for seed in range(20):
        chosen = select_nodes(farm, need, random.Random(seed))
        assert {c.operator for c in chosen} == {"bob", "carol"}
    with pytest.raises(NoCapableNodeError, match="can make buildroots"):
        select_nodes(farm[:1], attrs.evolve(need, count=1), random.Random(1))
    plain = attrs.evolve(need, buildroot=False, count=3)
    assert len(select_nodes(farm, plain, random.Random(1))) == 3
