"""Signed jobs, results and pull tokens; the replay cache."""

from __future__ import annotations

import contextlib
import hashlib

import attrs
import pytest
from core_strategies import value_or_our_error
from hypothesis import given
from hypothesis import strategies as st

from p2pbuild import (
    MAX_JOB_SIZE,
    BadSignatureError,
    BuildType,
    Domain,
    ExpiredError,
    FileDigest,
    ForbiddenError,
    Job,
    JobControl,
    JobControlAction,
    JobPolicy,
    JobSpec,
    LifetimeError,
    LocalError,
    MalformedError,
    NotYetValidError,
    OversizeError,
    P2PBuildError,
    PullAuth,
    ReplayCache,
    ReplayError,
    Result,
    ResultState,
    Role,
    SignedRecord,
    SourceArtifact,
    Target,
    UntrustedKeyError,
    WrongNodeError,
    check_relative_name,
    encode,
)
from p2pbuild.testing import example_status, make_identity, make_trust_list

NOW = 1_750_000_000
FIXTURE = make_trust_list()
TRUST = FIXTURE.trust_list
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["node-1"]
OTHER_NODE = FIXTURE.nodes["node-2"]


def make_spec(**overrides: object) -> JobSpec:
    fields: dict[str, object] = {
        "source": SourceArtifact("hello-2.12-1.src.rpm", 1234, hashlib.sha256(b"x").digest(),
                                 "https://dispatcher.example:8443/sources/abc"),
        "build_type": BuildType.RPM,
        "target": Target("x86_64", "fedora-41"),
        "options": {"check": True, "with": ["docs", "tests"]},
        "time_limit_s": 1800,
    }
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


def make_job(**overrides: object) -> Job:
    kwargs: dict[str, object] = {
        "issued_at": NOW,
        "lifetime": 3600,
        "node": NODE.public_key,
        "job_id": bytes(range(16)),
        "nonce": bytes(16),
    }
    identity = overrides.pop("identity", DISPATCHER)
    spec = overrides.pop("spec", make_spec())
    kwargs.update(overrides)
    return Job.create(identity, spec, **kwargs)  # type: ignore[arg-type]


def make_result(job: Job | None = None, **overrides: object) -> Result:
    kwargs: dict[str, object] = {
        "state": ResultState.SUCCEEDED,
        "exit_code": 0,
        "started_ms": NOW * 1000,
        "ended_ms": NOW * 1000 + 65_000,
        "environment": {"arch": "x86_64", "os": "fedora-41", "rpm": "4.20.0"},
        "artifacts": [
            FileDigest("hello-2.12-1.x86_64.rpm", 50_000, hashlib.sha256(b"a").digest()),
            FileDigest("debug/hello-debuginfo.rpm", 9_000, hashlib.sha256(b"b").digest()),
        ],
        "logs": [FileDigest("build.log", 777, hashlib.sha256(b"l").digest())],
    }
    kwargs.update(overrides)
    return Result.create(NODE, job or make_job(), **kwargs)  # type: ignore[arg-type]


# -- jobs -------------------------------------------------------------------------------------


def test_job_and_result_wire_bytes_are_pinned() -> None:
    # Seeded keys, fixed ids and deterministic Ed25519: the bytes of these values must not
    # change when the code that makes them does (existing signed jobs must still verify).
    job = make_job()
    assert hashlib.sha256(job.raw).hexdigest() == (
        "a92a82c526925a95fa7265faf4e932968c41e067618e8e0f2f49ec9ccf7f8219"
    )
    assert hashlib.sha256(make_job(node=None).raw).hexdigest() == (
        "9cb1cc65dd34b3f496388319b0b98d46de33a6ac9cb41da3f74e28bb873ddece"
    )
    assert hashlib.sha256(make_result(job).raw).hexdigest() == (
        "6f0ad54e5446355eb4bb10bba3a8fd4e4595798a840a2dcc72d7bc368b05dc45"
    )


def test_job_round_trip() -> None:
    job = make_job()
    parsed = Job.from_bytes(job.to_bytes())
    assert parsed == job
    assert parsed.to_bytes() == job.to_bytes()
    assert parsed.spec.options_map == {"check": True, "with": ("docs", "tests")}
    assert parsed.node == NODE.public_key
    assert len(job.to_bytes()) < 600


def test_untargeted_job_round_trip_and_inline_source() -> None:
    spec = make_spec(
        source=SourceArtifact("src.tar.gz", 10, bytes(32)), build_type="make", options={}
    )
    job = make_job(node=None, spec=spec, job_id=None, nonce=None)
    parsed = Job.from_bytes(job.to_bytes())
    assert parsed == job
    assert parsed.node is None and parsed.spec.source.inline
    assert parsed.spec.build_type is BuildType.MAKE
    parsed.check(NOW, TRUST, OTHER_NODE.public_key, ReplayCache())


