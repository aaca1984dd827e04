"""What configures and what reports a DHT node: :class:`DhtConfig` (every bound and tunable),
:class:`DhtStatistics` (counters since start), and the two errors only a peer's datagram can
cause in the core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .._errors import LocalError, MalformedError, RemoteError
from .._records import DEFAULT_POLICY, RecordPolicy

__all__ = ["DhtConfig", "DhtStatistics", "UnexpectedResponseError", "UnknownMethodError"]


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
    #: (A facet key holding ``max_records_per_key`` records refuses new publishers with
    #: ``store-full``; they publish under the facet's shards too: ``facet_shard_key``.)
    max_records_per_key: int = attrs.field(default=256, validator=_positive)
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
    republish_interval: float = attrs.field(default=3600.0, validator=_positive)
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
    #: When a bucket is touched (a contact in it heard from, or a newcomer for it), its
    #: least-recently-seen contact is pinged if it has not been heard from for this long
    #: (seconds); a newcomer for a full bucket waits in the cache meanwhile.
    eviction_ping_after: float = attrs.field(default=60.0, validator=_positive)
    #: Contacts not heard from for the *probe period* are pinged, even in quiet buckets
    #: (checked five times per period). The period is ``liveness_interval`` (seconds) in a
    #: quiet network, ``client_liveness_interval`` for a DHT client (no unsolicited request
    #: reaches it, so only its own requests show it who is alive), and shortens, down to
    #: ``liveness_interval_min``, as the node finds its contacts dying: it is chosen so
    #: that about ``liveness_dead_share`` of the contacts are dead at any time, from the
    #: share of recent pings that found their contact dead (MSPastry's self-tuning probe
    #: period; ``docs/protocol.md``, *Liveness*).
    liveness_interval: float = attrs.field(default=300.0, validator=_positive)
    client_liveness_interval: float = attrs.field(default=60.0, validator=_positive)
    liveness_interval_min: float = attrs.field(default=15.0, validator=_positive)
    liveness_dead_share: float = attrs.field(default=0.005, validator=_positive)
    #: ``p2p_store`` datagrams sent at most to one new contact to hand it the records it
    #: should hold, each key whole (0: no hand-off). A full key of ``max_records_per_key``
    #: records takes about 50.
    handoff_datagrams: int = attrs.field(default=64, validator=_not_negative)
    #: Contacts of one IP host per bucket and per lookup (loopback hosts exempt); 0: no
    #: limit. Bounds what one machine claiming many ids can take (Sybil, eclipse).
    max_contacts_per_host: int = attrs.field(default=2, validator=_not_negative)
    #: ``public``: a DHT server (answers, enters routing tables, holds records);
    #: ``client``: behind NAT, it marks its requests (``CLIENT_FLAG``) so that no node adds
    #: it to a routing table or asks it to store; ``auto``: public until
    #: ``reachability_timeout`` seconds pass without an unsolicited request (one from an
    #: address it has not sent to), then a client.
    reachability: str = attrs.field(
        default="public", validator=attrs.validators.in_(("public", "client", "auto"))
    )
    reachability_timeout: float = attrs.field(default=120.0, validator=_positive)


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
    #: Whether the node acts as a DHT client now (configured, or detected unreachable).
    client: bool = False
    #: Requests from clients answered (their senders were not added as contacts).
    client_requests_in: int = 0
    #: Parts of sampled reads asked again of another holder: the candidate first asked did
    #: not hold the key (or did not answer).
    sample_parts_reasked: int = 0
    #: Puts stored straight to the holders of an earlier put of their key (no walk).
    direct_puts: int = 0
    #: Sampled reads asked for more of their key's parts: a find's parts came short.
    sample_more: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

