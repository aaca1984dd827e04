"""The trust list: threshold signatures, rotation, rollback, expiry and revocation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import attrs
import pytest
from core_strategies import MAINTAINERS, T0, trust_lists, value_or_our_error
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbuild import (
    MAX_TRUST_LIST_SIZE,
    BadSignatureError,
    Domain,
    ExpiredError,
    LocalError,
    MalformedError,
    OversizeError,
    P2PBuildError,
    RemoteError,
    Role,
    RollbackError,
    RotationError,
    ThresholdError,
    TrustEntry,
    TrustError,
    TrustList,
    TrustSignatureError,
    UntrustedKeyError,
    accept_update,
)
from p2pbuild.testing import make_identity, make_trust_list

_FEW = max(5, settings().max_examples // 30)


def _fixture(**kwargs: Any) -> Any:
    return make_trust_list(**kwargs)


def _sign(trust: TrustList, signers: Any) -> TrustList:
    for signer in signers:
        trust = trust.sign(signer)
    return trust


# -- round trip and integrity -----------------------------------------------------------------


@given(trust_lists())
def test_round_trip(trust: TrustList) -> None:
    parsed = TrustList.from_bytes(trust.to_bytes())
    assert parsed == trust
    assert parsed.to_bytes() == trust.to_bytes()
    parsed.verify(T0)


@given(trust_lists(signed=False))
def test_unsigned_round_trip(trust: TrustList) -> None:
    assert TrustList.from_bytes(trust.to_bytes()) == trust


@settings(max_examples=_FEW)
@given(trust_lists(), st.integers(1, 255))
def test_flipping_any_single_byte_makes_the_list_invalid(trust: TrustList, mask: int) -> None:
    raw = trust.to_bytes()
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= mask
        with pytest.raises(RemoteError):
            TrustList.from_bytes(bytes(damaged)).verify(T0)


def test_damaged_extra_signature_still_invalidates() -> None:
    # Signed by all three although two suffice: a damaged third signature is not ignored.
    fixture = _fixture()
    trust = fixture.trust_list.sign(fixture.maintainers[2])
    trust.verify(T0)
    key, signature = trust.signatures[0]
    damaged = attrs.evolve(
        trust, signatures=((key, bytes([signature[0] ^ 1]) + signature[1:]), *trust.signatures[1:])
    )
    with pytest.raises(TrustSignatureError):
        damaged.verify(T0)
    assert len(damaged.valid_signers(damaged.maintainers)) == 2  # the lenient count


def test_a_record_signature_does_not_verify_as_a_trust_list() -> None:
    fixture = _fixture()
    draft = fixture.trust_list.next_version()
    message = draft.signed_bytes()
    for domain in Domain:
        if domain is Domain.TRUST_LIST:
            continue
        forged = draft
        for maintainer in fixture.maintainers[:2]:
            pair = (maintainer.public_key, maintainer.sign(domain, message))
            forged = attrs.evolve(forged, signatures=tuple(sorted([*forged.signatures, pair])))
        with pytest.raises(TrustSignatureError):
            forged.verify(T0)


# -- threshold --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 2), (5, 3), (5, 5)])
def test_k_minus_one_signatures_rejected_k_accepted(n: int, k: int) -> None:
    fixture = _fixture(maintainers=n, threshold=k)
    draft = attrs.evolve(fixture.trust_list, signatures=())
    with pytest.raises(ThresholdError):
        _sign(draft, fixture.maintainers[: k - 1]).verify(T0)
    _sign(draft, fixture.maintainers[:k]).verify(T0)
    _sign(draft, fixture.maintainers).verify(T0)


def test_duplicate_signatures_count_once() -> None:
    fixture = _fixture(maintainers=3, threshold=2)
    draft = attrs.evolve(fixture.trust_list, signatures=())
    once = draft.sign(fixture.maintainers[0])
    twice = once.sign(fixture.maintainers[0])
    assert twice.signatures == once.signatures
    with pytest.raises(ThresholdError):
        twice.verify(T0)
    # Nor can a duplicate be smuggled in on the wire.
    pair = once.signatures[0]
    with pytest.raises(MalformedError):
        attrs.evolve(once, signatures=(pair, pair))
    raw = once.to_bytes()
    signature_part = raw[raw.rindex(b"\x91") + 1 :]
    doubled = raw[: raw.rindex(b"\x91")] + b"\x92" + signature_part * 2
    with pytest.raises(MalformedError):
        TrustList.from_bytes(doubled)


def test_signatures_by_unknown_keys_are_ignored() -> None:
    fixture = _fixture(maintainers=3, threshold=2)
    draft = attrs.evolve(fixture.trust_list, signatures=())
    stranger = make_identity("stranger", Role.MAINTAINER)
    node = fixture.nodes["node-1"]  # listed, but not as a maintainer
    with pytest.raises(ThresholdError):
        _sign(draft, [fixture.maintainers[0], stranger, node]).verify(T0)
    _sign(draft, [fixture.maintainers[0], stranger, fixture.maintainers[1]]).verify(T0)


def test_threshold_must_be_satisfiable() -> None:
    fixture = _fixture(maintainers=2, threshold=2)
    with pytest.raises(MalformedError):
        attrs.evolve(fixture.trust_list, threshold=3)
    with pytest.raises(MalformedError):
        attrs.evolve(fixture.trust_list, threshold=0)


# -- expiry, rotation, rollback ---------------------------------------------------------------


def test_expired_list_is_rejected() -> None:
    trust = _fixture(expires_at=T0).trust_list
    trust.verify(T0 - 1)
    with pytest.raises(ExpiredError):
        trust.verify(T0)


def _successor(fixture: Any, signers: Any = None, **changes: Any) -> TrustList:
    draft = attrs.evolve(fixture.trust_list.next_version(), **changes)
    return _sign(draft, fixture.maintainers[:2] if signers is None else signers)


def test_rotation_accepted_with_the_old_threshold() -> None:
    fixture = _fixture()
    new = _successor(fixture)
    fixture.trust_list.verify_successor(new, T0)
    assert accept_update(fixture.trust_list, new, T0) is new
    assert accept_update(new, new, T0) is new  # the same list again: a no-op


def test_rollback_is_rejected() -> None:
    fixture = _fixture(version=5)
    older = _sign(attrs.evolve(fixture.trust_list, version=4, signatures=()),
                  fixture.maintainers[:2])
    with pytest.raises(RollbackError):
        accept_update(fixture.trust_list, older, T0)
    # Same version with different content is a rollback too, not a no-op.
    other = _sign(attrs.evolve(fixture.trust_list, expires_at=2**41, signatures=()),
                  fixture.maintainers[:2])
    with pytest.raises(RollbackError):
        accept_update(fixture.trust_list, other, T0)


def test_skipped_rotation_is_rejected() -> None:
    fixture = _fixture()
    v3 = _sign(attrs.evolve(fixture.trust_list, version=3, signatures=()), fixture.maintainers[:2])
    with pytest.raises(RotationError):
        accept_update(fixture.trust_list, v3, T0)


def test_rotation_without_the_old_threshold_is_rejected() -> None:
    # v2 replaces all maintainers with new ones who sign it themselves: valid on its own,
    # but not signed by the threshold of v1's maintainers.
    fixture = _fixture(maintainers=3, threshold=2)
    newcomers = [make_identity(f"new-maintainer-{i}", Role.MAINTAINER) for i in range(2)]
    entries = [e for e in fixture.trust_list.entries if e.role is not Role.MAINTAINER]
    entries += [TrustEntry(m.public_key, Role.MAINTAINER, "maintainers") for m in newcomers]
    changes = {"entries": tuple(sorted(entries, key=lambda e: e.key)), "threshold": 2}
    v2 = _successor(fixture, newcomers, **changes)
    v2.verify(T0)
    with pytest.raises(RotationError):
        accept_update(fixture.trust_list, v2, T0)
    # One old maintainer is not enough either...
    with pytest.raises(RotationError):
        accept_update(fixture.trust_list,
                      _sign(v2, fixture.maintainers[:1]), T0)
    # ...two are: the old threshold hands over to the new maintainers.
    v2 = _sign(v2, fixture.maintainers[:2])
    assert accept_update(fixture.trust_list, v2, T0) is v2
    # And from then on the old maintainers alone cannot rotate.
    v3_by_old = _sign(attrs.evolve(v2.next_version()), fixture.maintainers)
    with pytest.raises(ThresholdError):
        accept_update(v2, v3_by_old, T0)


def test_new_version_must_be_valid_on_its_own() -> None:
    fixture = _fixture(maintainers=3, threshold=2)
    with pytest.raises(ExpiredError):
        accept_update(fixture.trust_list, _successor(fixture, expires_at=T0), T0)
    with pytest.raises(ThresholdError):
        accept_update(fixture.trust_list,
                      _successor(fixture, fixture.maintainers[:2], threshold=3), T0)


def test_an_expired_list_can_still_be_rotated() -> None:
    fixture = _fixture(expires_at=T0 - 10)
    with pytest.raises(ExpiredError):
        fixture.trust_list.verify(T0)
    new = _successor(fixture, expires_at=T0 + 86400)
    assert accept_update(fixture.trust_list, new, T0) is new


def test_removal_revokes() -> None:
    fixture = _fixture()
    node = fixture.nodes["node-1"].public_key
    fixture.trust_list.require(node, Role.NODE)
    with pytest.raises(UntrustedKeyError):
        fixture.trust_list.require(node, Role.DISPATCHER)
    draft = fixture.trust_list.next_version().without_entry(node)
    new = _sign(draft, fixture.maintainers[:2])
    trusted = accept_update(fixture.trust_list, new, T0)
    assert trusted.entry(node) is None
    with pytest.raises(UntrustedKeyError):
        trusted.require(node, Role.NODE)
    with pytest.raises(LocalError):
        trusted.without_entry(node)


def test_with_entry_adds_and_replaces() -> None:
    fixture = _fixture()
    key = make_identity("newcomer").public_key
    trust = fixture.trust_list.with_entry(TrustEntry(key, Role.NODE, "carol", ("fedora",)))
    assert trust.signatures == ()
    assert trust.require(key, Role.NODE).pools == ("fedora",)
    trust = trust.with_entry(TrustEntry(key, Role.DISPATCHER, "carol"))
    assert trust.require(key, Role.DISPATCHER).operator == "carol"
    assert len(trust.entries) == len(fixture.trust_list.entries) + 1


# -- entries and shape ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"role": "king"},
        {"operator": ""},
        {"operator": "a b"},
        {"pools": ["b", "a"]},
        {"arches": ["X86"]},
        {"pools": ["a", "a"]},
        {"key": b"x" * 32},
    ],
)
def test_entry_validation(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {"key": make_identity("e").public_key, "role": "node",
                            "operator": "alice"}
    with pytest.raises(MalformedError):
        TrustEntry(**{**base, **kwargs})


def test_entries_must_be_sorted_and_unique() -> None:
    trust = _fixture().trust_list
    with pytest.raises(MalformedError):
        attrs.evolve(trust, entries=tuple(reversed(trust.entries)))
    with pytest.raises(MalformedError):
        attrs.evolve(trust, entries=trust.entries + trust.entries[-1:])


def test_format_version_true_is_not_one() -> None:
    trust = _fixture().trust_list
    raw = trust.to_bytes()
    assert raw[:2] == b"\x96\x01"
    with pytest.raises(MalformedError):
        TrustList.from_bytes(b"\x96\xc3" + raw[2:])


@given(st.binary(max_size=600))
def test_any_bytes_give_a_list_or_our_error(data: bytes) -> None:
    trust = value_or_our_error(TrustList.from_bytes, data)
    if trust is not None:
        with contextlib.suppress(TrustError):
            trust.verify(T0)


@given(trust_lists(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                               min_size=1, max_size=3))
def test_mutated_lists_give_a_list_or_our_error(trust: TrustList, edits: Any) -> None:
    data = bytearray(trust.to_bytes())
    for position, byte in edits:
        data[position % len(data)] = byte
    try:
        TrustList.from_bytes(bytes(data)).verify(T0)
    except P2PBuildError:
        return
    assert bytes(data) == trust.to_bytes()


def test_bad_signature_error_is_not_raised_from_verify() -> None:
    # Callers of verify() handle TrustError; record errors stay out of the trust subsystem.
    assert not issubclass(TrustSignatureError, BadSignatureError)
    assert issubclass(TrustSignatureError, TrustError)


def test_fixture_is_valid_for_every_size() -> None:
    for n in range(1, len(MAINTAINERS) + 1):
        for k in range(1, n + 1):
            make_trust_list(maintainers=n, threshold=k).trust_list.verify(T0)


def test_read_trust_list_is_the_one_bounded_loader(tmp_path: Path) -> None:
    from p2pbuild._trust import read_trust_list

    fixture = make_trust_list()
    good = tmp_path / "trust-list.bin"
    good.write_bytes(fixture.trust_list.to_bytes())
    assert read_trust_list(good) == fixture.trust_list
    huge = tmp_path / "huge.bin"
    huge.write_bytes(b"\x00" * (MAX_TRUST_LIST_SIZE * 4))
    with pytest.raises(OversizeError, match=f"trust list {huge}"):
        read_trust_list(huge)
    with pytest.raises(LocalError, match="cannot read trust list"):
        read_trust_list(tmp_path / "missing.bin")
    with pytest.raises(KeyError, match="cannot read trust list"):
        read_trust_list(tmp_path / "missing.bin", error=KeyError)
