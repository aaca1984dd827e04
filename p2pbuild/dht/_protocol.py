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
clock). The node is layered by concept, one module each: its state and RPC table
(``_rpc.py``), the welcome of new contacts and the hand-off of records (``_handoff.py``),
the request handlers and the amplification bound (``_handlers.py``), the lookup walks and
paging (``_lookups.py``); this module adds the public interface and the handling of
responses. Configuration and statistics are ``_config.py``, operations ``_operations.py``.

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

import heapq
from collections.abc import Collection, Iterable, Sequence

from .._errors import LocalError, MalformedError, RemoteError
from .._records import Kind, SignedRecord
from . import _wire as wire
from ._config import DhtConfig, DhtStatistics, UnexpectedResponseError, UnknownMethodError
from ._ids import Address, Contact, id_from_bytes, id_to_bytes
from ._lookups import _CENSUS_HOLDERS, LookupNode
from ._operations import (
    BootstrapOperation,
    FindNodesOperation,
    GetOperation,
    JoinRefreshOperation,
    Operation,
    PutOperation,
    _Candidate,
)
from ._rpc import STORE_OVERHEAD, Count, Purpose, TimerKind, _Rpc
from ._store import slot_of
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


class DhtNode(LookupNode):
    """One Kademlia node. Not thread-safe; one driver calls it.

    ``DhtNode(node_id, now=..., rng=..., config=..., cache=...)``: ``rng`` supplies message
    ids and refresh targets; ``cache`` is the verified-record cache (share one between nodes
    of a process). Calls never raise for anything a peer sends: malformed or hostile
    datagrams are dropped and counted in :meth:`statistics`.
    """

    __slots__ = ()

    # -- the sans-IO interface --------------------------------------------------------------------

    def receive_datagram(self, data: bytes, address: Address, now: float) -> None:
        """Handle one datagram from ``address``. Never raises for its content: anything
        malformed, oversize, unexpected or hostile is dropped and counted by error code."""
        counters = self._counters
        counters[Count.DATAGRAMS_IN] += 1
        counters[Count.BYTES_IN] += len(data)
        # The one boundary where a peer's garbage becomes a counter (h11's
        # _reraise_as_remote_protocol_error, aioquic's except QuicConnectionError).
        try:
            frame = wire.decode_datagram(data, max_size=self.config.max_incoming_datagram)
            if isinstance(frame, Request):
                counters[Count.REQUESTS_IN] += 1
                self._handle_request(frame, address, now, len(data))
            else:
                counters[Count.RESPONSES_IN] += 1
                self._handle_response(frame, address, now, len(data))
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
        periodic = min(self._next_maintenance, self._next_liveness)
        if timers and timers[0][0] < periodic:
            return timers[0][0]
        return periodic

    def handle_timer(self, now: float) -> None:
        """Fire every deadline that is due at ``now``: RPC stalls and timeouts, liveness
        pings, store expiry and bucket refresh. Calling it early or twice is harmless."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, msg_id, kind = heapq.heappop(timers)
            rpc = self._pending.get(msg_id)
            if rpc is None:
                continue
            if kind == TimerKind.STALL:
                self._on_stall(rpc, now)
            else:
                del self._pending[msg_id]
                if not self._pending:
                    self._pending = {}
                self._counters[Count.RPCS_TIMED_OUT] += 1
                if (
                    rpc.retries
                    and rpc.args is not None
                    and self._still_wanted(rpc)
                    and self._resend(rpc, now)
                ):
                    continue
                self._on_failure(rpc, now)
        if self._sent_to is not None and now >= self._reachable_by:
            # ``auto`` reachability: no unsolicited request for reachability_timeout. Behind
            # a NAT (or a firewall): go on as a client, out of others' routing tables.
            self._sent_to = None
            self.client = True
        if now >= self._next_liveness:
            self._check_liveness(now)
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
                address, None, wire.PING, [self.node_id], now, op, Purpose.BOOTSTRAP, retries=2
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

    def get(
        self, key: bytes, now: float, *, sample: int = 0, census: bool = False
    ) -> GetOperation:
        """Look up the records under ``key`` (20 bytes), including any held here.

        With ``sample`` > 0 (a facet key with many publishers), read about ``sample``
        publishers' records chosen uniformly at random instead of all of them: the walk
        asks for the holders' publisher counts only, then random parts of the key are asked
        of random holders at once (``docs/protocol.md``, *Sampled reads*); the result says
        ``complete`` False when the key holds more than was read. With ``census`` (and no
        ``sample``) the read ends after that walk: no records, ``publishers`` counted, and
        :meth:`sample_from` reads from the holders it found.
        """
        if sample or census:
            op = GetOperation(key, now, want=sample, seed=self.rng.randbytes(8), sampled=True)
            op._node_key = False
        else:
            op = GetOperation(key, now)
            for record in self.store.records(key, now):
                op._found[slot_of(record)] = record
        self._start_walk(op, id_from_bytes(key), self.config.value_quorum, records=True, now=now)
        return op

    def sample_from(
        self, census: GetOperation, want: int, now: float, *, whole: bool = True
    ) -> GetOperation:
        """Read about ``want`` publishers' records, chosen uniformly at random, from the
        holders a finished ``census`` read (``get(key, now, census=True)``) found: one
        round trip, no walk. If ``want`` covers the census's count, the key is paged
        through as a full read is (``complete`` unless a page is missing); with ``whole``
        False every part is asked once instead, of random holders (half the bytes of a
        full read, which reads two holders to the end; a part fuller than one reply gives a
        random subset of itself). Raises :class:`LocalError` if ``census`` is not a
        finished sampled read or ``want`` is below 1."""
        if not (census.done and census.sampled) or want < 1:
            raise LocalError("sample_from needs a finished census and want >= 1")
        op = GetOperation(census.key, now, want=want, seed=self.rng.randbytes(8))
        op._node_key = False
        op.publishers = census.publishers
        op._holders = census._holders
        op._whole = whole
        self._sample_phase(op, now)
        return op

    def sample_more(self, read: GetOperation, parts: int, now: float) -> GetOperation:
        """Ask for ``parts`` more parts of the key a finished sampled ``read`` (of
        :meth:`sample_from`) read: parts of the same random partition that it did not ask
        for (fewer if fewer are left), from the holders of its census, in one round trip.
        The new operation's ``result`` holds what they brought only. Raises
        :class:`LocalError` if ``read`` is not a finished read by parts or ``parts`` is
        below 1."""
        if not (read.done and read.sampled and read._parts) or parts < 1:
            raise LocalError("sample_more needs a finished read by parts and parts >= 1")
        op = GetOperation(read.key, now, want=parts, seed=read._seed)
        op._node_key = False
        op.publishers = read.publishers
        op._holders = read._holders
        op._whole = False
        op._parts = read._parts
        op._asked = read._asked
        self._counters[Count.SAMPLE_MORE] += 1
        self._sample_phase(op, now)
        return op

    def put(
        self,
        key: bytes,
        records: Sequence[SignedRecord],
        now: float,
        *,
        census: bool = False,
        holders: Sequence[tuple[int, Address]] | None = None,
        leave_out: Collection[int] = (),
    ) -> PutOperation:
        """Store ``records`` under ``key`` on the ``k`` closest nodes (and here, if this node
        is among them). Records are checked by every holder, as any store is. With
        ``census``, the walk asks the nodes it meets how many publishers they hold under
        ``key`` (``PutOperation.publishers``). With ``holders`` (node id, address: the
        holders an earlier put of ``key`` found), no walk: the records go to those nodes,
        and with ``census`` a census query to ``_CENSUS_HOLDERS`` of them at random
        (``publishers``: the larger count). The holders in ``leave_out`` (node ids) get no
        records (holders of a full facet root that refused them within the hour: they
        counted the offer).

        Raises :class:`LocalError` for an empty ``records``, ``holders`` empty or more
        than ``k`` of them, or ``leave_out`` but for a direct census.
        """
        if not records:
            raise LocalError("put needs at least one record")
        if holders is not None and not 0 < len(holders) <= self.config.k:
            raise LocalError("a direct put needs 1 to k holders")
        if leave_out and (holders is None or not census):
            raise LocalError("only a direct census may leave holders out")
        budget = self.config.max_datagram - HEADER_SIZE - STORE_OVERHEAD
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
        op = PutOperation(key, batches, now, census=census)
        if holders is None:
            self._start_walk(op, id_from_bytes(key), self.config.k, records=False, now=now)
            return op
        op.direct = True
        self._counters[Count.DIRECT_PUTS] += 1
        target = id_from_bytes(key)
        candidates = sorted(
            (_Candidate(node_id, address, node_id ^ target, 1) for node_id, address in holders),
            key=lambda candidate: candidate.distance,
        )
        if census:
            # Two holders at random, not the closest: every publisher of a crowded facet
            # censuses its root at each republish, and the closest served them all. Any
            # holder of a full root counts the publishers that offered within the hour (a
            # recent holder fewer: the directory keeps the larger counts for a while).
            cursor = wire.sample_cursor(bytes(8), 0, 1)
            asked = self.rng.sample(candidates, min(_CENSUS_HOLDERS, len(candidates)))
            for holder in asked:
                if self._call(
                    holder.address,
                    holder.node_id,
                    wire.P2P_FIND,
                    wire.encode_p2p_find_args(self.node_id, key, cursor),
                    now,
                    op,
                    Purpose.CENSUS,
                    holder,
                    retries=1,
                ):
                    op._outstanding += 1
        if leave_out:
            candidates = [c for c in candidates if c.node_id not in leave_out]
        if candidates:
            self._store_phase(op, candidates, now)
        elif not op._outstanding:
            self._finish(op)
        return op

    def note_transport_error(self, code: str) -> None:
        """Count a datagram the driver could not send or receive (``send-error``, ...)."""
        self._dropped[code] = self._dropped.get(code, 0) + 1

    def abandon(self) -> list[Operation]:
        """Forget every pending RPC and return the operations left unfinished (the driver
        is stopping). Their ``done`` stays False."""
        ops = {id(rpc.op): rpc.op for rpc in self._pending.values() if rpc.op is not None}
        for op in list(ops.values()):
            if isinstance(op, JoinRefreshOperation):
                ops[id(op.join)] = op.join
        self._pending.clear()
        self._timers.clear()
        self._deferred.clear()
        self._deferred_total = 0
        return [op for op in ops.values() if not op.done]

    def note_rejected(self, code: str) -> None:
        """Count a record refused above the core (``untrusted-key`` by a trust filter)."""
        self._rejected[code] = self._rejected.get(code, 0) + 1

    def contacts(self) -> list[Contact]:
        """Every contact in the routing table."""
        return [
            Contact(id_to_bytes(peer.node_id), peer.address[0], peer.address[1])
            for peer in self.routing
        ]

    def statistics(self) -> DhtStatistics:
        c = self._counters
        return DhtStatistics(
            datagrams_in=c[Count.DATAGRAMS_IN],
            datagrams_out=c[Count.DATAGRAMS_OUT],
            bytes_in=c[Count.BYTES_IN],
            bytes_out=c[Count.BYTES_OUT],
            requests_in=c[Count.REQUESTS_IN],
            responses_in=c[Count.RESPONSES_IN],
            rpcs_sent=c[Count.RPCS_SENT],
            rpcs_timed_out=c[Count.RPCS_TIMED_OUT],
            lookups=c[Count.LOOKUPS],
            lookup_rounds=c[Count.LOOKUP_ROUNDS],
            lookup_rpcs=c[Count.LOOKUP_RPCS],
            records_accepted=c[Count.RECORDS_ACCEPTED],
            records_held=len(self.store),
            contacts=len(self.routing),
            pending_rpcs=len(self._pending),
            dropped=dict(self._dropped),
            rejected=dict(self._rejected),
            replies_deferred=c[Count.REPLIES_DEFERRED],
            replies_bounded=c[Count.REPLIES_BOUNDED],
            handoff_stores=c[Count.HANDOFF_STORES],
            client=self.client,
            client_requests_in=c[Count.CLIENT_REQUESTS_IN],
            sample_parts_reasked=c[Count.SAMPLE_PARTS_REASKED],
            direct_puts=c[Count.DIRECT_PUTS],
            sample_more=c[Count.SAMPLE_MORE],
            refused_contacts=dict(self.routing.refused),
        )

    # -- responses --------------------------------------------------------------------------------

    def _handle_response(
        self, response: Response, address: Address, now: float, size: int
    ) -> None:
        rpc = self._pending.get(response.msg_id)
        if rpc is None:
            raise UnexpectedResponseError("response to no pending request")
        if rpc.address != address:
            raise UnexpectedResponseError("response from another address than asked")
        if rpc.op is not None:
            rpc.op.bytes_in += size
        pending = self._pending
        del pending[response.msg_id]
        if not pending:
            # A dict never shrinks: drop the table a burst of RPCs grew.
            self._pending = {}
        # Only a host receiving at ``address`` could echo the random message id. A contact
        # is verified by its measured round trip (``_welcome``); other addresses that
        # answered a verification ping are remembered apart.
        if rpc.purpose == Purpose.VERIFY or address in self._deferred:
            self._address_verified(address)
        try:
            if rpc.method == wire.P2P_FIND:
                cookie = wire.p2p_find_reply_cookie(response.value)
                if cookie:
                    self._keep_cookie(address, cookie, now)
            self._on_reply(rpc, response.value, address, now)
            if rpc.method == wire.PING:
                # (The answer checked above: the node id it gives is that of the contact.)
                peer = self.routing.get(id_from_bytes(wire.parse_ping_reply(response.value)))
                if peer is not None and peer.address == address:
                    peer.probe_factor = response.probe_factor
        except RemoteError:
            # The peer answered with garbage: as good as no answer for the operation. The
            # error itself propagates to the boundary in receive_datagram, to be counted.
            self._on_failure(rpc, now, count_peer=False)
            raise

    def _on_reply(self, rpc: _Rpc, value: object, address: Address, now: float) -> None:
        rtt = max(now - rpc.sent_at, 0.0)
        purpose = rpc.purpose
        if purpose == Purpose.HANDOFF:
            assert rpc.peer_id is not None
            wire.parse_p2p_store_reply(value, rpc.sent)
            self._welcome(rpc.peer_id, address, now, rtt)
            return
        if purpose in (Purpose.BOOTSTRAP, Purpose.LIVENESS, Purpose.VERIFY, Purpose.HANDOFF_PING):
            node_id = id_from_bytes(wire.parse_ping_reply(value))
            if rpc.peer_id is not None and node_id != rpc.peer_id:
                raise MalformedError("ping answered with another node id")
            self._welcome(node_id, address, now, rtt)
            if purpose == Purpose.HANDOFF_PING:
                if self.routing.peer_at(node_id, address) is not None:
                    keys = self._handoff_keys(node_id)
                    if keys:
                        self._handoff(node_id, address, keys, now)
            elif purpose == Purpose.LIVENESS:
                self.routing.ping_answered(node_id)
            elif purpose == Purpose.BOOTSTRAP:
                assert isinstance(rpc.op, BootstrapOperation)
                self._bootstrap_answered(rpc.op, now)
            return
        assert rpc.op is not None and rpc.peer_id is not None
        if purpose == Purpose.WALK:
            self._walk_reply(rpc, value, now)
        elif purpose == Purpose.SAMPLE:
            assert isinstance(rpc.op, GetOperation)
            _, raws, _ = wire.parse_p2p_find_reply(value)
            if not rpc.op.done:
                self._sample_reply(rpc, raws, now)
        elif purpose == Purpose.PAGE:
            assert isinstance(rpc.op, GetOperation)
            _, raws, cursor = wire.parse_p2p_find_reply(value)
            self._collect(rpc.op, raws, now)
            if not rpc.op.done:
                self._next_page(rpc.op, rpc.candidate, cursor, now)
        elif purpose == Purpose.CENSUS:
            assert isinstance(rpc.op, PutOperation)
            _, _, _, publishers = wire.parse_p2p_find_reply_counted(value)
            self._census_answered(rpc.op, publishers)
        else:
            assert isinstance(rpc.op, PutOperation)
            codes = wire.parse_p2p_store_reply(value, rpc.sent)
            op = rpc.op
            if any(code not in ("ok", "held") for code in codes):
                op._refused.add(rpc.address)
                if "store-full" in codes and all(a != address for _, a in op.full):
                    op.full.append((rpc.peer_id, address))
            self._store_answered(op, rpc.address, now)
        self._welcome(rpc.peer_id, address, now, rtt)

