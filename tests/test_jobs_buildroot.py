"""Jobs that name a buildroot (pinned repositories, base package set) and results that
list what the build ran against."""

from __future__ import annotations

import hashlib

import attrs
import pytest
from test_jobs import make_job, make_result, make_spec

from p2pbuild import (
    MAX_JOB_SIZE,
    BadSignatureError,
    BuildrootPackage,
    BuildrootRecord,
    BuildrootSpec,
    BuildType,
    Job,
    MalformedError,
    Repository,
    Result,
    encode,
)

DIGEST = hashlib.sha256(b"repomd").digest()


def make_buildroot(**overrides: object) -> BuildrootSpec:
    fields: dict[str, object] = {
        "repos": (Repository("base", "https://mirror.example/f41/x86_64/os/", DIGEST),),
        "group": "buildsys-build",
        "packages": ("gcc", "pkgconfig(zlib)"),
    }
    fields.update(overrides)
    return BuildrootSpec(**fields)  # type: ignore[arg-type]


def make_record() -> BuildrootRecord:
    return BuildrootRecord(
        (("base", DIGEST),),
        (
            BuildrootPackage("bash-5.2.26-4.fc41.x86_64", hashlib.sha256(b"b").digest(),
                             bytes(range(16))),
            BuildrootPackage("zlib-devel-1:1.3-1.fc41.x86_64", hashlib.sha256(b"z").digest()),
        ),
    )


def test_job_with_buildroot_round_trips_and_is_signed() -> None:
    spec = make_spec(buildroot=make_buildroot())
    job = make_job(spec=spec)
    parsed = Job.from_bytes(job.to_bytes())
    assert parsed == job
    assert parsed.spec.buildroot == make_buildroot()
    assert parsed.spec.buildroot.repos[0].repomd_sha256 == DIGEST


def test_job_without_buildroot_keeps_its_old_encoding() -> None:
    job = make_job()
    assert b"buildroot" not in job.to_bytes()
    assert Job.from_bytes(job.to_bytes()).spec.buildroot is None


def test_largest_buildroot_fits_the_16_kib_job_bound() -> None:
    repos = tuple(
        Repository(f"repo{i}", "https://m.example/" + "x" * 490 + str(i), DIGEST)
        for i in range(8)
    )
    packages = tuple(sorted(f"pkgconfig(lib{i:03d}{'y' * 110})" for i in range(64)))
    spec = make_spec(buildroot=BuildrootSpec(repos, "buildsys-build", packages))
    job = make_job(spec=spec)
    assert len(job.to_bytes()) <= MAX_JOB_SIZE


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"repos": ()}, "1 to 8"),
        ({"repos": (Repository("a", "https://a.example/", DIGEST),) * 2}, "unique"),
        ({"packages": ("zlib", "gcc")}, "sorted"),
        ({"packages": ("gcc >= 12",)}, "bad base package"),
        ({"group": "Bad Group"}, "comps group"),
    ],
)
def test_bad_buildroot_specs_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        make_buildroot(**overrides)


@pytest.mark.parametrize(
    ("url", "digest"),
    [
        ("ftp://mirror.example/", DIGEST),
        ("https://mirror.example/?x=1", DIGEST),
        ("https://mirror.example/", b"short"),  # no digest: never an unpinned repository
    ],
)
def test_repositories_must_be_http_or_https_and_pinned(url: str, digest: bytes) -> None:
    with pytest.raises(MalformedError):
        Repository("base", url, digest)


def test_unpinned_repository_on_the_wire_is_malformed() -> None:
    spec = make_spec(buildroot=make_buildroot())
    wire = spec.to_wire()
    del wire["buildroot"]["repos"][0]["repomd_sha256"]
    with pytest.raises(MalformedError, match="repository"):
        type(spec).from_wire(wire)


def test_make_jobs_name_no_buildroot() -> None:
    with pytest.raises(MalformedError, match="only rpm"):
        make_spec(build_type=BuildType.MAKE, buildroot=make_buildroot())


def test_result_lists_its_buildroot_and_it_is_signed() -> None:
    result = make_result(buildroot=make_record())
    parsed = Result.from_bytes(result.to_bytes())
    assert parsed == result
    assert parsed.buildroot == make_record()
    assert parsed.buildroot.key == make_record().key
    plain = Result.from_bytes(make_result().to_bytes())
    assert plain.buildroot is None


def test_result_buildroot_cannot_be_swapped_without_breaking_the_signature() -> None:
    result = make_result(buildroot=make_record())
    other = attrs.evolve(
        make_record(), packages=(BuildrootPackage("bash-5.2.26-4.fc41.x86_64", DIGEST),)
    )
    forged = bytearray(result.to_bytes())
    value = encode(other.to_wire())
    original = encode(make_record().to_wire())
    start = bytes(forged).index(original)
    forged[start : start + len(original)] = value
    with pytest.raises(BadSignatureError):
        Result.from_bytes(bytes(forged))


@pytest.mark.parametrize(
    "packages",
    [
        [["bash-5.2-1.x86_64", DIGEST], ["aaa-1-1.noarch", DIGEST]],  # unsorted
        [["not a nevra", DIGEST]],
        [["bash-5.2-1.x86_64", b"short"]],
    ],
)
def test_bad_buildroot_records_are_malformed(packages: list[list[object]]) -> None:
    with pytest.raises(MalformedError):
        BuildrootRecord.from_wire({"packages": packages, "repos": [["base", DIGEST]]})


def test_different_package_sets_have_different_keys() -> None:
    record = make_record()
    changed = attrs.evolve(record, repos=(("base", hashlib.sha256(b"other").digest()),))
    assert record.key != changed.key


def test_sigmd5_is_signed_but_not_part_of_the_buildroot_key() -> None:
    record = make_record()
    assert Result.from_bytes(make_result(buildroot=record).to_bytes()).buildroot == record
    assert record.packages[0].sigmd5 == bytes(range(16))
    without = attrs.evolve(record, packages=tuple(
        attrs.evolve(p, sigmd5=None) for p in record.packages))
    assert without.key == record.key and without != record
    with pytest.raises(MalformedError, match="sigmd5"):
        BuildrootPackage("bash-5.2-1.x86_64", DIGEST, b"short")
