"""Wake requests: a dispatcher's signed order to an on-demand node in standby to wake up.

An on-demand node (``Capability.wake_s > 0``) that has been idle publishes a ``standby``
status, and its owner's hook may stop the machine. A dispatcher that needs it sends a wake
request to the node's ``wake_url`` (an HTTPS endpoint the operator runs, or the node's own
``POST /v1/wake``); a pull node's wake-up is its long-poll answering at once, with a job.

Wire form (canonical msgpack, at most :data:`MAX_WAKE_SIZE` bytes), signed with
``Domain.WAKE`` over the first six elements as an array::

    [1, dispatcher(bin32), node(bin32), issued_at, nonce(bin16), signature(bin64)]

A receiver accepts one only if the signature verifies, the signer is a dispatcher on its
trust list, it names this node, it is fresh (``window`` seconds either side of
``issued_at``), and its nonce was not seen before (single use: a replayed request is
refused). Nothing in it is secret: it only makes a node start sooner.
"""

from __future__ import annotations

import attrs

from ._identity import Domain, Identity, PublicKey
from ._orders import ORDER_WINDOW_S, NodeOrder

__all__ = ["MAX_WAKE_SIZE", "WAKE_WINDOW_S", "WakeRequest"]

MAX_WAKE_SIZE = 256
#: A wake request is fresh this long either side of its ``issued_at`` (seconds).
WAKE_WINDOW_S = ORDER_WINDOW_S


@attrs.frozen
class WakeRequest(NodeOrder, domain=Domain.WAKE, max_size=MAX_WAKE_SIZE, what="wake request"):
    """A dispatcher's signed request that ``node`` wake up. Build with :meth:`create`,
    parse with :meth:`from_bytes` (authenticates), accept with :meth:`check`."""

    @classmethod
    def create(
        cls, identity: Identity, node: PublicKey, *, issued_at: int, nonce: bytes | None = None
    ) -> WakeRequest:
        """Sign a wake request for ``node`` as dispatcher ``identity``."""
        return cls._sign(identity, node=node, issued_at=issued_at, nonce=nonce)
