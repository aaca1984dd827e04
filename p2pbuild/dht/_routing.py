"""The Kademlia routing table: k-buckets by XOR distance, with per-contact round-trip times.

Bucket ``b`` holds contacts whose distance to us has its highest set bit at ``b`` (so bucket
159 covers half the id space and bucket 0 a single id). Buckets are created lazily: a node in
a network of N others has about ``log2(N / k)`` full buckets and a few sparse ones, so the
table is a small dict, not 160 preallocated lists.

Eviction follows the paper: a full bucket never drops its least-recently-seen contact just
because a newcomer showed up. The newcomer waits in a small replacement cache, and the
oldest contact is replaced only once a ping (or any other RPC) to it fails. Liveness follows
BitTorrent's BEP 5: whenever a bucket is touched (a contact in it heard from, a newcomer for
it), its least-recently-seen contact is handed to the core to ping if it has not been heard
from for ``fresh_for`` seconds (one ping per bucket at a time); :meth:`RoutingTable.silent`
lists every contact silent for longer, for the core's periodic check (whose period the core
shortens under churn: ``docs/protocol.md``, *Liveness*); a contact with a liveness ping in
flight (:meth:`RoutingTable.probe`) is handed out by neither. A contact heard from
recently is never pinged (section 4.1 of the paper: probing waits until there is reason to).
A contact that fails ``max_failures`` RPCs in a row, or one failure the core calls
*confirmed* (a ping or ``find_node`` unanswered twice), is removed even without a
replacement. A bucket is stale (due for a refresh lookup) only when no lookup went through
it, no contact was added to it and none answered us for the refresh interval (BEP 5's
"last changed").

Against bucket poisoning (one machine claiming many ids to fill our buckets, see
``docs/threat-model.md``): an address ``(host, port)`` holds at most one id in the table, and
a newcomer cannot take an address another id holds unless it proved it is there by
answering one of our requests (the table finds an address's owner by scanning its few
hundred contacts when a newcomer arrives, rather than keeping a dict of every address); and
with ``max_per_host``, a bucket (with its replacement
cache) holds at most that many contacts of one IP host. Loopback hosts are exempt (a test
network or a single machine runs all its nodes on 127.0.0.1).

Each contact keeps a smoothed round-trip time and its variance (RFC 6298), from which the
core derives that contact's RPC timeout; the table also keeps the same estimate for all
contacts together, used for contacts never measured.
"""

from __future__ import annotations

from collections.abc import Iterator

from ._ids import Address

