"""The lease holds a node was told of (``p2pbuild._hold``), to show in its status.

A dispatcher that leases one of this node's slots sends a signed hold; the node keeps it
until its ``until`` (or a releasing hold) and reports it in ``GET /v1/status``
(``leased_slots``, ``leases``) and so in ``p2pbuild node status``. Holds live in memory: a
restarted node shows them again at the dispatcher's next extension or not at all, which is
harmless (they are for display; the dispatcher enforces its leases itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .._errors import RemoteError
from .._hold import LeaseHold
from .._identity import PublicKey
from .._replay import ReplayCache
from .._trust import TrustList

__all__ = ["Holds"]

#: At most this many holds are kept (a trusted dispatcher cannot exhaust memory either).
MAX_HOLDS = 1024


@attrs.define(eq=False)
class Holds:
    key: PublicKey
    trust_list: Callable[[], TrustList]
    replay: ReplayCache = attrs.field(factory=lambda: ReplayCache(max_entries=10_000))
    refused: int = 0
    _holds: dict[tuple[bytes, str], tuple[int, str]] = attrs.field(factory=dict, init=False)

    def accept(self, data: bytes, now: float) -> LeaseHold:
        """Check and record (or release) a hold. Raises :class:`RemoteError` subclasses,
        counted in ``refused``."""
        try:
            hold = LeaseHold.from_bytes(data)
            hold.check(now, self.key, self.trust_list(), self.replay)
        except RemoteError:
            self.refused += 1
            raise
        slot = (hold.dispatcher.raw, hold.lease)
        self._prune(now)
        if hold.releases:
            self._holds.pop(slot, None)
        elif slot in self._holds or len(self._holds) < MAX_HOLDS:
            self._holds[slot] = (hold.until, hold.dispatcher.fingerprint)
        return hold

    def _prune(self, now: float) -> None:
        for slot in [s for s, (until, _) in self._holds.items() if until <= now]:
            del self._holds[slot]

    def active(self, now: float) -> list[dict[str, Any]]:
        """The holds in force: lease id, dispatcher fingerprint, until."""
        self._prune(now)
        return [
            {"lease": lease, "dispatcher": fingerprint, "until": until}
            for (_, lease), (until, fingerprint) in sorted(self._holds.items())
        ]
