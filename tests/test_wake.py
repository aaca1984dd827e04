"""Wake requests: signed by a trusted dispatcher, for one node, fresh, single use."""

from __future__ import annotations

import pytest

from p2pbuild._codec import encode
from p2pbuild._errors import (
    BadSignatureError,
    ExpiredError,
    ForbiddenError,
    MalformedError,
    NotYetValidError,
    RemoteError,
    ReplayError,
    WrongNodeError,
)
from p2pbuild._identity import Domain
from p2pbuild._replay import ReplayCache
from p2pbuild._wake import WakeRequest
from p2pbuild.testing import make_trust_list

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob")])
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["n1"].public_key
T0 = 1_800_000_000


def test_a_fresh_request_is_accepted_once() -> None:
    wake = WakeRequest.create(DISPATCHER, NODE, issued_at=T0)
    parsed = WakeRequest.from_bytes(wake.to_bytes())
    assert parsed == wake
    seen = ReplayCache()
    parsed.check(T0 + 5, NODE, FIXTURE.trust_list, seen)
    with pytest.raises(ReplayError):
        WakeRequest.from_bytes(wake.to_bytes()).check(T0 + 6, NODE, FIXTURE.trust_list, seen)
    # A new request (new nonce) is fine.
    WakeRequest.create(DISPATCHER, NODE, issued_at=T0).check(
        T0 + 7, NODE, FIXTURE.trust_list, seen
    )


def test_forged_requests_are_refused() -> None:
    seen = ReplayCache()
    # Signed by a key that is not a trusted dispatcher (a node's own key).
    by_node = WakeRequest.create(FIXTURE.nodes["n2"], NODE, issued_at=T0)
    with pytest.raises(ForbiddenError, match="not a trusted dispatcher"):
        WakeRequest.from_bytes(by_node.raw).check(T0, NODE, FIXTURE.trust_list, seen)
    # A flipped byte in the signed part: the signature no longer verifies.
    wake = WakeRequest.create(DISPATCHER, NODE, issued_at=T0)
    damaged = bytearray(wake.raw)
    damaged[40] ^= 1
    with pytest.raises((BadSignatureError, MalformedError)):
        WakeRequest.from_bytes(bytes(damaged))
    # The same fields signed under another domain (a job control signature, say).
    unsigned = [1, DISPATCHER.public_key.raw, NODE.raw, T0, bytes(16)]
    other = DISPATCHER.sign(Domain.JOB_CONTROL, encode(unsigned))
    with pytest.raises(BadSignatureError):
        WakeRequest.from_bytes(encode([*unsigned, other]))
    # For another node.
    with pytest.raises(WrongNodeError):
        wake.check(T0, FIXTURE.nodes["n2"].public_key, FIXTURE.trust_list, seen)


def test_stale_or_future_requests_are_refused() -> None:
    seen = ReplayCache()
    wake = WakeRequest.create(DISPATCHER, NODE, issued_at=T0)
    with pytest.raises(ExpiredError):
        wake.check(T0 + 61, NODE, FIXTURE.trust_list, seen)
    with pytest.raises(NotYetValidError):
        wake.check(T0 - 61, NODE, FIXTURE.trust_list, seen)
    wake.check(T0 + 60, NODE, FIXTURE.trust_list, seen)


@pytest.mark.parametrize("data", [b"", b"\x90", encode([1, 2, 3]), b"\xff" * 300])
def test_garbage_is_our_error(data: bytes) -> None:
    with pytest.raises(RemoteError):
        WakeRequest.from_bytes(data)
