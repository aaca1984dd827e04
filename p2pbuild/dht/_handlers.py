"""Serving requests, within the anti-amplification bound.

Every request method of ``docs/protocol.md`` is answered here. A reply to an address that
has never answered one of our requests is at most ``amplification_factor`` times its
request: replies that can be cut (contact lists, ``p2p_find`` pages) are built within the
bound; the one that cannot (a stock ``find_value`` bundle) waits for the address to answer a
ping, and is dropped (``amplification-limit``) if it does not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from . import _wire as wire
from ._config import UnknownMethodError
from ._handoff import HandoffNode
from ._ids import Address, id_from_bytes
from ._rpc import Count, Purpose
from ._wire import HEADER_SIZE, Request

__all__ = ["HandlerNode"]

# Contacts a first p2p_find page keeps room for, however many records the key holds.
_MIN_CONTACTS = 4
# Bytes around a p2p_find reply's parts: fixarray(3), two array16 headers, a cursor.
_FIND_REPLY_OVERHEAD = 1 + 3 + 3 + 2 + wire.MAX_CURSOR + 5
# An address cookie in a p2p_find reply: bin8 header and its bytes.
_COOKIE_COST = 2 + wire.COOKIE_SIZE


class HandlerNode(HandoffNode):
    """:class:`HandoffNode` that answers requests."""

    __slots__ = ()

    def _reply(
        self,
        msg_id: bytes,
        value: Any,
        address: Address,
        request_size: int,
        verified: bool,
        now: float,
        probe_factor: int = 1,
    ) -> None:
        data = wire.encode_response(msg_id, value, probe_factor=probe_factor)
        config = self.config
        if verified or len(data) <= config.amplification_factor * request_size:
            self._send(data, address)
            return
        # Anti-amplification: the request may carry a spoofed source address. A reply that
        # could not be cut to the bound waits until the address answers a ping (which
        # costs less than the request).
        self._counters[Count.REPLIES_DEFERRED] += 1
        queue = self._deferred.get(address)
        if queue is None:
            if self._deferred_total >= config.max_deferred_replies or not self._call(
                address, None, wire.PING, [self.node_id], now, None, Purpose.VERIFY, retries=1
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
        # A cookie this node gave the address: the sender receives there (as if verified).
        cookie_ok = bool(request.cookie) and self._cookie_valid(address, request.cookie, now)
        probe_factor = 1
        if method == wire.PING:
            sender = wire.parse_ping_args(request)
            value = self.node_id
            probe_factor = self._probe_factor(address, now)
        elif method == wire.FIND_NODE:
            sender, key = wire.parse_find_args(request)
            limit, verified = self._reply_limit(address, sender, request_size, cookie_ok)
            value = self._contacts_for(key, sender, limit - HEADER_SIZE)
        elif method == wire.FIND_VALUE:
            sender, key = wire.parse_find_args(request)
            limit, verified = self._reply_limit(address, sender, request_size, cookie_ok)
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
            largest = wire.CENSUS_REPLY_MAX if wire.is_census_cursor(cursor) else None
            limit, verified = self._reply_limit(
                address, sender, request_size, cookie_ok, largest
            )
            # A requester without a valid cookie gets one, for its next requests here.
            cookie = b"" if cookie_ok else self._cookie(address, now)
            overhead = _FIND_REPLY_OVERHEAD + (_COOKIE_COST if cookie else 0)
            budget = max(limit - HEADER_SIZE - overhead, 0)
            triples: list[wire.ContactTriple] = []
            sample = wire.parse_sample_cursor(cursor)
            publishers = self.store.publishers(key, now)
            count: int | None = publishers
            if sample is not None:
                seed, parts, part = sample
                next_cursor = b""
                if parts:
                    # No contacts and an empty cursor: the cursor's room holds records.
                    budget += wire.MAX_CURSOR
                    records = self.store.sample(key, seed, parts, part, now, budget)
                else:
                    # A census query: the closest contacts and the count only; ``part``,
                    # if not 0, is how many contacts the asker wants at most.
                    records = []
                    triples, among = self._census_contacts(key, sender, part, publishers, budget)
                    if not among:
                        # Records that reached a node beyond the key's k closest (a put
                        # whose walk ended elsewhere) are a part of the key, and a census
                        # that ends at two such nodes takes the count of a part for the
                        # key's (docs/protocol.md, *Sampled find*): no count from here.
                        count = None
            elif cursor:
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
            value = wire.encode_p2p_find_reply(triples, records, next_cursor, count, cookie)
        elif method == wire.P2P_STORE:
            sender, key, raws, stated = wire.parse_p2p_store_args(request)
            value = self._accept(key, raws, now)
            if stated is not None and not request.client:
                # A hand-off: the key's count on its sender (see ``RecordStore.counted``).
                self.store.counted(key, stated, now)
        elif method == wire.STORE:
            sender, key, offered = wire.parse_store_args(request)
            value = self._accept_stock(key, offered, now)
        else:
            raise UnknownMethodError(f"no method {method[:40]!r}")
        self._reply(request.msg_id, value, address, request_size, verified, now, probe_factor)
        sent_to = self._sent_to
        if sent_to is not None and address not in sent_to and not request.client:
            # Unsolicited: nobody behind a NAT receives this. The node is reachable.
            self._sent_to = None
        if request.client:
            # Behind NAT: never a contact (nobody could reach it), never asked to store.
            self._counters[Count.CLIENT_REQUESTS_IN] += 1
        else:
            self._welcome(id_from_bytes(sender), address, now, None)

    def _reply_limit(
        self,
        address: Address,
        sender: bytes,
        request_size: int,
        cookie_ok: bool,
        largest: int | None = None,
    ) -> tuple[int, bool]:
        """``(largest reply, verified)`` for a request of ``request_size`` bytes
        (``cookie_ok``: it carried a valid address cookie). ``largest``: the size the reply
        cannot exceed, if known (a census's); a bound at or above it cuts nothing and is
        not counted in ``replies_bounded``."""
        config = self.config
        if cookie_ok or self._is_verified(address, sender):
            return config.max_datagram, True
        bound = config.amplification_factor * request_size
        if bound >= config.max_datagram:
            return config.max_datagram, False
        if largest is None or bound < largest:
            self._counters[Count.REPLIES_BOUNDED] += 1
        return bound, False

    def _closest(self, key: bytes, sender: bytes, budget: int) -> list[wire.ContactTriple]:
        """The closest contacts to ``key`` but the asker, as many as fit in ``budget``."""
        peers = self.routing.closest(
            id_from_bytes(key), self.config.k, exclude=id_from_bytes(sender)
        )
        triples = [(p.raw_id, p.address[0], p.address[1]) for p in peers]
        return wire.fit_contacts(triples, budget)

    def _census_contacts(
        self, key: bytes, sender: bytes, wanted: int, publishers: int, budget: int
    ) -> tuple[list[wire.ContactTriple], bool]:
        """The contacts of a census answer, and whether this node, holding records of the
        key, is among its k closest as far as it knows (else they reached it from a put
        whose walk ended elsewhere: a part of the key). The contacts: the ``wanted``
        closest to ``key`` (all that fit if 0), or if this node holds the key, knows more
        of its k closest and ``wanted`` is not 0, ``wanted`` of them at random, closest
        first. A sampled read
        asks its parts of the holders its census heard and of the contacts they named
        (likely holders too): holders that named their closest few sent every reader's
        parts to the same few of the key's k holders."""
        if not publishers:
            return self._closest(key, sender, budget)[: wanted or None], True
        target = id_from_bytes(key)
        k = self.config.k
        peers = self.routing.closest(target, k, exclude=id_from_bytes(sender))
        among = len(peers) < k or (self.own ^ target) < (peers[-1].node_id ^ target)
        if wanted and len(peers) > wanted:
            peers = sorted(self.rng.sample(peers, wanted), key=lambda p: p.node_id ^ target)
        triples = [(p.raw_id, p.address[0], p.address[1]) for p in peers]
        return wire.fit_contacts(triples, budget), among

    def _contacts_for(self, key: bytes, sender: bytes, budget: int) -> list[list[Any]]:
        return wire.encode_contacts(self._closest(key, sender, budget))

    def _accept(self, key: bytes, raws: Sequence[bytes], now: float) -> list[str]:
        codes, errors = self.store.offer_many(key, raws, now)
        for exc in errors:
            self._rejected[exc.code] = self._rejected.get(exc.code, 0) + 1
        self._counters[Count.RECORDS_ACCEPTED] += codes.count("ok")
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

