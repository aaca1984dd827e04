"""Operations (the handles a caller of the core waits on) and the state of a lookup walk.

An operation's public fields are its result; the underscored ones belong to the core's
lookup state machines (``_lookups.py``)."""

from __future__ import annotations

import enum

from .._records import SignedRecord
from ._ids import Address, Contact

__all__ = [
    "BootstrapOperation",
    "CandidateState",
    "FindNodesOperation",
    "GetOperation",
    "JoinRefreshOperation",
    "Operation",
    "PutOperation",
]


class Operation:
    """A handle on a running operation. ``done`` becomes True once, and then ``result`` is
    final. ``waiter`` is the driver's (the core never reads it)."""

    __slots__ = ("_walk", "bytes_in", "bytes_out", "done", "rounds", "rpcs", "started_at", "waiter")

    def __init__(self, now: float) -> None:
        self.done = False
        self.waiter: object = None
        self.started_at = now
        #: RPCs sent and lookup depth reached (hops), for statistics.
        self.rpcs = 0
        self.rounds = 0
        #: Bytes of the requests this operation sent (resends included) and of the replies
        #: to them that came back: its own traffic, apart from whatever else the node does
        #: meanwhile (maintenance, serving peers).
        self.bytes_out = 0
        self.bytes_in = 0
        self._walk: _Walk | None = None


class FindNodesOperation(Operation):
    """Result: the ``k`` closest live contacts to the target, closest first."""

    __slots__ = ("result", "target")

    def __init__(self, target: int, now: float) -> None:
        super().__init__(now)
        self.target = target
        self.result: list[Contact] = []


class BootstrapOperation(Operation):
    """Result: how many contacts the routing table holds afterwards (after the lookup of
    our own id and the refresh of the buckets farther away than our closest neighbour)."""

    __slots__ = ("_refreshing", "_waiting", "result")

    def __init__(self, now: float) -> None:
        super().__init__(now)
        self._waiting = 0
        #: Bucket refresh lookups of the join still running.
        self._refreshing = 0
        self.result = 0


class JoinRefreshOperation(FindNodesOperation):
    """A lookup of a random id in one of our far buckets that a join runs (``join``)."""

    __slots__ = ("join",)

    def __init__(self, target: int, now: float, join: BootstrapOperation) -> None:
        super().__init__(target, now)
        self.join = join


class GetOperation(Operation):
    """Result: the verified, unexpired records under ``key``, latest per publisher and kind,
    sorted by slot (publisher key, then kind).

    ``complete`` is False when the read stopped before every record the holders reported
    was read (``max_pages``, or no holder left to page on), or, for a sampled read
    (``want`` > 0), when only part of the key's publishers were asked for. ``publishers``
    is the most publishers any holder reported under the key (None: no holder said).

    A *sampled* read (``sampled``) walks for the holders' publisher counts only; with
    ``want`` > 0 it then reads random parts of the key, with ``want`` = 0 (a census) it
    ends after the walk, and ``DhtNode.sample_from`` reads parts from its holders later."""

    __slots__ = (
        "_asked",
        "_cursor",
        "_found",
        "_holders",
        "_node_key",
        "_outstanding",
        "_pages",
        "_parts",
        "_seed",
        "_sources",
        "_whole",
        "complete",
        "failed",
        "key",
        "publishers",
        "result",
        "sampled",
        "want",
    )

    def __init__(
        self, key: bytes, now: float, want: int = 0, seed: bytes = b"", sampled: bool = False
    ) -> None:
        super().__init__(now)
        self.key = key
        self.want = want
        self.sampled = sampled or want > 0
        #: A sampled read's holders (answered, reported publishers), once its walk ended.
        self._holders: list[_Candidate] = []
        #: A sampled read that wants every publisher the key holds pages through it as a
        #: full read does (complete); else (one shard of a sampled find) it asks all its
        #: parts once, of random holders.
        self._whole = True
        self.complete = True
        #: Pages and parts that holders which had answered (its census, or an earlier
        #: part) did not answer: asked again of another, or lost.
        self.failed = 0
        self.publishers: int | None = None
        self._seed = seed
        #: A sampled read's random partition of the key's publishers (``wire.sample_cursor``
        #: with ``_seed``): how many parts, and the parts asked so far.
        self._parts = 0
        self._asked: set[int] = set()
        self._outstanding = 0
        self.result: list[SignedRecord] = []
        self._found: dict[bytes, SignedRecord] = {}
        #: Whether ``key`` is the node key of its records' publisher: unknown (None) until
        #: the first capability bound to ``key`` arrives (see ``DhtNode._collect``).
        self._node_key: bool | None = None
        self._cursor = b""
        self._pages = 0
        self._sources = 0

    def parts_asked(self) -> tuple[int, int]:
        """A sampled read's parts: how many it asked for, and how many it left unasked
        (:meth:`DhtNode.sample_more` asks for those)."""
        return len(self._asked), self._parts - len(self._asked)

    def holders_left(self) -> int:
        """Holders of a finished census (or sampled read) that answered and have not failed
        a part since: the ones ``DhtNode.sample_from`` can still ask."""
        return sum(c.state == CandidateState.OK for c in self._holders)