def test_job_check_accepts_then_replay_is_refused() -> None:
    job = make_job()
    seen = ReplayCache()
    job.check(NOW + 10, TRUST, NODE.public_key, seen)
    seen.add(job.job_id, job.expires_at, NOW + 10)
    with pytest.raises(ReplayError) as info:
        job.check(NOW + 20, TRUST, NODE.public_key, seen)
    assert info.value.code == "replayed"
    # A re-signed job with the same id is the same job on this node.
    again = make_job(nonce=b"\x01" * 16)
    with pytest.raises(ReplayError):
        again.check(NOW + 20, TRUST, NODE.public_key, seen)


def test_job_check_rejections() -> None:
    seen = ReplayCache()
    job = make_job()
    with pytest.raises(ExpiredError):
        job.check(NOW + 3600, TRUST, NODE.public_key, seen)
    with pytest.raises(NotYetValidError):
        job.check(NOW - 301, TRUST, NODE.public_key, seen)
    with pytest.raises(WrongNodeError) as wrong:
        job.check(NOW, TRUST, OTHER_NODE.public_key, seen)
    assert wrong.value.code == "wrong-node"
    with pytest.raises(LifetimeError):
        make_job(lifetime=24 * 3600 + 1).check(NOW, TRUST, NODE.public_key, seen)
    stranger = make_identity("stranger", Role.DISPATCHER)
    with pytest.raises(UntrustedKeyError):
        make_job(identity=stranger).check(NOW, TRUST, NODE.public_key, seen)
    # A trusted key in the wrong role cannot dispatch.
    with pytest.raises(UntrustedKeyError):
        make_job(identity=OTHER_NODE).check(NOW, TRUST, NODE.public_key, seen)
    assert len(seen) == 0


def test_job_fields_validated() -> None:
    with pytest.raises(MalformedError):
        make_spec(options={"define": ["x"]})  # not on the allow-list
    with pytest.raises(MalformedError):
        make_spec(options={"jobs": 0})
    with pytest.raises(MalformedError):
        make_spec(options={"with": ["b", "a"]})
    with pytest.raises(MalformedError):
        make_spec(build_type="ant")
    with pytest.raises(MalformedError):
        make_spec(time_limit_s=0)
    with pytest.raises(MalformedError):
        SourceArtifact("../x.src.rpm", 1, bytes(32))
    with pytest.raises(MalformedError):
        SourceArtifact("dir/x.src.rpm", 1, bytes(32))
    with pytest.raises(MalformedError):
        SourceArtifact("x.src.rpm", 1, bytes(32), "http://plain.example/x")
    with pytest.raises(MalformedError):
        Target("x86_64", "Fedora 41")
    with pytest.raises(MalformedError):
        make_job(job_id=b"short")


def test_job_size_bound() -> None:
    spec = make_spec(source=SourceArtifact("a.src.rpm", 1, bytes(32), "https://" + "a" * 500))
    job = make_job(spec=spec)
    padded = job.to_bytes()
    with pytest.raises(OversizeError):
        Job.from_bytes(padded + b"\x00" * MAX_JOB_SIZE)
    with pytest.raises(OversizeError):
        Job.from_bytes(padded, max_size=100)


def test_job_signature_flips_and_unknown_fields() -> None:
    data = make_job().to_bytes()
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[i] ^= bit
            with pytest.raises(P2PBuildError):
                Job.from_bytes(bytes(flipped))


def test_cross_domain_signatures_do_not_verify() -> None:
    # A job whose signature was made under another domain over the same bytes is refused.
    job = make_job()
    unsigned = Job.from_bytes(job.to_bytes())
    body = encode([
        1, unsigned.job_id, unsigned.nonce, DISPATCHER.public_key.raw,
        NODE.public_key.raw, unsigned.issued_at, unsigned.expires_at, unsigned.spec.to_wire(),
    ])
    for domain in (Domain.RECORD_STATUS, Domain.RESULT, Domain.PULL_AUTH, Domain.TRUST_LIST):
        forged = body[:0] + bytes([body[0] + 1]) + body[1:] + b"\xc4\x40"
        forged += DISPATCHER.sign(domain, body)
        with pytest.raises(BadSignatureError):
            Job.from_bytes(forged)
    # ... and a signed record is not a job, nor a result, nor a pull token.
    record = SignedRecord.create(NODE, example_status(), seq=1, issued_at=NOW, lifetime=60)
    for parser in (Job.from_bytes, Result.from_bytes, PullAuth.from_bytes):
        with pytest.raises(P2PBuildError):
            parser(record.to_bytes())


@given(st.binary(max_size=2048))
def test_any_bytes_give_a_job_or_our_error(data: bytes) -> None:
    with contextlib.suppress(P2PBuildError):
        Job.from_bytes(data)


