"""Signed records: round trips, authenticity of every byte, canonical encoding only, the
acceptance checks with explicit ``now``, and "any bytes in, a record or our own error out"."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import attrs
import msgpack
import pytest
from core_strategies import (
    IDENTITIES,
    T0,
    capabilities,
    records,
    statuses,
    value_or_our_error,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbuild import (
    MAX_RECORD_SIZE,
    BadSignatureError,
    Capability,
    Domain,
    ExpiredError,
    Kind,
    LifetimeError,
    MachineType,
    MalformedError,
    NotYetValidError,
    OversizeError,
    P2PBuildError,
    RecordPolicy,
    RemoteError,
    SignedRecord,
    StaleSeqError,
    Status,
    UnknownKindError,
    decode_record,
    encode,
)
from p2pbuild._records import _CAPABILITY_CHECKS, _check_fields, _known_token_lists, _known_tokens
from p2pbuild.testing import example_capability, example_status, make_identity

NODE = make_identity("records-node")

# The byte-flip tests verify a signature per position; run fewer, larger examples.
_FEW = max(10, settings().max_examples // 15)


def _record(body: Any = None, **kwargs: Any) -> SignedRecord:
    options: dict[str, Any] = {"seq": 7, "issued_at": T0, "lifetime": 600}
    options.update(kwargs)
    return SignedRecord.create(NODE, body or example_capability(), **options)


def _packed(value: Any) -> bytes:
    """msgpack exactly as given: no sorting, so tests can build non-canonical forms."""
    return msgpack.packb(value, use_bin_type=True)


def _signed(elements: list[bytes], domain: Domain = Domain.RECORD_CAPABILITY,
            identity: Any = NODE) -> bytes:
    """A record from the raw encodings of its first seven elements, validly signed over
    exactly those bytes: whatever is wrong with it, it is not the signature."""
    signed = b"\x97" + b"".join(elements)
    signature = identity.sign(domain, signed)
    return b"\x98" + b"".join(elements) + b"\xc4\x40" + signature


def _elements(record: SignedRecord) -> list[bytes]:
    return [
        _packed(1),
        _packed(record.kind.value),
        _packed(record.publisher.raw),
        _packed(record.seq),
        _packed(record.issued_at),
        _packed(record.expires_at),
        encode(record.body.to_wire()),
    ]


# -- round trips ------------------------------------------------------------------------------


@given(records())
def test_round_trip(record: SignedRecord) -> None:
    parsed = SignedRecord.from_bytes(record.to_bytes())
    assert parsed == record
    assert parsed.raw == record.raw
    assert parsed.body == record.body and type(parsed.body) is type(record.body)
    assert decode_record(record.raw, T0) == record
    assert len(record.raw) <= MAX_RECORD_SIZE


@given(capabilities())
def test_capability_wire_round_trip(body: Capability) -> None:
    assert Capability.from_wire(body.to_wire()) == body
    assert isinstance(Capability.from_wire(body.to_wire()).machine, MachineType)


@given(statuses())
def test_status_wire_round_trip(body: Status) -> None:
    assert Status.from_wire(body.to_wire()) == body


def test_record_accepts_bytearray_and_memoryview() -> None:
    record = _record()
    assert SignedRecord.from_bytes(bytearray(record.raw)) == record
    assert type(SignedRecord.from_bytes(memoryview(record.raw)).raw) is bytes
    with pytest.raises(MalformedError):
        SignedRecord.from_bytes("text")  # type: ignore[arg-type]


def test_example_bodies_and_facets() -> None:
    cap = example_capability(arch="s390x", pools=("team-b", "team-a"))
    assert cap.facets() == [
        "arch=s390x", "os=fedora-41", "arch=s390x/os=fedora-41", "machine=vm",
        "pool=team-a", "pool=team-b",
    ]
    assert example_capability(endpoint="").pull_only
    assert example_status().slots_free == 2


# -- every byte is authenticated --------------------------------------------------------------


@settings(max_examples=_FEW)
@given(records(), st.integers(1, 255))
def test_flipping_any_single_byte_makes_the_record_invalid(
    record: SignedRecord, mask: int
) -> None:
    raw = record.raw
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= mask
        with pytest.raises(RemoteError):
            SignedRecord.from_bytes(bytes(damaged))


@pytest.mark.parametrize("domain", [d for d in Domain if d is not Domain.RECORD_CAPABILITY])
def test_a_signature_for_another_object_type_does_not_verify(domain: Domain) -> None:
    record = _record()
    forged = _signed(_elements(record), domain=domain)
    with pytest.raises(BadSignatureError):
        SignedRecord.from_bytes(forged)
    # The same bytes signed for the right domain are fine: only the domain differs.
    assert SignedRecord.from_bytes(_signed(_elements(record))) == record


def test_status_signature_does_not_verify_as_capability_or_vice_versa() -> None:
    status = _record(example_status())
    elements = _elements(status)
    with pytest.raises(BadSignatureError):
        SignedRecord.from_bytes(_signed(elements, domain=Domain.RECORD_CAPABILITY))
    assert SignedRecord.from_bytes(_signed(elements, domain=Domain.RECORD_STATUS)) == status


def test_signature_by_another_key_does_not_verify() -> None:
    record = _record()
    with pytest.raises(BadSignatureError):
        SignedRecord.from_bytes(_signed(_elements(record), identity=make_identity("mallory")))


# -- acceptance checks at an explicit now -----------------------------------------------------


def test_expiry_boundary() -> None:
    record = _record(issued_at=T0, lifetime=600)
    record.check(T0 + 599)
    with pytest.raises(ExpiredError):
        record.check(T0 + 600)
    with pytest.raises(ExpiredError):
        decode_record(record.raw, T0 + 10**6)


def test_not_yet_valid_boundary() -> None:
    policy = RecordPolicy(max_clock_skew=300)
    record = _record(issued_at=T0 + 300)
    record.check(T0, policy=policy)
    with pytest.raises(NotYetValidError):
        record.check(T0 - 1, policy=policy)
    with pytest.raises(NotYetValidError):
        decode_record(record.raw, T0 - 1)


def test_lifetime_bounds_per_kind() -> None:
    _record(example_status(), lifetime=30 * 60).check(T0)
    with pytest.raises(LifetimeError):
        _record(example_status(), lifetime=30 * 60 + 1).check(T0)
    _record(lifetime=24 * 3600).check(T0)
    with pytest.raises(LifetimeError):
        decode_record(_record(lifetime=24 * 3600 + 1).raw, T0)
    policy = RecordPolicy(max_lifetime={Kind.CAPABILITY: 60, Kind.STATUS: 60})
    with pytest.raises(LifetimeError):
        _record(lifetime=61).check(T0, policy=policy)


def test_zero_or_negative_lifetime_on_the_wire() -> None:
    for expires_at in (T0, T0 - 1):
        elements = _elements(_record())
        elements[5] = _packed(expires_at)
        record = SignedRecord.from_bytes(_signed(elements))
        with pytest.raises(LifetimeError):
            record.check(T0 - 10)


@pytest.mark.parametrize("lifetime", [0, -1, 1.5])
def test_create_refuses_a_bad_lifetime(lifetime: Any) -> None:
    with pytest.raises(MalformedError):
        _record(lifetime=lifetime)


def test_create_refuses_bad_seq_and_times() -> None:
    for kwargs in ({"seq": -1}, {"issued_at": -5}, {"seq": 2**63}, {"issued_at": 2**63 - 1}):
        with pytest.raises(MalformedError):
            _record(**kwargs)


@given(st.integers(0, 2**63 - 2), st.integers(0, 2**63 - 1))
def test_stale_seq(seq: int, held: int) -> None:
    record = SignedRecord(
        NODE.public_key, seq, T0, T0 + 60, example_status(), b"\x00" * 64, b""
    )
    if seq > held:
        record.check(T0, held_seq=held)
    else:
        with pytest.raises(StaleSeqError):
            record.check(T0, held_seq=held)


def test_replayed_older_record_is_rejected() -> None:
    old = _record(seq=1)
    new = _record(seq=2)
    held = decode_record(new.raw, T0).seq
    with pytest.raises(StaleSeqError):
        decode_record(old.raw, T0, held_seq=held)
    with pytest.raises(StaleSeqError):
        decode_record(new.raw, T0, held_seq=held)  # the same record again
    decode_record(old.raw, T0)  # nothing held: fine


# -- size and encoding ------------------------------------------------------------------------


def test_oversize_is_rejected_before_decoding() -> None:
    huge = b"\x98" + b"\x00" * (10 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(OversizeError):
        SignedRecord.from_bytes(huge)
    with pytest.raises(OversizeError):
        decode_record(bytearray(huge), T0)
    assert time.perf_counter() - start < 0.05
    with pytest.raises(OversizeError):
        SignedRecord.from_bytes(b"\x00" * (MAX_RECORD_SIZE + 1))


def test_create_refuses_an_oversize_record() -> None:
    body = example_capability(pools=tuple(sorted(f"pool-{i:02d}-{'x' * 50}" for i in range(16))))
    with pytest.raises(OversizeError):
        _record(body)


@given(records())
def test_truncation_at_every_position_is_rejected(record: SignedRecord) -> None:
    for cut in range(len(record.raw)):
        with pytest.raises(MalformedError):
            SignedRecord.from_bytes(record.raw[:cut])


@given(records(), st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_rejected(record: SignedRecord, trailer: bytes) -> None:
    with pytest.raises(MalformedError):
        SignedRecord.from_bytes(record.raw + trailer)


def _field_encoded_as(name: str, raw: bytes) -> Any:
    """A change of a capability body array: field ``name`` encoded as ``raw``."""

    def change(fields: list[Any]) -> bytes:
        index = Capability._FIELDS.index(name)
        assert encode(fields[index]) != raw
        parts = [raw if i == index else encode(value) for i, value in enumerate(fields)]
        return encode(fields)[:1] + b"".join(parts)

    return change


def _with_field(body: Capability | Status, name: str, value: Any) -> list[Any]:
    """``body``'s wire array with field ``name`` set to ``value``."""
    fields = body.to_wire()
    fields[body._FIELDS.index(name)] = value
    return fields


