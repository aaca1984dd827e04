"""The sans-IO Kademlia node: datagrams and ``now`` in, datagrams and finished operations out.

No trio, no socket, no clock: the caller (``_trio.py``, the in-memory network of
``p2pbuild.testing``, or a test feeding bytes by hand) drives it through

* :meth:`DhtNode.receive_datagram` -- one datagram from ``address`` at time ``now``;
* :meth:`DhtNode.datagrams_to_send` -- what to send now, as ``(data, address)`` pairs;
* :meth:`DhtNode.get_timer` / :meth:`DhtNode.handle_timer` -- the next deadline;
* operations (:meth:`~DhtNode.bootstrap`, :meth:`~DhtNode.find_nodes`, :meth:`~DhtNode.get`,
  :meth:`~DhtNode.put`) that return an :class:`Operation` handle, completed later and listed
  by :meth:`DhtNode.finished_operations`.

Times are Unix seconds as floats (records carry Unix times, so the core needs only one
clock). The module is longer than most because the lookup state machines, the RPC table and
the request handlers share the node's state; splitting them would only add indirection.

Lookups ("walks") follow the paper with these changes:

* each RPC has a timeout from its contact's measured round trip (RFC 6298 style), and a
  shorter *stall* time after which the walk stops waiting for it: a stalled query no longer
  counts against ``alpha`` and no longer blocks termination, so a silently dead contact
  costs one stall time, not a full timeout, once ``alpha`` others have answered;
* a record lookup ends when the ``value_quorum`` closest live contacts have answered (or,
  if all of them answered with nothing, the ``k`` closest: they may have joined after the
  records were stored), then pages through the ``page_sources`` closest holders that have
  more (a key holds many records); a node lookup ends when the ``k`` closest have answered;
* a lookup of a *node key* ends sooner. A node key holds one publisher's records only (the
  store binds a capability to its publisher's node key and facet keys, a status to keys
  holding its publisher's capability: ``_store.py``), so one holder's answer with the
  publisher's capability is a complete one. Once ``node_key_quorum`` (1) answers held it,
  the walk asks nobody new, takes the answers of the queries still in flight (until each
  answers or stalls) and keeps the highest ``seq`` per slot. The walk tells the kind of key
  from the first capability bound to it (a facet key is nobody's node key: the SHA-1 inputs
  differ), so callers need not say it. Freshness, the choice made: the answers merged are
  the first holder's and those of its round still in flight. A holder that missed the
  latest publish (its store and the resend both lost) can serve an older, unexpired record
  until the owner's next publish reaches it (the node daemon's status every
  ``status_interval_s``, a directory's records every ``republish_interval``), as a stock
  first-value ``get`` can; and a Sybil holder next to the key that answers first can
  replay an older record of the publisher unless an answer in flight has a newer one. An
  answer without the capability never ends a lookup early, so "gone from the directory"
  still takes the quorum's empty answers. With ``node_key_quorum`` = 3, one machine's
  Sybils (at most ``max_contacts_per_host`` = 2 per lookup) cannot be every answer taken;
  it costs RPCs;
* until a record walk learns that its key holds several publishers' records, it walks for
  a single answer: its first round asks our ``alpha`` closest contacts at once; the next
  round starts once every query of the round has answered or stalled, so it asks the
  closest candidate any of them named, not the closest the fastest one named; and past
  the first round it asks one candidate at a time, the next when that one answers or
  stalls (records live on the ``k`` closest nodes, so a farther candidate holds them only
  if the closer one in flight does). The cost is latency only when a round's queries are
  slow or dead: at most a stall time per round. Facet walks and widened walks (``k``) ask
  ``alpha`` at a time;
* a lost walk query or page request is resent once while its lookup still needs it (a lost
  page would otherwise end the read early if no other holder has more). Not resent, their
  timeouts only counting against their contacts: the queries of a walk that has ended, and
  a single-answer walk's stalled queries (it asked the next candidate instead).

Defences against hostile peers (``docs/threat-model.md``), all bounded by ``DhtConfig``:

* anti-amplification: a reply to an address that has not answered one of our requests (a
  random 20-byte message id it could only echo by receiving it) is at most
  ``amplification_factor`` times its request. Requests that may get a big reply
  (``find_node``, ``find_value``, ``p2p_find``) are padded with zero bytes to
  ``max_datagram / amplification_factor`` (QUIC pads its client Initial the same way), so a
  p2pbuild requester gets a full reply at once; an unpadded request (a stock client) gets a
  reply built within the bound: fewer contacts, or a shorter page with a cursor to the rest.
  Only a reply that cannot be cut (a stock ``find_value`` bundle) waits for its address to
  answer one ping, and is dropped if it does not (``amplification-limit``). A spoofed
  request thus makes us send at most its own size times the factor to the victim;
* records move to nodes that join closer to a key than its holders (paper, section 2.5):
  when a node adds a new contact that is among the ``k`` closest it knows to a key it holds,
  and no contact it knows is closer to that key than itself, it stores that key's records
  to the newcomer (at most ``handoff_datagrams`` ``p2p_store`` datagrams per newcomer);
* at most ``max_contacts_per_host`` contacts of one IP host per bucket and per lookup
  (loopback exempt), and one id per address (``RoutingTable``): one machine cannot fill
  our buckets nor be most of a lookup's closest contacts (eclipse by Sybil ids).
"""

from __future__ import annotations

import array
import bisect
import heapq
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .._errors import LocalError, MalformedError, RemoteError
from .._records import DEFAULT_POLICY, Kind, RecordPolicy, SignedRecord
from . import _wire as wire
from ._ids import Address, Contact, id_from_bytes, id_to_bytes, node_key
from ._routing import Peer, RoutingTable, is_loopback
from ._store import SHARED_CACHE, RecordCache, RecordStore, latest, slot_of
from ._wire import HEADER_SIZE, Request, Response

__all__ = [
    "BootstrapOperation",
    "DhtConfig",
    "DhtNode",
    "DhtStatistics",
    "FindNodesOperation",
    "GetOperation",
    "Operation",
    "PutOperation",
    "UnexpectedResponseError",
    "UnknownMethodError",
]


class UnknownMethodError(MalformedError):
    """A request for a method this node does not implement (dropped, as rpcudp does)."""

    code = "unknown-method"


class UnexpectedResponseError(RemoteError):
    """A response to no pending request (late, duplicated, or from the wrong address)."""

    code = "unexpected-response"


def _positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, (int, float)) or value <= 0:
        raise LocalError(f"{attribute.name} must be positive")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or value < 0:
        raise LocalError(f"{attribute.name} must be an integer >= 0")


