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

from ._errors import MalformedError
from ._identity import Domain, Identity, PublicKey
from ._orders import TIME, NodeOrder, Wire

__all__ = ["MAX_HOLD_SIZE", "LeaseHold"]

MAX_HOLD_SIZE = 300
_LEASE_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _check_lease(value: object, name: str) -> str:
    if type(value) is not str or _LEASE_ID.fullmatch(value) is None:
        raise MalformedError(f"{name} must be 1 to 40 letters, digits, '-' or '_'")
    return value


@attrs.frozen
class LeaseHold(NodeOrder, domain=Domain.LEASE_HOLD, max_size=MAX_HOLD_SIZE, what="lease hold"):
    """A dispatcher's signed statement that lease ``lease`` holds a slot of ``node`` until
    ``until``. Build with :meth:`create`, parse with :meth:`from_bytes`, accept with
    :meth:`check`."""

    lease: str = attrs.field(metadata=Wire(_check_lease).metadata)
    until: int = attrs.field(metadata=TIME)

    @property
    def releases(self) -> bool:
        return self.until <= self.issued_at

    @classmethod
    def create(
        cls, identity: Identity, node: PublicKey, lease: str, until: int, *, issued_at: int,
        nonce: bytes | None = None,
    ) -> LeaseHold:
        return cls._sign(
            identity, node=node, lease=lease, until=until, issued_at=issued_at, nonce=nonce
        )
