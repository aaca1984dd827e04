"""A bounded replay cache: ids seen, each remembered until the object it came from expires.

A node remembers the id of every job it admitted until that job's ``expires_at``; after that
the job is refused as expired anyway, so the id can be forgotten. A dispatcher does the same
with the nonces of pull-mode tokens. The cache is bounded by ``max_entries``. When it is full,
the entry that expires first is evicted and its expiry becomes the *horizon*: from then on
every id whose object expires at or before the horizon counts as replayed. Eviction therefore
never reopens a replay window; at worst it refuses a fresh object with a very short lifetime,
which its sender can reissue.

The cache is a sans-IO value holder (no clock reads: ``now`` is passed in). It has a
canonical msgpack form (:meth:`ReplayCache.to_bytes` / :meth:`ReplayCache.from_bytes`) so a
node can persist it across restarts::

    [1, horizon, [[id(bin), expires_at], ...]]   # entries sorted by (expires_at, id)
"""

from __future__ import annotations

import heapq

import attrs

from ._codec import decode, encode
from ._errors import LocalError, MalformedError, ReplayError

__all__ = ["ReplayCache", "ReplayStatistics"]

_FORMAT_VERSION = 1
_MAX_ID = 64
_U63 = 2**63


@attrs.frozen
class ReplayStatistics:
    """A snapshot of a :class:`ReplayCache`."""

    entries: int
    max_entries: int
    horizon: int
    evicted: int


def _check_id(item_id: object) -> bytes:
    if type(item_id) is not bytes or not 0 < len(item_id) <= _MAX_ID:
        raise MalformedError(f"a replay id is 1 to {_MAX_ID} bytes")
    return item_id


def _check_time(value: object) -> int:
    if type(value) is not int or not 0 <= value < _U63:
        raise MalformedError("a replay expiry is a non-negative integer")
    return value


@attrs.define(eq=False)
class ReplayCache:
    """Ids seen, each until its expiry, at most ``max_entries`` of them.

    Use :meth:`check` to test an id without recording it and :meth:`add` to record it once
    the object is admitted.
    """

    max_entries: int = 100_000
    #: Every id whose object expires at or before this is treated as seen (see module doc).
    horizon: int = 0
    _expiry: dict[bytes, int] = attrs.field(factory=dict, init=False)
    _heap: list[tuple[int, bytes]] = attrs.field(factory=list, init=False)
    _evicted: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_entries < 1:
            raise LocalError("a replay cache holds at least one entry")

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._expiry

    def check(self, item_id: bytes, expires_at: int, now: float) -> None:
        """Raise :class:`ReplayError` if ``item_id`` was seen and may still be valid at
        ``now``, or if its ``expires_at`` is at or before the eviction horizon."""
        self.prune(now)
        if item_id in self._expiry:
            raise ReplayError(f"id {item_id.hex()[:16]} was already seen")
        if expires_at <= self.horizon:
            raise ReplayError(
                "expiry at or before the replay horizon (the cache was full); reissue it"
            )

    def add(self, item_id: bytes, expires_at: int, now: float) -> None:
        """Record ``item_id`` until ``expires_at`` (Unix seconds).

        Raises :class:`ReplayError` exactly when :meth:`check` would; the two are one step,
        so a caller cannot admit the same id twice.
        """
        _check_id(item_id)
        _check_time(expires_at)
        self.check(item_id, expires_at, now)
        if expires_at <= now:
            return  # already expired: nothing can replay it as valid
        while len(self._expiry) >= self.max_entries:
            self._evict_one()
        self._expiry[item_id] = expires_at
        heapq.heappush(self._heap, (expires_at, item_id))

    def prune(self, now: float) -> None:
        """Forget every id whose expiry is at or before ``now``."""
        while self._heap and self._heap[0][0] <= now:
            expires_at, item_id = heapq.heappop(self._heap)
            if self._expiry.get(item_id) == expires_at:
                del self._expiry[item_id]

    def _evict_one(self) -> None:
        expires_at, item_id = heapq.heappop(self._heap)
        if self._expiry.get(item_id) == expires_at:
            del self._expiry[item_id]
            self.horizon = max(self.horizon, expires_at)
            self._evicted += 1

    def statistics(self) -> ReplayStatistics:
        return ReplayStatistics(len(self._expiry), self.max_entries, self.horizon, self._evicted)

    # -- persistence ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        entries = sorted((exp, item_id) for item_id, exp in self._expiry.items())
        return encode([_FORMAT_VERSION, self.horizon, [[i, e] for e, i in entries]])

    @classmethod
    def from_bytes(
        cls, data: bytes, *, max_entries: int = 100_000, max_size: int = 16 * 1024 * 1024
    ) -> ReplayCache:
        """Load a cache written by :meth:`to_bytes`.

        Raises :class:`OversizeError` or :class:`MalformedError`. If the file holds more
        entries than ``max_entries``, the earliest-expiring ones are evicted (raising the
        horizon), exactly as if they had been added one by one.
        """
        value = decode(data, max_size=max_size)
        if type(value) is not list or len(value) != 3 or value[0] != _FORMAT_VERSION:
            raise MalformedError("a replay cache is [1, horizon, entries]")
        _, horizon, entries = value
        cache = cls(max_entries=max_entries, horizon=_check_time(horizon))
        if type(entries) is not list:
            raise MalformedError("replay cache entries must be an array")
        for entry in entries:
            if type(entry) is not list or len(entry) != 2:
                raise MalformedError("a replay cache entry is [id, expires_at]")
            item_id, expires_at = _check_id(entry[0]), _check_time(entry[1])
            if item_id in cache._expiry:
                raise MalformedError("duplicate id in replay cache")
            while len(cache._expiry) >= cache.max_entries:
                cache._evict_one()
            cache._expiry[item_id] = expires_at
            heapq.heappush(cache._heap, (expires_at, item_id))
        return cache