@given(st.binary(max_size=2048))
def test_any_bytes_give_a_result_or_our_error(data: bytes) -> None:
    with contextlib.suppress(P2PBuildError):
        Result.from_bytes(data)


@given(st.binary(max_size=512))
def test_any_bytes_give_a_pull_token_or_our_error(data: bytes) -> None:
    with contextlib.suppress(P2PBuildError):
        PullAuth.from_bytes(data)


@given(st.data())
def test_mutated_jobs_give_a_job_or_our_error(data: st.DataObject) -> None:
    raw = bytearray(make_job().to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    job = value_or_our_error(Job.from_bytes, bytes(raw[:cut]))
    if job is not None:
        assert job.to_bytes() == make_job().to_bytes()


# -- results ----------------------------------------------------------------------------------


def test_result_round_trip_sorted_and_bound_to_job() -> None:
    job = make_job()
    result = make_result(job)
    parsed = Result.from_bytes(result.to_bytes())
    assert parsed == result
    assert [a.name for a in parsed.artifacts] == [
        "debug/hello-debuginfo.rpm", "hello-2.12-1.x86_64.rpm",
    ]
    assert parsed.environment_map["rpm"] == "4.20.0"
    assert parsed.duration_ms == 65_000
    parsed.check_answers(job, NODE.public_key)
    with pytest.raises(WrongNodeError):
        parsed.check_answers(job, OTHER_NODE.public_key)
    with pytest.raises(MalformedError):
        parsed.check_answers(make_job(nonce=b"\x02" * 16), NODE.public_key)


def test_result_states_and_no_exit_code() -> None:
    result = make_result(state="timed-out", exit_code=None, artifacts=[])
    parsed = Result.from_bytes(result.to_bytes())
    assert parsed.state is ResultState.TIMED_OUT and parsed.exit_code is None


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../up", "a/../../up", "a//b", "./a", "a/.", "nul\x00byte",
     "new\nline", "tab\tname", "esc\x1b[31m", "back\\slash", "x" * 256],
)
def test_unsafe_artifact_names_rejected(name: str) -> None:
    with pytest.raises(MalformedError):
        FileDigest(name, 1, bytes(32))
    with pytest.raises(MalformedError):
        check_relative_name(name)


def test_result_list_bounds() -> None:
    digest = hashlib.sha256(b"").digest()
    with pytest.raises(MalformedError):  # duplicate name
        make_result(artifacts=[FileDigest("a", 0, digest), FileDigest("a", 1, digest)])
    with pytest.raises(MalformedError):  # too many
        make_result(artifacts=[FileDigest(f"f{i:04}", 0, digest) for i in range(513)])
    with pytest.raises(MalformedError):
        make_result(environment={"Bad Key": "x"})
    with pytest.raises(MalformedError):
        make_result(started_ms=10, ended_ms=5)


def test_result_with_unsafe_name_on_the_wire_is_refused() -> None:
    # Sign a result by hand whose artifact name escapes: parsing must refuse it even though
    # the signature is genuine.
    result = make_result()
    unsigned = [1, *result._elements()]  # the format version, then the signed fields
    unsigned[9] = [["../../evil", 1, bytes(32)]]
    signature = NODE.sign(Domain.RESULT, encode(unsigned))
    with pytest.raises(MalformedError):
        Result.from_bytes(encode([*unsigned, signature]))


