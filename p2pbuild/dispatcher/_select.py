"""Node selection: which nodes get a build's jobs (design item 13). Pure: no I/O, no clock.

:func:`select_nodes` takes the candidates a directory lookup found (each with its trust-list
entry, rating and current load) and a :class:`Requirements`, and either returns the chosen
nodes, one per operator, or raises :class:`NoCapableNodeError` whose message names the
constraint that left nothing, with counts::

    no trusted node has arch=s390x
    3 nodes match arch=x86_64, os=fedora-41 but none has build type rpm
    2 nodes match arch=x86_64, os=fedora-41 but all are operator alice; 2 replicas need 2 operators
    pool team-x is dedicated to team-x

The filters run in a fixed order, so the message names the first constraint that failed:
trust, arch, os, build type, machine type, pool (including dedicated pools), memory, disk,
draining, nodes this build already tried, operators this build already uses, and finally the
number of distinct operators.

Leases (``_leases.py``) enter as two more inputs of :class:`Requirements`: a build under a
lease may use only the lease's nodes (``lease_nodes``), and slots that leases of *other*
users hold (``held_slots``) are not offered: a node whose every slot is held is filtered out
("a slot not held by a lease"), and held slots count as used in its load.

Ranking: each survivor gets ``score = rating - load_weight * load`` where ``rating`` is in
[0, 1] (``_ratings.py``) and ``load`` is the fraction of its slots in use (from its status
record plus the jobs this dispatcher has on it and the status does not show yet; a node
without a status counts as fully loaded). The *best* are those within ``tolerance`` of the
top score, and at least ``min_pool`` of them. From the best, each pick draws two at random
and keeps the less loaded one (power of two choices: load spreads, the top node is not
hammered, and every machine of similar quality works). Each pick removes the picked node's
operator, so replicas land on different operators.

On-demand nodes in standby stay candidates, but each pick prefers an awake node with a free
slot, then a sleeping one (the engine wakes it), then an awake one that is full: a node is
woken when work matches only sleeping nodes or the always-on capacity is full.

Platform affinity: when the user's previous builds ran on a machine type (vm or metal) and
the request leaves it open, nodes of that type are preferred as long as enough operators
offer it; otherwise affinity is dropped silently (it is a preference, not a constraint).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence

import attrs

from .._identity import PublicKey
from .._jobs import BUILDROOT_METHODS, BuildType
from .._records import Capability, MachineType, Status
from .._trust import TrustEntry, trusted_node
from ._errors import NoCapableNodeError

__all__ = [
    "Candidate",
    "Platform",
    "Requirements",
    "SelectionPolicy",
    "asleep",
    "eligible",
    "select_nodes",
]


@attrs.frozen
class Platform:
    """A kind of platform, as remembered for a user's affinity."""

    arch: str
    os: str
    machine: MachineType | None = None


@attrs.frozen
class Candidate:
    """A node as selection sees it. ``trust`` is its trust-list entry (None: not listed);
    ``rating`` in [0, 1]; ``active`` the jobs this dispatcher has running on it."""

    key: PublicKey
    capability: Capability
    status: Status | None
    trust: TrustEntry | None
    rating: float = 0.5
    active: int = 0
    #: Slots that leases of other users hold on this node (not offered to this selection).
    held: int = 0

    @property
    def operator(self) -> str:
        return self.trust.operator if self.trust is not None else "?"

    @property
    def load(self) -> float:
        """Fraction of slots in use, in [0, 1+]; 1.0 when the node published no status."""
        status = self.status
        if status is None or status.slots_total == 0:
            return 1.0 + self.active + self.held
        used = max(status.slots_total - status.slots_free, 0)
        # Our own jobs may not be in the node's status yet (it republishes every minute).
        used = max(used, self.active) + self.held
        return used / status.slots_total

    @property
    def unheld_slots(self) -> int:
        """Slots not held by leases (a node without a status counts as one slot)."""
        total = self.status.slots_total if self.status is not None else 1
        return total - self.held