__all__ = ["Peer", "RoutingTable", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a canonical IP literal) is a loopback address."""
    return host.startswith("127.") or host == "::1"


# Many nodes in one process (tests, benchmarks) know the same contacts: share one id int,
# one id bytes and one address tuple per contact between all their tables. Bounded, and
# simply cleared when full, so hostile ids cannot grow it without limit.
_INTERNED: dict[int, tuple[int, bytes]] = {}
_ADDRESSES: dict[Address, Address] = {}
_MAX_INTERNED = 1 << 16


def _intern(node_id: int, address: Address) -> tuple[int, bytes, Address]:
    entry = _INTERNED.get(node_id)
    if entry is None:
        if len(_INTERNED) >= _MAX_INTERNED:
            _INTERNED.clear()
        entry = _INTERNED[node_id] = (node_id, node_id.to_bytes(20, "big"))
    return entry[0], entry[1], intern_address(address)


# The whole second of the last "heard from" time: the contacts heard from within one second
# share one int object instead of a float each.
_SECOND: list[int] = [0]


def _second(now: float) -> int:
    whole = int(now)
    shared = _SECOND[0]
    if whole != shared:
        _SECOND[0] = shared = whole
    return shared


def intern_address(address: Address) -> Address:
    """The process-wide shared copy of ``address`` (bounded; cleared when full)."""
    shared = _ADDRESSES.get(address)
    if shared is None:
        if len(_ADDRESSES) >= _MAX_INTERNED:
            _ADDRESSES.clear()
        shared = _ADDRESSES[address] = address
    return shared


class Peer:
    """One contact in the table. Mutable, slotted: a table holds a few hundred of these."""

    __slots__ = ("address", "failures", "node_id", "probe_factor", "rttvar", "seen_at", "srtt")

    def __init__(self, node_id: int, address: Address, now: float = 0.0) -> None:
        self.node_id, _, self.address = _intern(node_id, address)
        #: Smoothed RTT and its mean deviation in seconds; 0.0 until first measured (a
        #: measured contact answered one of our requests at its address).
        self.srtt = 0.0
        self.rttvar = 0.0
        #: RPCs in a row that timed out.
        self.failures = 0
        #: When it was last heard from (whole seconds).
        self.seen_at = _second(now)
        #: How many times the probe period it asked to stay silent before a liveness ping
        #: (its last ping answer's ``probe_factor``).
        self.probe_factor = 1

    @property
    def raw_id(self) -> bytes:
        """The 20-byte wire form of the id (shared for the process, not kept per contact)."""
        entry = _INTERNED.get(self.node_id)
        return entry[1] if entry is not None else self.node_id.to_bytes(20, "big")

    def __repr__(self) -> str:
        return f"Peer({self.node_id:040x}, {self.address})"


class _Bucket:
    __slots__ = ("changed_at", "peers", "pinging", "replacements")

    def __init__(self, now: float) -> None:
        #: Least recently seen first.
        self.peers: list[Peer] = []
        #: Newcomers waiting for a place, newest last (created when the bucket fills).
        self.replacements: list[Peer] = _NO_PEERS
        #: Id of the contact being pinged to check it is alive, if any.
        self.pinging: int | None = None
        #: When a lookup last went through the bucket, a contact was added to it, or a
        #: contact in it answered one of our requests (BEP 5's "last changed").
        self.changed_at = _second(now)


#: The shared empty replacement cache of buckets that never filled (never mutated).
_NO_PEERS: list[Peer] = []


# Round-trip estimates are kept to 10 microseconds and interned for the process: contacts
# with the same estimate share one float object instead of two each (a node holds a few
# hundred contacts, a test or benchmark process a thousand nodes). Bounded.
_TIMES: dict[float, float] = {}


_MAX_TIMES = 4096


def _shared_time(value: float) -> float:
    value = round(value, 5)
    shared = _TIMES.get(value)
    if shared is None:
        if len(_TIMES) >= _MAX_TIMES:
            return value  # full: not shared (a cleared table would let every value in)
        shared = _TIMES[value] = value
    return shared


def update_rtt(peer: Peer, rtt: float) -> None:
    """Fold one sample into ``peer``'s estimate (RFC 6298 with alpha 1/8, beta 1/4)."""
    rtt = max(rtt, 1e-5)  # a zero estimate means "never measured"
    if peer.srtt == 0.0:
        peer.srtt = _shared_time(rtt)
        peer.rttvar = _shared_time(rtt / 2)
    else:
        peer.rttvar = _shared_time(0.75 * peer.rttvar + 0.25 * abs(peer.srtt - rtt))
        peer.srtt = _shared_time(0.875 * peer.srtt + 0.125 * rtt)