def _variants() -> list[tuple[str, int, Any]]:
    """(why, element index, new encoding or a function of the body map)."""
    return [
        ("version as uint8", 0, b"\xcc\x01"),
        ("version True", 0, b"\xc3"),
        ("version 2", 0, _packed(2)),
        ("kind as str8", 1, b"\xd9\x0acapability"),
        ("kind as bytes", 1, _packed(b"capability")),
        ("publisher as bin16", 2, b"\xc5\x00\x20" + NODE.public_key.raw),
        ("publisher as text", 2, b"\xd9\x20" + b"a" * 32),
        ("publisher 31 bytes", 2, _packed(NODE.public_key.raw[:31])),
        ("seq as uint32", 3, b"\xce\x00\x00\x00\x07"),
        ("seq as int8", 3, b"\xd0\x07"),
        ("seq negative", 3, _packed(-7)),
        ("seq as float", 3, b"\xcb" + b"\x40\x1c" + b"\x00" * 6),
        ("issued_at as int64", 4, b"\xd3" + T0.to_bytes(8, "big")),
        ("expires_at as nil", 5, b"\xc0"),
        ("body as array16", 6, lambda f: b"\xdc\x00\x0b" + encode(f)[1:]),
        ("body extra field", 6, lambda f: encode([*f, 1])),
        ("body missing field", 6, lambda f: encode(f[:-1])),
        ("body as map", 6, lambda f: encode(dict(zip(Capability._FIELDS[:11], f, strict=True)))),
        ("body as text", 6, lambda f: _packed("x86_64")),
        ("body cpus as float", 6, _field_encoded_as("cpus", b"\xcb\x40\x20" + bytes(6))),
        ("body cpus as uint16", 6, _field_encoded_as("cpus", b"\xcd\x00\x08")),
        ("body cpus as int8", 6, _field_encoded_as("cpus", b"\xd0\x08")),
        ("body memory as int16", 6, _field_encoded_as("memory_mb", b"\xd1\x40\x00")),
        ("body pools as array16", 6, _field_encoded_as("pools", b"\xdc\x00\x00")),
        ("body arch as str8", 6, _field_encoded_as("arch", b"\xd9\x06x86_64")),
        ("body tls as bin16", 6, _field_encoded_as("tls_sha256", b"\xc5\x00\x20" + bytes(32))),
        ("body with ext", 6, _field_encoded_as("cpus", b"\xd4\x01\x08")),
    ]


