"""Lease holds: a dispatcher tells a node that a lease holds one of its slots until a time.

A dispatcher that grants, extends, returns or ends a lease (``dispatcher/_leases.py``)
sends each push node of the lease a signed hold, so the node can show its leased slots in
its own status (``GET /v1/status``, ``p2pbuild node status``). The node only shows it: the
dispatcher that granted the lease is the one that keeps other users' builds off the slot.

Wire form (canonical msgpack, at most :data:`MAX_HOLD_SIZE` bytes), signed with
``Domain.LEASE_HOLD`` over the first seven elements as an array::

    [1, dispatcher(bin32), node(bin32), lease(str), until, issued_at, nonce(bin16), signature]

``until`` is when the hold ends (Unix seconds); a hold whose ``until`` is not after
``issued_at`` releases the lease's slot. A node accepts one as :class:`~p2pbuild._wake.WakeRequest`
is accepted: signature, a trust-listed dispatcher, this node, fresh, not replayed.
"""

from __future__ import annotations

import re

import attrs

from ._errors import (
    MalformedError,
    WrongNodeError,
)
from ._fields import (
    NONCE_SIZE,
    _require_bytes,
    _require_time,
    _signed_part,
    _split_signed,
    check_window,
    fresh_nonce,
    require_dispatcher,
    sign_array,
)
from ._identity import Domain, Identity, PublicKey
from ._replay import ReplayCache
from ._trust import TrustList

__all__ = ["MAX_HOLD_SIZE", "LeaseHold"]

MAX_HOLD_SIZE = 300
_WINDOW_S = 60
_LEASE_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


@attrs.frozen
class LeaseHold:
    """A dispatcher's signed statement that lease ``lease`` holds a slot of ``node`` until
    ``until``. Build with :meth:`create`, parse with :meth:`from_bytes`, accept with
    :meth:`check`."""

    dispatcher: PublicKey
    node: PublicKey
    lease: str
    until: int
    issued_at: int
    nonce: bytes
    signature: bytes = attrs.field(repr=False)
    raw: bytes = attrs.field(repr=False, eq=False)

    @property
    def releases(self) -> bool:
        return self.until <= self.issued_at

    @classmethod
    def create(
        cls, identity: Identity, node: PublicKey, lease: str, until: int, *, issued_at: int,
        nonce: bytes | None = None,
    ) -> LeaseHold:
        nonce = fresh_nonce(nonce, issued_at)
        _require_time(until, "until")
        if _LEASE_ID.fullmatch(lease) is None:
            raise MalformedError("lease must be 1 to 40 letters, digits, '-' or '_'")
        signature, raw = sign_array(
            identity, Domain.LEASE_HOLD,
            [identity.public_key.raw, node.raw, lease, until, issued_at, nonce], MAX_HOLD_SIZE,
        )
        return cls(identity.public_key, node, lease, until, issued_at, nonce, signature, raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseHold:
        """Parse and authenticate a hold. Raises :class:`OversizeError`,
        :class:`MalformedError` or :class:`BadSignatureError`."""
        value = _split_signed(data, MAX_HOLD_SIZE, 8, "lease hold")
        _, dispatcher, node, lease, until, issued_at, nonce, signature = value
        dispatcher_key = PublicKey(_require_bytes(dispatcher, 32, "dispatcher"))
        node_key = PublicKey(_require_bytes(node, 32, "node"))
        if type(lease) is not str or _LEASE_ID.fullmatch(lease) is None:
            raise MalformedError("lease must be 1 to 40 letters, digits, '-' or '_'")
        _require_time(until, "until")
        _require_time(issued_at, "issued_at")
        _require_bytes(nonce, NONCE_SIZE, "nonce")
        dispatcher_key.verify(Domain.LEASE_HOLD, _signed_part(data, 8), signature)
        return cls(dispatcher_key, node_key, lease, until, issued_at, nonce, signature, data)

    def to_bytes(self) -> bytes:
        return self.raw

    def check(
        self, now: float, node: PublicKey, trust_list: TrustList, seen: ReplayCache,
        *, window: int = _WINDOW_S,
    ) -> None:
        """Accept the hold at ``now`` as ``node``; records its nonce in ``seen``.

        Raises :class:`WrongNodeError`, :class:`ForbiddenError` (not a trusted dispatcher),
        :class:`ExpiredError`, :class:`NotYetValidError` or :class:`ReplayError`.
        """
        if self.node != node:
            raise WrongNodeError("the lease hold is for another node")
        require_dispatcher(trust_list, self.dispatcher, "lease hold")
        check_window(now, self.issued_at, window, "lease hold")
        seen.add(self.dispatcher.raw + self.nonce, self.issued_at + window + 1, now)