class RoutingTable:
    """The contacts a node knows, bucketed by distance from ``own_id``.

    Every bound is a parameter: ``k`` contacts per bucket, ``replacements`` cached
    newcomers per bucket, ``max_failures`` consecutive timeouts before removal.
    """

    __slots__ = (
        "_buckets",
        "_size",
        "added",
        "fresh_for",
        "k",
        "max_failures",
        "max_per_host",
        "overall",
        "own_id",
        "probing",
        "refused",
        "replacements",
    )

    def __init__(
        self,
        own_id: int,
        *,
        k: int,
        replacements: int,
        max_failures: int,
        now: float,
        max_per_host: int = 0,
        fresh_for: float = 60.0,
    ) -> None:
        self.own_id = own_id
        self.k = k
        self.replacements = replacements
        self.max_failures = max_failures
        #: Contacts of one IP host per bucket (peers and replacements); 0: no limit.
        self.max_per_host = max_per_host
        #: An oldest contact heard from within this many seconds is not pinged to make
        #: room for a newcomer.
        self.fresh_for = fresh_for
        self._buckets: dict[int, _Bucket] = {}
        #: How many contacts the buckets hold (their replacement caches apart).
        self._size = 0
        #: Set by :meth:`seen`: whether its call added a new contact to the table.
        self.added = False
        #: Newcomers refused, by reason: ``address-in-use``, ``host-limit``.
        self.refused: dict[str, int] = {}
        #: The RTT estimate over all contacts, for contacts never measured.
        self.overall = Peer(own_id, ("", 0))
        #: Ids of the contacts a liveness ping is in flight to (:meth:`probe`): neither a
        #: touched bucket nor the periodic check pings them again meanwhile.
        self.probing: set[int] = set()

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Peer]:
        for index in sorted(self._buckets):
            yield from self._buckets[index].peers

    def bucket_index(self, node_id: int) -> int:
        return (node_id ^ self.own_id).bit_length() - 1

    def bucket_size(self, index: int) -> int:
        """How many contacts bucket ``index`` holds (its replacement cache apart)."""
        bucket = self._buckets.get(index)
        return 0 if bucket is None else len(bucket.peers)

    def get(self, node_id: int) -> Peer | None:
        bucket = self._buckets.get(self.bucket_index(node_id))
        if bucket is not None:
            for peer in bucket.peers:
                if peer.node_id == node_id:
                    return peer
        return None

    def seen(
        self, node_id: int, address: Address, now: float, rtt: float | None = None
    ) -> Peer | None:
        """Note that ``node_id`` at ``address`` was just heard from.

        Returns a contact the caller must ping to decide an eviction (the bucket is full and
        a newcomer is waiting), or None. A known contact keeps its first address: a datagram
        claiming a known id from elsewhere does not move it (replies to pings do, through
        :meth:`failed` and re-adding).
        """
        self.added = False
        if node_id == self.own_id:
            return None
        index = self.bucket_index(node_id)
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _Bucket(now)
        peers = bucket.peers
        for position, peer in enumerate(peers):
            if peer.node_id == node_id:
                if peer.address != address:
                    return None
                peer.failures = 0
                peer.seen_at = _second(now)
                if rtt is not None:
                    update_rtt(peer, rtt)
                    update_rtt(self.overall, rtt)
                    bucket.changed_at = peer.seen_at
                if position != len(peers) - 1:
                    del peers[position]
                    peers.append(peer)
                return self._check_oldest(bucket, now)
        full = len(peers) >= self.k
        # A newcomer for a full bucket only waits in its cache; its address is checked when
        # it is promoted (:meth:`failed`).
        owner = None if full else self._owner(address)
        if owner is not None:
            if rtt is None:
                # Anyone can claim any id in a request; only an answer to our request
                # proves who is at the address.
                self._refuse("address-in-use")
                return None
            self._remove(owner)
        if self.max_per_host and not is_loopback(address[0]):
            host = address[0]
            same = sum(1 for p in peers if p.address[0] == host) + sum(
                1 for p in bucket.replacements if p.address[0] == host and p.node_id != node_id
            )
            if same >= self.max_per_host:
                self._refuse("host-limit")
                return None
        if rtt is not None:
            update_rtt(self.overall, rtt)
        if not full:
            peer = Peer(node_id, address, now)
            if rtt is not None:
                update_rtt(peer, rtt)
            peers.append(peer)
            self._size += 1
            self.added = True
            bucket.changed_at = peer.seen_at
            return self._check_oldest(bucket, now)
        # Full: cache the newcomer; have the oldest contact pinged (once at a time) only if
        # it has not been heard from lately.
        cache = bucket.replacements
        if cache is _NO_PEERS:
            cache = bucket.replacements = []
        for position, waiting in enumerate(cache):
            if waiting.node_id == node_id:
                del cache[position]
                break
        newcomer = Peer(node_id, address, now)
        if rtt is not None:
            update_rtt(newcomer, rtt)
        cache.append(newcomer)
        if len(cache) > self.replacements:
            del cache[0]
        return self._check_oldest(bucket, now)

    def _check_oldest(self, bucket: _Bucket, now: float, age: float = 0.0) -> Peer | None:
        """The bucket's least-recently-seen contact, to be pinged, if it has been silent for
        ``age`` (default ``fresh_for``) seconds times its ``probe_factor`` and no ping of
        the bucket is in flight."""
        peers = bucket.peers
        if bucket.pinging is not None or not peers:
            return None
        oldest = peers[0]
        if (
            now - oldest.seen_at < (age or self.fresh_for) * oldest.probe_factor
            or oldest.node_id in self.probing
        ):
            return None
        bucket.pinging = oldest.node_id
        return oldest

    def _owner(self, address: Address) -> int | None:
        """The id of the contact at ``address``, if any (a scan: rare, and no dict kept)."""
        for bucket in self._buckets.values():
            for peer in bucket.peers:
                if peer.address == address:
                    return peer.node_id
        return None

    def peer_at(self, node_id: int, address: Address) -> Peer | None:
        """The contact ``node_id`` if the table holds it at ``address``."""
        peer = self.get(node_id)
        return peer if peer is not None and peer.address == address else None

    def holds_address(self, address: Address) -> Peer | None:
        """The contact at ``address``, if any (a scan)."""
        for bucket in self._buckets.values():
            for peer in bucket.peers:
                if peer.address == address:
                    return peer
        return None

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _remove(self, node_id: int) -> None:
        """Forget the contact ``node_id`` (its address now answers as another id)."""
        bucket = self._buckets.get(self.bucket_index(node_id))
        if bucket is None:
            return
        for position, peer in enumerate(bucket.peers):
            if peer.node_id == node_id:
                del bucket.peers[position]
                self._size -= 1
                if bucket.pinging == node_id:
                    bucket.pinging = None
                self.probing.discard(node_id)
                return

    def probe(self, node_id: int) -> None:
        """A liveness ping to ``node_id`` was sent (until :meth:`ping_answered` or
        :meth:`failed`, it is not handed out to be pinged again)."""
        self.probing.add(node_id)

    def ping_answered(self, node_id: int) -> None:
        """The liveness ping to ``node_id`` was answered (it was also :meth:`seen`), or its
        answer was unusable, or it could not be sent."""
        self.probing.discard(node_id)
        bucket = self._buckets.get(self.bucket_index(node_id))
        if bucket is not None and bucket.pinging == node_id:
            bucket.pinging = None

    def failed(self, node_id: int, *, confirmed: bool = False) -> bool:
        """An RPC to ``node_id`` timed out. Returns True if the contact was removed.

        It is replaced by the newest cached newcomer if there is one (the paper's rule: the
        old contact failed), or removed after ``max_failures`` consecutive failures, or at
        once if the failure is ``confirmed`` (a request every node answers went unanswered
        twice: sent and resent).
        """
        self.probing.discard(node_id)
        bucket = self._buckets.get(self.bucket_index(node_id))
        if bucket is None:
            return False
        if bucket.pinging == node_id:
            bucket.pinging = None
        for position, peer in enumerate(bucket.peers):
            if peer.node_id == node_id:
                peer.failures += 1
                if bucket.replacements:
                    del bucket.peers[position]
                    newcomer = bucket.replacements.pop()
                    if self._owner(newcomer.address) is None:
                        bucket.peers.append(newcomer)
                    else:
                        self._size -= 1
                    return True
                if confirmed or peer.failures >= self.max_failures:
                    del bucket.peers[position]
                    self._size -= 1
                    return True
                return False
        for position, waiting in enumerate(bucket.replacements):
            if waiting.node_id == node_id:
                del bucket.replacements[position]
                break
        return False

    def closest(self, target: int, count: int, exclude: int | None = None) -> list[Peer]:
        """Up to ``count`` contacts closest to ``target`` by XOR, closest first.

        Contacts with failures come after those without, so a lookup starts from contacts
        that answered last time.
        """
        # Contacts in bucket i (i = top bit of own ^ target) are closer to target than any
        # other; buckets below i come next (all at distance [2^i, 2^(i+1))), then buckets
        # above i in increasing order. Collect just enough buckets, then sort.
        index = (target ^ self.own_id).bit_length() - 1
        buckets = self._buckets
        chosen: list[Peer] = []
        if index >= 0 and index in buckets:
            chosen.extend(buckets[index].peers)
        if len(chosen) < count:
            for lower in sorted(b for b in buckets if b < index):
                chosen.extend(buckets[lower].peers)
        if len(chosen) < count:
            for higher in sorted(b for b in buckets if b > index):
                chosen.extend(buckets[higher].peers)
                if len(chosen) >= count:
                    break
        if exclude is not None:
            chosen = [peer for peer in chosen if peer.node_id != exclude]
        chosen.sort(key=lambda peer: (peer.failures > 0, peer.node_id ^ target))
        return chosen[:count]

    def touch(self, target: int, now: float) -> None:
        """A lookup for ``target`` ran: its bucket needs no refresh for a while."""
        bucket = self._buckets.get(self.bucket_index(target))
        if bucket is not None:
            bucket.changed_at = _second(now)

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Indexes of buckets unchanged for ``interval`` seconds: no lookup went through
        them, no contact was added and none answered a request of ours."""
        return [
            index for index, bucket in self._buckets.items() if bucket.changed_at + interval <= now
        ]

    def silent(self, now: float, age: float, longest: float | None = None) -> list[Peer]:
        """The contacts not heard from for ``age`` seconds (times their ``probe_factor``,
        up to ``longest`` if that is longer than ``age``) and not being pinged, the
        longest silent first (the caller pings them; one that answers is heard from
        again)."""
        probing = self.probing
        cap = max(age, longest if longest is not None else age)
        quiet = [
            peer
            for bucket in self._buckets.values()
            for peer in bucket.peers
            if now - peer.seen_at >= min(age * peer.probe_factor, cap)
            and bucket.pinging != peer.node_id
            and peer.node_id not in probing
        ]
        quiet.sort(key=lambda peer: peer.seen_at)
        return quiet

    def random_id_in_bucket(self, index: int, bits: int) -> int:
        """An id in bucket ``index``, from ``bits`` random bits supplied by the caller."""
        low = bits & ((1 << index) - 1) if index > 0 else 0
        return self.own_id ^ ((1 << index) | low)