@attrs.frozen
class DhtConfig:
    """Every bound and tunable of a DHT node. The defaults suit the internet and loopback."""

    #: Bucket size and replication factor.
    k: int = attrs.field(default=20, validator=_positive)
    #: Parallel queries per lookup.
    alpha: int = attrs.field(default=3, validator=_positive)
    #: Closest live contacts a record lookup must hear from before it ends.
    value_quorum: int = attrs.field(default=4, validator=_positive)
    #: Answers holding the publisher's capability that end a lookup of a *node key* (a key
    #: that holds one publisher's records only) before ``value_quorum``; the queries then
    #: in flight are still awaited, no new ones are sent.
    node_key_quorum: int = attrs.field(default=1, validator=_positive)
    #: Largest datagram we send (payload of UDP), including the rpcudp header.
    max_datagram: int = attrs.field(default=1200, validator=_positive)
    #: Largest datagram we accept; bigger ones are dropped as ``oversize``. Larger than
    #: ``max_datagram`` because stock peers do not bound theirs (20 IPv6 contacts ~ 1.4 KB).
    max_incoming_datagram: int = attrs.field(default=2048, validator=_positive)
    #: Largest record bundle in a stock ``find_value`` reply; small enough that a stock
    #: client's re-``store`` of it still fits in ``max_datagram``.
    max_bundle: int = attrs.field(default=1100, validator=_positive)
    #: RPC timeout bounds (seconds); the timeout of a contact is srtt + 4 * rttvar.
    min_rpc_timeout: float = attrs.field(default=0.02, validator=_positive)
    max_rpc_timeout: float = attrs.field(default=2.0, validator=_positive)
    #: Timeout for a contact when nothing at all has been measured yet.
    initial_rpc_timeout: float = attrs.field(default=1.0, validator=_positive)
    #: Outstanding RPCs; beyond this an RPC fails at once (counted as ``pending-full``).
    max_pending_rpcs: int = attrs.field(default=2048, validator=_positive)
    #: Consecutive timeouts before a contact is dropped without a replacement.
    max_failures: int = attrs.field(default=3, validator=_positive)
    #: Newcomers cached per full bucket.
    replacement_cache: int = attrs.field(default=4, validator=_positive)
    #: A bucket without a lookup for this long is refreshed (seconds).
    refresh_interval: float = attrs.field(default=3600.0, validator=_positive)
    #: Period of store expiry and refresh checks (seconds).
    maintenance_interval: float = attrs.field(default=60.0, validator=_positive)
    #: Store caps: records per key, per publisher (over all keys), in total.
    max_records_per_key: int = attrs.field(default=1024, validator=_positive)
    max_records_per_publisher: int = attrs.field(default=64, validator=_positive)
    max_records_total: int = attrs.field(default=16384, validator=_positive)
    #: Times a store RPC is resent after a timeout.
    store_retries: int = attrs.field(default=1)
    #: Holders a record lookup reads to the end (more: robust to a holder's gaps, slower).
    page_sources: int = attrs.field(default=2, validator=_positive)
    #: Pages a record lookup fetches at most.
    max_pages: int = attrs.field(default=512, validator=_positive)
    #: How often a Directory republishes its records (seconds); must be shorter than the
    #: shortest record lifetime to matter.
    republish_interval: float = attrs.field(default=300.0, validator=_positive)
    #: Acceptance bounds for records.
    record_policy: RecordPolicy = DEFAULT_POLICY
    #: Anti-amplification: largest reply, as a multiple of its request's size, sent to an
    #: address that has not yet answered any request of ours. Our own requests that may get
    #: big replies are padded to ``max_datagram / amplification_factor`` bytes; replies to
    #: unpadded ones are cut to the bound, and the few that cannot be cut wait for the
    #: address to answer a ping (proof that it receives there).
    amplification_factor: int = attrs.field(default=3, validator=_positive)
    #: Replies waiting for their address to be verified: per address, and in total.
    max_deferred_per_address: int = attrs.field(default=4, validator=_positive)
    max_deferred_replies: int = attrs.field(default=256, validator=_positive)
    #: Addresses verified by a ping that are not contacts, remembered (least recently
    #: verified forgotten first). A contact that answered a request of ours is verified
    #: by its measured round trip in the routing table.
    max_verified_addresses: int = attrs.field(default=64, validator=_positive)
    #: A full bucket's oldest contact is pinged for a newcomer only if it has not been
    #: heard from for this long (seconds); otherwise the newcomer waits in the cache.
    eviction_ping_after: float = attrs.field(default=60.0, validator=_positive)
    #: ``p2p_store`` datagrams sent at most to one new contact to hand it the records it
    #: should hold (0: no hand-off).
    handoff_datagrams: int = attrs.field(default=4, validator=_not_negative)
    #: Contacts of one IP host per bucket and per lookup (loopback hosts exempt); 0: no
    #: limit. Bounds what one machine claiming many ids can take (Sybil, eclipse).
    max_contacts_per_host: int = attrs.field(default=2, validator=_not_negative)


@attrs.frozen
class DhtStatistics:
    """Counters of one node since it started. ``dropped`` counts datagrams by the error code
    that caused the drop; ``rejected`` counts records refused (in stores or lookup replies)
    by code."""

    datagrams_in: int
    datagrams_out: int
    bytes_in: int
    bytes_out: int
    requests_in: int
    responses_in: int
    rpcs_sent: int
    rpcs_timed_out: int
    lookups: int
    lookup_rounds: int
    lookup_rpcs: int
    records_accepted: int
    records_held: int
    contacts: int
    pending_rpcs: int
    dropped: Mapping[str, int]
    rejected: Mapping[str, int]
    #: Replies held back until their address proved it receives there (anti-amplification).
    replies_deferred: int = 0
    #: Replies built within the amplification bound (cut short) for an unverified address.
    replies_bounded: int = 0
    #: ``p2p_store`` datagrams sent to new contacts to hand them records.
    handoff_stores: int = 0
    #: Would-be contacts refused by code: ``address-in-use``, ``host-limit``.
    refused_contacts: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


# -- operations -----------------------------------------------------------------------------------


class Operation:
    """A handle on a running operation. ``done`` becomes True once, and then ``result`` is
    final. ``waiter`` is the driver's (the core never reads it)."""

    __slots__ = ("_walk", "done", "rounds", "rpcs", "started_at", "waiter")

    def __init__(self, now: float) -> None:
        self.done = False
        self.waiter: object = None
        self.started_at = now
        #: RPCs sent and lookup depth reached (hops), for statistics.
        self.rpcs = 0
        self.rounds = 0
        self._walk: _Walk | None = None


class FindNodesOperation(Operation):
    """Result: the ``k`` closest live contacts to the target, closest first."""

    __slots__ = ("result", "target")

    def __init__(self, target: int, now: float) -> None:
        super().__init__(now)
        self.target = target
        self.result: list[Contact] = []


class BootstrapOperation(Operation):
    """Result: how many contacts the routing table holds afterwards."""

    __slots__ = ("_waiting", "result")

    def __init__(self, now: float) -> None:
        super().__init__(now)
        self._waiting = 0
        self.result = 0


class GetOperation(Operation):
    """Result: the verified, unexpired records under ``key``, latest per publisher and kind,
    sorted by slot (publisher key, then kind)."""

    __slots__ = ("_cursor", "_found", "_node_key", "_pages", "_sources", "key", "result")

    def __init__(self, key: bytes, now: float) -> None:
        super().__init__(now)
        self.key = key
        self.result: list[SignedRecord] = []
        self._found: dict[bytes, SignedRecord] = {}
        #: Whether ``key`` is the node key of its records' publisher: unknown (None) until
        #: the first capability bound to ``key`` arrives (see ``DhtNode._collect``).
        self._node_key: bool | None = None
        self._cursor = b""
        self._pages = 0
        self._sources = 0


