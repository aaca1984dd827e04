"""Lease holds: signed by a trusted dispatcher, for one node, fresh, single use; a node
shows the holds in force."""

from __future__ import annotations

import pytest

from p2pbuild._errors import ForbiddenError, MalformedError, ReplayError, WrongNodeError
from p2pbuild._hold import LeaseHold
from p2pbuild._replay import ReplayCache
from p2pbuild.node._holds import Holds
from p2pbuild.testing import make_trust_list

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob")])
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["n1"].public_key
T0 = 1_800_000_000


def test_holds_are_shown_until_they_end_or_are_released() -> None:
    holds = Holds(NODE, lambda: FIXTURE.trust_list)
    hold = LeaseHold.create(DISPATCHER, NODE, "Labc", T0 + 100, issued_at=T0)
    holds.accept(LeaseHold.from_bytes(hold.raw).raw, T0)
    assert holds.active(T0 + 99) == [
        {"lease": "Labc", "dispatcher": DISPATCHER.public_key.fingerprint, "until": T0 + 100}
    ]
    assert holds.active(T0 + 100) == []
    holds.accept(LeaseHold.create(DISPATCHER, NODE, "Labc", T0 + 500, issued_at=T0 + 1).raw,
                 T0 + 1)
    release = LeaseHold.create(DISPATCHER, NODE, "Labc", T0 + 2, issued_at=T0 + 2)
    assert release.releases
    holds.accept(release.raw, T0 + 2)
    assert holds.active(T0 + 3) == []


def test_forged_replayed_or_misaddressed_holds_are_refused() -> None:
    holds = Holds(NODE, lambda: FIXTURE.trust_list)
    with pytest.raises(ForbiddenError):
        holds.accept(LeaseHold.create(FIXTURE.nodes["n2"], NODE, "L1", T0 + 9, issued_at=T0).raw,
                     T0)
    with pytest.raises(WrongNodeError):
        holds.accept(LeaseHold.create(
            DISPATCHER, FIXTURE.nodes["n2"].public_key, "L1", T0 + 9, issued_at=T0).raw, T0)
    hold = LeaseHold.create(DISPATCHER, NODE, "L1", T0 + 9, issued_at=T0)
    holds.accept(hold.raw, T0)
    with pytest.raises(ReplayError):
        holds.accept(hold.raw, T0 + 1)
    with pytest.raises(MalformedError):
        LeaseHold.create(DISPATCHER, NODE, "no spaces", T0 + 9, issued_at=T0)
    assert holds.refused == 3
    seen = ReplayCache()
    LeaseHold.create(DISPATCHER, NODE, "L2", T0 + 9, issued_at=T0).check(
        T0, NODE, FIXTURE.trust_list, seen
    )
