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

import math
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn

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
from ._ids import (
    FACET_SHARDS,
    Address,
    Contact,
    facet_key,
    facet_shard,
    facet_shard_key,
    facet_shard_text_key,
    facet_text_key,
    node_text_key,
    random_node_id,
    text_key,
)
from ._protocol import DhtConfig, DhtNode, DhtStatistics, GetOperation
from ._store import SHARED_CACHE, RecordCache, latest, slot_of
from ._trio import DatagramTransport, Driver, UdpTransport, resolve

__all__ = [
    "Directory",
    "FacetSample",
    "FindResult",
    "NodeEntry",
    "Query", "open_directory", "open_directory_on", "serve"]

#: The default random source of every node in the process: an OS-backed generator has no
#: state to keep per node, and one instance spares each node its own (about 2.5 KB).
_SHARED_RNG = random.SystemRandom()
#: Shards a sampled find reads at first when it knows nothing of the facet, and at most
#: when it does (besides the facet's root key); and how much more than wanted it asks for
#: (parts of a random partition vary in size, and the weighting trims the rest).
_SAMPLE_SHARDS = 2
_MAX_SAMPLE_SHARDS = 8
_OVERFETCH = 1.25


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
        #: (Publisher, facet) pairs whose root key refused the publisher as full: it
        #: publishes under its shard of the facet too.
        self._sharded: set[tuple[PublicKey, str]] = set()
        #: Per facet, what the last sampled find saw: publishers in the root key, and the
        #: mean per shard read.
        self._shapes: dict[str, tuple[int, float]] = {}

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
        publishers = set()
        for record in records:
            self._published[slot_of(record)] = record
            publishers.add(record.publisher)
        for publisher in publishers:
            if self._capability_of(publisher) is None:
                raise LocalError(f"publish a capability of {publisher.fingerprint} first")
        if not self._republishing and self._nursery is not None:
            self._republishing = True
            self._republish = trio.Event()
            self._nursery.start_soon(self._republish_loop)
        elif self._republish is not None:
            self._republish.set()
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
        roots = [self._core.get(facet_key(facet), now) for facet in facets]
        for op in roots:
            await self._driver.wait(op)
        # A facet whose root key is (nearly) full has more publishers in its shards.
        groups: list[list[GetOperation]] = []
        full = self._full_root()
        for name, root in zip(facets, roots, strict=True):
            group = [root]
            if (root.publishers or 0) >= full:
                now = self.now()
                group += [
                    self._core.get(facet_shard_key(name, shard), now)
                    for shard in range(FACET_SHARDS)
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
        them, without reading the whole facet: sampled reads (``DhtNode.get(sample=...)``)
        of the first facet's root key and of random shards, all at once, weighted so that
        every publisher is as likely to be chosen; other facets of the query and the trust
        list filter the sample. Raises :class:`LocalError` for an empty query or ``want``
        below 1.
        """
        facets = query.facets()
        if not facets:
            raise LocalError("a query needs at least one of arch, os, machine, pool")
        if want < 1:
            raise LocalError("want must be at least 1")
        first = facets[0]
        rng = self._core.rng
        now = self.now()
        # What the last sample of this facet saw (publishers in its root, per shard) sets
        # how many shards to read and how many publishers to ask of each; unknown, the
        # root is assumed to hold most of them.
        root_seen, shard_mean = self._shapes.get(first, (want, 0.0))
        total = root_seen + FACET_SHARDS * shard_mean
        want_root = max(1, math.ceil(_OVERFETCH * want * root_seen / max(total, 1)))
        if shard_mean:
            count = math.ceil((want - want_root) / shard_mean)
            count = min(max(count, 1), _MAX_SAMPLE_SHARDS)
            want_shard = max(1, math.ceil(_OVERFETCH * (want - want_root) / count))
        else:
            count, want_shard = _SAMPLE_SHARDS, max(1, want // 4)
        root = self._core.get(facet_key(first), now, sample=want_root)
        shards = rng.sample(range(FACET_SHARDS), count)
        ops = [root] + [
            self._core.get(facet_shard_key(first, shard), now, sample=want_shard)
            for shard in shards
        ]
        for op in ops:
            await self._driver.wait(op)
        shard_counts = [op.publishers or 0 for op in ops[1:]]
        got = sum(len(op.result) for op in ops) // 2
        if (root.publishers or 0) >= self._full_root() and got < want:
            # A big facet, fewer records than wanted: read more shards, once.
            extra = rng.sample(
                [s for s in range(FACET_SHARDS) if s not in shards],
                min(FACET_SHARDS - len(shards), 2 * _SAMPLE_SHARDS),
            )
            more_each = max(1, math.ceil(_OVERFETCH * (want - got) / len(extra)))
            now = self.now()
            more = [
                self._core.get(facet_shard_key(first, s), now, sample=more_each) for s in extra
            ]
            for op in more:
                await self._driver.wait(op)
            ops += more
            shards += extra
            shard_counts += [op.publishers or 0 for op in more]
        self._shapes[first] = (root.publishers or 0, sum(shard_counts) / len(shard_counts))
        # Each shard read stands for FACET_SHARDS / len(shards) shards: weight its records
        # so that every publisher of the facet is as likely to be in the sample.
        weight = FACET_SHARDS / len(shards)
        estimated = (root.publishers or 0) + round(weight * sum(shard_counts))
        weights: dict[bytes, float] = {}
        for op, w in zip(ops, [1.0] + [weight] * len(shards), strict=True):
            for record in op.result:
                if record.kind is Kind.CAPABILITY:
                    weights[record.publisher.raw] = w
        entries = self._entries(query, trust_list, [ops])
        # Weighted sampling without replacement (Efraimidis-Spirakis keys u ** (1 / w)).
        keyed = sorted(
            entries,
            key=lambda e: rng.random() ** (1.0 / weights.get(e.publisher.raw, 1.0)),
            reverse=True,
        )
        sample = FacetSample(keyed[:want])
        sample.complete = (
            all(op.complete for op in ops) and not sum(shard_counts) and len(entries) <= want
        )
        sample.estimated_publishers = estimated
        return sample

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
        return self._published.get(publisher.raw + Kind.CAPABILITY.value.encode())

    async def _put_all(self, publishers: Iterable[PublicKey]) -> dict[str, int]:
        now = self.now()
        ops = []
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
            shard = facet_shard(publisher)
            # Every facet's root key first: a reader reads the shards only when the root
            # is full, so the root must stay full while it has more publishers than it
            # holds (a full holder refuses a new publisher but keeps updating one it has).
            texts: list[tuple[str, str | None]] = [(node_text_key(publisher), None)]
            for name in body.facets():
                texts.append((facet_text_key(name), name))
                if (publisher, name) in self._sharded:
                    texts.append((facet_shard_text_key(name, shard), None))
            for text, root_of in texts:
                put = self._core.put(text_key(text), mine, now)
                ops.append((text, root_of, publisher, shard, mine, put))
        result = {}
        overflow = []
        for text, root_of, publisher, shard, mine, op in ops:
            await self._driver.wait(op)
            if root_of is not None and op.full:
                # Root holders refused us as full: we publish under our shard too, and
                # report the shard's acknowledgements for this facet.
                shard_text = facet_shard_text_key(root_of, shard)
                if (publisher, root_of) not in self._sharded:
                    self._sharded.add((publisher, root_of))
                    put = self._core.put(text_key(shard_text), mine, now)
                    overflow.append((shard_text, put))
                continue
            if root_of is not None:
                self._sharded.discard((publisher, root_of))
            result[text] = op.result
        for text, op in overflow:
            await self._driver.wait(op)
            result[text] = op.result
        return result

    def _republish_period(self) -> float:
        """``republish_interval``, or half the lifetime of the shortest-lived record we
        publish if that is shorter: each record is republished at least once in its life."""
        period = self.config.republish_interval
        for record in self.published():
            period = min(period, (record.expires_at - record.issued_at) / 2)
        return max(period, 1.0)

    async def _republish_loop(self) -> NoReturn:
        while True:
            with trio.move_on_after(self._republish_period()):
                assert self._republish is not None
                await self._republish.wait()
                self._republish = trio.Event()
                continue
            now = self.now()
            expired = [slot for slot, r in self._published.items() if r.expires_at <= now]
            for slot in expired:
                del self._published[slot]
            if self._published:
                await self._put_all({r.publisher for r in self._published.values()})


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
        node_id if node_id is not None else random_node_id(rng),
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


@asynccontextmanager
async def open_directory(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    bootstrap: Iterable[tuple[str, int]] = (),
    node_id: bytes | None = None,
    config: DhtConfig | None = None,
    rng: random.Random | None = None,
    clock_offset: float | None = None,
    cache: RecordCache = SHARED_CACHE,
) -> AsyncIterator[Directory]:
    """Run a directory on a UDP socket bound to ``(host, port)`` (port 0: any free port;
    ``Directory.address`` tells which). Other arguments as :func:`open_directory_on`.

    Raises :class:`OSError` if the address cannot be bound or a bootstrap name does not
    resolve.
    """
    config = config if config is not None else DhtConfig()
    transport = await UdpTransport.bind(host, port, max_size=config.max_incoming_datagram)
    async with open_directory_on(
        transport,
        bootstrap=bootstrap,
        node_id=node_id,
        config=config,
        rng=rng,
        clock_offset=clock_offset,
        cache=cache,
    ) as directory:
        yield directory


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    bootstrap: Iterable[tuple[str, int]] = (),
    node_id: bytes | None = None,
    config: DhtConfig | None = None,
    rng: random.Random | None = None,
    clock_offset: float | None = None,
    cache: RecordCache = SHARED_CACHE,
    task_status: trio.TaskStatus[Directory] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a directory on UDP until cancelled; ``task_status.started(directory)`` once it
    listens (and has bootstrapped). Use with ``await nursery.start(serve, ...)``."""
    async with open_directory(
        host,
        port,
        bootstrap=bootstrap,
        node_id=node_id,
        config=config,
        rng=rng,
        clock_offset=clock_offset,
        cache=cache,
    ) as directory:
        task_status.started(directory)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