@pytest.mark.parametrize(("why", "index", "change"), _variants(), ids=[v[0] for v in _variants()])
def test_non_canonical_or_malformed_signed_records_are_rejected(
    why: str, index: int, change: Any
) -> None:
    record = _record()
    elements = _elements(record)
    elements[index] = change(record.body.to_wire()) if callable(change) else change
    assert elements != _elements(record), why
    # Validly signed over exactly these bytes: only the encoding is wrong.
    with pytest.raises(MalformedError):
        SignedRecord.from_bytes(_signed(elements))


def test_signature_with_a_non_canonical_header_is_rejected() -> None:
    record = _record()
    raw = record.raw[:-66] + b"\xc5\x00\x40" + record.signature
    with pytest.raises(MalformedError):
        SignedRecord.from_bytes(raw)


def test_outer_array_as_array16_is_rejected() -> None:
    record = _record()
    with pytest.raises(MalformedError):
        SignedRecord.from_bytes(b"\xdc\x00\x08" + record.raw[1:])


def test_unknown_kind() -> None:
    record = _record()
    elements = _elements(record)
    elements[1] = _packed("weather")
    with pytest.raises(UnknownKindError):
        SignedRecord.from_bytes(_signed(elements))
    elements[1] = _packed(["capability"])  # unhashable: still our error, never TypeError
    with pytest.raises(MalformedError):
        SignedRecord.from_bytes(_signed(elements))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("arch", "X86"), ("arch", "a/b"), ("arch", "a=b"), ("arch", ""), ("arch", "a" * 65),
        ("os", 5), ("cpus", 4096), ("cpus", -1), ("cpus", True), ("cpu_model", "a\nb"),
        ("cpu_model", "x" * 97), ("memory_mb", 2**32), ("disk_mb", "1"), ("machine", "cloud"),
        ("machine", ["vm"]), ("build_types", ["rpm", "make"]), ("build_types", ["rpm", "rpm"]),
        ("build_types", ["Rpm"]), ("build_types", [{"a": 1}]), ("build_types", "rpm"),
        ("pools", [str(i) for i in range(17)]), ("endpoint", "http://x"),
        ("endpoint", "https://" + "x" * 200), ("tls_sha256", b""), ("tls_sha256", "x" * 32),
    ],
)
def test_capability_field_bounds_on_the_wire(field: str, value: Any) -> None:
    record = _record()
    elements = _elements(record)
    elements[6] = encode(_with_field(record.body, field, value))
    with pytest.raises(MalformedError, match=field):
        SignedRecord.from_bytes(_signed(elements))
    with pytest.raises(MalformedError):
        Capability.from_wire(_with_field(record.body, field, value))


