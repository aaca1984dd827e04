"""Hand-off of records to nodes that join closer to a key than its holders (Kademlia paper,
section 2.5), and the welcome every heard-from node gets (routing table, liveness ping of
its bucket's least-recently-seen contact).

A newcomer that only sent us a request (its source address may be spoofed) is pinged first;
the records follow its answer, so a hand-off is never an amplifier. At most
``DhtConfig.handoff_datagrams`` ``p2p_store`` datagrams go to one newcomer.
"""

from __future__ import annotations

import math

from . import _wire as wire
from ._ids import Address
from ._routing import Peer
from ._rpc import STORE_OVERHEAD, Count, Purpose, RpcNode
from ._wire import HEADER_SIZE

__all__ = ["HandoffNode"]

# A holder hands a key's records to a newcomer only if fewer contacts than this are closer.
_HANDOFF_SENDERS = 3
# Bytes of a hand-off's publisher count (a msgpack uint32 at most).
_COUNT_SIZE = 5
# A node pinged by more than this many times as many nodes as its routing table lists (or
# k) asks its pingers for a probe factor: the mean public node of a farm with a third of
# its nodes behind NAT is pinged by about 1.4 times its table.
_PROBE_SHARE = 2.0
# Pingers a node remembers at most (each costs a dict entry; spoofed pings from many
# addresses only make it ask for a larger factor, whose effect is bounded: see
# ``_check_liveness``).
_PINGERS_REMEMBERED = 65536
# Liveness pings are remembered for about this long (seconds; an exponential decay) when
# the probe period is chosen from the share of them that found their contact dead.
_PROBE_MEMORY = 60.0
# ... and, apart, over the pings since the last this many deaths they found (a window as
# long as the node's own rate of deaths needs: it holds through the gaps between rare
# deaths), until the node has gone this many times the window's mean gap between two
# deaths without one (a gap that long comes once in 20 while the rate holds: the churn
# has ended, or slowed).
_DEATHS_REMEMBERED = 4
_DEATHS_GAPS = 3.0


