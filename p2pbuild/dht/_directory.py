"""The directory: publishing and finding nodes' signed records over the DHT.

:class:`Directory` is what the node daemon, the dispatcher and the CLI use. It wraps one DHT
node (the sans-IO core driven by the trio adapter) and knows the record layout of design
item 5:

* a publisher's capability and status live under its *node key*
  (``p2pbuild/node/<key>``) and under each *facet key* of its capability
  (``p2pbuild/facet/arch=s390x``, ``.../os=fedora-41``, ``.../arch=s390x/os=fedora-41``,
  ``.../machine=vm``, ``.../pool=<name>``);
* a query is one lookup per facet it names and an intersection by publisher; each publisher
  yields its latest capability and latest status (:class:`NodeEntry`).

Open one with :func:`open_directory` (real UDP), :func:`open_directory_on` (any
:class:`DatagramTransport`, e.g. ``p2pbuild.testing.MemoryNetwork``) or run one as a service
with :func:`serve`. Many directories can share one trio run (and one
:class:`~p2pbuild.dht.RecordCache`): that is how tests and benchmarks run a thousand nodes.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn, TypedDict, Unpack

import attrs
import trio

from .._errors import LocalError, MalformedError
from .._identity import PublicKey
from .._records import (
    _TOKEN,
    Capability,
    Kind,
    MachineType,
    SignedRecord,
    Status,
    facet,
    platform_facet,
)
from .._trust import TrustEntry, TrustList, trusted_node
from . import _ids
from ._ids import Address, Contact
from ._protocol import DhtConfig, DhtNode, DhtStatistics, GetOperation, PutOperation
from ._store import SHARED_CACHE, SKETCH_WINDOW, RecordCache, latest, slot_of
from ._trio import DatagramTransport, Driver, UdpTransport, resolve

__all__ = [
    "Directory",
    "DirectoryOptions",
    "FacetSample",
    "FindResult",
    "NodeEntry",
    "Query",
    "open_directory",
    "open_directory_on",
    "serve",
]

#: The default random source of every node in the process: an OS-backed generator has no
#: state to keep per node, and one instance spares each node its own (about 2.5 KB).
_SHARED_RNG = random.SystemRandom()
#: Shards a sampled find reads at least and at most; how much more than wanted it fetches
#: (parts of a random partition vary in size: the uniform choice at the end trims the
#: rest); how long a facet's size (its root key's census) is trusted before it is read
#: again.
_SAMPLE_SHARDS = 2
_MAX_SAMPLE_SHARDS = 16
_OVERFETCH = 1.2
_SHAPE_TTL = 300.0
#: How long a census (a key's publisher count and the holders it found) serves this
#: directory's later sampled finds of the key, which ask its holders for parts with no walk
#: of their own; how many keys' censuses it keeps.
_CENSUS_TTL = 60.0
_CENSUSES_KEPT = 256
#: Waves of requests a sampled find takes at most when it can choose: a walk and two more
#: (a census read again after holders left is not read again past it).
_MAX_ROUNDS = 3
#: Facet levels whose shard sizes a directory remembers.
_SIZED_LEVELS = 64
#: How soon a directory republishes after a publish that changed the shard levels it
#: writes (a facet that grew or shrank past a level), and after its first publish if a
#: facet root it wrote already had publishers (a farm whose nodes start at once: the
#: counts its first puts saw are soon outdated). While a root it writes has publishers,
#: each such *settling* republish is followed by the next after twice the delay (30, 60,
#: 120 s, ...), until that reaches the republish period: a facet that keeps growing for
#: minutes is followed, at a few roots-only puts per publish.
_SETTLE_DELAY = 30.0
#: A put goes straight to the holders its key's last walk reached (stored, or refused as
#: full) while that walk is younger than ``refresh_interval`` (an hour, as buckets are
#: refreshed): the nodes that joined closer since got the records from those holders (the
#: paper's hand-off). A facet root's put asks two of them at random for the count its
#: census walk would have gathered. It walks again if fewer than this share of the walk's
#: holders answer, or no count came.
_DIRECT_QUORUM = 0.75
#: A root's count decides the shard levels a publisher writes as the largest its censuses
#: gave within this long (seconds). Two holders at random answer a census; one that
#: became a holder lately has counted the offers of a part of the sketch's hour only, and
#: a low count moved the levels down and up again near a level boundary (each move a walk
#: to a new shard level, and settling anew). A facet that shrinks is followed this much
#: later, as its full roots count the offers of an hour anyway.
_COUNT_MEMORY = SKETCH_WINDOW / 4


@attrs.frozen
class _Holders:
    """Where a walked put of a key reached: when, how many nodes answered then, and those
    still answering (node id, address), nearest first."""

    walked_at: float
    walked: int
    holders: list[tuple[int, Address]]


@attrs.frozen
class _Shape:
    """What the last sampled find of a facet saw: publishers its root key's census
    reported (an estimate of the whole facet once the root is full), and when."""

    root: int
    seen_at: float


@attrs.define(eq=False)
class _Census:
    """A census of one key this directory runs or ran at ``started``; ``ready`` is set
    once the task that started it stops waiting for it. The finds of the key within
    ``_CENSUS_TTL`` share it (one walk, not one per find: the walks of a dispatcher's
    finds ended at the same few holders)."""

    op: GetOperation
    started: float
    ready: trio.Event = attrs.Factory(trio.Event)


def _shareable(entry: _Census, now: float) -> bool:
    """Whether a find may share ``entry`` (see :meth:`Directory._census_keys`)."""
    if now - entry.started > _CENSUS_TTL:
        return False
    op = entry.op
    return not entry.ready.is_set() or (op.done and (not op.publishers or op.holders_left() > 0))


@attrs.frozen
class _Put:
    """One put of a publish: its key's name (the text key, or a shard's name), the facet it
    serves and its shard level (0: the facet's root; facet None: the node key), whose
    records, and the operation (a settling republish's root: a census, no store)."""

    text: str
    facet: str | None
    level: int
    publisher: PublicKey
    top: int
    records: list[SignedRecord]
    op: PutOperation | GetOperation
    #: A facet root's put that left out the holders that refused the records as full:
    #: how many holders it sent them to.
    subset: int | None = None


# A facet key gets a status whose state holds once the one it holds would expire within
# this many of its publisher's intervals: a daemon's, a minute apart and living 5 minutes,
# every fourth minute (the next one, a minute later, would still come in time).
_FACET_STATUS_MARGIN = 1.5


def _same_state(a: SignedRecord, b: SignedRecord) -> bool:
    """Whether two statuses tell the same state: slots, running builds, draining, standby
    (not the load or the uptime, which change every minute)."""
    x, y = a.body, b.body
    assert isinstance(x, Status) and isinstance(y, Status)
    return attrs.evolve(x, load_milli=0, uptime_s=0) == attrs.evolve(y, load_milli=0, uptime_s=0)


def _shard_target(room: int) -> int:
    """Publishers a facet's shard should hold, about: a third of what a key has room for
    (``room`` publishers), so the fuller of the two levels a publisher writes stays below
    the cap."""
    return max(1, room // 3)


def _scale(estimate: int, room: int) -> float:
    """``log2(estimate / target)``: the shard level at which shards hold the target."""
    return math.log2(max(estimate, 1) / _shard_target(room))


def levels_written(estimate: int, room: int) -> tuple[int, ...]:
    """The shard levels a publisher of a facet of about ``estimate`` publishers writes:
    ``floor(x)`` and ``floor(x) + 1`` with ``x = log2(estimate / target)``, within
    ``1 .. FACET_MAX_LEVEL``. A reader reads level ``round(x')`` for its own estimate
    ``x'`` (:func:`level_read`), which is one of the two whenever the estimates differ by
    less than half a level (a factor of 1.41)."""
    low = min(max(math.floor(_scale(estimate, room)), 1), _ids.FACET_MAX_LEVEL)
    return (low,) if low == _ids.FACET_MAX_LEVEL else (low, low + 1)


def level_read(estimate: int, room: int) -> int:
    """The shard level a reader of a facet of about ``estimate`` publishers reads (see
    :func:`levels_written`): its ``2 ** level`` shards hold ``target / 1.41`` to
    ``target * 1.41`` publishers each."""
    return min(max(math.floor(_scale(estimate, room) + 0.5), 1), _ids.FACET_MAX_LEVEL)


@functools.lru_cache(maxsize=_SIZED_LEVELS)
def _shard_keys(facet: str, level: int) -> Mapping[bytes, int]:
    """The DHT keys of the ``2 ** level`` shards of ``facet``, each with its number (one
    mapping per facet and level, shared: read it only)."""
    return {_ids.facet_shard_key(facet, level, s): s for s in range(1 << level)}


def _shards_for(wanted: int, shard_mean: float, shards: int) -> int:
    """Shards to read so that ``wanted`` publishers can be fetched with the same chance for
    every publisher of a sharded facet (``wanted / total``, which ``count / shards`` of
    them can give only if ``count >= shards * wanted / total``), with a margin of two
    standard deviations of their Poisson-like count (``2 * sqrt(wanted)``) so that the
    shards read seldom turn out too thin for it; at least two, so that one shard's
    publishers are never the whole sample, and at most all of them."""
    needed = math.ceil((wanted + 2.0 * math.sqrt(wanted)) / max(shard_mean, 1.0))
    return min(max(needed, _SAMPLE_SHARDS), _MAX_SAMPLE_SHARDS, shards)


def _optional_token(
    instance: object, attribute: attrs.Attribute[str | None], value: object
) -> None:
    if value is not None and (not isinstance(value, str) or not _TOKEN.fullmatch(value)):
        raise MalformedError(
            f"{attribute.name} must match [a-z0-9][a-z0-9._+-]*, got {value!r:.40}"
        )


def _machine(value: object) -> MachineType | None:
    if value is None:
        return None
    try:
        return MachineType(str(value))
    except ValueError:
        raise MalformedError(f"machine must be one of {[m.value for m in MachineType]}") from None


@attrs.frozen
class Query:
    """What a dispatcher looks for. At least one field must be set; every set field must
    match. Raises :class:`MalformedError` for a value that can never be a facet."""

    arch: str | None = attrs.field(default=None, validator=_optional_token)
    os: str | None = attrs.field(default=None, validator=_optional_token)
    machine: MachineType | None = attrs.field(default=None, converter=_machine)
    pool: str | None = attrs.field(default=None, validator=_optional_token)

    def facets(self) -> list[str]:
        """The facet keys to look up: as few as the query allows (``arch`` and ``os``
        together are one combined facet)."""
        facets = []
        if self.arch is not None and self.os is not None:
            facets.append(platform_facet(self.arch, self.os))
        elif self.arch is not None:
            facets.append(facet("arch", self.arch))
        elif self.os is not None:
            facets.append(facet("os", self.os))
        if self.machine is not None:
            facets.append(facet("machine", self.machine.value))
        if self.pool is not None:
            facets.append(facet("pool", self.pool))
        return facets

    def matches(self, capability: Capability) -> bool:
        return (
            (self.arch is None or capability.arch == self.arch)
            and (self.os is None or capability.os == self.os)
            and (self.machine is None or capability.machine is self.machine)
            and (self.pool is None or self.pool in capability.pools)
        )


@attrs.frozen
class NodeEntry:
    """One publisher found by :meth:`Directory.find`: its verified latest capability record,
    its latest status record if one was found, and its trust-list entry when the query was
    filtered by a trust list."""

    publisher: PublicKey
    capability_record: SignedRecord
    status_record: SignedRecord | None
    trust: TrustEntry | None = None

    @property
    def capability(self) -> Capability:
        body = self.capability_record.body
        assert isinstance(body, Capability)
        return body

    @property
    def status(self) -> Status | None:
        if self.status_record is None:
            return None
        body = self.status_record.body
        assert isinstance(body, Status)
        return body


class FindResult(list[NodeEntry]):
    """The entries :meth:`Directory.find` returns (a list), and whether they are all of
    them: ``complete`` is False when a read stopped before every record the holders
    reported (never a silent truncation)."""

    complete: bool = True


class FacetSample(list[NodeEntry]):
    """The entries :meth:`Directory.find_sample` returns (a list): a uniformly random
    sample of the matching publishers. ``complete`` is True when they are all of them;
    ``estimated_publishers`` is how many publish under the facet, as the holders' counts
    suggest."""

    complete: bool = False
    estimated_publishers: int = 0
    #: Sequential waves of requests the find took: waves of census walks, then one round
    #: trip of parts (a find that knows the facet: 2).
    rounds: int = 0
    #: Bytes of the find's own requests and of the replies to them (the node's other
    #: traffic meanwhile, such as its republish or the requests it serves, not counted).
    bytes_out: int = 0
    bytes_in: int = 0


class Directory:
    """A running DHT node with the record layout of p2pbuild. Build with
    :func:`open_directory`, :func:`open_directory_on` or :func:`serve`.

    Every method may raise :class:`DirectoryClosedError` if the node stops meanwhile.
    Nothing a peer sends raises here: bad datagrams and records are dropped and counted
    (:meth:`statistics`).
    """

    def __init__(self, core: DhtNode, driver: Driver) -> None:
        self._core = core
        self._driver = driver
        #: Our own published records, by slot, republished until they expire.
        self._published: dict[bytes, SignedRecord] = {}
        #: Set to restart the republish period (created with the republish task).
        self._republish: trio.Event | None = None
        #: Where the republish task starts, on the first publish (most nodes of a farm
        #: never publish: no task for them).
        self._nursery: trio.Nursery | None = None
        self._republishing = False
        #: Settling republishes due, in a row (0: none; ``_settle_delay``).
        self._settling = 0
        self._put_before = False
        #: Per slot we publish (the keys of ``_published``): when its record was last put
        #: (a whole put, or a status update, see ``publish``).
        self._put_at: dict[bytes, float] = {}
        #: Per publisher: the status its facet keys got last (by a whole put or an
        #: update), and the gap between its latest two statuses' issue times (its
        #: interval; see ``_update_all``).
        self._at_facets: dict[PublicKey, SignedRecord] = {}
        self._status_gap: dict[PublicKey, int] = {}
        #: Per (publisher, facet) whose root key is (nearly) full: the shard levels it
        #: publishes under too (:func:`levels_written`).
        self._sharded: dict[tuple[PublicKey, str], tuple[int, ...]] = {}
        #: Per facet, what the last sampled find saw (:class:`_Shape`).
        self._shapes: dict[str, _Shape] = {}
        #: Per (facet, level), the publishers each shard's last census counted (at most
        #: ``_SIZED_LEVELS`` of them, the oldest forgotten first).
        self._shard_sizes: dict[tuple[str, int], dict[int, int]] = {}
        #: Per key, its latest census (at most ``_CENSUSES_KEPT``, the oldest forgotten
        #: first).
        self._censuses: dict[bytes, _Census] = {}
        #: Per key we put: the holders its last walk reached.
        self._holders: dict[bytes, _Holders] = {}
        #: Per (facet root, publisher) whose records some holders refused as full: when
        #: they were offered to every holder, and the ids of those that refused. A full root
        #: counts the publishers that offered within ``SKETCH_WINDOW``: for half of that,
        #: a republish sends the records only to the other holders (none: it only asks for
        #: the count).
        self._refused: dict[tuple[bytes, PublicKey], tuple[float, frozenset[int]]] = {}
        #: Per facet root we put to: the largest count its censuses gave within
        #: ``_COUNT_MEMORY``, and when (``_root_count``).
        self._root_counts: dict[bytes, tuple[int, float]] = {}

    # -- identity ---------------------------------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        """This node's 20-byte DHT id."""
        return self._core.node_id

    @property
    def address(self) -> Address:
        """The bound ``(host, port)``."""
        return self._driver.transport.local_address

    @property
    def config(self) -> DhtConfig:
        return self._core.config

    def now(self) -> float:
        """The node's clock, in Unix seconds (trio's clock plus the configured offset)."""
        return self._driver.now()

    def contacts(self) -> list[Contact]:
        """The routing table's contacts."""
        return self._core.contacts()

    def statistics(self) -> DhtStatistics:
        """Counters since start (datagrams, drops by code, RPCs, lookups, records)."""
        return self._core.statistics()

    # -- DHT primitives ---------------------------------------------------------------------------

    async def bootstrap(self, addresses: Iterable[tuple[str, int]]) -> int:
        """Join through ``addresses`` (names are resolved); returns the number of contacts
        known afterwards, zero if nobody answered.

        Raises :class:`OSError` if a name does not resolve.
        """
        resolved = [await resolve(address) for address in addresses]
        op = self._core.bootstrap(resolved, self.now())
        await self._driver.wait(op)
        return op.result

    async def find_nodes(self, target: bytes) -> list[Contact]:
        """The ``k`` closest live nodes to ``target`` (20 bytes), closest first."""
        op = self._core.find_nodes(target, self.now())
        await self._driver.wait(op)
        return op.result

    async def get(self, key: bytes) -> list[SignedRecord]:
        """The verified, unexpired records under ``key`` (20 bytes; see
        :func:`~p2pbuild.dht.node_key`, :func:`~p2pbuild.dht.facet_key`), latest per
        publisher and kind. An empty list means none was found.

        A lookup of a node key ends at the first holder whose answer has the publisher's
        capability (``DhtConfig.node_key_quorum``), merged with the answers then in flight;
        a lookup of any other key reads the ``value_quorum`` closest holders
        (``docs/protocol.md``).
        """
        op = self._core.get(key, self.now())
        await self._driver.wait(op)
        return op.result

    async def put(self, key: bytes, records: Sequence[SignedRecord]) -> int:
        """Store ``records`` under ``key`` once (no republishing); returns how many nodes
        acknowledged them. Holders refuse records not bound to ``key``."""
        op = self._core.put(key, records, self.now())
        await self._driver.wait(op)
        return op.result

    # -- records ----------------------------------------------------------------------------------

    async def publish(self, records: Sequence[SignedRecord]) -> dict[str, int]:
        """Publish ``records`` under their publisher's node key and every facet key of the
        publisher's capability, and keep republishing them (every ``republish_interval``)
        until they expire or a newer record of the same publisher and kind replaces them.

        A status needs its publisher's capability, in the same call or an earlier one.
        Returns, per text key, how many nodes acknowledged. Raises the
        :class:`RecordError` of the first record that is not acceptable now (expired,
        lifetime out of bounds, older than one already published), and
        :class:`LocalError` for a status without a capability.
        """
        now = self.now()
        policy = self.config.record_policy
        for record in records:
            previous = self._published.get(slot_of(record))
            if previous is not None and previous.raw == record.raw:
                previous = None  # the same record again: fine
            record.check(now, policy=policy, held_seq=None if previous is None else previous.seq)
        # (In the records' order, not a set's: the order of the puts must not follow
        # the process's hash seed, or a seeded simulation would not repeat itself.)
        publishers = dict.fromkeys(record.publisher for record in records)
        # New statuses of publishers whose capability a whole put sent: an update.
        update = all(record.kind is Kind.STATUS for record in records) and all(
            self._capability_slot(publisher) in self._put_at for publisher in publishers
        )
        for record in records:
            slot = slot_of(record)
            before = self._published.get(slot)
            if record.kind is Kind.STATUS and before is not None:
                self._status_gap[record.publisher] = record.issued_at - before.issued_at
            self._published[slot] = record
            self._put_at[slot] = now  # (put now: the republish loop counts from here)
        for publisher in publishers:
            if self._capability_of(publisher) is None:
                raise LocalError(f"publish a capability of {publisher.fingerprint} first")
        if not self._republishing and self._nursery is not None:
            self._republishing = True
            self._republish = trio.Event()
            self._nursery.start_soon(self._republish_loop)
        elif self._republish is not None:
            self._republish.set()
        if update:
            return await self._update_all(publishers, records)
        return await self._put_all(publishers)

    def published(self) -> list[SignedRecord]:
        """The records this directory republishes, unexpired ones only."""
        now = self.now()
        return [r for r in self._published.values() if r.expires_at > now]

    async def find(self, query: Query, trust_list: TrustList | None = None) -> FindResult:
        """Nodes matching ``query``: one lookup per facet, intersected by publisher, with
        the latest verified capability and status of each, sorted by publisher key.

        With ``trust_list``, only publishers it trusts as nodes (within their arch and pool
        restrictions) are returned. Capabilities that do not match the query are dropped
        even if a holder listed them. Raises :class:`LocalError` for an empty query.
        """
        facets = query.facets()
        if not facets:
            raise LocalError("a query needs at least one of arch, os, machine, pool")
        now = self.now()
        roots = [self._core.get(_ids.facet_key(facet), now) for facet in facets]
        for op in roots:
            await self._driver.wait(op)
        # A facet whose root key is (nearly) full has more publishers in its shards.
        groups: list[list[GetOperation]] = []
        full = self._full_root()
        for name, root in zip(facets, roots, strict=True):
            group = [root]
            if (root.publishers or 0) >= full:
                now = self.now()
                # Every level up to the one readers read: publishers that counted fewer
                # (the facet grew since their last put) wrote a lower level.
                top = level_read(root.publishers or 0, self.config.max_records_per_key // 2)
                group += [
                    self._core.get(_ids.facet_shard_key(name, level, shard), now)
                    for level in range(1, top + 1)
                    for shard in range(1 << level)
                ]
                for op in group[1:]:
                    await self._driver.wait(op)
            groups.append(group)
        result = FindResult(self._entries(query, trust_list, groups))
        result.complete = all(op.complete for group in groups for op in group)
        return result

    async def find_sample(
        self, query: Query, want: int = 64, trust_list: TrustList | None = None
    ) -> FacetSample:
        """About ``want`` nodes matching ``query``, chosen uniformly at random among all of
        them, without reading the whole facet (``docs/protocol.md``, *Sampled find*).

        A facet whose root key holds every publisher (fewer than the root has room for) is
        sampled from its root; a bigger one from a few random shards only, of the level its
        size calls for (every publisher of a big facet writes its shard there), the same
        share of each, so that every publisher is as likely to be chosen: one wave of
        census walks (publisher counts and holders, no records), one round trip of random
        parts, a uniform choice of ``want`` among them. The root's census (which counts the
        whole facet once the root is full) comes first while this directory does not know
        the facet's size (first find, or after ``_SHAPE_TTL``). A census this directory
        made less than ``_CENSUS_TTL`` ago is shared: no walk, its holders are asked for
        parts (and if one of them no longer answers, the key is censused and read again).
        Other facets of the query and the trust list filter the sample.
        ``FacetSample.rounds`` says how many waves it took. Raises :class:`LocalError` for
        an empty query or ``want`` below 1.
        """
        facets = query.facets()
        if not facets:
            raise LocalError("a query needs at least one of arch, os, machine, pool")
        if want < 1:
            raise LocalError("want must be at least 1")
        first = facets[0]
        rng = self._core.rng
        wanted = math.ceil(_OVERFETCH * want)
        room = self.config.max_records_per_key // 2
        rounds = 0
        shape = self._shapes.get(first)
        if shape is not None and self.now() - shape.seen_at > _SHAPE_TTL:
            shape = None
        root: GetOperation | None = None
        spent: list[GetOperation] = []  # every operation of this find, for its bytes
        if shape is None or shape.root < room:
            # The facet's size is unknown, or it fits in its root: census the root.
            (root,), waited = await self._census_keys([_ids.facet_key(first)], spent)
            rounds += waited
            shape = _Shape(root.publishers or 0, self.now())
        level = 0
        censuses: list[GetOperation] = []
        chances: list[float] = []
        if shape.root >= room:
            level = level_read(shape.root, room)
            chances = self._believed_sizes(first, level, shape.root >> level)
            censuses, waited = await self._census_shards(
                first, level, [], shape.root >> level, wanted, chances, spent
            )
            rounds += waited
            if root is None and not any(op.publishers for op in censuses):
                # Empty shards: the facet shrank since its size was seen. Read its root.
                (root,), waited = await self._census_keys([_ids.facet_key(first)], spent)
                rounds += waited
                shape = _Shape(root.publishers or 0, self.now())
                level = 0
                censuses = []
                if shape.root >= room:
                    level = level_read(shape.root, room)
                    chances = self._believed_sizes(first, level, shape.root >> level)
                    censuses, waited = await self._census_shards(
                        first, level, [], shape.root >> level, wanted, chances, spent
                    )
                    rounds += waited
        self._shapes[first] = shape
        shard_counts = [op.publishers or 0 for op in censuses]
        shard_mean = sum(shard_counts) / len(shard_counts) if shard_counts else 0.0
        reads: list[GetOperation] = []
        if not shard_mean:
            # The root holds the whole facet (or its shards are not written yet).
            if root is None:
                (root,), waited = await self._census_keys([_ids.facet_key(first)], spent)
                rounds += waited
            estimated = root.publishers or 0
            if estimated:
                reads = [self._core.sample_from(root, wanted, self.now())]
        else:
            shards = 1 << level
            if sum(shard_counts) < wanted and len(censuses) < min(shards, _MAX_SAMPLE_SHARDS):
                # Far thinner shards than the estimate said (the margin of _shards_for did
                # not cover it: a facet that shrank): census more shards, once.
                censuses, waited = await self._census_shards(
                    first, level, censuses, shard_mean, wanted, chances, spent
                )
                rounds += waited
            # Each shard read was drawn with the chance ``picked``, about ``m *
            # chances[s] / sum(chances)`` (in proportion to the size believed then); the
            # share ``target / picked`` of it is asked for, rounded up or down at random
            # so that it is that share on average: every publisher is fetched with the
            # chance ``target`` (Horvitz-Thompson), whatever the size of its shard and of
            # the shards read beside it, and once the sizes are known the parts are about
            # equal. While they are little known (a reader's first finds), the shares can
            # add up to fewer than wanted: then all are raised in proportion (and the
            # shards read beside a publisher's matter again).
            self._remember_sizes(first, level, censuses)
            known = _shard_keys(first, level)
            total = sum(self._believed_sizes(first, level, shard_mean, least=0.0))
            estimated = round(total)
            target = min(1.0, wanted / max(total, 1.0))
            weight = sum(chances)
            every = len(censuses) == shards
            shares = []
            for census in censuses:
                picked = 1.0 if every else len(censuses) * chances[known[census.key]] / weight
                shares.append(target / min(1.0, picked) * (census.publishers or 0))
            scale = max(1.0, wanted / max(sum(shares), 1e-9))
            now = self.now()
            for census, share in zip(censuses, shares, strict=True):
                asked = min(census.publishers or 0, math.floor(scale * share + rng.random()))
                if asked:
                    reads.append(self._core.sample_from(census, asked, now, whole=False))
        for op in reads:
            await self._driver.wait(op)
        rounds += bool(reads)
        # A read from a census that an earlier find ran, whose holders did not all answer:
        # they are leaving, and the census is out of date. It is dropped; if this find took
        # no wave before its parts, the key is censused and read again (two more waves,
        # only then). A find that walked keeps what the key's other holders gave: two more
        # waves would take it past ``_MAX_ROUNDS``.
        stale = [
            index for index, op in enumerate(reads)
            if op.failed and all(op.key != mine.key for mine in spent)
        ]
        for index in stale:
            self._forget_census(reads[index])
        if stale and rounds + 2 <= _MAX_ROUNDS:
            spent += [reads[index] for index in stale]
            fresh, _ = await self._census_keys([reads[index].key for index in stale], spent)
            now = self.now()
            for index, census in zip(stale, fresh, strict=True):
                reads[index] = self._core.sample_from(
                    census, reads[index].want, now, whole=not shard_mean
                )
            for index in stale:
                await self._driver.wait(reads[index])
            rounds += 2
        more: list[GetOperation] = []
        if shard_mean and rounds < _MAX_ROUNDS:
            more = await self._sample_more(reads, want, wanted)
            rounds += bool(more)
        # A part fuller than one reply gives a random subset of itself: weigh each key's
        # records by the inverse of the share of the publishers asked for that came, so
        # that the choice of ``want`` below (Efraimidis-Spirakis keys u ** (1 / w)) stays
        # uniform. (Weighed by the shard's whole count instead, the publishers of thick
        # shards, asked for as many as thin ones' once the sizes are known, would win.)
        asked_of: dict[bytes, float] = {}
        came: dict[bytes, set[bytes]] = {}
        for op, topped_up in [(op, False) for op in reads] + [(op, True) for op in more]:
            # (A read of more parts wants parts: as many publishers as they hold, about.)
            publishers: float = op.want
            if topped_up:
                publishers = op.want * (op.publishers or 0) / max(sum(op.parts_asked()), 1)
            asked_of[op.key] = asked_of.get(op.key, 0.0) + publishers
            came.setdefault(op.key, set()).update(
                r.publisher.raw for r in op.result if r.kind is Kind.CAPABILITY
            )
        weights: dict[bytes, float] = {}
        for key, got in came.items():
            for publisher in got:
                weights[publisher] = max(asked_of[key], len(got)) / len(got)
        entries = self._entries(query, trust_list, [reads + more])
        keyed = sorted(
            entries,
            key=lambda e: rng.random() ** (1.0 / weights.get(e.publisher.raw, 1.0)),
            reverse=True,
        )
        sample = FacetSample(keyed[:want])
        sample.complete = (
            shape.root < room
            and not shard_mean
            and all(op.complete for op in reads)
            and len(entries) <= want
        )
        sample.estimated_publishers = estimated
        sample.rounds = rounds
        spent += reads + more
        sample.bytes_out = sum(op.bytes_out for op in spent)
        sample.bytes_in = sum(op.bytes_in for op in spent)
        return sample

    async def _sample_more(
        self, reads: list[GetOperation], want: int, wanted: int
    ) -> list[GetOperation]:
        """If the parts of ``reads`` (a sharded facet's) brought fewer than ``want``
        publishers, ask the same keys for more of their parts, once: enough for
        ``wanted`` at the yield their parts had, spread over the keys in proportion to
        the parts each was asked for (every publisher's chance of coming grows by the
        same factor). The new reads (none: no wave)."""
        got = {r.publisher.raw for op in reads for r in op.result if r.kind is Kind.CAPABILITY}
        if len(got) >= want:
            return []
        counted = [(op, *op.parts_asked()) for op in reads if op.done and op.sampled]
        parts_asked = sum(asked for _, asked, _ in counted)
        if not parts_asked or not any(left for _, _, left in counted):
            return []
        per_part = max(len(got), 1) / parts_asked
        need = (wanted - len(got)) / per_part
        rng = self._core.rng
        now = self.now()
        more = []
        for op, asked, left in counted:
            parts = min(left, math.floor(need * asked / parts_asked + rng.random()))
            if parts:
                more.append(self._core.sample_more(op, parts, now))
        for op in more:
            await self._driver.wait(op)
        return more

    def _forget_census(self, read: GetOperation) -> None:
        """Drop the kept census that ``read`` was read from (not a newer one of its key,
        which another find may have started since). A read shares its census's holders,
        or pages through copies of them (a whole key)."""
        entry = self._censuses.get(read.key)
        if entry is None:
            return
        holders = entry.op._holders
        if read._holders is holders or any(
            copy.origin is holder for copy in read._holders for holder in holders
        ):
            del self._censuses[read.key]

    async def _census_keys(
        self, keys: Sequence[bytes], spent: list[GetOperation]
    ) -> tuple[list[GetOperation], bool]:
        """Censuses of ``keys``, run at once, and whether they took a wave of requests (or
        of waiting for another find's). A census of a key that this directory started
        less than ``_CENSUS_TTL`` ago is shared, while it runs and after, if it counted
        nobody or a holder it found still answers; the others start here and go to
        ``spent``."""
        now = self.now()
        kept = self._censuses
        entries: list[_Census] = []
        mine: list[_Census] = []
        for key in keys:
            entry = kept.get(key)
            if entry is None or not _shareable(entry, now):
                entry = _Census(self._census(key, now), now)
                mine.append(entry)
                kept.pop(key, None)
                kept[key] = entry
                while len(kept) > _CENSUSES_KEPT:
                    del kept[next(iter(kept))]
            entries.append(entry)
        waited = any(not entry.ready.is_set() for entry in entries)
        spent += [entry.op for entry in mine]
        try:
            for entry in mine:
                await self._driver.wait(entry.op)
        finally:
            for entry in mine:
                entry.ready.set()
        ops = []
        for entry in entries:
            await entry.ready.wait()
            op = entry.op
            if not op.done:
                # The find that started it was cancelled first: a census of its own.
                op = self._census(op.key, self.now())
                spent.append(op)
                await self._driver.wait(op)
            ops.append(op)
        return ops, waited

    async def _census_shards(
        self,
        facet: str,
        level: int,
        done: list[GetOperation],
        shard_mean: float,
        wanted: int,
        chances: Sequence[float],
        spent: list[GetOperation],
    ) -> tuple[list[GetOperation], bool]:
        """``done`` and censuses of more shards of ``facet`` at ``level``, as many as
        :func:`_shards_for` says for ``shard_mean`` publishers per shard, chosen at random
        with chances in proportion to ``chances`` (one per shard; Efraimidis-Spirakis keys
        ``u ** (1 / w)``); and whether they took a wave (see :meth:`_census_keys`)."""
        read = {op.key for op in done}
        keys = _shard_keys(facet, level)
        rng = self._core.rng
        left = sorted(
            (key for key in keys if key not in read),
            key=lambda key: rng.random() ** (1.0 / chances[keys[key]]),
            reverse=True,
        )
        count = _shards_for(wanted, shard_mean, len(keys)) - len(done)
        ops, waited = await self._census_keys(left[: max(0, count)], spent)
        return done + ops, waited

    def _believed_sizes(
        self, facet: str, level: int, default: float, least: float = 0.5
    ) -> list[float]:
        """Publishers in each shard of ``facet`` at ``level`` as this directory believes:
        what the shard's last census counted, else the mean of those counted, else
        ``default``; at least ``least`` (as a chance to be read: a shard counted empty may
        have filled since)."""
        known = self._shard_sizes.get((facet, level), {})
        if known:
            default = sum(known.values()) / len(known)
        return [max(known.get(s, default), least) for s in range(1 << level)]

    def _remember_sizes(
        self, facet: str, level: int, censuses: Sequence[GetOperation]
    ) -> None:
        """Remember the publishers ``censuses`` (of shards of ``facet`` at ``level``)
        counted."""
        sizes = self._shard_sizes.pop((facet, level), {})
        self._shard_sizes[(facet, level)] = sizes  # most recently used last
        while len(self._shard_sizes) > _SIZED_LEVELS:
            del self._shard_sizes[next(iter(self._shard_sizes))]
        keys = _shard_keys(facet, level)
        for op in censuses:
            sizes[keys[op.key]] = op.publishers or 0

    def _census(self, key: bytes, now: float) -> GetOperation:
        return self._core.get(key, now, census=True)

    def _settle_census(
        self, key: bytes, records: list[SignedRecord], now: float
    ) -> PutOperation | GetOperation:
        """A settling republish's census of a facet root: asked of two of the holders the
        last whole put reached (a direct census put that leaves every holder out: no
        records, no walk), or by a census walk if none is known. Every publisher of a
        crowded facet settles at the same delays after its publish, so a walk's census
        would end, for all of them, at the root's few closest holders."""
        holders = self._direct_holders(key, now)
        if holders is None:
            return self._census(key, now)
        everyone = frozenset(node_id for node_id, _ in holders)
        return self._core.put(key, records, now, census=True, holders=holders, leave_out=everyone)

    def _direct_holders(self, key: bytes, now: float) -> list[tuple[int, Address]] | None:
        """The holders a put of ``key`` goes straight to: those its last walk reached, if
        that walk is younger than ``refresh_interval`` (``_DIRECT_QUORUM``); None: walk."""
        kept = self._holders.get(key)
        age = self.config.refresh_interval
        if kept is None or not kept.holders or now - kept.walked_at >= age:
            return None
        return kept.holders

    def _full_root(self) -> int:
        """Publishers a facet root key holds when readers should read its shards too (it
        refuses new ones at ``max_records_per_key``, a capability and a status each)."""
        return max(1, self.config.max_records_per_key // 2 * 3 // 4)

    def _entries(
        self,
        query: Query,
        trust_list: TrustList | None,
        groups: Sequence[Sequence[GetOperation]],
    ) -> list[NodeEntry]:
        """Intersect the publishers of each group of reads (one group per facet)."""
        newest = latest(record for group in groups for op in group for record in op.result)
        present = [
            {r.publisher.raw for op in group for r in op.result if r.kind is Kind.CAPABILITY}
            for group in groups
        ]
        entries = []
        for publisher in sorted(set.intersection(*present)):
            capability = newest[publisher + Kind.CAPABILITY.value.encode()]
            body = capability.body
            assert isinstance(body, Capability)
            if not query.matches(body):
                continue
            trust = None
            if trust_list is not None:
                trust = trust_list.entry(capability.publisher)
                if not trusted_node(trust, body):
                    # Revoked, never listed, or outside its arches or pools: counted so
                    # a key that keeps publishing after revocation shows up.
                    self._core.note_rejected("untrusted-key")
                    continue
            status = newest.get(publisher + Kind.STATUS.value.encode())
            entries.append(NodeEntry(capability.publisher, capability, status, trust))
        return entries

    # -- internals --------------------------------------------------------------------------------

    def _capability_of(self, publisher: PublicKey) -> SignedRecord | None:
        return self._published.get(self._capability_slot(publisher))

    @staticmethod
    def _capability_slot(publisher: PublicKey) -> bytes:
        return publisher.raw + Kind.CAPABILITY.value.encode()

    def _keys_of(
        self, publisher: PublicKey, body: Capability, *, settling: bool = False
    ) -> list[tuple[str, bytes, str | None, int]]:
        """The keys ``publisher``'s records go under (text key, DHT key, facet, shard
        level): its node key (not for a settling put), each facet's root, and the shard
        levels it writes (:func:`levels_written`; not for a settling put)."""
        top = _ids.facet_shard(publisher, _ids.FACET_MAX_LEVEL)
        puts: list[tuple[str, bytes, str | None, int]] = []
        if not settling:
            puts.append((_ids.node_text_key(publisher), _ids.node_key(publisher), None, 0))
        for name in body.facets():
            puts.append((_ids.facet_text_key(name), _ids.facet_key(name), name, 0))
            for level in () if settling else self._sharded.get((publisher, name), ()):
                shard = top >> (_ids.FACET_MAX_LEVEL - level)
                puts.append((
                    _ids.facet_shard_text_key(name, level, shard),
                    _ids.facet_shard_key(name, level, shard),
                    name,
                    level,
                ))
        return puts

    async def _update_all(
        self, publishers: Iterable[PublicKey], records: Sequence[SignedRecord]
    ) -> dict[str, int]:
        """Put new statuses (``records``) of ``publishers``, whose current capability a
        whole put sent under every key, to the holders that put reached: the statuses
        alone, no walk, no census (a node daemon publishes one a minute: a whole put each
        time sent the capability, twice the bytes, and censused every root). A root whose
        holders all refused the records as full holds none of them: nothing goes there.
        The node key gets every status; the facet keys only one that tells a new state
        (:func:`_same_state`), or when the status they hold would expire within
        ``_FACET_STATUS_MARGIN`` of the publisher's intervals (the gap between its last two
        statuses): a facet's status
        tells a finder that the node lives and its state, and most of a daemon's traffic
        was its minute's status to a dozen facet keys.
        A publisher with a key whose holders are not known (or older than
        ``refresh_interval``), or whose update fewer than ``_DIRECT_QUORUM`` of the
        holders took (gone, or missing the capability a status needs under a facet key),
        gets a whole put instead. Per text key, how many nodes acknowledged."""
        now = self.now()
        result: dict[str, int] = {}
        whole: list[PublicKey] = []
        updates: list[tuple[PublicKey, str, PutOperation, int]] = []
        for publisher in publishers:
            capability = self._capability_of(publisher)
            assert capability is not None
            body = capability.body
            assert isinstance(body, Capability)
            fresh = [r for r in records if r.publisher == publisher]
            facets = self._facets_due(publisher, fresh[-1], now)
            targets: list[tuple[str, bytes, list[tuple[int, Address]]]] = []
            for text, key, of, level in self._keys_of(publisher, body):
                if of is not None and not facets:
                    continue
                holders = self._direct_holders(key, now)
                if holders is None:
                    whole.append(publisher)
                    break
                refused = self._refused.get((key, publisher)) if of and not level else None
                if refused is not None:
                    holders = [h for h in holders if h[0] not in refused[1]]
                if holders:
                    targets.append((text, key, holders))
            else:
                if facets:
                    self._at_facets[publisher] = fresh[-1]
                for text, key, holders in targets:
                    op = self._core.put(key, fresh, now, holders=holders)
                    updates.append((publisher, text, op, len(holders)))
        for publisher, text, op, sent in updates:
            await self._driver.wait(op)
            result[text] = op.result
            if len(op.stored) < _DIRECT_QUORUM * sent and publisher not in whole:
                whole.append(publisher)
        if whole:
            result.update(await self._put_all(whole))
        return result

    def _facets_due(self, publisher: PublicKey, status: SignedRecord, now: float) -> bool:
        """Whether ``publisher``'s new ``status`` goes to its facet keys (``_update_all``)."""
        held = self._at_facets.get(publisher)
        gap = self._status_gap.get(publisher, 0)
        if held is None or gap <= 0 or held.expires_at - now < _FACET_STATUS_MARGIN * gap:
            return True
        return not _same_state(held, status)

    async def _put_all(
        self, publishers: Iterable[PublicKey], *, settling: bool = False
    ) -> dict[str, int]:
        """Put our records of ``publishers`` under every key they belong to; per text key,
        how many nodes acknowledged. A *settling* republish (``_SETTLE_DELAY`` after a
        publish to a crowded facet) censuses the facets' roots only, to learn whether
        other shard levels are due now (those then written as in any put): every key got
        the same records at the last whole put, less than a republish period ago (a full
        root counted their offer), and a put would send them to all ``k`` holders of
        every root again."""
        now = self.now()
        if not settling:
            age = self.config.refresh_interval  # (no put goes straight to older ones)
            self._holders = {
                key: kept for key, kept in self._holders.items() if now - kept.walked_at < age
            }
            self._refused = {
                put: offered
                for put, offered in self._refused.items()
                if now - offered[0] < SKETCH_WINDOW / 2
            }
            self._root_counts = {
                key: held
                for key, held in self._root_counts.items()
                if now - held[1] < _COUNT_MEMORY
            }
        ops: list[_Put] = []
        for publisher in publishers:
            mine = [
                r
                for r in self._published.values()
                if r.publisher == publisher and r.expires_at > now
            ]
            capability = self._capability_of(publisher)
            if not mine or capability is None or capability.expires_at <= now:
                continue
            body = capability.body
            assert isinstance(body, Capability)
            top = _ids.facet_shard(publisher, _ids.FACET_MAX_LEVEL)
            if not settling:
                for record in mine:
                    self._put_at[slot_of(record)] = now
                status = [r for r in mine if r.kind is Kind.STATUS]
                if status:
                    self._at_facets[publisher] = status[0]
            # Every facet's root key first: a full find reads the shards only when the
            # root is nearly full, so the root must stay full while it has more publishers
            # than it holds (a full holder refuses a new publisher but keeps updating one
            # it has, and counts who offered). Its put walk's census tells how many
            # publishers the facet has: from 3/4 of the root's room on, every publisher of
            # the facet writes its shard at the two levels that size calls for
            # (:func:`levels_written`), so that the shards at the level readers read hold
            # the whole facet.
            for text, dht_key, of, level in self._keys_of(publisher, body, settling=settling):
                census = of is not None and not level
                started: PutOperation | GetOperation
                subset = None
                if settling:
                    started = self._settle_census(dht_key, mine, now)
                else:
                    direct = self._direct_holders(dht_key, now)
                    refused = self._refused.get((dht_key, publisher))
                    leave_out = frozenset[int]()
                    if direct is not None and refused is not None:
                        leave_out = refused[1]
                        subset = sum(node_id not in leave_out for node_id, _ in direct)
                    started = self._core.put(
                        dht_key, mine, now, census=census, holders=direct, leave_out=leave_out
                    )
                ops.append(_Put(text, of, level, publisher, top, mine, started, subset))
        result = {}
        room = self.config.max_records_per_key // 2
        changed = crowded = False
        # Waves of puts: the first (node key, roots, known shard levels), then the shard
        # levels the roots' counts call for, then deeper levels for shards that refused the
        # records as full (a facet that grew fast: each full shard of level l has at least
        # ``room`` publishers, so the facet has ``room * 2 ** l``), a dozen at most.
        while ops:
            deeper: list[_Put] = []
            for put in ops:
                op = put.op
                await self._driver.wait(op)
                full = False
                if settling and not put.level and isinstance(op, PutOperation):
                    # A root's census query (the new levels it calls for are put below).
                    if op.publishers is None:
                        # None of the two holders asked answered with a count: walk.
                        self._holders.pop(op.key, None)
                        deeper.append(attrs.evolve(put, op=self._census(op.key, now)))
                        continue
                elif isinstance(op, PutOperation):
                    full = bool(op.full) or put.subset is not None
                    if not self._stored(op, now, put.subset):
                        # Too few of the last walk's holders answered: walk again.
                        self._refused.pop((op.key, put.publisher), None)
                        again = self._core.put(op.key, put.records, now, census=op.census)
                        deeper.append(attrs.evolve(put, op=again, subset=None))
                        continue
                    if op.census and put.subset is None:
                        if op.full:
                            refusers = frozenset(node_id for node_id, _ in op.full)
                            self._refused[(op.key, put.publisher)] = (now, refusers)
                        else:
                            self._refused.pop((op.key, put.publisher), None)
                if put.facet is not None:
                    key = (put.publisher, put.facet)
                    written = self._sharded.get(key, ())
                    levels: tuple[int, ...] | None = None
                    if not put.level:
                        estimate = self._root_count(op.key, op.publishers or 0, now)
                        crowded = crowded or estimate > 0
                        levels = ()
                        if full or estimate >= self._full_root():
                            levels = levels_written(max(estimate, self._full_root()), room)
                    elif full and put.level < _ids.FACET_MAX_LEVEL:
                        grown = levels_written(room << put.level, room)
                        if max(grown) > max(written, default=0):
                            levels = grown
                    if levels is not None and levels != written:
                        changed = True
                        if levels:
                            self._sharded[key] = levels
                        else:
                            # The facet shrank (or never grew): the shard records expire.
                            self._sharded.pop(key, None)
                        for level in levels:
                            if level in written:
                                continue
                            # A new level: written now; the previous one's records expire.
                            shard = put.top >> (_ids.FACET_MAX_LEVEL - level)
                            text = _ids.facet_shard_text_key(put.facet, level, shard)
                            new = self._core.put(
                                _ids.facet_shard_key(put.facet, level, shard), put.records, now
                            )
                            deeper.append(
                                _Put(
                                    text, put.facet, level, put.publisher, put.top, put.records, new
                                )
                            )
                    if full:
                        # Refused as full: the other keys' acknowledgements stand for it.
                        continue
                if isinstance(op, PutOperation) and not settling:
                    result[put.text] = op.result
            ops = deeper
        begin = changed or (crowded and not self._put_before)
        self._put_before = True
        if settling:
            # The next after twice the delay, while a root has publishers, up to the period.
            go_on = crowded and self._settle_delay(1) < self._republish_period()
            self._settling = self._settling + 1 if go_on else 0
        elif begin and not self._settling:
            self._settling = 1
        if self._settling and self._republish is not None:
            self._republish.set()  # (the republish loop's wait restarts, shorter)
        return result

    def _root_count(self, key: bytes, count: int, now: float) -> int:
        """The count of facet root ``key`` that decides the shard levels, given a census's
        ``count``: the largest within ``_COUNT_MEMORY`` (a lower one is noted only once
        the larger is that old)."""
        held = self._root_counts.get(key)
        if held is not None and held[0] > count and now - held[1] < _COUNT_MEMORY:
            return held[0]
        self._root_counts[key] = (count, now)
        return count

    def _stored(self, op: PutOperation, now: float, subset: int | None = None) -> bool:
        """Note the holders a put reached: those that stored, and those that refused the
        records as full (a crowded facet root, which counted the offer); whether it is done
        (a direct put that too few holders answered is not, nor a direct census that got
        no count: it walks again). A put that left out the holders that refused the
        records as full (``subset``: it went to that many) leaves them as they were, and
        walks again only if no count came: those few holders may have left, but the root
        got the offer half an hour ago at most, and gets it again, from a walk if need be,
        half an hour after."""
        kept = self._holders.get(op.key)
        if subset is not None:
            if op.publishers is None:
                self._holders.pop(op.key, None)
                return False
            return True
        target = int.from_bytes(op.key, "big")
        answered = sorted(op.stored + op.full, key=lambda holder: holder[0] ^ target)
        if not op.direct:
            self._holders[op.key] = _Holders(now, len(answered), answered)
            return True
        if (
            kept is None
            or len(answered) < _DIRECT_QUORUM * kept.walked
            or (op.census and op.publishers is None)
        ):
            self._holders.pop(op.key, None)
            return False
        self._holders[op.key] = attrs.evolve(kept, holders=answered)
        return True

    def _settle_delay(self, ahead: int = 0) -> float:
        """The delay before the next settling republish (``ahead``: that many later)."""
        return _SETTLE_DELAY * 2.0 ** (self._settling - 1 + ahead)

    def _republish_period(self) -> float:
        """``republish_interval``, or half the lifetime of the shortest-lived record we
        publish if that is shorter: each record is republished at least once in its life."""
        period = self.config.republish_interval
        for record in self.published():
            period = min(period, (record.expires_at - record.issued_at) / 2)
        return max(period, 1.0)

    def _whole_due(self) -> float:
        """When the next whole put is due: when a record we publish has gone
        ``republish_interval``, or half its lifetime if that is shorter, since it was last
        put (a status update puts the status alone, see ``publish``)."""
        interval = self.config.republish_interval
        due = math.inf
        for slot, record in self._published.items():
            put_at = self._put_at[slot]  # (every record we publish has one: publish)
            lifetime = record.expires_at - record.issued_at
            due = min(due, put_at + max(min(interval, lifetime / 2), 1.0))
        return due

    async def _republish_loop(self) -> NoReturn:
        while True:
            # The whole put is due a period after the last one; settling puts in between.
            # With nothing left to put (every record expired), none is due until a publish.
            period = self._whole_due() - self.now()
            if not self._published:
                period, self._settling = math.inf, 0
            settling = bool(self._settling) and period > self._settle_delay()
            if settling:
                period = self._settle_delay()
            else:
                self._settling = 0
            with trio.move_on_after(max(period, 0.0)):
                assert self._republish is not None
                await self._republish.wait()
                self._republish = trio.Event()
                continue
            now = self.now()
            expired = [slot for slot, r in self._published.items() if r.expires_at <= now]
            for slot in expired:
                del self._published[slot]
                self._put_at.pop(slot, None)
            if self._published:
                await self._put_all(
                    dict.fromkeys(r.publisher for r in self._published.values()),
                    settling=settling,
                )


@asynccontextmanager
async def open_directory_on(
    transport: DatagramTransport,
    *,
    bootstrap: Iterable[tuple[str, int]] = (),
    node_id: bytes | None = None,
    config: DhtConfig | None = None,
    rng: random.Random | None = None,
    clock_offset: float | None = None,
    cache: RecordCache = SHARED_CACHE,
) -> AsyncIterator[Directory]:
    """Run a directory over ``transport`` for the duration of the block.

    ``node_id`` defaults to a random id (use :func:`~p2pbuild.dht.node_id_for` for a
    publishing node); ``rng`` defaults to one ``random.SystemRandom()`` shared by the
    process's nodes (message ids should be unpredictable; it keeps no state worth a copy
    per node); ``clock_offset`` is Unix time at trio time 0, by default the wall clock.
    If ``bootstrap`` is given, the node joins through it before the block starts (check
    ``statistics().contacts`` to see whether anyone answered). The transport is closed on
    exit.
    """
    rng = rng if rng is not None else _SHARED_RNG
    offset = clock_offset if clock_offset is not None else Driver.default_offset()
    core = DhtNode(
        node_id if node_id is not None else _ids.random_node_id(rng),
        now=trio.current_time() + offset,
        rng=rng,
        config=config,
        cache=cache,
    )
    driver = Driver(core, transport, clock_offset=offset)
    directory = Directory(core, driver)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run, nursery)
            directory._nursery = nursery
            addresses = list(bootstrap)
            if addresses:
                await directory.bootstrap(addresses)
            yield directory
            nursery.cancel_scope.cancel()
    finally:
        transport.close()


class DirectoryOptions(TypedDict, total=False):
    """The keyword arguments :func:`open_directory` and :func:`serve` pass on to
    :func:`open_directory_on` (documented there)."""

    bootstrap: Iterable[tuple[str, int]]
    node_id: bytes | None
    config: DhtConfig | None
    rng: random.Random | None
    clock_offset: float | None
    cache: RecordCache


@asynccontextmanager
async def open_directory(
    host: str = "127.0.0.1", port: int = 0, **options: Unpack[DirectoryOptions]
) -> AsyncIterator[Directory]:
    """Run a directory on a UDP socket bound to ``(host, port)`` (port 0: any free port;
    ``Directory.address`` tells which). Other arguments as :func:`open_directory_on`.

    Raises :class:`OSError` if the address cannot be bound or a bootstrap name does not
    resolve.
    """
    config = options.get("config") or DhtConfig()
    transport = await UdpTransport.bind(host, port, max_size=config.max_incoming_datagram)
    async with open_directory_on(transport, **options) as directory:
        yield directory


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[Directory] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[DirectoryOptions],
) -> NoReturn:
    """Run a directory on UDP until cancelled; ``task_status.started(directory)`` once it
    listens (and has bootstrapped). Use with ``await nursery.start(serve, ...)``. Other
    arguments as :func:`open_directory_on`."""
    async with open_directory(host, port, **options) as directory:
        task_status.started(directory)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