@pytest.mark.parametrize(
    ("field", "value"),
    [("load_milli", -1), ("slots_total", 4096), ("slots_free", 5), ("running", None),
     ("uptime_s", 2**63), ("draining", 1), ("draining", None)],
)
def test_status_field_bounds(field: str, value: Any) -> None:
    record = _record(example_status())
    elements = _elements(record)
    elements[6] = encode(_with_field(record.body, field, value))
    with pytest.raises(MalformedError, match=field):
        SignedRecord.from_bytes(_signed(elements, domain=Domain.RECORD_STATUS))
    with pytest.raises(MalformedError):
        attrs.evolve(record.body, **{field: value})


def test_bodies_validate_when_built_in_code() -> None:
    with pytest.raises(MalformedError, match="arch"):
        example_capability(arch="Not A Token")
    with pytest.raises(MalformedError, match="machine"):
        Capability("x", "y", 1, "", 1, 1, "cloud", (), ())  # type: ignore[arg-type]
    with pytest.raises(MalformedError, match="tls_sha256"):
        attrs.evolve(example_capability(), tls_sha256=b"")
    with pytest.raises(MalformedError, match="slots_free"):
        Status(load_milli=0, slots_total=4, slots_free=5, running=0, uptime_s=0)
    # Lists from code are accepted and stored as tuples.
    cap = attrs.evolve(example_capability(), pools=["a", "b"])
    assert cap.pools == ("a", "b")
    with pytest.raises(MalformedError):
        SignedRecord(NODE.public_key, -1, T0, T0 + 1, example_status(), b"\x00" * 64, b"")


