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

from ._errors import WrongNodeError
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

__all__ = ["MAX_WAKE_SIZE", "WAKE_WINDOW_S", "WakeRequest"]

MAX_WAKE_SIZE = 256
#: A wake request is fresh this long either side of its ``issued_at`` (seconds).
WAKE_WINDOW_S = 60
_FORMAT_VERSION = 1


@attrs.frozen
class WakeRequest:
    """A dispatcher's signed request that ``node`` wake up. Build with :meth:`create`,
    parse with :meth:`from_bytes` (authenticates), accept with :meth:`check`."""

    dispatcher: PublicKey
    node: PublicKey
    issued_at: int
    nonce: bytes
    signature: bytes = attrs.field(repr=False)
    raw: bytes = attrs.field(repr=False, eq=False)

    @classmethod
    def create(
        cls, identity: Identity, node: PublicKey, *, issued_at: int, nonce: bytes | None = None
    ) -> WakeRequest:
        """Sign a wake request for ``node`` as dispatcher ``identity``."""
        nonce = fresh_nonce(nonce, issued_at)
        signature, raw = sign_array(
            identity, Domain.WAKE, [identity.public_key.raw, node.raw, issued_at, nonce],
            MAX_WAKE_SIZE,
        )
        return cls(identity.public_key, node, issued_at, nonce, signature, raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> WakeRequest:
        """Parse and authenticate a wake request.

        Raises :class:`OversizeError`, :class:`MalformedError` or :class:`BadSignatureError`.
        """
        value = _split_signed(data, MAX_WAKE_SIZE, 6, "wake request")
        _, dispatcher, node, issued_at, nonce, signature = value
        dispatcher_key = PublicKey(_require_bytes(dispatcher, 32, "dispatcher"))
        node_key = PublicKey(_require_bytes(node, 32, "node"))
        _require_time(issued_at, "issued_at")
        _require_bytes(nonce, NONCE_SIZE, "nonce")
        dispatcher_key.verify(Domain.WAKE, _signed_part(data, 6), signature)
        return cls(dispatcher_key, node_key, issued_at, nonce, signature, data)

    def to_bytes(self) -> bytes:
        return self.raw

    def check(
        self,
        now: float,
        node: PublicKey,
        trust_list: TrustList,
        seen: ReplayCache,
        *,
        window: int = WAKE_WINDOW_S,
    ) -> None:
        """Accept the request at ``now`` as ``node``, recording its nonce in ``seen``.

        Raises :class:`WrongNodeError` (for another node), :class:`ForbiddenError` (not
        signed by a trust-listed dispatcher), :class:`ExpiredError`,
        :class:`NotYetValidError` or :class:`ReplayError`.
        """
        if self.node != node:
            raise WrongNodeError("the wake request is for another node")
        require_dispatcher(trust_list, self.dispatcher, "wake request")
        check_window(now, self.issued_at, window, "wake request")
        seen.add(self.dispatcher.raw + self.nonce, self.issued_at + window + 1, now)