class PutOperation(Operation):
    """Result: how many nodes (this one included) hold the records now (acknowledged each
    record as ``"ok"`` or ``"held"``)."""

    __slots__ = ("_batches", "_holders", "_outstanding", "_refused", "key", "result")

    def __init__(self, key: bytes, batches: list[list[bytes]], now: float) -> None:
        super().__init__(now)
        self.key = key
        self.result = 0
        self._batches = batches
        self._outstanding = 0
        #: Per holder address: batches still unanswered; and holders that refused any.
        self._holders: dict[Address, int] = {}
        self._refused: set[Address] = set()


# -- walks ----------------------------------------------------------------------------------------

_NEW, _INFLIGHT, _STALLED, _OK, _FAILED = range(5)
# Deeper than any walk goes.
_NO_DEPTH = 1 << 30


class _Candidate:
    __slots__ = ("address", "cursor", "depth", "distance", "node_id", "state")

    def __init__(self, node_id: int, address: Address, distance: int, depth: int) -> None:
        self.node_id = node_id
        self.address = address
        self.distance = distance
        self.depth = depth
        self.state = _NEW
        #: For record walks: the holder's next-page cursor after its first reply.
        self.cursor = b""


def _distance(candidate: _Candidate) -> int:
    return candidate.distance


class _Walk:
    __slots__ = (
        "confirmed",
        "finished",
        "hosts",
        "inflight",
        "known",
        "op",
        "quorum",
        "records",
        "shortlist",
        "target",
    )

    def __init__(self, op: Operation, target: int, quorum: int, records: bool) -> None:
        self.op = op
        self.target = target
        self.quorum = quorum
        self.records = records
        self.shortlist: list[_Candidate] = []
        #: Ids (wire form) already on the shortlist or dropped from it.
        self.known: set[bytes] = set()
        self.inflight = 0
        #: Candidates per IP host (for ``max_contacts_per_host``).
        self.hosts: dict[str, int] = {}
        #: Set once the walk's result is handed on; late replies then change nothing.
        self.finished = False
        #: Record walks of a node key: answers that held the publisher's capability.
        self.confirmed = 0


# -- RPC table ------------------------------------------------------------------------------------

_STALL, _DEADLINE = 0, 1
# What an RPC is for, beyond its method.
(
    _FOR_WALK,
    _FOR_PAGE,
    _FOR_STORE,
    _FOR_BOOTSTRAP,
    _FOR_EVICTION,
    _FOR_VERIFY,
    _FOR_HANDOFF,
    _FOR_HANDOFF_PING,
) = range(8)
# A holder hands a key's records to a newcomer only if fewer contacts than this are closer.
_HANDOFF_SENDERS = 3
# Contacts a first p2p_find page keeps room for, however many records the key holds.
_MIN_CONTACTS = 4
# Methods whose requests we pad, so that any reply stays within the amplification bound.
_PADDED = frozenset((wire.FIND_NODE, wire.FIND_VALUE, wire.P2P_FIND))


class _Rpc:
    __slots__ = (
        "address",
        "args",
        "candidate",
        "method",
        "op",
        "peer_id",
        "purpose",
        "retries",
        "sent",
        "sent_at",
    )

    def __init__(
        self,
        method: str,
        address: Address,
        peer_id: int | None,
        purpose: int,
        op: Operation | None,
        candidate: _Candidate | None,
        sent: int,
        now: float,
    ) -> None:
        self.method = method
        self.address = address
        self.peer_id = peer_id
        self.purpose = purpose
        self.op = op
        self.candidate = candidate
        #: Records carried (stores), to check the reply's length.
        self.sent = sent
        self.sent_at = now
        #: Arguments and resends left, for RPCs worth repeating once lost (stores).
        self.args: list[Any] | None = None
        self.retries = 0


# Bytes around the records of a p2p_store request: fixarray(2), "p2p_store", fixarray(3),
# two 20-byte ids, array16 header.
_STORE_OVERHEAD = 1 + 1 + len(wire.P2P_STORE) + 1 + 2 * (2 + 20) + 3
# Bytes around a p2p_find reply's parts: fixarray(3), two array16 headers, a cursor.
_FIND_REPLY_OVERHEAD = 1 + 3 + 3 + 2 + wire.MAX_CURSOR


