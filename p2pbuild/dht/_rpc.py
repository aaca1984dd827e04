"""The node's state and its RPC table: requests sent and awaited, their timeouts and stalls.

:class:`RpcNode` holds every field of a DHT node (the request handlers, the hand-off, the
lookup walks and the public interface are layered on it as subclasses, one module per
concept: ``_handoff.py``, ``_handlers.py``, ``_lookups.py``, ``_protocol.py``) and sends
requests: :meth:`RpcNode._call` registers an RPC with its deadline (smoothed RTT + 4 x
RTT variance, RFC 6298, clamped) and, for a walk query, a shorter *stall* time after which
the walk stops waiting for it.
"""

from __future__ import annotations

import array
import enum
import hashlib
import heapq
import hmac
import random
from collections import OrderedDict
from typing import Any

from .._errors import LocalError
from . import _wire as wire
from ._config import DhtConfig
from ._ids import Address, id_from_bytes
from ._operations import Operation, _Candidate
from ._routing import Peer, RoutingTable
from ._store import SHARED_CACHE, RecordCache, RecordStore

__all__ = ["Count", "Purpose", "RpcNode", "TimerKind"]


class TimerKind(enum.IntEnum):
    """What an RPC's timer entry fires."""

    #: A walk stops waiting for the query (it no longer counts against ``alpha``).
    STALL = 0
    #: The RPC timed out: resent if still wanted, else a failure of its contact.
    DEADLINE = 1


class Purpose(enum.IntEnum):
    """What an RPC is for, beyond its method."""

    WALK = 0
    PAGE = 1
    STORE = 2
    BOOTSTRAP = 3
    #: A ping of a bucket's least-recently-seen contact, silent for a while: is it alive?
    LIVENESS = 4
    VERIFY = 5
    HANDOFF = 6
    HANDOFF_PING = 7
    SAMPLE = 8
    #: A census query of a direct census put (``DhtNode.put``): how many publishers?
    CENSUS = 9


class Count(enum.IntEnum):
    """Indexes of a node's counters (an ``array``: no int object per counter)."""

    DATAGRAMS_IN = 0
    DATAGRAMS_OUT = 1
    BYTES_IN = 2
    BYTES_OUT = 3
    REQUESTS_IN = 4
    RESPONSES_IN = 5
    RPCS_SENT = 6
    RPCS_TIMED_OUT = 7
    LOOKUPS = 8
    LOOKUP_ROUNDS = 9
    LOOKUP_RPCS = 10
    RECORDS_ACCEPTED = 11
    REPLIES_DEFERRED = 12
    REPLIES_BOUNDED = 13
    HANDOFF_STORES = 14
    CLIENT_REQUESTS_IN = 15
    SAMPLE_PARTS_REASKED = 16
    DIRECT_PUTS = 17
    SAMPLE_MORE = 18


# Methods whose requests we pad, so that any reply stays within the amplification bound.
_PADDED = frozenset((wire.FIND_NODE, wire.FIND_VALUE, wire.P2P_FIND))
# Address cookies (``docs/protocol.md``, *Address cookies*): a server's key changes every
# ``COOKIE_ROTATION`` seconds and cookies made with the current or the previous key are
# valid, so a cookie is good for at least that long; a requester uses one for half of it.
COOKIE_ROTATION = 3600.0
_COOKIE_USE_FOR = COOKIE_ROTATION / 2
# Cookies a requester remembers (least recently received forgotten first).
_COOKIES_REMEMBERED = 1024
# Bytes around the records of a p2p_store request: fixarray(2), "p2p_store", fixarray(3),
# two 20-byte ids, array16 header.
STORE_OVERHEAD = 1 + 1 + len(wire.P2P_STORE) + 1 + 2 * (2 + 20) + 3
# Addresses an ``auto`` node remembers having sent to (a request from one of them may be a
# NAT letting a reply-like datagram through, so it proves nothing).
_SENT_TO_REMEMBERED = 1024


