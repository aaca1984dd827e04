"""The short signed orders keep their wire form: these encodings, made and signed before the
orders shared one :class:`~p2pbuild._orders.SignedOrder` base, must still be made the same
and still parse and verify (Ed25519 signatures are deterministic, the keys are seeded)."""

from __future__ import annotations

import pytest

from p2pbuild._errors import P2PBuildError
from p2pbuild._hold import LeaseHold
from p2pbuild._orders import JobControl, JobControlAction, PullAuth, SignedOrder
from p2pbuild._wake import WakeRequest
from p2pbuild.testing import make_trust_list

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob")])
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["n1"]
T0 = 1_800_000_000
NONCE = bytes(range(16))

PULL_AUTH = bytes.fromhex(
    "9601c4200effa91fb3fbbbebfdeb3f0bf11355114f61f50497f05eb5e1cf5065c6b91462c420f964"
    "6e22234f7b1321575f299970747d724bf97a60e068e53b32f0ab2b9c0f18ce6b49d200c410000102"
    "030405060708090a0b0c0d0e0fc440db722b45da3f90f3df2947414e2c2d51a1d0612464993b4d73"
    "f5311b54f3b63ef1c1e6d301e56fe22851db4d4daac7130e3a468c60b84a924c047a4afd6a6e06"
)
JOB_CONTROL = bytes.fromhex(
    "9701c420f9646e22234f7b1321575f299970747d724bf97a60e068e53b32f0ab2b9c0f18c4100000"
    "0000000000000000000000000000a664656c657465ce6b49d200c410000102030405060708090a0b"
    "0c0d0e0fc44092f9986a624a58028d0c9759802b8110097d09888074e83f403be426ac02de4e0b7e"
    "a649724ced060259ec4f21a9e832cef5064568aefd14b5dadd2a8b23f80e"
)
WAKE_REQUEST = bytes.fromhex(
    "9601c420f9646e22234f7b1321575f299970747d724bf97a60e068e53b32f0ab2b9c0f18c4200eff"
    "a91fb3fbbbebfdeb3f0bf11355114f61f50497f05eb5e1cf5065c6b91462ce6b49d200c410000102"
    "030405060708090a0b0c0d0e0fc440dc059d11188ba99eb6b72512944f40d0abf2f85b1573efdf89"
    "31303f800401fe72f947da9c10a4265b4660fccb6e25dd7256da9bb2b62d52a9b52aa5d1e7060c"
)
LEASE_HOLD = bytes.fromhex(
    "9801c420f9646e22234f7b1321575f299970747d724bf97a60e068e53b32f0ab2b9c0f18c4200eff"
    "a91fb3fbbbebfdeb3f0bf11355114f61f50497f05eb5e1cf5065c6b91462a76c656173652d31ce6b"
    "49d264ce6b49d200c410000102030405060708090a0b0c0d0e0fc440a7a24029c75517a220883bee"
    "de24487f88c93f05c13922c4257fc0333ee5b889ef1b6aec3025c52c817d2f2bf3a28c7d1f82b79e"
    "2418abfbd2533969402e7609"
)

CASES = [
    (PullAuth.create(NODE, DISPATCHER.public_key, issued_at=T0, nonce=NONCE), PULL_AUTH),
    (
        JobControl.create(
            DISPATCHER, bytes(16), JobControlAction.DELETE, issued_at=T0, nonce=NONCE
        ),
        JOB_CONTROL,
    ),
    (WakeRequest.create(DISPATCHER, NODE.public_key, issued_at=T0, nonce=NONCE), WAKE_REQUEST),
    (
        LeaseHold.create(
            DISPATCHER, NODE.public_key, "lease-1", T0 + 100, issued_at=T0, nonce=NONCE
        ),
        LEASE_HOLD,
    ),
]


@pytest.mark.parametrize(("order", "pinned"), CASES, ids=lambda case: type(case).__name__)
def test_orders_are_made_and_read_as_pinned(order: SignedOrder, pinned: bytes) -> None:
    assert order.to_bytes() == pinned
    parsed = type(order).from_bytes(pinned)
    assert parsed == order
    assert parsed.raw == pinned
    assert (parsed.issued_at, parsed.nonce) == (T0, NONCE)


def test_pinned_fields() -> None:
    control = JobControl.from_bytes(JOB_CONTROL)
    assert (control.dispatcher, control.job_id, control.action) == (
        DISPATCHER.public_key,
        bytes(16),
        JobControlAction.DELETE,
    )
    hold = LeaseHold.from_bytes(LEASE_HOLD)
    assert (hold.dispatcher, hold.node, hold.lease, hold.until) == (
        DISPATCHER.public_key,
        NODE.public_key,
        "lease-1",
        T0 + 100,
    )
    token = PullAuth.from_bytes(PULL_AUTH)
    assert (token.node, token.dispatcher) == (NODE.public_key, DISPATCHER.public_key)
    wake = WakeRequest.from_bytes(WAKE_REQUEST)
    assert (wake.dispatcher, wake.node) == (DISPATCHER.public_key, NODE.public_key)


@pytest.mark.parametrize(("order", "pinned"), CASES, ids=lambda case: type(case).__name__)
def test_any_flipped_bit_is_refused(order: SignedOrder, pinned: bytes) -> None:
    # Every byte is signed, is the signature, or frames them: no flip parses.
    for i in range(len(pinned)):
        for bit in (0x01, 0x10):
            flipped = bytearray(pinned)
            flipped[i] ^= bit
            with pytest.raises(P2PBuildError):
                type(order).from_bytes(bytes(flipped))