class HandoffNode(RpcNode):
    """:class:`RpcNode` with the welcome of new contacts and the hand-off of records."""

    __slots__ = ()

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
                        Purpose.HANDOFF_PING,
                    )
        if to_ping is not None:
            self._check_alive(to_ping, now)

    def _check_alive(self, peer: Peer, now: float) -> None:
        """Ping ``peer``, a contact that has been silent (a bucket's least-recently-seen
        one, its bucket then marked as pinging, or one silent for the probe period). Resent
        once; unanswered twice, it is replaced from the bucket's cache or removed
        (``RoutingTable.failed``), and counted as a probe that found its contact dead."""
        if self._call(
            peer.address, peer.node_id, wire.PING, [self.node_id], now, None, Purpose.LIVENESS,
            retries=1,
        ):
            self.routing.probe(peer.node_id)
            self._decay_probes(now)
            silence = max(now - peer.seen_at, 0.0)
            self._probe_silence += silence
            self._silence_total += silence
        else:
            self.routing.ping_answered(peer.node_id)

    def _check_liveness(self, now: float) -> None:
        """Ping every contact silent for the probe period (times the probe factor it asked
        for, up to ``eviction_ping_after`` if that is longer: under churn, when the period
        is near its floor and dead contacts cost lookups their timeouts, a node listed
        everywhere is found dead within a minute); check again in a fifth of the period."""
        period = self.probe_period(now)
        longest = max(period, self.config.eviction_ping_after)
        for peer in self.routing.silent(now, period, longest):
            self._check_alive(peer, now)
        self._next_liveness = now + period / 5

    def _probe_factor(self, address: Address, now: float) -> int:
        """Note a ping from ``address``; the probe factor to answer it with. Kademlia keeps
        the oldest contacts, so the nodes that joined first end up in many more routing
        tables than the mean, and each table pings its silent contacts: such a node
        counts the nodes that pinged it within ``liveness_interval`` and, when they
        are more than ``_PROBE_SHARE`` times the contacts a table holds (its own), asks
        them to wait that many times longer (the ratio, rounded), as a BOINC scheduler's
        reply asks its clients to wait before the next request."""
        pingers = self._pingers
        window = self.config.liveness_interval
        if pingers is None:
            pingers = self._pingers = {}
        elif now - self._pingers_pruned_at >= window / 4:
            oldest = now - window
            pingers = self._pingers = {a: at for a, at in pingers.items() if at >= oldest}
            self._pingers_pruned_at = now
        if len(pingers) < _PINGERS_REMEMBERED or address in pingers:
            pingers[address] = int(now)
        fair = _PROBE_SHARE * max(len(self.routing), self.config.k)
        if len(pingers) < 1.5 * fair:
            return 1
        return min(round(len(pingers) / fair), wire.MAX_PROBE_FACTOR)

    def _probe_failed(self, now: float) -> None:
        """A liveness ping went unanswered twice: its contact was dead. The probe period
        may shorten: the next check comes no later than a fifth of it from now."""
        self._decay_probes(now)
        self._probe_failures += 1.0
        deaths = self._deaths
        deaths.append((now, self._silence_total))
        if len(deaths) > _DEATHS_REMEMBERED + 1:
            del deaths[0]
        self._next_liveness = min(self._next_liveness, now + self.probe_period(now) / 5)

    def _decay_probes(self, now: float) -> None:
        elapsed = now - self._probed_at
        if elapsed > 0:
            factor = math.exp(-elapsed / _PROBE_MEMORY)
            self._probe_silence *= factor
            self._probe_failures *= factor
            self._probed_at = now

    def probe_period(self, now: float) -> float:
        """How long a contact may stay silent before it is pinged (seconds).

        MSPastry's self-tuning (Castro, Costa, Rowstron, DSN 2004): a contact pinged after
        ``s`` seconds of silence is found dead with probability about ``mu * s`` (``mu``:
        the rate at which a contact dies), so ``mu`` is estimated as the liveness pings'
        failures over their contacts' silence: over the last minute (an exponential decay:
        quick to see churn begin), or over the pings since the last ``_DEATHS_REMEMBERED``
        deaths (a window as long as the node's own rate of deaths needs: a small table,
        a DHT client's, sees a death only now and then, and the minute's estimate falls
        to nothing in every longer gap between two), whichever is higher. Checked every
        ``T / 5`` for contacts silent ``T``, a dead contact stays listed ``T / 2 + T / 10``
        on average, a share ``0.6 * mu * T`` of the table. The period keeps that share at
        ``liveness_dead_share``, between ``liveness_interval_min`` and the quiet network's
        period (no failures): ``liveness_interval``, or ``client_liveness_interval`` for a
        DHT client. A public node learns who is alive from the requests its contacts send
        it (each touches a bucket, whose oldest contact is then checked); a client hears
        only answers to its own requests, and its few probes would find the first deaths
        of a churn late."""
        config = self.config
        quiet = config.liveness_interval
        if self.client:
            quiet = min(quiet, config.client_liveness_interval)
        self._decay_probes(now)
        rate = self._probe_failures / self._probe_silence if self._probe_failures else 0.0
        deaths = self._deaths
        if len(deaths) > 2:  # two deaths at least since the window's first
            (first, silence), (last, _) = deaths[0], deaths[-1]
            gap = (last - first) / (len(deaths) - 1)
            window = self._silence_total - silence
            if window > 0.0 and now - last <= _DEATHS_GAPS * gap:
                rate = max(rate, (len(deaths) - 1) / window)
        if rate <= 0.0:
            return quiet
        period = config.liveness_dead_share / (0.6 * rate)
        return min(max(period, config.liveness_interval_min), quiet)

    def _handoff_keys(self, node_id: int) -> list[bytes]:
        """The keys whose records a new contact should get from this node (paper, section
        2.5): those it is among the ``k`` closest to, as far as this node knows, if at most
        ``_HANDOFF_SENDERS - 1`` other contacts are closer to the key than this node. The
        paper (and the stock package) lets only the holder closest to the key send, and only
        to a newcomer closer than itself; here a few closest send, to any newcomer among
        the k closest (a holder like the others: a newcomer farther than the closest few
        got nothing, and then held a growing part of the key from the owners' republishes,
        and answered censuses with too small a count), while the many other holders stay
        quiet."""
        config = self.config
        routing = self.routing
        own = self.own
        keys = []
        held = self.store.keys()
        for key in held:
            target = int.from_bytes(key, "big")
            distance = node_id ^ target
            closest = routing.closest(target, config.k, exclude=node_id)
            if len(closest) >= config.k and closest[-1].node_id ^ target < distance:
                continue  # the newcomer is not among the k closest
            mine = own ^ target
            closer = 0
            for peer in closest[:_HANDOFF_SENDERS]:
                closer += peer.node_id ^ target < mine
            if closer < _HANDOFF_SENDERS:
                keys.append(key)
        return keys

    def _handoff(self, node_id: int, address: Address, keys: list[bytes], now: float) -> None:
        """Store the records of ``keys`` to a new contact that answered us, paged as a put
        is, each key whole or not at all, at most ``handoff_datagrams`` datagrams in all
        (keys that do not fit wait for their owners' republish). Each datagram states how
        many publishers the key holds here (``RecordStore.counted``): a newcomer handed a
        part of a key, or a full key's room without the count of those it refused, would
        answer censuses with too small a count, and a census that ends at two such
        newcomers would take a sharded facet for a small one."""
        config = self.config
        left = config.handoff_datagrams
        if len(self._pending) * 2 > config.max_pending_rpcs:
            return
        budget = config.max_datagram - HEADER_SIZE - STORE_OVERHEAD - _COUNT_SIZE
        store = self.store
        for key in keys:
            batches: list[list[bytes]] = []
            cursor = b""
            while len(batches) <= left:
                raws, cursor = store.page(key, cursor, now, budget)
                if raws:
                    batches.append(raws)
                if not cursor:
                    break
            if not batches or len(batches) > left:
                continue
            publishers = store.publishers(key, now)
            for raws in batches:
                args = wire.encode_p2p_store_args(self.node_id, key, raws, publishers)
                if not self._call(
                    address, node_id, wire.P2P_STORE, args, now, None, Purpose.HANDOFF,
                    sent=len(raws),
                ):
                    return
                left -= 1
                self._counters[Count.HANDOFF_STORES] += 1
            if not left:
                return