class PutOperation(Operation):
    """Result: how many nodes (this one included) hold the records now (acknowledged each
    record as ``"ok"`` or ``"held"``).

    A *census* put walks with ``p2p_find`` census queries instead of ``find_node``, so
    that ``publishers`` tells how many publishers the key's holders had (None: no holder
    said); a publisher learns that way that a facet root key is nearly full.

    A *direct* put (``holders`` given) stores to those nodes with no walk (a republish to
    the holders an earlier put found); ``stored`` names the nodes that acknowledged every
    batch, for the next."""

    __slots__ = (
        "_batches",
        "_holders",
        "_ids",
        "_outstanding",
        "_refused",
        "census",
        "direct",
        "full",
        "key",
        "publishers",
        "result",
        "stored",
    )

    def __init__(
        self, key: bytes, batches: list[list[bytes]], now: float, census: bool = False
    ) -> None:
        super().__init__(now)
        self.key = key
        self.result = 0
        self.census = census
        self.direct = False
        self.publishers: int | None = None
        self._batches = batches
        self._outstanding = 0
        #: Per holder address: batches still unanswered, its node id; holders that refused.
        self._holders: dict[Address, int] = {}
        self._ids: dict[Address, int] = {}
        #: The holders that acknowledged every batch (node id, address), nearest first.
        self.stored: list[tuple[int, Address]] = []
        self._refused: set[Address] = set()
        #: Holders that refused a record as ``store-full`` (a full facet key, which counts
        #: the offer), as ``stored``.
        self.full: list[tuple[int, Address]] = []


# -- walks ----------------------------------------------------------------------------------------

class CandidateState(enum.IntEnum):
    """Where a walk's candidate stands."""

    #: Not asked yet.
    NEW = 0
    #: Asked, no answer yet.
    INFLIGHT = 1
    #: Asked, no answer within its stall time: the walk no longer waits for it.
    STALLED = 2
    #: Answered.
    OK = 3
    #: Timed out, answered with garbage, or could not be asked.
    FAILED = 4


# Deeper than any walk goes.
_NO_DEPTH = 1 << 30


class _Candidate:
    __slots__ = (
        "address",
        "cursor",
        "depth",
        "distance",
        "named",
        "node_id",
        "origin",
        "publishers",
        "state",
    )

    def __init__(self, node_id: int, address: Address, distance: int, depth: int) -> None:
        self.node_id = node_id
        self.address = address
        self.distance = distance
        self.depth = depth
        self.state = CandidateState.NEW
        #: For record walks: the holder's next-page cursor after its first reply, and the
        #: publishers it said it holds under the key.
        self.cursor = b""
        self.publishers = 0
        #: For census walks: a holder of the key named it among its closest contacts to
        #: the key (so it likely holds the key too).
        self.named = False
        #: For a census's holder copied for one read that pages through it: the holder
        #: in the census (shared by later reads), told when the copy fails.
        self.origin: _Candidate | None = None


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

