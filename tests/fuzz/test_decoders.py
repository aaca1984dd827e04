"""Every network decoder, fuzzed: any input gives a value or our own error, nothing else.

Inputs are random bytes and mutations (flipped, cut, inserted, duplicated bytes) of valid
encodings, so the fuzzer reaches deep into each parser rather than failing at byte one.
The "ci" profile runs each test a few hundred times; ``HYPOTHESIS_PROFILE=long`` runs each
100,000 times (the fuzzing mode; see README, Reliability)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from p2pbuild import (
    BuildType,
    Job,
    JobControl,
    JobControlAction,
    JobSpec,
    P2PBuildError,
    PullAuth,
    RemoteError,
    Result,
    SignedRecord,
    SourceArtifact,
    Target,
    TrustList,
)
from p2pbuild._codec import decode
from p2pbuild._hold import LeaseHold
from p2pbuild._jobs import FileDigest
from p2pbuild._orders import NodeOrder
from p2pbuild._replay import ReplayCache
from p2pbuild._wake import WakeRequest
from p2pbuild.dht import DhtNode, decode_bundle, encode_bundle
from p2pbuild.dht import _wire as wire
from p2pbuild.dispatcher._api import _request_from
from p2pbuild.testing import example_capability, example_status, make_identity, make_trust_list

FUZZ = settings(suppress_health_check=list(HealthCheck))
T0 = 1_700_000_000
NODE = make_identity("fuzz-node")
FIXTURE = make_trust_list(label="fuzz-")
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
SPEC = JobSpec(SourceArtifact("hello-1.0.tar.gz", 3, b"\x11" * 32), BuildType.MAKE,
               Target("x86_64", "fedora-41"), {"check": True, "jobs": 2})
JOB = Job.create(DISPATCHER, SPEC, issued_at=T0, lifetime=600, node=NODE.public_key)
RESULT = Result.create(NODE, JOB, state="succeeded", exit_code=0, started_ms=1, ended_ms=2,
                       environment={"arch": "x86_64"},
                       artifacts=[FileDigest("out/a.bin", 3, b"\x22" * 32)],
                       logs=[FileDigest("build.log", 4, b"\x33" * 32)])
CAPABILITY = SignedRecord.create(NODE, example_capability(), seq=3, issued_at=T0, lifetime=3600)
STATUS = SignedRecord.create(NODE, example_status(), seq=3, issued_at=T0, lifetime=600)
# By a node on the trust list, so that a seed is accepted whole.
PULL = PullAuth.create(FIXTURE.nodes["node-1"], DISPATCHER.public_key, issued_at=T0)
CONTROL = JobControl.create(DISPATCHER, JOB.job_id, JobControlAction.DELETE, issued_at=T0)
WAKE = WakeRequest.create(DISPATCHER, NODE.public_key, issued_at=T0)
HOLD = LeaseHold.create(DISPATCHER, NODE.public_key, "fuzz-lease", T0 + 60, issued_at=T0)
REPLAY = ReplayCache()
for _i in range(5):
    REPLAY.add(bytes([_i]) * 16, T0 + 100 + _i, T0)
SENDER = b"\x07" * 20
KEY = b"\x09" * 20
DATAGRAMS = [
    wire.encode_request(b"m" * 20, wire.PING, [SENDER]),
    wire.encode_request(b"m" * 20, wire.FIND_NODE, wire.encode_find_args(SENDER, KEY)),
    wire.encode_request(b"m" * 20, wire.P2P_FIND, wire.encode_p2p_find_args(SENDER, KEY, b"")),
    wire.encode_request(b"m" * 20, wire.P2P_STORE,
                        wire.encode_p2p_store_args(SENDER, KEY, [CAPABILITY.raw])),
    wire.encode_request(b"m" * 20, wire.STORE, [SENDER, KEY, CAPABILITY.raw]),
    wire.encode_response(b"r" * 20, [[[KEY, "10.0.0.1", 7420]], [STATUS.raw], b""]),
]
BUNDLE = encode_bundle([CAPABILITY.raw, STATUS.raw], 2, max_size=1100)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid encoding with a few random edits, or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2 * max(len(s) for s in seeds)))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == 0 and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:
            data[at] = draw(st.integers(0, 255))
        elif op == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3:
            del data[at:at + draw(st.integers(1, 16))]
        else:
            data += draw(st.binary(max_size=8))
    return bytes(data)


def _value_or_our_error(decoder: Callable[[bytes], object], data: bytes) -> None:
    try:
        decoder(data)
    except P2PBuildError as exc:
        code = exc.code
    else:
        return
    # Our own error, with a code a daemon can count; never a bare exception.
    assert isinstance(code, str) and code


@FUZZ
@given(mutated([CAPABILITY.raw, STATUS.raw]))
def test_fuzz_signed_record(data: bytes) -> None:
    _value_or_our_error(SignedRecord.from_bytes, data)


def _accept_at_node(kind: type[NodeOrder], raw: bytes) -> None:
    kind.from_bytes(raw).check(T0, NODE.public_key, FIXTURE.trust_list, ReplayCache())


# Each signed object: a valid encoding to mutate, and how a receiver parses and accepts it.
SIGNED: dict[str, tuple[bytes, Callable[[bytes], object]]] = {
    "trust-list": (FIXTURE.trust_list.to_bytes(), lambda raw: TrustList.from_bytes(raw).verify(T0)),
    "job": (
        JOB.to_bytes(),
        lambda raw: Job.from_bytes(raw).check(
            T0 + 1, FIXTURE.trust_list, NODE.public_key, ReplayCache()
        ),
    ),
    "result": (
        RESULT.to_bytes(),
        lambda raw: Result.from_bytes(raw).check_answers(JOB, NODE.public_key),
    ),
    "pull-auth": (
        PULL.to_bytes(),
        lambda raw: PullAuth.from_bytes(raw).check(
            T0, FIXTURE.trust_list, DISPATCHER.public_key, ReplayCache()
        ),
    ),
    "job-control": (
        CONTROL.to_bytes(),
        lambda raw: JobControl.from_bytes(raw).check(
            T0, JOB, JobControlAction.DELETE, ReplayCache()
        ),
    ),
    "wake-request": (WAKE.to_bytes(), lambda raw: _accept_at_node(WakeRequest, raw)),
    "lease-hold": (HOLD.to_bytes(), lambda raw: _accept_at_node(LeaseHold, raw)),
}


@pytest.mark.parametrize("kind", sorted(SIGNED))
@FUZZ
@given(data=st.data())
def test_fuzz_signed_object(kind: str, data: st.DataObject) -> None:
    seed, accept = SIGNED[kind]
    _value_or_our_error(accept, data.draw(mutated([seed])))


@FUZZ
@given(mutated([REPLAY.to_bytes()]))
def test_fuzz_replay_cache_file(data: bytes) -> None:
    _value_or_our_error(lambda raw: ReplayCache.from_bytes(raw, max_entries=64), data)


@FUZZ
@given(mutated([CAPABILITY.raw, FIXTURE.trust_list.to_bytes()[:600], JOB.to_bytes()]))
def test_fuzz_canonical_codec(data: bytes) -> None:
    _value_or_our_error(lambda raw: decode(raw, max_size=64 * 1024), data)


@FUZZ
@given(mutated([BUNDLE]))
def test_fuzz_record_bundle(data: bytes) -> None:
    _value_or_our_error(lambda raw: decode_bundle(raw, max_size=2048), data)


@FUZZ
@given(mutated(DATAGRAMS))
def test_fuzz_dht_datagram(data: bytes) -> None:
    _value_or_our_error(lambda raw: wire.decode_datagram(raw, max_size=2048), data)
    # And the whole receive path of a node: never raises, always counts.
    node = DhtNode(b"\x01" * 20, now=float(T0), rng=random.Random(0))
    node.receive_datagram(data, ("10.0.0.2", 5), float(T0))
    stats = node.statistics()
    assert stats.datagrams_in == 1
    assert all(len(d) <= 1200 for d, _ in node.datagrams_to_send())


_PARSERS: list[Callable[[Any], object]] = [
    wire.parse_contacts,
    wire.parse_find_value_reply,
    wire.parse_p2p_find_reply,
    wire.parse_ping_reply,
    wire.parse_store_reply,
    lambda value: wire.parse_p2p_store_reply(value, 2),
]


@FUZZ
@given(mutated([msgpack.packb(v, use_bin_type=True) for v in (
    [[KEY, "10.0.0.1", 7420], [KEY, "::1", 1]],
    {"value": BUNDLE},
    [[[KEY, "10.0.0.1", 7420]], [STATUS.raw], b"x" * 40],
    KEY, True, ["ok", "stale-seq"],
)]), st.integers(0, len(_PARSERS) - 1))
# Found by the 100,000-input run: a contact host with a NUL made inet_pton raise ValueError.
@example(b"\x92\x93\xc4\x14" + b"\t" * 20 + b"\xa8\x000.0.0.1\xcd\x1c\xfc\x93\xc4\x14"
         + b"\t" * 20 + b"\xa3::1\x01", 0)
def test_fuzz_dht_reply_values(data: bytes, which: int) -> None:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        return  # not msgpack: decode_datagram refuses it before any parser sees it
    _value_or_our_error(lambda _: _PARSERS[which](value), data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(
    ["arch", "os", "machine", "pool", "build_type", "options", "replicas", "min_memory_mb",
     "min_disk_mb", "time_limit_s", "x"]), json_values, max_size=8))
def test_fuzz_dispatcher_json_build_request(fields: dict[str, Any]) -> None:
    def parse(_: bytes) -> object:
        request = _request_from(fields, "hello-1.0-1.src.rpm", "a" * 64, 10, "")
        request.validate()
        return request

    _value_or_our_error(parse, b"")


def test_the_seeds_themselves_are_valid() -> None:
    assert SignedRecord.from_bytes(CAPABILITY.raw) == CAPABILITY
    assert Job.from_bytes(JOB.to_bytes()).job_id == JOB.job_id
    assert Result.from_bytes(RESULT.to_bytes()).artifacts == RESULT.artifacts
    assert PullAuth.from_bytes(PULL.to_bytes()).nonce == PULL.nonce
    for seed, accept in SIGNED.values():
        accept(seed)
    assert len(ReplayCache.from_bytes(REPLAY.to_bytes())) == 5
    assert decode_bundle(BUNDLE, max_size=2048)[0] == 2
    for datagram in DATAGRAMS:
        wire.decode_datagram(datagram, max_size=2048)
    assert time.time() > 0 and RemoteError