# -- the fast path agrees with the reference checks -------------------------------------------

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 2**64), st.text(max_size=8),
    st.binary(max_size=33), st.lists(st.text(max_size=3), max_size=3).map(tuple),
)


@given(
    capabilities(),
    st.dictionaries(st.sampled_from(sorted(Capability._FIELDS)), anything, max_size=3),
    st.booleans(),
)
def test_fast_capability_validation_agrees_with_the_reference(
    valid: Capability, changes: dict[str, Any], clear_caches: bool
) -> None:
    if clear_caches:
        _known_tokens.clear()
        _known_token_lists.clear()
    fields = {**valid.to_dict(), **changes}
    fields = {name: fields[name] for name in Capability._FIELDS}
    fields = {k: tuple(v) if type(v) is list else v for k, v in fields.items()}
    try:
        _check_fields(fields, _CAPABILITY_CHECKS, "capability")
    except MalformedError:
        reference_ok = False
    else:
        reference_ok = True
    values = tuple(fields.values())
    if type(fields["wake_s"]) is int and fields["wake_s"] == 0 and fields["wake_url"] == "":
        values = values[:11]  # not on demand: the shorter form, the only one written
    for _ in range(2):  # cold, then with whatever the first pass cached
        try:
            built = Capability._build(values)
        except MalformedError:
            assert not reference_ok
        else:
            assert reference_ok
            assert built == Capability.from_wire(list(values))


# -- any bytes in, a record or our own error out ----------------------------------------------


@given(st.binary(max_size=1200))
def test_any_bytes_give_a_record_or_our_error(data: bytes) -> None:
    with contextlib.suppress(P2PBuildError):
        SignedRecord.from_bytes(data)
    with contextlib.suppress(P2PBuildError):
        decode_record(data, T0)


@given(records(), st.lists(st.tuples(st.integers(0, 999), st.integers(0, 255)), max_size=4),
       st.integers(0, 1000), st.binary(max_size=4))
def test_mutated_records_give_a_record_or_our_error(
    record: SignedRecord, edits: list[tuple[int, int]], cut: int, insert: bytes
) -> None:
    data = bytearray(record.raw)
    for position, byte in edits:
        data[position % len(data)] = byte
    data[cut % len(data):cut % len(data)] = insert
    parsed = value_or_our_error(SignedRecord.from_bytes, bytes(data))
    if parsed is not None:
        assert parsed.raw == bytes(data) == record.raw  # only a no-op edit can survive


@given(st.sampled_from(IDENTITIES), statuses())
def test_records_from_every_identity(identity: Any, body: Status) -> None:
    record = SignedRecord.create(identity, body, seq=1, issued_at=T0, lifetime=60)
    assert decode_record(record.raw, T0).publisher == identity.public_key