def test_result_flips_invalidate() -> None:
    data = make_result().to_bytes()
    for i in range(0, len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x04
        with pytest.raises(P2PBuildError):
            Result.from_bytes(bytes(flipped))


def test_a_policy_with_a_bound_out_of_range_is_refused() -> None:
    with pytest.raises(LocalError, match="pull_auth_window must be at least 1, not 0"):
        JobPolicy(pull_auth_window=0)
    with pytest.raises(LocalError, match="max_job_lifetime"):
        JobPolicy(max_job_lifetime=-5)
    with pytest.raises(LocalError, match="max_clock_skew"):
        JobPolicy(max_clock_skew=-1)
    assert JobPolicy(max_clock_skew=0).max_clock_skew == 0


# -- pull auth --------------------------------------------------------------------------------


def test_pull_auth_round_trip_and_checks() -> None:
    dispatcher = DISPATCHER.public_key
    token = PullAuth.create(NODE, dispatcher, issued_at=NOW)
    parsed = PullAuth.from_bytes(token.to_bytes())
    assert parsed == token
    seen = ReplayCache()
    parsed.check(NOW + 30, TRUST, dispatcher, seen)
    with pytest.raises(ReplayError):
        parsed.check(NOW + 31, TRUST, dispatcher, seen)
    fresh = PullAuth.create(NODE, dispatcher, issued_at=NOW)
    with pytest.raises(ExpiredError):
        fresh.check(NOW + 61, TRUST, dispatcher, seen)
    with pytest.raises(NotYetValidError):
        fresh.check(NOW - 61, TRUST, dispatcher, seen)
    with pytest.raises(WrongNodeError):
        fresh.check(NOW, TRUST, make_identity("elsewhere").public_key, seen)
    stranger = PullAuth.create(make_identity("stranger-node"), dispatcher, issued_at=NOW)
    with pytest.raises(UntrustedKeyError):
        stranger.check(NOW, TRUST, dispatcher, seen)
    # A dispatcher key cannot pull as a node.
    with pytest.raises(UntrustedKeyError):
        PullAuth.create(DISPATCHER, dispatcher, issued_at=NOW).check(NOW, TRUST, dispatcher, seen)


def test_job_control_round_trip_and_checks() -> None:
    job = make_job()
    order = JobControl.create(DISPATCHER, job.job_id, JobControlAction.DELETE, issued_at=NOW)
    assert JobControl.from_bytes(order.to_bytes()) == order
    seen = ReplayCache()
    order.check(NOW + 30, job, JobControlAction.DELETE, seen)
    with pytest.raises(ReplayError):
        order.check(NOW + 31, job, JobControlAction.DELETE, seen)
    fresh = JobControl.create(DISPATCHER, job.job_id, JobControlAction.DELETE, issued_at=NOW)
    with pytest.raises(ExpiredError):
        fresh.check(NOW + 61, job, JobControlAction.DELETE, seen)
    with pytest.raises(NotYetValidError):
        fresh.check(NOW - 61, job, JobControlAction.DELETE, seen)
    # Another trusted dispatcher's order, or one about another job, is forbidden.
    other = make_identity("other-dispatcher", Role.DISPATCHER)
    foreign = JobControl.create(other, job.job_id, JobControlAction.DELETE, issued_at=NOW)
    with pytest.raises(ForbiddenError):
        foreign.check(NOW, job, JobControlAction.DELETE, seen)
    elsewhere = JobControl.create(DISPATCHER, bytes(16), JobControlAction.DELETE, issued_at=NOW)
    with pytest.raises(ForbiddenError):
        elsewhere.check(NOW, job, JobControlAction.DELETE, seen)
    # Its signature is domain-separated: the same bytes signed as a job do not verify.
    unsigned = order.raw[: -(64 + 2)]
    as_job = DISPATCHER.sign(Domain.JOB, unsigned)
    with pytest.raises(BadSignatureError):
        JobControl.from_bytes(unsigned + b"\xc4\x40" + as_job)


# -- replay cache -----------------------------------------------------------------------------


def test_replay_cache_forgets_expired_ids() -> None:
    cache = ReplayCache()
    cache.add(b"a" * 16, NOW + 10, NOW)
    with pytest.raises(ReplayError):
        cache.add(b"a" * 16, NOW + 10, NOW + 5)
    cache.prune(NOW + 10)
    assert len(cache) == 0
    cache.add(b"a" * 16, NOW + 20, NOW + 10)


def test_replay_cache_eviction_raises_horizon() -> None:
    cache = ReplayCache(max_entries=3)
    for i in range(3):
        cache.add(bytes([i]) * 16, NOW + 100 + i, NOW)
    cache.add(b"\x09" * 16, NOW + 500, NOW)  # evicts the one expiring at NOW + 100
    assert len(cache) == 3
    assert cache.statistics().horizon == NOW + 100
    assert cache.statistics().evicted == 1
    # The evicted id is still refused, because its expiry is at the horizon.
    with pytest.raises(ReplayError):
        cache.check(b"\x00" * 16, NOW + 100, NOW + 1)
    # A new id expiring after the horizon is fine.
    cache.check(b"\x07" * 16, NOW + 101, NOW + 1)


def test_replay_cache_persists() -> None:
    cache = ReplayCache(max_entries=10)
    for i in range(5):
        cache.add(bytes([i]) * 16, NOW + 100 - i, NOW)
    loaded = ReplayCache.from_bytes(cache.to_bytes(), max_entries=3)
    assert len(loaded) == 3
    assert loaded.horizon == NOW + 97
    for i in range(5):
        with pytest.raises(ReplayError):
            loaded.check(bytes([i]) * 16, NOW + 100 - i, NOW)
    with pytest.raises(MalformedError):
        ReplayCache.from_bytes(encode([1, 0, [[b"x", -1]]]))


@given(st.binary(max_size=256))
def test_any_bytes_give_a_replay_cache_or_our_error(data: bytes) -> None:
    with contextlib.suppress(P2PBuildError):
        ReplayCache.from_bytes(data)


def test_evolve_revalidates() -> None:
    # attrs.evolve goes through __init__, so an invalid value cannot be made that way either.
    with pytest.raises(MalformedError):
        attrs.evolve(make_spec().source, name="../x")