class _Rpc:
    __slots__ = (
        "address",
        "args",
        "candidate",
        "method",
        "op",
        "peer_id",
        "purpose",
        "resent",
        "retries",
        "sent",
        "sent_at",
    )

    def __init__(
        self,
        method: str,
        address: Address,
        peer_id: int | None,
        purpose: Purpose,
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
        #: Arguments and resends left, for RPCs worth repeating once lost (stores); a resend
        #: keeps its arguments with none left.
        self.args: list[Any] | None = None
        self.retries = 0
        #: Whether this is a resend (the first attempt went unanswered).
        self.resent = False




class RpcNode:
    """One Kademlia node's state and RPC table; :class:`~p2pbuild.dht.DhtNode` is the
    complete node. Not thread-safe; one driver calls it.

    ``rng`` supplies message ids and refresh targets; ``cache`` is the verified-record cache
    (share one between nodes of a process).
    """

    __slots__ = (
        "_census_pad",
        "_cookie_keys",
        "_cookie_rotate_at",
        "_cookies",
        "_counters",
        "_deaths",
        "_deferred",
        "_deferred_total",
        "_dropped",
        "_finished",
        "_next_liveness",
        "_next_maintenance",
        "_out",
        "_pad_to",
        "_pending",
        "_pingers",
        "_pingers_pruned_at",
        "_probe_failures",
        "_probe_silence",
        "_probed_at",
        "_reachable_by",
        "_rejected",
        "_sent_to",
        "_silence_total",
        "_timers",
        "_verified",
        "client",
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
        self._timers: list[tuple[float, bytes, TimerKind]] = []
        self._finished: list[Operation] = []
        self._next_maintenance = now + config.maintenance_interval
        #: Liveness: when silent contacts are next checked; and, decayed over
        #: ``_PROBE_MEMORY`` seconds, the silence (seconds) of the contacts pinged to see
        #: whether they are alive and how many of them were dead, as of ``_probed_at``.
        self._next_liveness = now + config.liveness_interval / 5
        self._probe_silence = 0.0
        self._probe_failures = 0.0
        self._probed_at = now
        #: The same, not decayed: all liveness pings' silence; and when each of the last
        #: ``_DEATHS_REMEMBERED + 1`` pings that found their contact dead did, with the
        #: silence's sum then.
        self._silence_total = 0.0
        self._deaths: list[tuple[float, float]] = []
        #: Who pinged us lately (address: when, whole seconds), within
        #: ``liveness_interval`` as of the last prune (created on first use).
        self._pingers: dict[Address, int] | None = None
        self._pingers_pruned_at = now
        # Indexed by ``Count`` (an array: no int object per counter).
        self._counters = array.array("q", bytes(8 * len(Count)))
        self._dropped: dict[str, int] = {}
        #: Addresses that answered a verification ping but are not contacts, LRU order
        #: (created on first use: p2pbuild requesters pad, so only stock ones need it).
        self._verified: OrderedDict[Address, None] | None = None
        #: Size requests are padded to (see ``amplification_factor``).
        self._pad_to = -(-config.max_datagram // config.amplification_factor)
        #: Size census queries are padded to (their answers are small, ``CENSUS_REPLY_MAX``).
        self._census_pad = min(
            -(-wire.CENSUS_REPLY_MAX // config.amplification_factor), self._pad_to
        )
        #: Address cookies: the keys this node makes them with (current, previous) and when
        #: the current one retires; the cookies servers gave us, with when, LRU order
        #: (created on first use).
        self._cookie_keys: tuple[bytes, bytes] | None = None
        self._cookie_rotate_at = 0.0
        self._cookies: OrderedDict[Address, tuple[bytes, float]] | None = None
        #: Replies held for addresses not verified yet, and how many in total.
        self._deferred: dict[Address, list[bytes]] = {}
        self._deferred_total = 0
        self._rejected: dict[str, int] = {}
        #: Acting as a DHT client (behind NAT): requests carry ``CLIENT_FLAG``.
        self.client = config.reachability == "client"
        #: ``auto`` reachability, undecided: addresses sent to lately (an unsolicited
        #: request comes from elsewhere), and when the node turns client if none came.
        self._sent_to: OrderedDict[Address, None] | None = None
        self._reachable_by = 0.0
        if config.reachability == "auto":
            self._sent_to = OrderedDict()
            self._reachable_by = now + config.reachability_timeout

    def verified(self, address: Address) -> bool:
        """Whether ``address`` has answered a request of ours (it receives there)."""
        peer = self.routing.holds_address(address)
        if peer is not None and peer.srtt:
            return True
        return self._verified is not None and address in self._verified

    def _cookie(self, address: Address, now: float, key: int = 0) -> bytes:
        """The address cookie of ``address`` made with the current key (``key`` 0) or the
        previous one (1): a keyed hash of the address, so only a host that received a reply
        there knows it."""
        keys = self._cookie_keys
        if keys is None or now >= self._cookie_rotate_at:
            fresh = self.rng.randbytes(16)
            keys = self._cookie_keys = (fresh, keys[0] if keys is not None else fresh)
            self._cookie_rotate_at = now + COOKIE_ROTATION
        host, port = address
        return hashlib.blake2b(
            f"{host}|{port}".encode(),
            key=keys[key],
            digest_size=wire.COOKIE_SIZE,
        ).digest()

    def _cookie_valid(self, address: Address, cookie: bytes, now: float) -> bool:
        """Whether ``cookie`` is one this node gave ``address`` within the last rotation
        or two."""
        return hmac.compare_digest(cookie, self._cookie(address, now)) or hmac.compare_digest(
            cookie, self._cookie(address, now, 1)
        )

    def _keep_cookie(self, address: Address, cookie: bytes, now: float) -> None:
        """Remember the cookie a server gave us (its reply came to where we receive)."""
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = OrderedDict()
        cookies[address] = (cookie, now)
        cookies.move_to_end(address)
        if len(cookies) > _COOKIES_REMEMBERED:
            cookies.popitem(last=False)

    def _is_verified(self, address: Address, sender: bytes) -> bool:
        """:meth:`verified`, fast: the claimed sender is a contact at ``address`` that
        answered us (a spoofer naming it only gets replies sent to where it receives)."""
        peer = self.routing.peer_at(int.from_bytes(sender, "big"), address)
        if peer is not None and peer.srtt:
            return True
        return self._verified is not None and address in self._verified

    # -- sending ----------------------------------------------------------------------------------

    def _send(self, data: bytes, address: Address) -> None:
        if len(data) > self.config.max_datagram:
            raise LocalError(f"bug: a {len(data)}-byte datagram exceeds max_datagram")
        self._out.append((data, address))
        self._counters[Count.DATAGRAMS_OUT] += 1
        self._counters[Count.BYTES_OUT] += len(data)

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
        purpose: Purpose,
        candidate: _Candidate | None = None,
        sent: int = 0,
        retries: int = 0,
    ) -> _Rpc | None:
        """Send a request; returns it, or None if it could not be sent (pending table
        full). An RPC with ``retries`` is sent again that many times if it times out.
        Requests whose answers may be big are padded unless the address gave us a cookie:
        to a third of a datagram, a census query to a third of a census answer."""
        if len(self._pending) >= self.config.max_pending_rpcs:
            self._dropped["pending-full"] = self._dropped.get("pending-full", 0) + 1
            return None
        msg_id = self.rng.randbytes(wire.MSG_ID_SIZE)
        pad = 0
        if method in _PADDED:
            pad = self._pad_to
            if method == wire.P2P_FIND and wire.is_census_cursor(args[2]):
                pad = self._census_pad
        cookie = b""
        if pad and self._cookies is not None:
            held = self._cookies.get(address)
            if held is not None and now - held[1] < _COOKIE_USE_FOR:
                # The server knows we receive here: no padding needed.
                cookie, pad = held[0], 0
        data = wire.encode_request(
            msg_id, method, args, pad_to=pad, client=self.client, cookie=cookie
        )
        self._send(data, address)
        sent_to = self._sent_to
        if sent_to is not None:
            sent_to[address] = None
            sent_to.move_to_end(address)
            if len(sent_to) > _SENT_TO_REMEMBERED:
                sent_to.popitem(last=False)
        self._counters[Count.RPCS_SENT] += 1
        if op is not None:
            op.rpcs += 1
            op.bytes_out += len(data)
        rpc = self._pending[msg_id] = _Rpc(
            method, address, peer_id, purpose, op, candidate, sent, now
        )
        if retries:
            rpc.args = args
            rpc.retries = retries
        peer = self.routing.get(peer_id) if peer_id is not None else None
        timeout, stall = self._timeouts(peer)
        if purpose == Purpose.LIVENESS:
            # Its verdict removes the contact, and nothing waits on it: it waits as long as
            # any RPC may (a round trip far above the contact's estimate, or the average's
            # for a contact never measured, is not death).
            timeout = self.config.max_rpc_timeout
        heapq.heappush(self._timers, (now + timeout, msg_id, TimerKind.DEADLINE))
        if purpose == Purpose.WALK and stall < timeout:
            heapq.heappush(self._timers, (now + stall, msg_id, TimerKind.STALL))
        return rpc

    def _resend(self, rpc: _Rpc, now: float) -> bool:
        """Send a timed-out RPC again (a lost store leaves a hole in a holder's pages; a lost
        bootstrap ping leaves a node alone). Returns False if it could not be sent."""
        assert rpc.args is not None
        again = self._call(
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
        if again is None:
            return False
        again.resent = True
        again.args = rpc.args  # (what was asked, for its failure: a part asked again)
        return True