def test_bodies_from_code_take_the_reference_checks() -> None:
    # The wire fast path relies on exact decoded types; values built in code (a str
    # subclass equal to a known token) go through the reference checks and are refused.
    class Token(str):
        pass

    example_capability()  # "x86_64" is now a known token
    fields = _with_field(example_capability(), "arch", Token("x86_64"))
    with pytest.raises(MalformedError, match="arch"):
        Capability.from_wire(fields)
    # A StrEnum member is not exactly text on the wire, but a fine value from code.
    fields = _with_field(example_capability(), "machine", MachineType.VM)
    assert Capability.from_wire(fields).machine is MachineType.VM


def test_decoded_values_hold_their_fields() -> None:
    record = _record()
    parsed = decode_record(record.raw, T0)
    assert parsed == record
    assert vars(parsed.body) == vars(record.body)
    assert attrs.asdict(parsed.body) == attrs.asdict(record.body)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        parsed.body.arch = "other"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        parsed.seq = 1  # type: ignore[misc]


@given(records(), st.integers(-10**6, 10**6), st.one_of(st.none(), st.integers(0, 20)),
       st.integers(1, 10**5), st.integers(0, 10**4))
def test_decode_record_checks_exactly_as_check(
    record: SignedRecord, offset: int, held_seq: int | None, lifetime: int, skew: int
) -> None:
    # decode_record runs the time checks inline; it must accept and refuse as check() does.
    policy = RecordPolicy({Kind.CAPABILITY: lifetime, Kind.STATUS: lifetime}, skew)
    now = T0 + offset
    expected: type[Exception] | None = None
    try:
        SignedRecord.from_bytes(record.raw).check(now, policy=policy, held_seq=held_seq)
    except P2PBuildError as exc:
        expected = type(exc)
    if expected is None:
        assert decode_record(record.raw, now, policy=policy, held_seq=held_seq) == record
    else:
        with pytest.raises(expected):
            decode_record(record.raw, now, policy=policy, held_seq=held_seq)


# -- on-demand fields: the shorter form unless set ---------------------------------------------


def test_on_demand_fields_are_written_only_when_set() -> None:
    from p2pbuild.testing import example_capability, make_identity

    identity = make_identity("on-demand")
    plain = example_capability()
    record = SignedRecord.create(identity, plain, seq=1, issued_at=T0, lifetime=3600)
    # The body of a node that is not on demand has the 11 fields older versions read.
    assert len(plain.to_wire()) == 11
    on_demand = attrs.evolve(plain, wake_s=90, wake_url="https://wake.example.org/n1")
    assert on_demand.to_wire()[11:] == [90, "https://wake.example.org/n1"]
    again = SignedRecord.from_bytes(
        SignedRecord.create(identity, on_demand, seq=2, issued_at=T0, lifetime=3600).raw
    )
    assert again.body == on_demand and again.body.on_demand
    assert SignedRecord.from_bytes(record.raw).body.wake_s == 0
    asleep = Status(load_milli=0, slots_total=2, slots_free=2, running=0, uptime_s=5,
                    standby=True)
    assert asleep.to_wire()[6:] == [True]
    assert len(attrs.evolve(asleep, standby=False).to_wire()) == 6
    decoded = SignedRecord.from_bytes(
        SignedRecord.create(identity, asleep, seq=3, issued_at=T0, lifetime=300).raw
    )
    assert decoded.body == asleep
    with pytest.raises(MalformedError, match="wake_url"):
        attrs.evolve(plain, wake_url="https://wake.example.org/")  # without wake_s
    with pytest.raises(MalformedError, match="wake_s"):
        attrs.evolve(plain, wake_s=3601)
    # Only one encoding per value: the longer forms with their defaults are refused.
    with pytest.raises(MalformedError, match="shorter form"):
        Capability.from_wire([*plain.to_wire(), 0, ""])
    with pytest.raises(MalformedError, match="standby is written only when true"):
        Status.from_wire([*attrs.evolve(asleep, standby=False).to_wire(), False])