class DhtNode:
    """One Kademlia node's state. Not thread-safe; one driver calls it.

    ``rng`` supplies message ids and refresh targets; ``cache`` is the verified-record cache
    (share one between nodes of a process). Calls never raise for anything a peer sends:
    malformed or hostile datagrams are dropped and counted in :meth:`statistics`.
    """

    __slots__ = (
        "_counters",
        "_deferred",
        "_deferred_total",
        "_dropped",
        "_finished",
        "_next_maintenance",
        "_out",
        "_pad_to",
        "_pending",
        "_rejected",
        "_timers",
        "_verified",
        "config",
        "node_id",
        "own",
        "rng",
        "routing",
        "store",
    )

    def __init__(
        self,
        node_id: bytes,
        *,
        now: float,
        rng: random.Random,
        config: DhtConfig | None = None,
        cache: RecordCache = SHARED_CACHE,
    ) -> None:
        self.config = config = config if config is not None else DhtConfig()
        self.node_id = node_id
        self.own = id_from_bytes(node_id)
        self.rng = rng
        self.routing = RoutingTable(
            self.own,
            k=config.k,
            replacements=config.replacement_cache,
            max_failures=config.max_failures,
            now=now,
            max_per_host=config.max_contacts_per_host,
            fresh_for=config.eviction_ping_after,
        )
        self.store = RecordStore(
            max_per_key=config.max_records_per_key,
            max_per_publisher=config.max_records_per_publisher,
            max_total=config.max_records_total,
            policy=config.record_policy,
            cache=cache,
        )
        self._out: list[tuple[bytes, Address]] = []
        self._pending: dict[bytes, _Rpc] = {}
        self._timers: list[tuple[float, bytes, int]] = []
        self._finished: list[Operation] = []
        self._next_maintenance = now + config.maintenance_interval
        # datagrams_in, datagrams_out, bytes_in, bytes_out, requests_in, responses_in,
        # rpcs_sent, rpcs_timed_out, lookups, lookup_rounds, lookup_rpcs, records_accepted
        # (An array: no int object per counter.)
        self._counters = array.array("q", bytes(8 * 15))
        self._dropped: dict[str, int] = {}
        #: Addresses that answered a verification ping but are not contacts, LRU order
        #: (created on first use: p2pbuild requesters pad, so only stock ones need it).
        self._verified: OrderedDict[Address, None] | None = None
        #: Size requests are padded to (see ``amplification_factor``).
        self._pad_to = -(-config.max_datagram // config.amplification_factor)
        #: Replies held for addresses not verified yet, and how many in total.
        self._deferred: dict[Address, list[bytes]] = {}
        self._deferred_total = 0
        self._rejected: dict[str, int] = {}

    # -- the sans-IO interface --------------------------------------------------------------------

    def receive_datagram(self, data: bytes, address: Address, now: float) -> None:
        """Handle one datagram from ``address``. Never raises for its content: anything
        malformed, oversize, unexpected or hostile is dropped and counted by error code."""
        counters = self._counters
        counters[0] += 1
        counters[2] += len(data)
        # The one boundary where a peer's garbage becomes a counter (h11's
        # _reraise_as_remote_protocol_error, aioquic's except QuicConnectionError).
        try:
            frame = wire.decode_datagram(data, max_size=self.config.max_incoming_datagram)
            if isinstance(frame, Request):
                counters[4] += 1
                self._handle_request(frame, address, now, len(data))
            else:
                counters[5] += 1
                self._handle_response(frame, address, now)
        except RemoteError as exc:
            self._dropped[exc.code] = self._dropped.get(exc.code, 0) + 1

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """The datagrams to send now, oldest first; each is at most ``max_datagram`` bytes."""
        out = self._out
        self._out = []
        return out

    def get_timer(self) -> float:
        """When :meth:`handle_timer` must next be called (always a time: maintenance is
        periodic)."""
        timers = self._timers
        while timers and timers[0][1] not in self._pending:
            heapq.heappop(timers)
        if timers and timers[0][0] < self._next_maintenance:
            return timers[0][0]
        return self._next_maintenance

    def handle_timer(self, now: float) -> None:
        """Fire every deadline that is due at ``now``: RPC stalls and timeouts, store expiry
        and bucket refresh. Calling it early or twice is harmless."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, msg_id, kind = heapq.heappop(timers)
            rpc = self._pending.get(msg_id)
            if rpc is None:
                continue
            if kind == _STALL:
                self._on_stall(rpc, now)
            else:
                del self._pending[msg_id]
                if not self._pending:
                    self._pending = {}
                self._counters[7] += 1
                if (
                    rpc.retries
                    and rpc.args is not None
                    and self._still_wanted(rpc)
                    and self._resend(rpc, now)
                ):
                    continue
                self._on_failure(rpc, now)
        if now >= self._next_maintenance:
            self._next_maintenance = now + self.config.maintenance_interval
            self._maintain(now)

    def finished_operations(self) -> list[Operation]:
        """Operations completed since the last call, in completion order."""
        finished = self._finished
        self._finished = []
        return finished

    # -- operations -------------------------------------------------------------------------------

    def bootstrap(self, addresses: Iterable[Address], now: float) -> BootstrapOperation:
        """Ping ``addresses`` (IP literals), then look up our own id to fill the table.

        Finishes with the number of known contacts; zero means no bootstrap node answered.
        """
        op = BootstrapOperation(now)
        for address in addresses:
            if self._call(
                address, None, wire.PING, [self.node_id], now, op, _FOR_BOOTSTRAP, retries=2
            ):
                op._waiting += 1
        if op._waiting == 0:
            self._start_walk(op, self.own, self.config.k, records=False, now=now)
        return op

    def find_nodes(self, target: bytes, now: float) -> FindNodesOperation:
        """Look up the ``k`` closest live nodes to ``target`` (20 bytes)."""
        op = FindNodesOperation(id_from_bytes(target), now)
        self._start_walk(op, op.target, self.config.k, records=False, now=now)
        return op

    def get(self, key: bytes, now: float) -> GetOperation:
        """Look up the records under ``key`` (20 bytes), including any held here."""
        op = GetOperation(key, now)
        for record in self.store.records(key, now):
            op._found[slot_of(record)] = record
        self._start_walk(op, id_from_bytes(key), self.config.value_quorum, records=True, now=now)
        return op

    def put(self, key: bytes, records: Sequence[SignedRecord], now: float) -> PutOperation:
        """Store ``records`` under ``key`` on the ``k`` closest nodes (and here, if this node
        is among them). Records are checked by every holder, as any store is.

        Raises :class:`LocalError` for an empty ``records``.
        """
        if not records:
            raise LocalError("put needs at least one record")
        budget = self.config.max_datagram - HEADER_SIZE - _STORE_OVERHEAD
        batches: list[list[bytes]] = [[]]
        used = 0
        # Capabilities first, so a status never arrives before the capability it needs.
        for record in sorted(records, key=lambda r: r.kind is Kind.STATUS):
            cost = wire.record_cost(record.raw)
            if batches[-1] and used + cost > budget:
                batches.append([])
                used = 0
            batches[-1].append(record.raw)
            used += cost
        op = PutOperation(key, batches, now)
        self._start_walk(op, id_from_bytes(key), self.config.k, records=False, now=now)
        return op

    def note_transport_error(self, code: str) -> None:
        """Count a datagram the driver could not send or receive (``send-error``, ...)."""
        self._dropped[code] = self._dropped.get(code, 0) + 1

    def abandon(self) -> list[Operation]:
        """Forget every pending RPC and return the operations left unfinished (the driver
        is stopping). Their ``done`` stays False."""
        ops = {id(rpc.op): rpc.op for rpc in self._pending.values() if rpc.op is not None}
        self._pending.clear()
        self._timers.clear()
        self._deferred.clear()
        self._deferred_total = 0
        return [op for op in ops.values() if not op.done]

    def note_rejected(self, code: str) -> None:
        """Count a record refused above the core (``untrusted-key`` by a trust filter)."""
        self._rejected[code] = self._rejected.get(code, 0) + 1

    def verified(self, address: Address) -> bool:
        """Whether ``address`` has answered a request of ours (it receives there)."""
        peer = self.routing.holds_address(address)
        if peer is not None and peer.srtt:
            return True
        return self._verified is not None and address in self._verified

    def _is_verified(self, address: Address, sender: bytes) -> bool:
        """:meth:`verified`, fast: the claimed sender is a contact at ``address`` that
        answered us (a spoofer naming it only gets replies sent to where it receives)."""
        peer = self.routing.peer_at(int.from_bytes(sender, "big"), address)
        if peer is not None and peer.srtt:
            return True
        return self._verified is not None and address in self._verified

    def contacts(self) -> list[Contact]:
        """Every contact in the routing table."""
        return [
            Contact(id_to_bytes(peer.node_id), peer.address[0], peer.address[1])
            for peer in self.routing
        ]

    def statistics(self) -> DhtStatistics:
        c = self._counters
        return DhtStatistics(
            datagrams_in=c[0],
            datagrams_out=c[1],
            bytes_in=c[2],
            bytes_out=c[3],
            requests_in=c[4],
            responses_in=c[5],
            rpcs_sent=c[6],
            rpcs_timed_out=c[7],
            lookups=c[8],
            lookup_rounds=c[9],
            lookup_rpcs=c[10],
            records_accepted=c[11],
            records_held=len(self.store),
            contacts=len(self.routing),
            pending_rpcs=len(self._pending),
            dropped=dict(self._dropped),
            rejected=dict(self._rejected),
            replies_deferred=c[12],
            replies_bounded=c[13],
            handoff_stores=c[14],
            refused_contacts=dict(self.routing.refused),
        )

    # -- sending ----------------------------------------------------------------------------------

    def _send(self, data: bytes, address: Address) -> None:
        if len(data) > self.config.max_datagram:
            raise LocalError(f"bug: a {len(data)}-byte datagram exceeds max_datagram")
        self._out.append((data, address))
        self._counters[1] += 1
        self._counters[3] += len(data)

    def _timeouts(self, peer: Peer | None) -> tuple[float, float]:
        """``(timeout, stall)`` for an RPC to ``peer`` (None: an unmeasured contact)."""
        config = self.config
        estimate = peer if peer is not None and peer.srtt else self.routing.overall
        if not estimate.srtt:
            return config.initial_rpc_timeout, config.initial_rpc_timeout / 2
        timeout = min(
            max(estimate.srtt + 4 * estimate.rttvar, config.min_rpc_timeout),
            config.max_rpc_timeout,
        )
        stall = min(max(2 * estimate.srtt, config.min_rpc_timeout / 2), timeout)
        return timeout, stall

    def _call(
        self,
        address: Address,
        peer_id: int | None,
        method: str,
        args: list[Any],
        now: float,
        op: Operation | None,
        purpose: int,
        candidate: _Candidate | None = None,
        sent: int = 0,
        retries: int = 0,
    ) -> bool:
        """Send a request; returns False if it could not be (pending table full). An RPC
        with ``retries`` is sent again that many times if it times out."""
        if len(self._pending) >= self.config.max_pending_rpcs:
            self._dropped["pending-full"] = self._dropped.get("pending-full", 0) + 1
            return False
        msg_id = self.rng.randbytes(wire.MSG_ID_SIZE)
        pad = self._pad_to if method in _PADDED else 0
        self._send(wire.encode_request(msg_id, method, args, pad_to=pad), address)
        self._counters[6] += 1
        if op is not None:
            op.rpcs += 1
        rpc = self._pending[msg_id] = _Rpc(
            method, address, peer_id, purpose, op, candidate, sent, now
        )
        if retries:
            rpc.args = args
            rpc.retries = retries
        peer = self.routing.get(peer_id) if peer_id is not None else None
        timeout, stall = self._timeouts(peer)
        heapq.heappush(self._timers, (now + timeout, msg_id, _DEADLINE))
        if purpose == _FOR_WALK and stall < timeout:
            heapq.heappush(self._timers, (now + stall, msg_id, _STALL))
        return True

    def _still_wanted(self, rpc: _Rpc) -> bool:
        """Whether the answer to a timed-out RPC would still serve its operation. Not resent,
        only counted as a failure of its contact: a walk query of a walk that has ended (it
        had enough answers without this one), and a stalled query of a single-answer walk
        (the walk asked the next closest candidate instead: any holder will do)."""
        op = rpc.op
        if op is None:
            return True
        if op.done:
            return False
        if rpc.purpose == _FOR_WALK:
            walk = op._walk
            if walk is None or walk.finished:
                return False
            candidate = rpc.candidate
            stalled = candidate is not None and candidate.state == _STALLED
            return not (stalled and self._single_answer(walk))
        return True

    def _resend(self, rpc: _Rpc, now: float) -> bool:
        """Send a timed-out RPC again (a lost store leaves a hole in a holder's pages; a lost
        bootstrap ping leaves a node alone). Returns False if it could not be sent."""
        assert rpc.args is not None
        return self._call(
            rpc.address,
            rpc.peer_id,
            rpc.method,
            rpc.args,
            now,
            rpc.op,
            rpc.purpose,
            rpc.candidate,
            rpc.sent,
            rpc.retries - 1,
        )

    def _reply(
        self,
        msg_id: bytes,
        value: Any,
        address: Address,
        request_size: int,
        verified: bool,
        now: float,
    ) -> None:
        data = wire.encode_response(msg_id, value)
        config = self.config
        if verified or len(data) <= config.amplification_factor * request_size:
            self._send(data, address)
            return
        # Anti-amplification: the request may carry a spoofed source address. A reply that
        # could not be cut to the bound waits until the address answers a ping (which
        # costs less than the request).
        self._counters[12] += 1
        queue = self._deferred.get(address)
        if queue is None:
            if self._deferred_total >= config.max_deferred_replies or not self._call(
                address, None, wire.PING, [self.node_id], now, None, _FOR_VERIFY, retries=1
            ):
                self._drop_reply()
                return
            queue = self._deferred[address] = []
        elif len(queue) >= config.max_deferred_per_address or (
            self._deferred_total >= config.max_deferred_replies
        ):
            self._drop_reply()
            return
        queue.append(data)
        self._deferred_total += 1

    def _drop_reply(self, count: int = 1) -> None:
        self._dropped["amplification-limit"] = self._dropped.get("amplification-limit", 0) + count

    def _address_verified(self, address: Address) -> None:
        """``address`` answered a verification ping: it receives there. Send what waited."""
        verified = self._verified
        if verified is None:
            verified = self._verified = OrderedDict()
        if address in verified:
            verified.move_to_end(address)
        else:
            verified[address] = None
            if len(verified) > self.config.max_verified_addresses:
                verified.popitem(last=False)
        queue = self._deferred.pop(address, None)
        if queue:
            self._deferred_total -= len(queue)
            for data in queue:
                self._send(data, address)

    # -- serving requests -------------------------------------------------------------------------

    def _handle_request(
        self, request: Request, address: Address, now: float, request_size: int
    ) -> None:
        method = request.method
        value: Any
        config = self.config
        verified = False
        if method == wire.PING:
            sender = wire.parse_ping_args(request)
            value = self.node_id
        elif method == wire.FIND_NODE:
            sender, key = wire.parse_find_args(request)
            limit, verified = self._reply_limit(address, sender, request_size)
            value = self._contacts_for(key, sender, limit - HEADER_SIZE)
        elif method == wire.FIND_VALUE:
            sender, key = wire.parse_find_args(request)
            limit, verified = self._reply_limit(address, sender, request_size)
            held = self.store.records(key, now)
            if held:
                # A bundle is not cut: a stock reader would take a first page for the whole.
                bundle = wire.encode_bundle(
                    [record.raw for record in held], len(held), max_size=config.max_bundle
                )
                value = {"value": bundle}
            else:
                value = self._contacts_for(key, sender, limit - HEADER_SIZE)
        elif method == wire.P2P_FIND:
            sender, key, cursor = wire.parse_p2p_find_args(request)
            limit, verified = self._reply_limit(address, sender, request_size)
            budget = max(limit - HEADER_SIZE - _FIND_REPLY_OVERHEAD, 0)
            triples: list[wire.ContactTriple] = []
            if cursor:
                records, next_cursor = self.store.page(key, cursor, now, budget)
            else:
                # Records first, then as many of the closest contacts as fit (at least a
                # few, for the walk): a key with a few records is read in the walk's own
                # round trips, with no page to fetch after it.
                closest = self._closest(key, sender, budget)
                reserve = wire.contacts_size(closest[:_MIN_CONTACTS])
                records, next_cursor = self.store.page(key, b"", now, budget - reserve)
                used = sum(wire.record_cost(raw) for raw in records)
                triples = wire.fit_contacts(closest, budget - used)
            value = wire.encode_p2p_find_reply(triples, records, next_cursor)
        elif method == wire.P2P_STORE:
            sender, key, raws = wire.parse_p2p_store_args(request)
            value = self._accept(key, raws, now)
        elif method == wire.STORE:
            sender, key, offered = wire.parse_store_args(request)
            value = self._accept_stock(key, offered, now)
        else:
            raise UnknownMethodError(f"no method {method[:40]!r}")
        self._reply(request.msg_id, value, address, request_size, verified, now)
        self._welcome(id_from_bytes(sender), address, now, None)

    def _reply_limit(self, address: Address, sender: bytes, request_size: int) -> tuple[int, bool]:
        """``(largest reply, verified)`` for a request of ``request_size`` bytes."""
        config = self.config
        if self._is_verified(address, sender):
            return config.max_datagram, True
        bound = config.amplification_factor * request_size
        if bound >= config.max_datagram:
            return config.max_datagram, False
        self._counters[13] += 1
        return bound, False

    def _closest(self, key: bytes, sender: bytes, budget: int) -> list[wire.ContactTriple]:
        """The closest contacts to ``key`` but the asker, as many as fit in ``budget``."""
        peers = self.routing.closest(
            id_from_bytes(key), self.config.k, exclude=id_from_bytes(sender)
        )
        triples = [(p.raw_id, p.address[0], p.address[1]) for p in peers]
        return wire.fit_contacts(triples, budget)

    def _contacts_for(self, key: bytes, sender: bytes, budget: int) -> list[list[Any]]:
        return wire.encode_contacts(self._closest(key, sender, budget))

    def _accept(self, key: bytes, raws: Sequence[bytes], now: float) -> list[str]:
        codes, errors = self.store.offer_many(key, raws, now)
        for exc in errors:
            self._rejected[exc.code] = self._rejected.get(exc.code, 0) + 1
        self._counters[11] += codes.count("ok")
        return codes

    def _accept_stock(self, key: bytes, offered: object, now: float) -> bool:
        """A stock ``store``: the value must be a record bundle or a single record."""
        raws: list[bytes]
        if type(offered) is not bytes or not offered:
            self._rejected["malformed"] = self._rejected.get("malformed", 0) + 1
            return False
        if offered[0] == 0x93:  # fixarray(3): a bundle; a record is fixarray(8) (0x98)
            _, raws = wire.decode_bundle(offered, max_size=self.config.max_incoming_datagram)
        else:
            raws = [offered]
        codes = self._accept(key, raws, now)
        return any(code in ("ok", "held") for code in codes)

    def _welcome(self, node_id: int, address: Address, now: float, rtt: float | None) -> None:
        routing = self.routing
        to_ping = routing.seen(node_id, address, now, rtt)
        if routing.added and self.config.handoff_datagrams and len(self.store):
            keys = self._handoff_keys(node_id)
            if keys:
                if rtt is not None:
                    self._handoff(node_id, address, keys, now)
                else:
                    # It only sent us a request, from a source address that may be spoofed:
                    # records go to it once it answers a ping (no amplification).
                    self._call(
                        address, node_id, wire.PING, [self.node_id], now, None,
                        _FOR_HANDOFF_PING,
                    )
        if to_ping is not None:
            sent = self._call(
                to_ping.address,
                to_ping.node_id,
                wire.PING,
                [self.node_id],
                now,
                None,
                _FOR_EVICTION,
            )
            if not sent:
                self.routing.ping_answered(to_ping.node_id)

    def _handoff_keys(self, node_id: int) -> list[bytes]:
        """The keys whose records a new contact should get from this node (paper, section
        2.5): those it is closer to than this node and among the ``k`` closest this node
        knows, if at most ``_HANDOFF_SENDERS - 1`` other contacts are closer to the key than
        this node. The paper (and the stock package) lets only the holder closest to the key
        send; a few closest send here, so that a first newcomer closer than the old holders
        that never hears of the next one does not break the chain, while the many other
        holders stay quiet."""
        config = self.config
        routing = self.routing
        own = self.own
        keys = []
        held = self.store.keys()
        for key in held:
            target = int.from_bytes(key, "big")
            distance = node_id ^ target
            mine = own ^ target
            if distance >= mine:
                continue
            closest = routing.closest(target, config.k, exclude=node_id)
            if len(closest) >= config.k and closest[-1].node_id ^ target < distance:
                continue  # the newcomer is not among the k closest
            closer = 0
            for peer in closest[:_HANDOFF_SENDERS]:
                closer += peer.node_id ^ target < mine
            if closer < _HANDOFF_SENDERS:
                keys.append(key)
        return keys

    def _handoff(self, node_id: int, address: Address, keys: list[bytes], now: float) -> None:
        """Store the records of ``keys`` to a new contact that answered us, paged as a put
        is, at most ``handoff_datagrams`` datagrams; the rest waits for the owners'
        republish."""
        config = self.config
        left = config.handoff_datagrams
        if len(self._pending) * 2 > config.max_pending_rpcs:
            return
        budget = config.max_datagram - HEADER_SIZE - _STORE_OVERHEAD
        for key in keys:
            cursor = b""
            while left:
                raws, cursor = self.store.page(key, cursor, now, budget)
                if raws:
                    args = wire.encode_p2p_store_args(self.node_id, key, raws)
                    if not self._call(
                        address, node_id, wire.P2P_STORE, args, now, None, _FOR_HANDOFF,
                        sent=len(raws),
                    ):
                        return
                    left -= 1
                    self._counters[14] += 1
                if not cursor:
                    break
            if not left:
                return

    # -- responses --------------------------------------------------------------------------------

    def _handle_response(self, response: Response, address: Address, now: float) -> None:
        rpc = self._pending.get(response.msg_id)
        if rpc is None:
            raise UnexpectedResponseError("response to no pending request")
        if rpc.address != address:
            raise UnexpectedResponseError("response from another address than asked")
        pending = self._pending
        del pending[response.msg_id]
        if not pending:
            # A dict never shrinks: drop the table a burst of RPCs grew.
            self._pending = {}
        # Only a host receiving at ``address`` could echo the random message id. A contact
        # is verified by its measured round trip (``_welcome``); other addresses that
        # answered a verification ping are remembered apart.
        if rpc.purpose == _FOR_VERIFY or address in self._deferred:
            self._address_verified(address)
        try:
            self._on_reply(rpc, response.value, address, now)
        except RemoteError:
            # The peer answered with garbage: as good as no answer for the operation. The
            # error itself propagates to the boundary in receive_datagram, to be counted.
            self._on_failure(rpc, now, count_peer=False)
            raise

    def _on_reply(self, rpc: _Rpc, value: object, address: Address, now: float) -> None:
        rtt = max(now - rpc.sent_at, 0.0)
        purpose = rpc.purpose
        if purpose == _FOR_HANDOFF:
            assert rpc.peer_id is not None
            wire.parse_p2p_store_reply(value, rpc.sent)
            self._welcome(rpc.peer_id, address, now, rtt)
            return
        if purpose in (_FOR_BOOTSTRAP, _FOR_EVICTION, _FOR_VERIFY, _FOR_HANDOFF_PING):
            node_id = id_from_bytes(wire.parse_ping_reply(value))
            if rpc.peer_id is not None and node_id != rpc.peer_id:
                raise MalformedError("ping answered with another node id")
            self._welcome(node_id, address, now, rtt)
            if purpose == _FOR_HANDOFF_PING:
                if self.routing.peer_at(node_id, address) is not None:
                    keys = self._handoff_keys(node_id)
                    if keys:
                        self._handoff(node_id, address, keys, now)
            elif purpose == _FOR_EVICTION:
                self.routing.ping_answered(node_id)
            elif purpose == _FOR_BOOTSTRAP:
                assert isinstance(rpc.op, BootstrapOperation)
                self._bootstrap_answered(rpc.op, now)
            return
        assert rpc.op is not None and rpc.peer_id is not None
        if purpose == _FOR_WALK:
            self._walk_reply(rpc, value, now)
        elif purpose == _FOR_PAGE:
            assert isinstance(rpc.op, GetOperation)
            _, raws, cursor = wire.parse_p2p_find_reply(value)
            self._collect(rpc.op, raws, now)
            if not rpc.op.done:
                self._next_page(rpc.op, rpc.candidate, cursor, now)
        else:
            assert isinstance(rpc.op, PutOperation)
            codes = wire.parse_p2p_store_reply(value, rpc.sent)
            op = rpc.op
            if any(code not in ("ok", "held") for code in codes):
                op._refused.add(rpc.address)
            self._store_answered(op, rpc.address, now)
        self._welcome(rpc.peer_id, address, now, rtt)

    def _on_stall(self, rpc: _Rpc, now: float) -> None:
        candidate = rpc.candidate
        if candidate is None or candidate.state != _INFLIGHT:
            return
        op = rpc.op
        assert op is not None
        walk = op._walk
        candidate.state = _STALLED
        if walk is not None and not op.done:
            walk.inflight -= 1
            self._advance(walk, now)

    def _on_failure(self, rpc: _Rpc, now: float, count_peer: bool = True) -> None:
        """An RPC timed out (or was answered with garbage)."""
        if rpc.purpose == _FOR_VERIFY:
            queue = self._deferred.pop(rpc.address, None)
            if queue:
                self._deferred_total -= len(queue)
                self._drop_reply(len(queue))
        # A stock peer never answers p2pbuild's own methods: a hand-off does not count.
        if count_peer and rpc.peer_id is not None and rpc.purpose != _FOR_HANDOFF:
            self.routing.failed(rpc.peer_id)
        op = rpc.op
        if op is None or op.done:
            return
        purpose = rpc.purpose
        if purpose == _FOR_BOOTSTRAP:
            assert isinstance(op, BootstrapOperation)
            self._bootstrap_answered(op, now)
        elif purpose == _FOR_WALK:
            candidate = rpc.candidate
            assert candidate is not None and op._walk is not None
            if candidate.state == _INFLIGHT:
                op._walk.inflight -= 1
            candidate.state = _FAILED
            self._advance(op._walk, now)
        elif purpose == _FOR_PAGE:
            assert isinstance(op, GetOperation)
            # Continue from the same cursor on the next closest holder that has more.
            self._next_page(op, None, b"", now)
        elif purpose == _FOR_STORE:
            assert isinstance(op, PutOperation)
            op._refused.add(rpc.address)
            self._store_answered(op, rpc.address, now)

    # -- walks ------------------------------------------------------------------------------------

    def _start_walk(
        self, op: Operation, target: int, quorum: int, *, records: bool, now: float
    ) -> None:
        self._counters[8] += 1
        walk = _Walk(op, target, quorum, records)
        op._walk = walk
        self.routing.touch(target, now)
        for peer in self.routing.closest(target, self.config.k):
            self._add_candidate(walk, peer.raw_id, peer.address, 1)
        self._advance(walk, now)

    def _add_candidate(self, walk: _Walk, raw_id: bytes, address: Address, depth: int) -> None:
        if raw_id in walk.known:
            return
        walk.known.add(raw_id)
        node_id = int.from_bytes(raw_id, "big")
        if node_id == self.own:
            return
        limit = self.config.max_contacts_per_host
        host = address[0]
        if limit and not is_loopback(host):
            seen = walk.hosts.get(host, 0)
            if seen >= limit:
                refused = self.routing.refused
                refused["host-limit"] = refused.get("host-limit", 0) + 1
                return
            walk.hosts[host] = seen + 1
        shortlist = walk.shortlist
        candidate = _Candidate(node_id, address, node_id ^ walk.target, depth)
        bisect.insort(shortlist, candidate, key=_distance)
        # Keep enough spares to replace dead contacts, drop the farthest unqueried beyond.
        limit = 2 * self.config.k + walk.quorum
        if len(shortlist) > limit and shortlist[-1].state == _NEW:
            shortlist.pop()

    def _advance(self, walk: _Walk, now: float) -> None:
        """Send queries while fewer than ``alpha`` are in flight, or finish the walk once the
        ``quorum`` closest non-failed, non-stalled candidates have all answered.

        A record walk that may end at its first holder (its key is not known to hold several
        publishers' records) asks as the module docstring says: the next round only once
        the round in flight has answered or stalled, and past the first round one candidate
        at a time. Once ``node_key_quorum`` answers held the key's publisher's capability,
        it asks nobody new and finishes when the queries in flight have answered or stalled.
        """
        op = walk.op
        if op.done or walk.finished:
            return
        config = self.config
        if walk.confirmed >= config.node_key_quorum:
            if walk.inflight == 0:
                self._walk_done(walk, now)
            return
        alpha = config.alpha
        single = self._single_answer(walk)
        # ``deepest``: no query to a candidate learned deeper than a query in flight (a
        # round's answers are all in before the next round picks the closest they named).
        deepest = _NO_DEPTH
        if single:
            for candidate in walk.shortlist:
                if candidate.state == _INFLIGHT and candidate.depth < deepest:
                    deepest = candidate.depth
        # ``held``: no query to a candidate farther than one in flight; a single-answer
        # walk's records live on the k closest nodes, so a farther candidate holds them
        # only if the closer one does.
        held = False
        # Only the first round (our own closest contacts) is asked alpha at a time.
        one_at_a_time = single and op.rpcs > 0
        answered = 0
        blocked = False
        for candidate in walk.shortlist:
            state = candidate.state
            if state == _OK:
                answered += 1
                if answered >= walk.quorum:
                    break
            elif state == _NEW:
                blocked = True
                if walk.inflight < alpha and not held and candidate.depth <= deepest:
                    self._query(walk, candidate, now)
                    # (Not if it could not be sent: then the next candidate is tried.)
                    held = one_at_a_time and candidate.state == _INFLIGHT
            elif state == _INFLIGHT:
                blocked = True
                held = held or single
        if not blocked:
            if walk.records and walk.quorum < self.config.k and self._found_nothing(walk):
                # The closest answered empty-handed (nodes that joined after the records
                # were stored and got no hand-off yet): ask on, up to the k closest.
                walk.quorum = self.config.k
                self._advance(walk, now)
                return
            self._walk_done(walk, now)

    def _single_answer(self, walk: _Walk) -> bool:
        """Whether ``walk`` may end at its first holder's answer: a record walk not widened
        to ``k`` whose key is not known to hold several publishers' records."""
        op = walk.op
        return (
            walk.records
            and walk.quorum < self.config.k
            and isinstance(op, GetOperation)
            and op._node_key is not False
        )

    def _found_nothing(self, walk: _Walk) -> bool:
        op = walk.op
        assert isinstance(op, GetOperation)
        if op._found:
            return False
        return not any(c.cursor for c in walk.shortlist if c.state == _OK)

    def _query(self, walk: _Walk, candidate: _Candidate, now: float) -> None:
        target = id_to_bytes(walk.target)
        if walk.records:
            method, args = wire.P2P_FIND, wire.encode_p2p_find_args(self.node_id, target, b"")
        else:
            method, args = wire.FIND_NODE, wire.encode_find_args(self.node_id, target)
        op = walk.op
        # One resend: a query lost on the way would leave its node out of the result (and
        # a put's records off that holder); stalls keep a dead node from delaying the walk.
        if self._call(
            candidate.address,
            candidate.node_id,
            method,
            args,
            now,
            op,
            _FOR_WALK,
            candidate,
            retries=1,
        ):
            candidate.state = _INFLIGHT
            walk.inflight += 1
            self._counters[10] += 1
            if candidate.depth > op.rounds:
                op.rounds = candidate.depth
        else:
            candidate.state = _FAILED

    def _walk_reply(self, rpc: _Rpc, value: object, now: float) -> None:
        op = rpc.op
        candidate = rpc.candidate
        assert op is not None and candidate is not None
        contacts: list[wire.ContactTriple]
        confirms = False
        if rpc.method == wire.P2P_FIND:
            contacts, raws, cursor = wire.parse_p2p_find_reply(value)
            assert isinstance(op, GetOperation)
            if not op.done:
                confirms = self._collect(op, raws, now)
            candidate.cursor = cursor
        else:
            contacts = wire.parse_contacts(value)
        walk = op._walk
        if op.done or walk is None or walk.finished:
            return
        if candidate.state == _INFLIGHT:
            walk.inflight -= 1
        candidate.state = _OK
        walk.confirmed += confirms
        depth = candidate.depth + 1
        for raw_id, host, port in contacts:
            self._add_candidate(walk, raw_id, (host, port), depth)
        self._advance(walk, now)

    def _walk_done(self, walk: _Walk, now: float) -> None:
        walk.finished = True
        op = walk.op
        self._counters[9] += op.rounds
        answered = [c for c in walk.shortlist if c.state == _OK]
        if isinstance(op, FindNodesOperation):
            op.result = [
                Contact(id_to_bytes(c.node_id), c.address[0], c.address[1])
                for c in answered[: self.config.k]
            ]
            self._finish(op)
        elif isinstance(op, BootstrapOperation):
            op.result = len(self.routing)
            self._finish(op)
        elif isinstance(op, GetOperation):
            self._next_page(op, None, b"", now)
        else:
            assert isinstance(op, PutOperation)
            self._store_phase(op, answered[: self.config.k], now)

    def _finish(self, op: Operation) -> None:
        if not op.done:
            op.done = True
            op._walk = None
            self._finished.append(op)

    def _bootstrap_answered(self, op: BootstrapOperation, now: float) -> None:
        op._waiting -= 1
        if op._waiting == 0:
            self._start_walk(op, self.own, self.config.k, records=False, now=now)

    # -- record lookups ---------------------------------------------------------------------------

    def _collect(self, op: GetOperation, raws: Sequence[bytes], now: float) -> bool:
        """Verify the records a holder sent and keep the newest per slot. This is the
        reader's record boundary: each bad record is counted and skipped, the rest kept.

        Returns True if ``op.key`` is a node key and the records held its publisher's
        capability: a node key holds one publisher's records only (a capability is bound to
        its publisher's node key and facet keys, a status to keys holding its publisher's
        capability; ``_store.py``), so that holder's answer is a complete one."""
        confirms = False
        found = op._found
        cache = self.store.cache
        policy = self.config.record_policy
        for raw in raws:
            try:
                record, keys = cache.parse(raw)
                record.check(now, policy=policy)
            except RemoteError as exc:
                self._rejected[exc.code] = self._rejected.get(exc.code, 0) + 1
                continue
            # Binding: capabilities must belong here; a status is kept for now and must be
            # matched by its publisher's capability (or be under its node key) at the end.
            if op.key not in keys and record.kind is not Kind.STATUS:
                self._rejected["wrong-key"] = self._rejected.get("wrong-key", 0) + 1
                continue
            if record.kind is Kind.CAPABILITY:
                if op._node_key is None:
                    # The first bound capability tells node key from facet key for good: a
                    # facet key is no publisher's node key (different SHA-1 inputs).
                    op._node_key = node_key(record.publisher) == op.key
                if op._node_key:
                    confirms = True
            slot = slot_of(record)
            current = found.get(slot)
            if current is None or record.seq > current.seq:
                found[slot] = record
        return confirms

    def _next_page(
        self, op: GetOperation, holder: _Candidate | None, cursor: bytes, now: float
    ) -> None:
        """Page on. ``holder`` just answered a page with next ``cursor``; an empty cursor
        means that holder has been read to the end (one *source* done). None means "start,
        or the previous holder failed": continue with the closest holder that reported more.
        Ends after ``page_sources`` holders were read to the end (so one holder that missed
        a store does not hide a record), when no holder has more, or after ``max_pages``."""
        if holder is not None and not cursor:
            op._sources += 1
            op._cursor = b""
            holder = None
            if op._sources >= self.config.page_sources:
                self._finish_get(op, now)
                return
        elif cursor > op._cursor:
            op._cursor = cursor
        if holder is None:
            walk = op._walk
            if walk is not None:
                for candidate in walk.shortlist:
                    if candidate.state == _OK and candidate.cursor:
                        holder = candidate
                        break
        if holder is None or op._pages >= self.config.max_pages:
            self._finish_get(op, now)
            return
        # Continue from the furthest point known (cursors are the same on every holder).
        start = max(holder.cursor, op._cursor)
        holder.cursor = b""
        op._pages += 1
        args = wire.encode_p2p_find_args(self.node_id, op.key, start)
        # Resent once, as walk queries are: under loss a page dropped on the way would
        # otherwise move the read to another holder, or end it if no other has more.
        if not self._call(
            holder.address,
            holder.node_id,
            wire.P2P_FIND,
            args,
            now,
            op,
            _FOR_PAGE,
            holder,
            retries=1,
        ):
            self._finish_get(op, now)

    def _finish_get(self, op: GetOperation, now: float) -> None:
        best = latest(op._found.values())
        capabilities = {
            record.publisher.raw for record in best.values() if record.kind is Kind.CAPABILITY
        }
        result = []
        for slot in sorted(best):
            record = best[slot]
            if record.expires_at <= now:
                continue
            if record.kind is Kind.STATUS and record.publisher.raw not in capabilities:
                _, keys = self.store.cache.parse(record.raw)
                if op.key not in keys:
                    self._rejected["wrong-key"] = self._rejected.get("wrong-key", 0) + 1
                    continue
            result.append(record)
        op.result = result
        self._finish(op)

    # -- stores -----------------------------------------------------------------------------------

    def _store_phase(self, op: PutOperation, holders: list[_Candidate], now: float) -> None:
        key = op.key
        farthest = holders[-1].distance if holders else 0
        if len(holders) < self.config.k or (self.own ^ id_from_bytes(key)) < farthest:
            codes = self._accept(key, [raw for batch in op._batches for raw in batch], now)
            if all(code in ("ok", "held") for code in codes):
                op.result += 1
        for holder in holders:
            for batch in op._batches:
                args = wire.encode_p2p_store_args(self.node_id, key, batch)
                if self._call(
                    holder.address,
                    holder.node_id,
                    wire.P2P_STORE,
                    args,
                    now,
                    op,
                    _FOR_STORE,
                    holder,
                    sent=len(batch),
                    retries=self.config.store_retries,
                ):
                    op._outstanding += 1
                    op._holders[holder.address] = op._holders.get(holder.address, 0) + 1
        if op._outstanding == 0:
            self._finish(op)

    def _store_answered(self, op: PutOperation, address: Address, now: float) -> None:
        op._outstanding -= 1
        left = op._holders[address] - 1
        op._holders[address] = left
        if left == 0 and address not in op._refused:
            op.result += 1
        if op._outstanding == 0:
            self._finish(op)

    # -- maintenance ------------------------------------------------------------------------------

    def _maintain(self, now: float) -> None:
        self.store.expire(now)
        config = self.config
        for index in self.routing.stale_buckets(now, config.refresh_interval)[:4]:
            target = self.routing.random_id_in_bucket(index, self.rng.getrandbits(160))
            op = FindNodesOperation(target, now)
            self._start_walk(op, target, config.k, records=False, now=now)