@attrs.frozen
class Requirements:
    """The hard constraints of one selection, and how many nodes it needs.

    ``team`` is the requesting user's team (None: no team); ``dedicated_pools`` maps a pool
    name to the one team allowed to use it. ``exclude_nodes`` are nodes this build already
    tried and gave up on; ``exclude_operators`` operators it already has a replica on.
    ``lease_nodes`` (not None): only these nodes may be chosen (the build's lease,
    ``lease_id``); ``held_slots`` the slots other users' leases hold, per node.
    """

    arch: str
    os: str
    build_type: BuildType
    count: int = 2
    #: The build names a buildroot: only nodes offering a buildroot method
    #: (:data:`~p2pbuild.BUILDROOT_METHODS` among their build types) can run it.
    buildroot: bool = False
    machine: MachineType | None = None
    pool: str | None = None
    min_memory_mb: int = 0
    min_disk_mb: int = 0
    team: str | None = None
    dedicated_pools: Mapping[str, str] = attrs.field(factory=dict)
    exclude_nodes: frozenset[PublicKey] = frozenset()
    exclude_operators: frozenset[str] = frozenset()
    affinity: Platform | None = None
    lease_nodes: frozenset[PublicKey] | None = None
    lease_id: str = ""
    held_slots: Mapping[PublicKey, int] = attrs.field(factory=dict)


@attrs.frozen
class SelectionPolicy:
    """Ranking knobs. ``load_weight`` trades rating for load; ``tolerance`` is how far
    below the top score a node still counts among the best; ``min_pool`` the least number
    of nodes the random choice draws from."""

    load_weight: float = 0.5
    tolerance: float = 0.15
    min_pool: int = 4


DEFAULT_SELECTION_POLICY = SelectionPolicy()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _trusted(c: Candidate) -> bool:
    return trusted_node(c.trust, c.capability)


def _pool_allowed(c: Candidate, req: Requirements) -> bool:
    """A node in a pool dedicated to another team serves only that team."""
    for pool in c.capability.pools:
        team = req.dedicated_pools.get(pool)
        if team is not None and team != req.team and pool != req.pool:
            return False
    return req.pool is None or req.pool in c.capability.pools


def _filter(candidates: Sequence[Candidate], req: Requirements) -> list[Candidate]:
    if req.held_slots:
        candidates = [
            attrs.evolve(c, held=req.held_slots[c.key]) if c.key in req.held_slots else c
            for c in candidates
        ]
    if req.pool is not None:
        owner = req.dedicated_pools.get(req.pool)
        if owner is not None and owner != req.team:
            raise NoCapableNodeError(
                f"pool {req.pool} is dedicated to {owner}", "pool-dedicated"
            )
    remaining = [c for c in candidates if _trusted(c)]
    if not remaining:
        found = f" ({_plural(len(candidates), 'node')} found, none trusted)" if candidates else ""
        raise NoCapableNodeError(f"no trusted node has arch={req.arch}{found}", "trust")
    passed: list[str] = []
    steps: list[tuple[str, str, Callable[[Candidate], bool]]] = [
        ("arch", f"arch={req.arch}", lambda c: c.capability.arch == req.arch),
        ("os", f"os={req.os}", lambda c: c.capability.os == req.os),
        (
            "build-type",
            f"build type {req.build_type.value}",
            lambda c: req.build_type.value in c.capability.build_types,
        ),
    ]
    if req.buildroot:
        steps.append(
            ("buildroot", "a node that can make buildroots (rpm.dnf or rpm.mock)",
             lambda c: bool(BUILDROOT_METHODS & set(c.capability.build_types)))
        )
    if req.machine is not None:
        machine = req.machine
        steps.append(
            ("machine", f"machine={machine.value}", lambda c: c.capability.machine is machine)
        )
    pool_text = f"pool {req.pool}" if req.pool else "a pool open to your team"
    steps.append(("pool", pool_text, lambda c: _pool_allowed(c, req)))
    if req.min_memory_mb:
        steps.append(
            ("memory", f"memory >= {req.min_memory_mb} MB",
             lambda c: c.capability.memory_mb >= req.min_memory_mb)
        )
    if req.min_disk_mb:
        steps.append(
            ("disk", f"disk >= {req.min_disk_mb} MB",
             lambda c: c.capability.disk_mb >= req.min_disk_mb)
        )
    steps.append(
        ("draining", "a node that is not draining",
         lambda c: c.status is None or not c.status.draining)
    )
    if req.lease_nodes is not None:
        lease_nodes = req.lease_nodes
        steps.append(
            ("lease", f"a node of lease {req.lease_id}", lambda c: c.key in lease_nodes)
        )
    if req.held_slots:
        steps.append(
            ("leased", "a slot not held by another user's lease",
             lambda c: c.unheld_slots > 0)
        )
    if req.exclude_nodes:
        steps.append(
            ("excluded", "a node this build has not already given up on",
             lambda c: c.key not in req.exclude_nodes)
        )
    if req.exclude_operators:
        steps.append(
            ("operators-used",
             f"an operator other than {', '.join(sorted(req.exclude_operators))}",
             lambda c: c.operator not in req.exclude_operators)
        )
    for name, text, test in steps:
        kept = [c for c in remaining if test(c)]
        if not kept:
            if name == "arch" and not passed:
                raise NoCapableNodeError(f"no trusted node has arch={req.arch}", name)
            what = ", ".join(passed) if passed else "the query"
            raise NoCapableNodeError(
                f"{_plural(len(remaining), 'node')} match {what} but none has {text}", name
            )
        remaining = kept
        if name in ("arch", "os"):
            passed.append(text)
    return remaining


