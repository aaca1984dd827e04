"""Leases: a user holds slots on chosen nodes for a while (a CI session, a debugging hour).

Pure, like ``_select.py``: no I/O, no clock; every decision takes ``now`` (Unix seconds) and
selection an ``rng``. :class:`LeaseBook` is the state machine over all leases; the
dispatcher keeps it in memory, writes every change it returns to SQLite in one transaction
with its audit entry (``_leasing.py``), and rebuilds it from the database at start, so a
lease survives a restart.

A lease's life::

    request --(quota ok, nodes found)--> active --(extend)--> active
                                           |--(done)------> done
                                           '--(now >= expires_at)--> expired

* **request** (:meth:`LeaseBook.request`): ``count`` slots, one per node, on nodes of
  ``count`` distinct operators (``OperatorMode.DISTINCT``, the default: builds under the
  lease can be verified) or of one operator (``SAME``: the same kind of machine from one
  owner). The nodes are chosen by the usual selection (``_select.eligible`` and
  ``select_nodes``: trust, arch, os, machine type, pool, draining, ratings and load), minus
  slots other leases hold. Refused with :class:`LeaseRefusedError` whose message is one
  line naming the constraint (``quota-user``, ``quota-team``, ``duration``, or the
  selection's own: ``arch``, ``operators``, ``leased``...).
* **extend** (:meth:`LeaseBook.extend`): a later expiry, within ``max_duration_s`` from
  now; an ended lease cannot be extended (``lease-expired``).
* **done** (:meth:`LeaseBook.done`): returned early by its user; its slots are free at once.
* **expire** (:meth:`LeaseBook.expire_due`): every active lease whose time is up; the
  caller persists and audits each. A lease whose time is up counts as ended for every
  decision even before ``expire_due`` runs (:meth:`Lease.active_at`), so a late timer never
  keeps slots held.

Slots: a lease holds one slot on each of its nodes. While it is active those slots are not
offered to other users (``held_slots``), and builds submitted with the lease run only on
its nodes (``restriction``).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping, Sequence

import attrs

from .._identity import PublicKey
from .._jobs import BuildType
from .._records import MachineType
from ._errors import ClientError, NoCapableNodeError
from ._select import (
    DEFAULT_SELECTION_POLICY,
    Candidate,
    Requirements,
    SelectionPolicy,
    eligible,
    select_nodes,
)

__all__ = [
    "Lease",
    "LeaseBook",
    "LeaseRefusedError",
    "LeaseRequest",
    "LeaseState",
    "LeasedNode",
    "OperatorMode",
    "Quotas",
    "UnknownLeaseError",
]


class LeaseState(enum.StrEnum):
    ACTIVE = "active"
    DONE = "done"
    EXPIRED = "expired"


class OperatorMode(enum.StrEnum):
    #: One node per operator: builds under the lease can be verified (two operators).
    DISTINCT = "distinct"
    #: All nodes of one operator: the same kind of machine from one owner.
    SAME = "same"


class LeaseRefusedError(ClientError):
    """A lease request, extension or use that cannot be granted. ``constraint`` names the
    constraint that failed for machines (``quota-user``, ``quota-team``, ``duration``,
    ``lease-expired``, ``not-yours``, ``operators``, or a selection constraint such as
    ``arch``); the message is one line for people."""

    code = "lease-refused"
    http_status = 409

    def __init__(self, message: str, constraint: str) -> None:
        super().__init__(message)
        self.constraint = constraint


class UnknownLeaseError(ClientError):
    code = "unknown-lease"
    http_status = 404


_MAX_COUNT = 64


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer")


@attrs.frozen
class LeaseRequest:
    """What a user asks for: ``count`` slots on nodes of a kind for ``duration_s``."""

    arch: str
    count: int = attrs.field(validator=_positive)
    duration_s: int = attrs.field(validator=_positive)
    os: str | None = None
    machine: MachineType | None = None
    pool: str | None = None
    build_type: BuildType = BuildType.RPM
    operators: OperatorMode = OperatorMode.DISTINCT

    def __attrs_post_init__(self) -> None:
        if self.count > _MAX_COUNT:
            raise ValueError(f"count must be at most {_MAX_COUNT}")


@attrs.frozen
class LeasedNode:
    key: PublicKey
    operator: str


@attrs.frozen
class Lease:
    """One lease, as persisted. ``ended_at`` is set once it is done or expired."""

    id: str
    user: str
    team: str | None
    request: LeaseRequest
    nodes: tuple[LeasedNode, ...]
    created_at: float
    expires_at: float
    state: LeaseState = LeaseState.ACTIVE
    ended_at: float | None = None

    @property
    def slots(self) -> int:
        return len(self.nodes)

    @property
    def operators(self) -> frozenset[str]:
        return frozenset(n.operator for n in self.nodes)

    def active_at(self, now: float) -> bool:
        """Active and not past its expiry (whether or not ``expire_due`` has run yet)."""
        return self.state is LeaseState.ACTIVE and now < self.expires_at

    def state_at(self, now: float) -> LeaseState:
        if self.state is LeaseState.ACTIVE and now >= self.expires_at:
            return LeaseState.EXPIRED
        return self.state

    def to_json(self, now: float) -> dict[str, object]:
        request = self.request
        return {
            "id": self.id,
            "user": self.user,
            "team": self.team,
            "state": self.state_at(now).value,
            "arch": request.arch,
            "os": request.os,
            "machine": request.machine.value if request.machine else None,
            "pool": request.pool,
            "build_type": request.build_type.value,
            "operators": request.operators.value,
            "count": request.count,
            "nodes": [
                {"node": str(n.key), "fingerprint": n.key.fingerprint, "operator": n.operator}
                for n in self.nodes
            ],
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "ended_at": self.ended_at,
            "remaining_s": max(0.0, round(self.expires_at - now, 3))
            if self.active_at(now) else 0.0,
        }


@attrs.frozen
class Quotas:
    """Bounds on what users hold at once; None: no bound. ``max_duration_s`` bounds a
    lease's remaining time when requested or extended."""

    max_slots_per_user: int | None = None
    max_slots_per_team: int | None = None
    max_duration_s: int = 7 * 24 * 3600


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@attrs.define(eq=False)
class LeaseBook:
    """Every lease the dispatcher knows, by id. Methods that change a lease return its new
    value (the caller persists and audits it); none reads a clock or does I/O."""

    quotas: Quotas = attrs.field(factory=Quotas)
    policy: SelectionPolicy = DEFAULT_SELECTION_POLICY
    _leases: dict[str, Lease] = attrs.field(factory=dict, init=False)

    def load(self, leases: Iterable[Lease]) -> None:
        """Put persisted leases back (at start)."""
        for lease in leases:
            self._leases[lease.id] = lease

    def get(self, lease_id: str) -> Lease:
        """Raises :class:`UnknownLeaseError`."""
        lease = self._leases.get(lease_id)
        if lease is None:
            raise UnknownLeaseError(f"no lease {lease_id[:40]}")
        return lease

    def leases(
        self, *, user: str | None = None, include_ended: bool = True
    ) -> list[Lease]:
        """Leases newest first, of one user or all."""
        found = [
            lease for lease in self._leases.values()
            if (user is None or lease.user == user)
            and (include_ended or lease.state is LeaseState.ACTIVE)
        ]
        return sorted(found, key=lambda lease: (-lease.created_at, lease.id))

    def active(self, now: float) -> list[Lease]:
        return [lease for lease in self._leases.values() if lease.active_at(now)]

    def held_slots(self, now: float, *, except_lease: str | None = None) -> dict[PublicKey, int]:
        """Slots held per node by the active leases, but ``except_lease``."""
        held: dict[PublicKey, int] = {}
        for lease in self.active(now):
            if lease.id == except_lease:
                continue
            for node in lease.nodes:
                held[node.key] = held.get(node.key, 0) + 1
        return held

    def held_by(self, now: float) -> dict[PublicKey, list[str]]:
        """The ids of the active leases on each node (for ``nodes ls``)."""
        out: dict[PublicKey, list[str]] = {}
        for lease in self.active(now):
            for node in lease.nodes:
                out.setdefault(node.key, []).append(lease.id)
        return out

    def next_expiry(self) -> float | None:
        """When the next active lease expires (None: no active lease)."""
        times = [lease.expires_at for lease in self._leases.values()
                 if lease.state is LeaseState.ACTIVE]
        return min(times, default=None)

    # -- decisions ---------------------------------------------------------------------------

    def check_quota(
        self, request: LeaseRequest, user: str, team: str | None, now: float
    ) -> None:
        """Raises :class:`LeaseRefusedError` (``duration``, ``quota-user``, ``quota-team``)
        when granting ``request`` would exceed a bound."""
        quotas = self.quotas
        if request.duration_s > quotas.max_duration_s:
            raise LeaseRefusedError(
                f"a lease lasts at most {quotas.max_duration_s} s; {request.duration_s} s "
                "requested", "duration",
            )
        active = self.active(now)
        # The same quota for the user's slots and the team's (constraint quota-<who>).
        for who, name, limit in (("user", user, quotas.max_slots_per_user),
                                 ("team", team, quotas.max_slots_per_team)):
            if limit is None or name is None:
                continue
            held = sum(lease.slots for lease in active if getattr(lease, who) == name)
            if held + request.count > limit:
                raise LeaseRefusedError(
                    f"quota reached: {who} {name} holds {_plural(held, 'slot')} of "
                    f"{limit}; {request.count} more requested",
                    f"quota-{who}",
                )

    def request(
        self,
        lease_id: str,
        request: LeaseRequest,
        user: str,
        team: str | None,
        candidates: Sequence[Candidate],
        rng: random.Random,
        now: float,
        *,
        dedicated_pools: Mapping[str, str] | None = None,
    ) -> Lease:
        """Grant ``request`` on nodes chosen from ``candidates`` and add the lease.

        Raises :class:`LeaseRefusedError` naming the constraint that failed (quota, duration
        or the selection's), and :class:`~p2pbuild.dispatcher.ClientError` for a duplicate id.
        """
        if lease_id in self._leases:
            raise ClientError(f"lease {lease_id} exists")
        self.check_quota(request, user, team, now)
        requirements = Requirements(
            arch=request.arch,
            os=request.os or "",
            build_type=request.build_type,
            count=request.count,
            machine=request.machine,
            pool=request.pool,
            team=team,
            dedicated_pools=dedicated_pools or {},
            held_slots=self.held_slots(now),
        )
        if request.os is None:
            # Any OS of the arch: selection compares os, so ask per candidate's own.
            candidates = [c for c in candidates if c.capability.arch == request.arch]
        try:
            chosen = self._choose(candidates, requirements, request, rng)
        except NoCapableNodeError as exc:
            raise LeaseRefusedError(str(exc), exc.constraint) from None
        # The granted lease names the one OS its nodes run (asked or chosen).
        request = attrs.evolve(request, os=chosen[0].capability.os)
        lease = Lease(
            id=lease_id, user=user, team=team, request=request,
            nodes=tuple(LeasedNode(c.key, c.operator) for c in chosen),
            created_at=now, expires_at=now + request.duration_s,
        )
        self._leases[lease_id] = lease
        return lease

    def _choose(
        self, candidates: Sequence[Candidate], req: Requirements, request: LeaseRequest,
        rng: random.Random,
    ) -> list[Candidate]:
        if request.os is None:
            # Group by OS: the lease gets one kind of platform (the best-supplied OS).
            by_os: dict[str, list[Candidate]] = {}
            for c in candidates:
                by_os.setdefault(c.capability.os, []).append(c)
            if not by_os:
                raise NoCapableNodeError(f"no trusted node has arch={request.arch}", "arch")
            first_error: NoCapableNodeError | None = None
            for os_name in sorted(by_os, key=lambda o: (-len(by_os[o]), o)):
                try:
                    return self._choose_on(
                        by_os[os_name], attrs.evolve(req, os=os_name), request, rng
                    )
                except NoCapableNodeError as exc:
                    first_error = first_error or exc
            assert first_error is not None
            raise first_error
        return self._choose_on(candidates, req, request, rng)

    def _choose_on(
        self, candidates: Sequence[Candidate], req: Requirements, request: LeaseRequest,
        rng: random.Random,
    ) -> list[Candidate]:
        if request.operators is OperatorMode.DISTINCT:
            return select_nodes(candidates, req, rng, self.policy)
        remaining = eligible(candidates, req)
        by_operator: dict[str, list[Candidate]] = {}
        for c in remaining:
            by_operator.setdefault(c.operator, []).append(c)
        enough = {op: cs for op, cs in by_operator.items() if len(cs) >= request.count}
        if not enough:
            most = max((len(cs) for cs in by_operator.values()), default=0)
            raise NoCapableNodeError(
                f"{_plural(len(remaining), 'node')} match arch={req.arch}, os={req.os} but no "
                f"operator has {request.count} of them (at most {most}); "
                f"--same-operator needs {request.count} nodes of one operator",
                "operators",
            )
        # The operator whose best nodes score highest; within it the best, least loaded.
        def score(c: Candidate) -> float:
            return c.rating - self.policy.load_weight * min(c.load, 2.0)

        ranked = {
            op: sorted(cs, key=lambda c: (-score(c), c.key.raw)) for op, cs in enough.items()
        }
        best = max(
            sorted(ranked),
            key=lambda op: sum(score(c) for c in ranked[op][: request.count]),
        )
        return ranked[best][: request.count]

    def extend(self, lease_id: str, user: str, by_s: int, now: float) -> Lease:
        """Push the lease's expiry ``by_s`` seconds later (from its current expiry).

        Raises :class:`UnknownLeaseError`, and :class:`LeaseRefusedError` when the lease is
        not ``user``'s (``not-yours``), has ended (``lease-expired``) or would then last
        longer than ``max_duration_s`` from now (``duration``).
        """
        lease = self._owned(lease_id, user, now)
        if by_s < 1:
            raise LeaseRefusedError("extend by a positive number of seconds", "duration")
        expires_at = lease.expires_at + by_s
        if expires_at - now > self.quotas.max_duration_s:
            raise LeaseRefusedError(
                f"a lease lasts at most {self.quotas.max_duration_s} s from now; extending "
                f"by {by_s} s would leave {int(expires_at - now)} s", "duration",
            )
        extended = attrs.evolve(lease, expires_at=expires_at)
        self._leases[lease_id] = extended
        return extended

    def done(self, lease_id: str, user: str, now: float, *, admin: bool = False) -> Lease:
        """Return the lease: its slots are free at once. Raises :class:`UnknownLeaseError`
        and :class:`LeaseRefusedError` (``not-yours``, ``lease-expired``)."""
        lease = self._owned(lease_id, user, now, admin=admin)
        ended = attrs.evolve(lease, state=LeaseState.DONE, ended_at=now)
        self._leases[lease_id] = ended
        return ended

    def expire_due(self, now: float) -> list[Lease]:
        """End every active lease whose time is up; returns them (to persist and audit)."""
        due = [lease for lease in self._leases.values()
               if lease.state is LeaseState.ACTIVE and now >= lease.expires_at]
        expired = []
        for lease in due:
            ended = attrs.evolve(lease, state=LeaseState.EXPIRED, ended_at=lease.expires_at)
            self._leases[lease.id] = ended
            expired.append(ended)
        return expired

    def restriction(self, lease_id: str, user: str, now: float) -> Lease:
        """The lease a build of ``user`` runs under, if it may now.

        Raises :class:`UnknownLeaseError`, and :class:`LeaseRefusedError` when it is another
        user's (``not-yours``) or has ended (``lease-expired``).
        """
        return self._owned(lease_id, user, now)

    def check_use(self, lease_id: str, user: str, replicas: int, now: float) -> Lease:
        """As :meth:`restriction`, and the lease must have nodes of at least
        ``max(replicas, 2)`` operators, since a build verifies only on two (``operators``)."""
        lease = self._owned(lease_id, user, now)
        need = max(replicas, 2)
        if len(lease.operators) < need:
            raise LeaseRefusedError(
                f"lease {lease.id} holds nodes of {_plural(len(lease.operators), 'operator')}; "
                f"a verified build with {_plural(replicas, 'replica')} needs {need}",
                "operators",
            )
        return lease

    def _owned(self, lease_id: str, user: str, now: float, *, admin: bool = False) -> Lease:
        lease = self.get(lease_id)
        if lease.user != user and not admin:
            raise LeaseRefusedError(f"lease {lease.id} belongs to another user", "not-yours")
        if not lease.active_at(now):
            state = lease.state_at(now)
            what = "expired" if state is LeaseState.EXPIRED else "was returned"
            raise LeaseRefusedError(f"lease {lease.id} {what}", "lease-expired")
        return lease
