"""Lookup walks and paging: node lookups, record lookups (with the early end of a node-key
lookup and the single-answer walk), the store phase of a put, and bucket refresh.

The rules are in ``_protocol.py``'s docstring and ``docs/protocol.md`` (*Lookups*).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from .._errors import RemoteError
from .._records import Kind
from . import _wire as wire
from ._handlers import HandlerNode
from ._ids import Address, Contact, id_from_bytes, id_to_bytes, node_key
from ._operations import (
    _NO_DEPTH,
    BootstrapOperation,
    CandidateState,
    FindNodesOperation,
    GetOperation,
    JoinRefreshOperation,
    Operation,
    PutOperation,
    _Candidate,
    _distance,
    _Walk,
)
from ._routing import is_loopback
from ._rpc import Count, Purpose, _Rpc
from ._store import keep_newest, latest

__all__ = ["LookupNode"]

# Publishers per part of a sampled read: about what one reply holds (a capability and a
# status are ~380 bytes together; a sample reply has no contacts and no cursor).
_PER_PART = 3
_PART_YIELD = 2.4
# Publishers per part of a read of every publisher of a key by parts (Poisson-like counts:
# a part of more than three loses the rest, about 3.5% of all at 1.2).
_ALL_PER_PART = 1.2
# Holders a census walk ends at: the first two that answer with a count, wherever they are
# among the key's k holders (the walks of readers with different routing tables end at
# different holders, which then serve the read's parts: the load spreads over the k
# holders instead of falling on the value_quorum closest).
_CENSUS_HOLDERS = 2
# Parts of a sampled read go to the candidates its census's holders named (8 of their k
# closest at random each, themselves included if the other named them), when there are
# at least this many: not to the holders that answered the census too. Every reader's
# census walk ends at nearly the same few closest holders; asked for parts as often as
# the named ones, each of them served about 1.4 times its share of a hot shard's parts in
# ``bench/internet.py``'s load phase (113 of 1,586 for 20 holders), besides the censuses.
_PART_NAMED = 4

# Requests a stock Kademlia node answers too (it ignores p2pbuild's own methods).
_EVERY_NODE_ANSWERS = frozenset((wire.PING, wire.FIND_NODE))


def part_holders(shortlist: Sequence[_Candidate], k: int) -> list[_Candidate]:
    """The holders a sampled read asks for its parts, from its census walk's ``shortlist``
    (closest first): the candidates that answered with a count, then those never asked
    that a holder named (its closest contacts to the key: likely holders too), closest
    first, ``k`` in all. Without names, the closest candidates never asked, among the
    ``k`` closest (about half of which held nothing at N=2,000: candidates from answers
    on the way, closer than holders the walk never heard of)."""
    holders = [c for c in shortlist if c.state == CandidateState.OK and c.publishers]
    named = [c for c in shortlist if c.state == CandidateState.NEW and c.named]
    if not named:
        named = [c for c in shortlist[:k] if c.state == CandidateState.NEW]
    return holders + named[: max(k - len(holders), 0)]


class LookupNode(HandlerNode):
    """:class:`HandlerNode` with lookup walks, paging and stores."""

    __slots__ = ()

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
        if rpc.purpose == Purpose.WALK:
            walk = op._walk
            if walk is None or walk.finished:
                return False
            candidate = rpc.candidate
            stalled = candidate is not None and candidate.state == CandidateState.STALLED
            return not (stalled and self._single_answer(walk))
        return True

    def _on_stall(self, rpc: _Rpc, now: float) -> None:
        candidate = rpc.candidate
        if candidate is None or candidate.state != CandidateState.INFLIGHT:
            return
        op = rpc.op
        assert op is not None
        walk = op._walk
        candidate.state = CandidateState.STALLED
        if walk is not None and not op.done:
            walk.inflight -= 1
            self._advance(walk, now)

    def _on_failure(self, rpc: _Rpc, now: float, count_peer: bool = True) -> None:
        """An RPC timed out (or was answered with garbage)."""
        if rpc.purpose == Purpose.VERIFY:
            queue = self._deferred.pop(rpc.address, None)
            if queue:
                self._deferred_total -= len(queue)
                self._drop_reply(len(queue))
        # A stock peer never answers p2pbuild's own methods: a hand-off does not count.
        if count_peer and rpc.peer_id is not None and rpc.purpose != Purpose.HANDOFF:
            # Unanswered after a resend, a request that every Kademlia node answers: the
            # contact is gone (two datagrams lost in a row under 1% loss: 1 in 2,500).
            confirmed = rpc.resent and rpc.method in _EVERY_NODE_ANSWERS
            self.routing.failed(rpc.peer_id, confirmed=confirmed)
            if rpc.purpose == Purpose.LIVENESS:
                self._probe_failed(now)
        if rpc.purpose == Purpose.LIVENESS and rpc.peer_id is not None:
            self.routing.ping_answered(rpc.peer_id)  # (answered with garbage: ended too)
        op = rpc.op
        if op is None or op.done:
            return
        purpose = rpc.purpose
        if purpose == Purpose.BOOTSTRAP:
            assert isinstance(op, BootstrapOperation)
            self._bootstrap_answered(op, now)
        elif purpose == Purpose.WALK:
            candidate = rpc.candidate
            assert candidate is not None and op._walk is not None
            if candidate.state == CandidateState.INFLIGHT:
                op._walk.inflight -= 1
            candidate.state = CandidateState.FAILED
            self._advance(op._walk, now)
        elif purpose == Purpose.PAGE:
            assert isinstance(op, GetOperation)
            op.failed += 1  # (pages are asked of holders that answered only)
            if rpc.candidate is not None and rpc.candidate.origin is not None:
                # A census's holder: the reads sharing the census do not ask it again.
                rpc.candidate.origin.state = CandidateState.FAILED
            # Continue from the same cursor on the next closest holder that has more.
            self._next_page(op, None, b"", now)
        elif purpose == Purpose.SAMPLE:
            assert isinstance(op, GetOperation)
            if rpc.candidate is not None and rpc.candidate.state == CandidateState.OK:
                op.failed += 1  # a holder that answered before (see ``failed``)
            self._sample_reply(rpc, None, now)
        elif purpose == Purpose.STORE:
            assert isinstance(op, PutOperation)
            op._refused.add(rpc.address)
            self._store_answered(op, rpc.address, now)
        elif purpose == Purpose.CENSUS:
            assert isinstance(op, PutOperation)
            self._census_answered(op, None)

    # -- walks ------------------------------------------------------------------------------------

    def _start_walk(
        self, op: Operation, target: int, quorum: int, *, records: bool, now: float
    ) -> None:
        self._counters[Count.LOOKUPS] += 1
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
        if len(shortlist) > limit and shortlist[-1].state == CandidateState.NEW:
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
        quorum = config.node_key_quorum
        if isinstance(op, GetOperation) and op.sampled:
            quorum = _CENSUS_HOLDERS
        if walk.confirmed >= quorum:
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
                if candidate.state == CandidateState.INFLIGHT and candidate.depth < deepest:
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
            if state == CandidateState.OK:
                answered += 1
                if answered >= walk.quorum:
                    break
            elif state == CandidateState.NEW:
                blocked = True
                if walk.inflight < alpha and not held and candidate.depth <= deepest:
                    self._query(walk, candidate, now)
                    # (Not if it could not be sent: then the next candidate is tried.)
                    held = one_at_a_time and candidate.state == CandidateState.INFLIGHT
            elif state == CandidateState.INFLIGHT:
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
        if op._found or op.sampled:
            # (A sampling walk reads no records: an empty answer is the normal one.)
            return False
        return not any(c.cursor for c in walk.shortlist if c.state == CandidateState.OK)

    def _query(self, walk: _Walk, candidate: _Candidate, now: float) -> None:
        target = id_to_bytes(walk.target)
        if walk.records:
            op = walk.op
            assert isinstance(op, GetOperation)
            cursor = wire.sample_cursor(op._seed, 0, wire.CENSUS_CONTACTS) if op.sampled else b""
            method, args = wire.P2P_FIND, wire.encode_p2p_find_args(self.node_id, target, cursor)
        elif isinstance(walk.op, PutOperation) and walk.op.census:
            cursor = wire.sample_cursor(bytes(8), 0, 0)
            method, args = wire.P2P_FIND, wire.encode_p2p_find_args(self.node_id, target, cursor)
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
            Purpose.WALK,
            candidate,
            retries=1,
        ):
            candidate.state = CandidateState.INFLIGHT
            walk.inflight += 1
            self._counters[Count.LOOKUP_RPCS] += 1
            if candidate.depth > op.rounds:
                op.rounds = candidate.depth
        else:
            candidate.state = CandidateState.FAILED

    def _walk_reply(self, rpc: _Rpc, value: object, now: float) -> None:
        op = rpc.op
        candidate = rpc.candidate
        assert op is not None and candidate is not None
        contacts: list[wire.ContactTriple]
        confirms = False
        named = False  # a holder's answer to a census: its contacts likely hold the key
        if rpc.method == wire.P2P_FIND:
            contacts, raws, cursor, publishers = wire.parse_p2p_find_reply_counted(value)
            assert isinstance(op, GetOperation | PutOperation)
            if isinstance(op, GetOperation) and not op.done:
                confirms = self._collect(op, raws, now)
            candidate.cursor = cursor
            if publishers is not None:
                candidate.publishers = publishers
                if op.publishers is None or publishers > op.publishers:
                    op.publishers = publishers
                if publishers and isinstance(op, GetOperation) and op.sampled:
                    confirms = named = True  # a holder (see ``_CENSUS_HOLDERS``)
        else:
            contacts = wire.parse_contacts(value)
        walk = op._walk
        if op.done or walk is None or walk.finished:
            return
        if candidate.state == CandidateState.INFLIGHT:
            walk.inflight -= 1
        candidate.state = CandidateState.OK
        walk.confirmed += confirms
        depth = candidate.depth + 1
        for raw_id, host, port in contacts:
            self._add_candidate(walk, raw_id, (host, port), depth)
        if named and contacts:
            ids = {int.from_bytes(raw_id, "big") for raw_id, _, _ in contacts}
            for other in walk.shortlist:
                if other.node_id in ids:
                    other.named = True
        self._advance(walk, now)

    def _walk_done(self, walk: _Walk, now: float) -> None:
        walk.finished = True
        op = walk.op
        self._counters[Count.LOOKUP_ROUNDS] += op.rounds
        answered = [c for c in walk.shortlist if c.state == CandidateState.OK]
        if isinstance(op, FindNodesOperation):
            op.result = [
                Contact(id_to_bytes(c.node_id), c.address[0], c.address[1])
                for c in answered[: self.config.k]
            ]
            self._finish(op)
            if isinstance(op, JoinRefreshOperation):
                self._join_refreshed(op.join)
        elif isinstance(op, BootstrapOperation):
            self._refresh_far_buckets(op, answered[0].node_id if answered else None, now)
        elif isinstance(op, GetOperation):
            if op.sampled:
                # The holders that answered, then the candidates never asked that a holder
                # named: parts are spread over all of them (not asked of nodes that hold
                # nothing, and then again of the two holders the census heard).
                op._holders = part_holders(walk.shortlist, self.config.k)
                self._sample_phase(op, now)
            else:
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

    def _refresh_far_buckets(
        self, op: BootstrapOperation, closest: int | None, now: float
    ) -> None:
        """The join's last step (section 2.3 of the paper): refresh every bucket farther
        away than our closest neighbour, here the ones not full, with a lookup of a random
        id in it, all at once. The lookup of our own id met nodes near us; without this a
        joiner's far buckets hold the few nodes met on the way and fill later with whoever
        it talks to, for every node the holders of the keys everyone walks to (which then
        sit in most routing tables and take most liveness pings). A DHT client skips it: it
        routes its own requests only, and pings every contact it lists."""
        routing = self.routing
        op._refreshing = 1  # held while the walks start (one may end at once)
        if closest is not None and not self.client:
            for index in range(routing.bucket_index(closest) + 1, 160):
                if routing.bucket_size(index) >= routing.k:
                    continue
                target = routing.random_id_in_bucket(index, self.rng.getrandbits(160))
                op._refreshing += 1
                refresh = JoinRefreshOperation(target, now, op)
                self._start_walk(refresh, target, self.config.k, records=False, now=now)
        self._join_refreshed(op)

    def _join_refreshed(self, op: BootstrapOperation) -> None:
        op._refreshing -= 1
        if op._refreshing == 0:
            op.result = len(self.routing)
            self._finish(op)

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
            keep_newest(found, record)
        return confirms

    def _next_page(
        self, op: GetOperation, holder: _Candidate | None, cursor: bytes, now: float
    ) -> None:
        """Page on. ``holder`` just answered a page with next ``cursor``; an empty cursor
        means that holder has been read to the end (one *source* done). None means "start,
        or the previous holder failed": continue with the closest holder that reported more.
        Ends after ``page_sources`` holders were read to the end (so one holder that missed
        a store does not hide a record), when no holder has more, or after ``max_pages``;
        but while the holders read gave fewer publishers than one that answered the walk
        counted, more holders are read, up to twice ``page_sources``."""
        if holder is not None and not cursor:
            op._sources += 1
            op._cursor = b""
            holder = None
            if op._sources >= self.config.page_sources and not self._short_of_count(op):
                self._finish_get(op, now)
                return
        elif cursor > op._cursor:
            op._cursor = cursor
        if holder is None:
            walk = op._walk
            # (A sampled read of a whole key pages through its census's holders.)
            for candidate in walk.shortlist if walk is not None else op._holders:
                if candidate.state == CandidateState.OK and candidate.cursor:
                    holder = candidate
                    break
        if holder is None or op._pages >= self.config.max_pages:
            if op._cursor or holder is not None:
                # More was reported than was read: say so, never truncate silently.
                op.complete = False
            self._finish_get(op, now)
            return
        # Continue from the furthest point known (cursors are the same on every holder).
        start = max(holder.cursor, op._cursor)
        holder.cursor = b""
        op._pages += 1
        if not self._read_from(holder, op, start, Purpose.PAGE, now):
            self._finish_get(op, now)

    def _short_of_count(self, op: GetOperation) -> bool:
        """Whether a full read should read one more holder: the ones read so far gave
        fewer publishers than a holder that answered counted (a put that missed both under
        loss, or a put whose walk ended elsewhere), and fewer than twice ``page_sources``
        were read (a holder that counts records nobody can verify costs that at most)."""
        if op._sources >= 2 * self.config.page_sources:
            return False
        walk = op._walk
        counted = max(
            (
                c.publishers or 0
                for c in (walk.shortlist if walk is not None else op._holders)
                if c.state == CandidateState.OK
            ),
            default=0,
        )
        return len({record.publisher.raw for record in op._found.values()}) < counted

    def _read_from(
        self, holder: _Candidate, op: GetOperation, cursor: bytes, purpose: Purpose, now: float
    ) -> bool:
        """Ask ``holder`` for the records of ``op.key`` from ``cursor`` (a page or a sample
        part); False if it could not be sent. Resent once, as walk queries are: under loss
        a page dropped on the way would otherwise move the read to another holder, or end
        it if no other has more, and a lost part would leave the sample short."""
        args = wire.encode_p2p_find_args(self.node_id, op.key, cursor)
        rpc = self._call(
            holder.address, holder.node_id, wire.P2P_FIND, args, now, op, purpose, holder, retries=1
        )
        return rpc is not None

    def _sample_phase(self, op: GetOperation, now: float) -> None:
        """A sampled read after its walk (or its census's): ask the holders that reported
        publishers for random parts of the key (``wire.sample_cursor``), all at once, each
        part from a holder picked at random (the serving load spreads over the holders).
        Enough parts are asked for about ``op.want`` publishers, all of them if the key
        holds fewer; a census (``want`` = 0) ends here."""
        holders = op._holders
        confirmed = [c for c in holders if c.state == CandidateState.OK]
        count = op.publishers or 0
        if not confirmed or not count or not op.want:
            if count and not op.want:
                op.complete = False
            self._finish_get(op, now)
            return
        if op.want >= count and op._whole:
            # All of it: paged from the start (b"\x00") as a full read is, so that none is
            # left out (a random part may hold more than one reply has room for). Through
            # copies of the holders: their cursors are this read's, and the census may
            # serve other reads too.
            op._holders = []
            for holder in confirmed:
                copy = _Candidate(holder.node_id, holder.address, holder.distance, holder.depth)
                copy.state = CandidateState.OK
                copy.publishers = holder.publishers
                copy.cursor = b"\x00"
                copy.origin = holder
                op._holders.append(copy)
            self._next_page(op, None, b"", now)
            return
        if op._parts:
            # More parts of an earlier read's partition (``DhtNode.sample_more``): ``want``
            # counts parts here.
            parts = op._parts
            wanted = min(op.want, parts - len(op._asked))
        else:
            # About three publishers' records fit in one reply: parts of three on average.
            # A part with more gives a random subset of itself, so a part yields a little
            # less than three (``_PART_YIELD``); every publisher still has the same chance.
            parts = min(max(1, -(-count // _PER_PART)), 255)
            wanted = min(parts, math.ceil(op.want / _PART_YIELD))
            if op.want >= count:
                # Every publisher, not paged (a shard of a sampled find): every part once,
                # of ``_ALL_PER_PART`` publishers on average so that few are fuller than a
                # reply (about 3.5% of the publishers left out, at random).
                parts = wanted = min(max(1, math.ceil(count / _ALL_PER_PART)), 255)
            op._parts = parts
        op.complete = False
        rng = self.rng
        # Not the holders that failed a part of an earlier read sharing this census; only
        # the candidates the census's holders named if there are enough (see
        # ``_PART_NAMED``).
        holders = [c for c in holders if c.state != CandidateState.FAILED]
        named = [c for c in holders if c.named]
        if len(named) >= _PART_NAMED:
            holders = named
        left = [part for part in range(parts) if part not in op._asked]
        for part in rng.sample(left, wanted):
            op._asked.add(part)
            cursor = wire.sample_cursor(op._seed, parts, part)
            if self._read_from(rng.choice(holders), op, cursor, Purpose.SAMPLE, now):
                op._outstanding += 1
        if not op._outstanding:
            self._finish_get(op, now)

    def _sample_reply(self, rpc: _Rpc, raws: Sequence[bytes] | None, now: float) -> None:
        """A part of a sampled read came back (``raws``) or failed (None). A part asked of a
        candidate the census did not hear from that turns out not to hold the key (no
        records, no count) or does not answer, or of a holder that answered before but
        not now (gone since: a census is shared by a directory's finds for a while), is
        asked again of a holder that answered. One that does not answer is not asked
        again by the reads sharing its census."""
        op = rpc.op
        assert isinstance(op, GetOperation)
        candidate = rpc.candidate
        if raws is None and candidate is not None:
            candidate.state = CandidateState.FAILED
        if raws and candidate is not None and candidate.state == CandidateState.NEW:
            # It holds the key: later parts asked again go to it too, not only to the few
            # holders the census heard from.
            candidate.state = CandidateState.OK
        if not raws and candidate is not None and candidate.state != CandidateState.OK:
            confirmed = [c for c in op._holders if c.state == CandidateState.OK]
            cursor = rpc.args[2] if rpc.args is not None else None
            if confirmed and isinstance(cursor, bytes):
                holder = self.rng.choice(confirmed)
                if self._read_from(holder, op, cursor, Purpose.SAMPLE, now):
                    self._counters[Count.SAMPLE_PARTS_REASKED] += 1
                    return
        self._sample_answered(op, raws, now)

    def _sample_answered(self, op: GetOperation, raws: Sequence[bytes] | None, now: float) -> None:
        """One part of a sampled read came back (``raws``), or failed (None)."""
        op._outstanding -= 1
        if raws is None:
            op.complete = False
        else:
            self._collect(op, raws, now)
        if op._outstanding == 0 and not op.done:
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
        if not self.client and (
            (len(holders) < self.config.k and not op.direct)
            or (self.own ^ id_from_bytes(key)) < farthest
        ):
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
                    Purpose.STORE,
                    holder,
                    sent=len(batch),
                    retries=self.config.store_retries,
                ):
                    op._outstanding += 1
                    op._holders[holder.address] = op._holders.get(holder.address, 0) + 1
                    op._ids[holder.address] = holder.node_id
        if op._outstanding == 0:
            self._finish(op)

    def _store_answered(self, op: PutOperation, address: Address, now: float) -> None:
        op._outstanding -= 1
        left = op._holders[address] - 1
        op._holders[address] = left
        if left == 0 and address not in op._refused:
            op.result += 1
            op.stored.append((op._ids[address], address))
        if op._outstanding == 0:
            self._put_done(op)

    def _census_answered(self, op: PutOperation, publishers: int | None) -> None:
        """A census query of a direct census put was answered with ``publishers`` (None:
        not answered, or the holder did not say)."""
        op._outstanding -= 1
        if publishers is not None and (op.publishers is None or publishers > op.publishers):
            op.publishers = publishers
        if op._outstanding == 0:
            self._put_done(op)

    def _put_done(self, op: PutOperation) -> None:
        target = id_from_bytes(op.key)
        op.stored.sort(key=lambda holder: holder[0] ^ target)
        self._finish(op)

    # -- maintenance ------------------------------------------------------------------------------

    def _maintain(self, now: float) -> None:
        self.store.expire(now)
        config = self.config
        for index in self.routing.stale_buckets(now, config.refresh_interval)[:4]:
            target = self.routing.random_id_in_bucket(index, self.rng.getrandbits(160))
            op = FindNodesOperation(target, now)
            self._start_walk(op, target, config.k, records=False, now=now)
