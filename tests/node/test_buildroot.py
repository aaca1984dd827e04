"""Buildroots for real: repositories made with rpmbuild + createrepo_c, served over HTTPS
on loopback, resolved, downloaded, installed with dnf --installroot, built in with
rpmbuild inside bubblewrap."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

from p2pbuild import (
    BuildrootSpec,
    Job,
    JobSpec,
    Repository,
    ResultState,
    SourceArtifact,
    Target,
)
from p2pbuild.node import (
    HOST_PACKAGE,
    BadMetadataError,
    BuildrootCache,
    BuildSpec,
    BuildState,
    BuildType,
    ExecutorRunner,
    JobFilter,
    Limits,
    MetadataLimits,
    MissingBuildDependencyError,
    PackageChecksumError,
    PackageOutsideBuildrootError,
    RepoChangedError,
    RepoUnreachableError,
    UnservableJobError,
    run_build,
)
from p2pbuild.testing import (
    GREET_HEADER,
    PublishedRepo,
    SourcePackage,
    greet_devel_rpm,
    greet_srpm,
    make_trust_list,
    publish_repository,
    serve_files,
    write_rpm,
)

pytestmark = pytest.mark.slow
LIMITS = Limits(time_limit=120, max_output_bytes=1 << 20, max_disk_bytes=256 << 20)
DIGEST = hashlib.sha256(b"x").digest()


@attrs.define
class Served:
    base: Path
    url: str
    repo: PublishedRepo
    srpm: SourcePackage

    def buildroot(self, **changes: object) -> BuildrootSpec:
        spec = BuildrootSpec((Repository("test", self.url + "/repo/", self.repo.repomd_sha256),))
        return attrs.evolve(spec, **changes)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    www = tmp_path / "www"
    repo = publish_repository(www / "repo", [greet_devel_rpm(tmp_path / "rpms")])
    srpm = greet_srpm(tmp_path / "srpm")
    async with trio.open_nursery() as nursery:
        url, _ = await nursery.start(serve_files, www, tmp_path / "tls")
        yield Served(tmp_path, url, repo, srpm)
        nursery.cancel_scope.cancel()


async def _build(served: Served, cache: BuildrootCache, name: str,
                 buildroot: BuildrootSpec | None = None) -> object:
    spec = BuildSpec(BuildType.RPM, served.srpm.path, served.srpm.sha256,
                     buildroot=buildroot or served.buildroot())
    return await run_build(spec, served.base / name, LIMITS, buildroots=cache)


async def test_header_only_in_the_repository_builds_in_the_buildroot(served: Served) -> None:
    assert not Path(GREET_HEADER).exists(), "the host must not have the test header"
    # Without a buildroot the host's /usr is all there is: the build fails.
    plain = await run_build(
        BuildSpec(BuildType.RPM, served.srpm.path, served.srpm.sha256),
        served.base / "plain", LIMITS,
    )
    assert plain.state is BuildState.FAILED
    assert b"p2pbuild-greet.h" in plain.logs[0].path.read_bytes()

    cache = BuildrootCache(served.base / "cache")
    first = await _build(served, cache, "first")
    assert first.state is BuildState.SUCCEEDED, first.logs[0].path.read_text()[-2000:]
    assert [a.name for a in first.artifacts] == ["greet-1.0-1.x86_64.rpm"]
    record = first.buildroot
    assert record is not None
    nevras = [p.nevra for p in record.packages]
    assert nevras[0] == "p2pbuild-greet-devel-1.0-1.noarch"
    assert nevras[1].startswith(f"{HOST_PACKAGE}-1-")
    rpm_bytes = (served.repo.path / "Packages" / "p2pbuild-greet-devel-1.0-1.noarch.rpm")
    assert record.packages[0].sha256 == hashlib.sha256(rpm_bytes.read_bytes()).digest()
    sigmd5 = subprocess.run(["rpm", "-qp", "--nosignature", "--qf", "%{SIGMD5}",
                             str(rpm_bytes)], capture_output=True, text=True, check=True).stdout
    assert record.packages[0].sigmd5 == bytes.fromhex(sigmd5)
    assert all(p.sigmd5 is not None for p in record.packages)
    assert record.repos == (("test", served.repo.repomd_sha256),)
    step = first.buildroot_step
    assert step is not None and not step.cache_hit
    assert "gcc" in step.from_host  # BuildRequires: gcc, met by the host base
    log = first.logs[0].path.read_text()
    assert "cache miss" in log and "hello from a buildroot" in log

    second = await _build(served, cache, "second")
    assert second.state is BuildState.SUCCEEDED
    assert second.buildroot_step is not None and second.buildroot_step.cache_hit
    assert second.buildroot == record
    assert [(a.name, a.sha256) for a in second.artifacts] == [
        (a.name, a.sha256) for a in first.artifacts
    ]
    assert not Path(GREET_HEADER).exists()


async def test_a_build_requirement_no_repository_provides(served: Served) -> None:
    empty = publish_repository(served.base / "www" / "empty",
                               [write_rpm(served.base / "other", "unrelated", files={
                                   "/usr/share/unrelated/README": "x\n"})])
    spec = BuildrootSpec((Repository("test", served.url + "/empty/", empty.repomd_sha256),))
    cache = BuildrootCache(served.base / "cache")
    with pytest.raises(MissingBuildDependencyError,
                       match="missing-build-dependency: p2pbuild-greet-devel"):
        await _build(served, cache, "missing", spec)
    assert not (served.base / "missing" / "results" / "artifacts").exists() or not any(
        (served.base / "missing" / "results" / "artifacts").iterdir()
    )


async def test_a_repository_republished_after_signing_is_refused(served: Served) -> None:
    pinned = served.buildroot()
    publish_repository(served.repo.path, [greet_devel_rpm(served.base / "rpms2",
                                                          greeting="changed")])
    cache = BuildrootCache(served.base / "cache")
    with pytest.raises(RepoChangedError, match="repo-changed"):
        await _build(served, cache, "changed", pinned)


async def test_an_unreachable_repository_is_transient(served: Served) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = BuildrootSpec((Repository("gone", f"https://127.0.0.1:{port}/",
                                     served.repo.repomd_sha256),))
    with pytest.raises(RepoUnreachableError) as caught:
        await _build(served, BuildrootCache(served.base / "cache"), "gone", spec)
    assert caught.value.transient


async def test_a_package_that_differs_from_the_metadata_is_refused(served: Served) -> None:
    path = served.repo.path / "Packages" / "p2pbuild-greet-devel-1.0-1.noarch.rpm"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PackageChecksumError, match="package-checksum-mismatch"):
        await _build(served, BuildrootCache(served.base / "cache"), "tampered")


async def test_oversize_metadata_is_refused_before_parsing(served: Served) -> None:
    cache = BuildrootCache(served.base / "cache", limits=MetadataLimits(max_repomd_bytes=100))
    with pytest.raises(BadMetadataError, match="larger than 100 bytes"):
        await _build(served, cache, "oversize")


async def test_malformed_metadata_is_refused(served: Served) -> None:
    repomd = served.repo.path / "repodata" / "repomd.xml"
    repomd.write_bytes(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><x>&a;</x>")
    spec = served.buildroot(repos=(Repository(
        "test", served.url + "/repo/", hashlib.sha256(repomd.read_bytes()).digest()),))
    with pytest.raises(BadMetadataError, match="malformed repository metadata"):
        await _build(served, BuildrootCache(served.base / "cache"), "malformed", spec)


async def test_a_package_writing_outside_the_buildroot_is_refused(served: Served) -> None:
    evil = write_rpm(served.base / "evil-rpms", "p2pbuild-greet-devel", version="2.0", files={
        GREET_HEADER: "#define GREETING \"x\"\n",
        "/etc/cron.d/p2pbuild-evil": "* * * * * root true\n",
    })
    repo = publish_repository(served.base / "www" / "evil", [evil])
    spec = BuildrootSpec((Repository("test", served.url + "/evil/", repo.repomd_sha256),))
    with pytest.raises(PackageOutsideBuildrootError, match=r"/etc/cron\.d/p2pbuild-evil"):
        await _build(served, BuildrootCache(served.base / "cache"), "evil-build", spec)
    assert not Path("/etc/cron.d/p2pbuild-evil").exists()


async def test_the_cache_evicts_least_recently_used_roots(served: Served) -> None:
    cache = BuildrootCache(served.base / "cache", max_bytes=1)
    first = await _build(served, cache, "one")
    assert first.state is BuildState.SUCCEEDED
    # Over the bound and no longer in use: evicted when the build let go of it.
    assert cache.statistics() == {"roots": 0, "bytes": 0}
    again = await _build(served, cache, "two")
    assert again.buildroot_step is not None and not again.buildroot_step.cache_hit


def _job(served: Served, buildroot: BuildrootSpec) -> Job:
    fixture = make_trust_list()
    spec = JobSpec(
        SourceArtifact(served.srpm.path.name, served.srpm.path.stat().st_size,
                       bytes.fromhex(served.srpm.sha256), "https://unused.invalid/x"),
        BuildType.RPM, Target("x86_64", "debian-12"), {}, 600, buildroot,
    )
    return Job.create(fixture.dispatchers["dispatcher-1"], spec, issued_at=1, lifetime=60)


async def _copy(served: Served, source: SourceArtifact, dest: Path) -> None:
    dest.write_bytes(served.srpm.path.read_bytes())


async def test_the_runner_reports_why_nothing_was_built(served: Served) -> None:
    runner = ExecutorRunner(LIMITS, fetch=partial(_copy, served),
                            buildroots=BuildrootCache(served.base / "cache"))
    lines: list[bytes] = []

    async def log(data: bytes) -> None:
        lines.append(data)

    pinned = served.buildroot()
    publish_repository(served.repo.path, [greet_devel_rpm(served.base / "r2", greeting="x")])
    report = await runner.run(_job(served, pinned), served.base / "job1", log)
    assert report.state is ResultState.REJECTED and report.artifacts == ()
    assert report.environment["reason"].startswith("repo-changed: repository test")
    assert b"no build: repo-changed" in b"".join(lines)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = BuildrootSpec((Repository("gone", f"https://127.0.0.1:{port}/", DIGEST),))
    report = await runner.run(_job(served, gone), served.base / "job2", log)
    assert report.state is ResultState.HANDED_BACK
    assert report.environment["reason"].startswith("repo-unreachable")


def test_a_node_without_a_buildroot_method_refuses_buildroot_jobs(tmp_path: Path) -> None:
    served = Served(tmp_path, "https://x.invalid", PublishedRepo(tmp_path, DIGEST),
                    SourcePackage(tmp_path / "x.src.rpm", "0" * 64))
    (tmp_path / "x.src.rpm").write_bytes(b"x")
    job = _job(served, served.buildroot())
    plain = JobFilter({"x86_64"}, {"debian-12"}, {"rpm", "make"}, 1 << 30)
    with pytest.raises(UnservableJobError, match="cannot make one"):
        plain.check(job)
    JobFilter({"x86_64"}, {"debian-12"}, {"rpm", "rpm.dnf"}, 1 << 30).check(job)


async def test_a_comps_group_is_the_base_set(served: Served) -> None:
    devel = greet_devel_rpm(served.base / "grp-rpms")
    repo = publish_repository(served.base / "www" / "grouped", [devel],
                              groups={"buildsys-build": ["p2pbuild-greet-devel"]})
    # The SRPM asks only for gcc; the header comes with the group.
    srpm = greet_srpm(served.base / "grp-srpm", build_requires=("gcc",))
    spec = BuildrootSpec((Repository("grouped", served.url + "/grouped/", repo.repomd_sha256),),
                         group="buildsys-build")
    cache = BuildrootCache(served.base / "cache")
    outcome = await run_build(BuildSpec(BuildType.RPM, srpm.path, srpm.sha256, buildroot=spec),
                              served.base / "grouped-build", LIMITS, buildroots=cache)
    assert outcome.state is BuildState.SUCCEEDED
    assert outcome.buildroot is not None
    assert "p2pbuild-greet-devel-1.0-1.noarch" in [p.nevra for p in outcome.buildroot.packages]
    missing = attrs.evolve(spec, group="no-such-group")
    with pytest.raises(MissingBuildDependencyError, match="@no-such-group"):
        await run_build(BuildSpec(BuildType.RPM, srpm.path, srpm.sha256, buildroot=missing),
                        served.base / "nogroup-build", LIMITS, buildroots=cache)
