"""The record store: many signed records per DHT key, one per publisher and kind.

A key holds *slots*; a slot is ``publisher key (32 bytes) || kind`` (``b"capability"`` or
``b"status"``) and holds that publisher's latest record of that kind. Slot names sort, and a
page of a key's records is "the slots after this cursor", so a cursor stays valid while the
key changes and is the same on every node (a reader can continue paging on another holder).

A record is stored only if, in this order:

1. it decodes and its signature verifies (``SignedRecord.from_bytes``);
2. it is *bound* to the key: a capability under its publisher's node key or one of its own
   facet keys; a status under its publisher's node key or a key that holds (or receives in
   the same batch) a capability of the same publisher -- so nobody can fill an arbitrary key
   with validly signed records (:class:`WrongKeyError`);
3. it is acceptable now: not expired, not from the future, lifetime in bounds, and its
   ``seq`` newer than the held one (``SignedRecord.check``); the very same bytes again are
   reported as ``"held"``, not as an error;
4. the per-key, per-publisher and total caps leave room (:class:`StoreFullError`).

Checking a signature costs more than the rest of a datagram's handling, and in one process
running many nodes (tests, benchmarks) the same record reaches many of them, so verified
records are kept in a bounded :class:`RecordCache` that nodes may share: verification is a
pure function of the bytes, so sharing it changes nothing but time.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .._errors import RecordError, RemoteError
from .._records import DEFAULT_POLICY, Capability, Kind, RecordPolicy, SignedRecord
from ._ids import FACET_MAX_LEVEL, facet_key, facet_shard, facet_shard_key, node_key

__all__ = [
    "RecordCache",
    "RecordStore",
    "StoreFullError",
    "WrongKeyError",
    "bound_keys",
    "keep_newest",
    "slot_of",
]

HELD = "held"
OK = "ok"


class WrongKeyError(RecordError):
    """A valid record offered under a key it is not bound to (see the module docstring)."""

    code = "wrong-key"


class StoreFullError(RecordError):
    """A per-key, per-publisher or total cap of the store is reached."""

    code = "store-full"


# Slot names interned for the process: every holder of a record names its slot alike, and a
# thousand nodes in one process (tests, benchmarks) would otherwise keep a copy each.
# Bounded, and simply cleared when full.
_SLOTS: dict[bytes, bytes] = {}
_MAX_SLOTS = 1 << 16


def slot_of(record: SignedRecord) -> bytes:
    """The slot name of ``record``: publisher key bytes followed by the kind."""
    slot = record.publisher.raw + record.kind.value.encode()
    shared = _SLOTS.get(slot)
    if shared is None:
        if len(_SLOTS) >= _MAX_SLOTS:
            _SLOTS.clear()
        shared = _SLOTS[slot] = slot
    return shared


def bound_keys(record: SignedRecord) -> frozenset[bytes]:
    """The keys ``record`` is bound to by itself: its publisher's node key and, for a
    capability, each of its facet keys and its own shard of each at every level."""
    keys = [node_key(record.publisher)]
    if isinstance(record.body, Capability):
        top = facet_shard(record.publisher, FACET_MAX_LEVEL)
        shards = [
            (level, top >> (FACET_MAX_LEVEL - level)) for level in range(1, FACET_MAX_LEVEL + 1)
        ]
        for facet in record.body.facets():
            keys.append(facet_key(facet))
            keys.extend(facet_shard_key(facet, level, shard) for level, shard in shards)
    return frozenset(keys)


class RecordCache:
    """A bounded cache of verified records and their bound keys, by wire bytes.

    Only successes are cached. Share one instance between nodes of one process to verify
    each distinct record once.
    """

    __slots__ = ("_entries", "maxsize")

    def __init__(self, maxsize: int = 8192) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[bytes, tuple[SignedRecord, frozenset[bytes]]] = OrderedDict()

    def parse(self, raw: bytes) -> tuple[SignedRecord, frozenset[bytes]]:
        """The verified record of ``raw`` and its :func:`bound_keys`.

        Raises what ``SignedRecord.from_bytes`` raises: :class:`OversizeError`,
        :class:`MalformedError`, :class:`UnknownKindError` or :class:`BadSignatureError`.
        """
        entry = self._entries.get(raw)
        if entry is not None:
            self._entries.move_to_end(raw)
            return entry
        record = SignedRecord.from_bytes(raw)
        entry = (record, bound_keys(record))
        self._entries[raw] = entry
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return entry


#: The cache nodes use unless given their own.
SHARED_CACHE = RecordCache()


class _Key:
    """The slots of one key: two parallel lists sorted by slot name (the paging order),
    lighter than a dict per key (a node holds a few keys, a process a thousand nodes)."""

    __slots__ = ("order", "records")

    def __init__(self) -> None:
        #: Slot names, sorted.
        self.order: list[bytes] = []
        #: ``records[i]`` holds slot ``order[i]``.
        self.records: list[SignedRecord] = []

    def get(self, slot: bytes) -> SignedRecord | None:
        order = self.order
        position = bisect.bisect_left(order, slot)
        if position < len(order) and order[position] == slot:
            return self.records[position]
        return None

    def put(self, slot: bytes, record: SignedRecord) -> None:
        order = self.order
        position = bisect.bisect_left(order, slot)
        if position < len(order) and order[position] == slot:
            self.records[position] = record
        else:
            order.insert(position, slot)
            self.records.insert(position, record)

    def remove(self, slot: bytes) -> None:
        position = bisect.bisect_left(self.order, slot)
        del self.order[position]
        del self.records[position]


#: Publishers a full key's sketch keeps per window (the smallest hashes): its estimate of
#: how many publishers offered records is off by about 1 / sqrt(126), 9%, typically.
SKETCH_SIZE = 128
#: A sketch's window: every publisher republishes at least hourly (docs/protocol.md,
#: *Publishing*), so each window sees every live publisher of a key.
SKETCH_WINDOW = 3600.0


def _kmv(hashes: list[float]) -> int:
    if len(hashes) < SKETCH_SIZE:
        return len(hashes)
    return round((SKETCH_SIZE - 1) / hashes[-1])


class _Sketch:
    """How many distinct publishers offered a capability under a key that has been full:
    the ``SKETCH_SIZE`` smallest hashes of their keys (a k-minimum-values sketch, Bar-Yossef
    et al. 2002) in the current window of ``SKETCH_WINDOW`` seconds and in the previous
    one. A sketch with fewer entries holds all of them; a full one estimates
    ``(SKETCH_SIZE - 1) / largest hash``. The estimate is the larger of the two windows':
    a publisher that left stops counting two windows later."""

    __slots__ = ("current", "previous", "start")

    def __init__(self, now: float) -> None:
        #: Hashes in (0, 1], sorted.
        self.current: list[float] = []
        self.previous: list[float] = []
        self.start = now

    def _roll(self, now: float) -> None:
        if now >= self.start + SKETCH_WINDOW:
            self.previous = self.current if now < self.start + 2 * SKETCH_WINDOW else []
            self.current = []
            self.start = now

    def note(self, publisher: bytes, now: float) -> None:
        self._roll(now)
        digest = hashlib.blake2b(publisher, digest_size=8, person=b"p2pb-kmv").digest()
        value = (int.from_bytes(digest, "big") + 1) / 2.0**64
        hashes = self.current
        position = bisect.bisect_left(hashes, value)
        if position < len(hashes) and hashes[position] == value:
            return
        if len(hashes) >= SKETCH_SIZE:
            if position >= SKETCH_SIZE:
                return
            hashes.pop()
        hashes.insert(position, value)

    def estimate(self, now: float) -> int:
        self._roll(now)
        return max(_kmv(self.current), _kmv(self.previous))


class RecordStore:
    """Records held by one node. Every bound is a constructor parameter."""

    __slots__ = (
        "_counted",
        "_keys",
        "_per_publisher",
        "_sketches",
        "_total",
        "cache",
        "max_per_key",
        "max_per_publisher",
        "max_total",
        "policy",
    )

    def __init__(
        self,
        *,
        max_per_key: int,
        max_per_publisher: int,
        max_total: int,
        policy: RecordPolicy = DEFAULT_POLICY,
        cache: RecordCache = SHARED_CACHE,
    ) -> None:
        self.max_per_key = max_per_key
        self.max_per_publisher = max_per_publisher
        self.max_total = max_total
        self.policy = policy
        self.cache = cache
        self._keys: dict[bytes, _Key] = {}
        #: Keys that have refused a publisher as full: who offered (``publishers``).
        self._sketches: dict[bytes, _Sketch] = {}
        #: Publisher counts of held keys as a hand-off's sender stated them, and until when
        #: they count (``counted``).
        self._counted: dict[bytes, tuple[int, float]] = {}
        self._per_publisher: dict[bytes, int] = {}
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def keys(self) -> list[bytes]:
        return list(self._keys)

    # -- writing ----------------------------------------------------------------------------------

    def offer(self, key: bytes, raw: bytes, now: float) -> str:
        """Store ``raw`` under ``key`` if it is acceptable; returns ``"ok"`` or ``"held"``.

        Raises the :class:`RemoteError` that explains a refusal (see the module docstring).
        """
        record, keys = self.cache.parse(raw)
        slot = slot_of(record)
        held = self._keys.get(key)
        if key not in keys:
            capability_slot = record.publisher.raw + Kind.CAPABILITY.value.encode()
            if record.kind is not Kind.STATUS or held is None or held.get(capability_slot) is None:
                raise WrongKeyError("record is not bound to this key")
        previous = held.get(slot) if held is not None else None
        sketch = self._sketches.get(key) if record.kind is Kind.CAPABILITY else None
        if previous is not None and previous.raw == raw:
            if sketch is not None:
                sketch.note(record.publisher.raw, now)
            return HELD
        record.check(
            now, policy=self.policy, held_seq=previous.seq if previous is not None else None
        )
        if sketch is not None:
            sketch.note(record.publisher.raw, now)
        if previous is None:
            publisher = record.publisher.raw
            if held is not None and len(held.order) >= self.max_per_key:
                if record.kind is Kind.CAPABILITY and sketch is None:
                    # Full: from now on, count who offers (the census of a big facet's
                    # root tells how big it is, see ``publishers``).
                    sketch = self._sketches[key] = _Sketch(now)
                    for other in held.records:
                        if other.kind is Kind.CAPABILITY and other.expires_at > now:
                            sketch.note(other.publisher.raw, now)
                    sketch.note(publisher, now)
                raise StoreFullError("this key holds as many records as allowed")
            if self._per_publisher.get(publisher, 0) >= self.max_per_publisher:
                raise StoreFullError("this publisher holds as many records as allowed")
            if self._total >= self.max_total:
                raise StoreFullError("the store is full")
            if held is None:
                held = self._keys[key] = _Key()
            self._per_publisher[publisher] = self._per_publisher.get(publisher, 0) + 1
            self._total += 1
        assert held is not None
        held.put(slot, record)
        return OK

    def offer_many(
        self, key: bytes, raws: Sequence[bytes], now: float
    ) -> tuple[list[str], list[RemoteError]]:
        """Offer each record; capabilities first, so a status may follow its capability in
        one batch. Returns one code per record in the input order (``"ok"``, ``"held"`` or
        the refusal's ``code``) and the refusals themselves, for the caller to count.

        This is the record boundary of the receive path: each record's refusal is caught
        here, by the :class:`RemoteError` family only, so one bad record does not spoil the
        batch.
        """
        codes = [""] * len(raws)
        errors: list[RemoteError] = []
        # Status records (and anything that fails to parse) go second.
        order = sorted(range(len(raws)), key=lambda i: self._is_status(raws[i]))
        for index in order:
            try:
                codes[index] = self.offer(key, raws[index], now)
            except RemoteError as exc:
                codes[index] = exc.code
                errors.append(exc)
        return codes, errors

    def _is_status(self, raw: bytes) -> bool:
        # Cheap peek for ordering only; the real check happens in offer().
        return b"\xa6status" in raw[:12]

    def expire(self, now: float) -> int:
        """Drop every expired record; returns how many."""
        dropped = 0
        for key in list(self._keys):
            held = self._keys[key]
            stale = [
                slot
                for slot, record in zip(held.order, held.records, strict=True)
                if record.expires_at <= now
            ]
            for slot in stale:
                self._remove(held, slot)
                dropped += 1
            if not held.order:
                del self._keys[key]
                self._sketches.pop(key, None)
        for key, (_, until) in list(self._counted.items()):
            if until <= now or key not in self._keys:
                del self._counted[key]
        return dropped

    def counted(self, key: bytes, publishers: int, now: float) -> None:
        """A hand-off of ``key`` stated that its sender holds ``publishers`` publishers
        under it (a full key: those that offered, held or not). If this store holds the key,
        :meth:`publishers` says at least that for a ``SKETCH_WINDOW``, by which time its own
        sketch has seen every live publisher offer. A newcomer handed a full key holds the
        room's worth of publishers only, not the count its census answers should give."""
        if key in self._keys:
            current, _ = self._counted.get(key, (0, now))
            self._counted[key] = (max(current, publishers), now + SKETCH_WINDOW)

    def _remove(self, held: _Key, slot: bytes) -> None:
        held.remove(slot)
        publisher = slot[:32]
        left = self._per_publisher[publisher] - 1
        if left:
            self._per_publisher[publisher] = left
        else:
            del self._per_publisher[publisher]
        self._total -= 1

    # -- reading ----------------------------------------------------------------------------------

    def records(self, key: bytes, now: float) -> list[SignedRecord]:
        """The unexpired records under ``key``, in slot order."""
        held = self._keys.get(key)
        if held is None:
            return []
        return [
            record
            for record in held.records
            if record.expires_at > now
        ]

    def publishers(self, key: bytes, now: float) -> int:
        """How many publishers have records under ``key`` or, for a key that has refused a
        publisher as full, how many offered a capability (held or not) in the last hour or
        two (``SKETCH_WINDOW``): exact up to ``SKETCH_SIZE``, an estimate beyond; at least
        what a recent hand-off of the key stated (:meth:`counted`)."""
        held = self._keys.get(key)
        if held is None:
            return 0
        count = len({slot[:32] for slot in held.order})
        sketch = self._sketches.get(key)
        if sketch is not None:
            count = max(count, sketch.estimate(now))
        stated = self._counted.get(key)
        if stated is not None and stated[1] > now:
            count = max(count, stated[0])
        return count

    def sample(
        self, key: bytes, seed: bytes, parts: int, part: int, now: float, budget: int
    ) -> list[bytes]:
        """The unexpired records of the publishers under ``key`` in part ``part`` of the
        random partition into ``parts`` keyed by ``seed`` (``wire.sample_cursor``), as many
        whole publishers as fit in ``budget``, in an order ``seed`` shuffles (a part that
        does not fit gives a uniformly random subset of itself)."""
        held = self._keys.get(key)
        if held is None or parts <= 0:
            return []
        by_publisher: dict[bytes, list[SignedRecord]] = {}
        for slot, record in zip(held.order, held.records, strict=True):
            if record.expires_at <= now:
                continue
            publisher = slot[:32]
            group = by_publisher.get(publisher)
            if group is None:
                digest = hashlib.blake2b(publisher, key=seed, digest_size=8).digest()
                if int.from_bytes(digest, "big") % parts != part:
                    continue
                group = by_publisher[publisher] = []
            group.append(record)
        chosen = sorted(by_publisher)
        random.Random(seed).shuffle(chosen)
        out: list[bytes] = []
        used = 0
        for publisher in chosen:
            raws = [record.raw for record in by_publisher[publisher]]
            cost = sum(len(raw) + (2 if len(raw) < 256 else 3) for raw in raws)
            if used + cost > budget:
                continue
            out.extend(raws)
            used += cost
        return out

    def count(self, key: bytes) -> int:
        held = self._keys.get(key)
        return 0 if held is None else len(held.order)

    def page(self, key: bytes, cursor: bytes, now: float, budget: int) -> tuple[list[bytes], bytes]:
        """Records after slot ``cursor`` whose encodings fit in ``budget`` bytes (at least
        one record is returned if any is left, so the caller must leave room for one
        maximal record). Returns ``(records, next_cursor)``; ``next_cursor`` is empty when
        nothing is left."""
        held = self._keys.get(key)
        if held is None:
            return [], b""
        order = held.order
        held_records = held.records
        start = bisect.bisect_right(order, cursor) if cursor else 0
        chosen: list[bytes] = []
        used = 0
        for position in range(start, len(order)):
            record = held_records[position]
            if record.expires_at <= now:
                continue
            cost = len(record.raw) + (2 if len(record.raw) < 256 else 3)
            if used + cost > budget:
                # A non-empty cursor always: b"\x00" sorts before every slot and means
                # "from the start" when not even the first record fitted.
                return chosen, order[position - 1] if position > start else (cursor or b"\x00")
            chosen.append(record.raw)
            used += cost
        return chosen, b""


def keep_newest(best: dict[bytes, SignedRecord], record: SignedRecord) -> None:
    """Put ``record`` in ``best`` (by slot) unless it holds one of a higher or equal
    ``seq``."""
    slot = slot_of(record)
    current = best.get(slot)
    if current is None or record.seq > current.seq:
        best[slot] = record


def latest(records: Iterable[SignedRecord]) -> dict[bytes, SignedRecord]:
    """The highest-``seq`` record of each slot."""
    best: dict[bytes, SignedRecord] = {}
    for record in records:
        keep_newest(best, record)
    return best