def eligible(candidates: Sequence[Candidate], req: Requirements) -> list[Candidate]:
    """The candidates that pass every hard constraint of ``req`` (the filters above, with
    ``held`` set from ``req.held_slots``), in the given order; ``req.count`` is not checked.

    Raises :class:`NoCapableNodeError` naming the first constraint that left no node.
    """
    return _filter(candidates, req)


def _operators(candidates: Collection[Candidate]) -> set[str]:
    return {c.operator for c in candidates}


def select_nodes(
    candidates: Sequence[Candidate],
    req: Requirements,
    rng: random.Random,
    policy: SelectionPolicy = DEFAULT_SELECTION_POLICY,
) -> list[Candidate]:
    """Choose ``req.count`` nodes of distinct operators for ``req``, best first.

    Deterministic for a given ``rng`` state. Raises :class:`NoCapableNodeError` naming the
    first constraint that left no node, or the operator shortage when fewer than
    ``req.count`` distinct operators remain.
    """
    if req.count < 1:
        return []
    remaining = _filter(candidates, req)
    operators = _operators(remaining)
    if len(operators) < req.count:
        where = f"arch={req.arch}, os={req.os}"
        raise NoCapableNodeError(
            f"{_plural(len(remaining), 'node')} match {where} but "
            + (
                f"all are operator {next(iter(operators))}"
                if len(operators) == 1
                else f"they belong to only {len(operators)} operators "
                f"({', '.join(sorted(operators))})"
            )
            + f"; {_plural(req.count, 'replica')} need {req.count} operators",
            "operators",
        )
    if req.affinity is not None and req.machine is None and req.affinity.machine is not None:
        preferred = [c for c in remaining if c.capability.machine is req.affinity.machine]
        if len(_operators(preferred)) >= req.count:
            remaining = preferred
    chosen: list[Candidate] = []
    if any(asleep(c) for c in remaining):
        return _choose_waking_last(remaining, req.count, rng, policy)
    while len(chosen) < req.count:
        pick = _power_of_two(remaining, rng, policy)
        chosen.append(pick)
        remaining = [c for c in remaining if c.operator != pick.operator]
    return chosen


def asleep(c: Candidate) -> bool:
    """An on-demand node in standby, or without a status (its machine may be stopped and
    unable to republish one): it builds once woken."""
    if c.status is None:
        return c.capability.on_demand
    return c.status.standby


def _choose_waking_last(
    remaining: list[Candidate], count: int, rng: random.Random, policy: SelectionPolicy
) -> list[Candidate]:
    """With nodes in standby among the candidates, each pick takes from the first of:
    awake nodes with a free slot; nodes in standby (to be woken); the rest (awake but full).
    So a sleeping node is woken only when the work matches no awake node with room, or the
    always-on capacity is full."""
    chosen: list[Candidate] = []
    while len(chosen) < count:
        tiers = (
            [c for c in remaining if not asleep(c) and c.load < 1.0],
            [c for c in remaining if asleep(c)],
            [c for c in remaining if not asleep(c) and c.load >= 1.0],
        )
        tier = next(t for t in tiers if t)
        pick = _power_of_two(tier, rng, policy)
        chosen.append(pick)
        remaining = [c for c in remaining if c.operator != pick.operator]
    return chosen


def _score(c: Candidate, policy: SelectionPolicy) -> float:
    return c.rating - policy.load_weight * min(c.load, 2.0)


def _power_of_two(
    candidates: Sequence[Candidate], rng: random.Random, policy: SelectionPolicy
) -> Candidate:
    ranked = sorted(candidates, key=lambda c: (-_score(c, policy), c.key.raw))
    top = _score(ranked[0], policy)
    best = [c for c in ranked if _score(c, policy) >= top - policy.tolerance]
    if len(best) < policy.min_pool:
        best = ranked[: policy.min_pool]
    if len(best) == 1:
        return best[0]
    first, second = rng.sample(best, 2)
    if first.load != second.load:
        return first if first.load < second.load else second
    return first if first.rating >= second.rating else second
