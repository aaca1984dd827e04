"""The build planner: what a build needs next, decided from its persisted attempts.

Pure, like ``_select.py`` and ``_verify.py``: :func:`plan` takes the build, its attempts
(each with its signed result, parsed once), the time and the engine's bounds
(``EngineConfig``), and returns one action; :func:`after_no_node` turns a failed selection
into waiting or failing. No I/O, no clock, no database: the engine (``_engine.py``) reads
the state, asks, carries the action out, and asks again when something changed.

The actions:

* :class:`Complete` -- two operators agree (``_verify.assess``) and no requested replica
  is still building: store the build and finish.
* :class:`Fail` -- the build failed on two operators, ran out of attempts or tie-breaks,
  or no node can ever satisfy it; ``reason`` says which for people.
* :class:`TieBreak` -- replicas of different operators disagree: record the difference
  report, then choose one node of an operator not yet involved (``choose``), or wait for
  the tie-break already running (``choose`` None).
* :class:`Choose` -- too few operators cover the build: choose ``count`` more nodes, not
  of ``exclude_operators``, not the nodes lost recently (``exclude_nodes``, each until the
  end of a backoff that doubles with each loss on this build).
* :class:`Wait` -- nothing to do until an attempt changes (``until`` None) or until a
  time (no node yet, for a reason that may pass).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import attrs

from .._jobs import Result
from ._db import AttemptRow, AttemptState, BuildRow
from ._engine_config import EngineConfig
from ._errors import NoCapableNodeError
from ._verify import NeedTieBreak, Replica, Verified, assess

__all__ = [
    "TRANSIENT_CONSTRAINTS",
    "Action",
    "Attempt",
    "Choose",
    "Complete",
    "Fail",
    "TieBreak",
    "Wait",
    "after_no_node",
    "backoff",
    "plan",
]

#: Selection failures that may pass by themselves (a node stops draining, a backoff ends,
#: a lease ends or its nodes free a slot).
TRANSIENT_CONSTRAINTS = frozenset(
    {"draining", "excluded", "operators-used", "lease", "leased"}
)


@attrs.frozen
class Attempt:
    """One attempt as the planner sees it: its row and, once it ended with one, the
    node's signed result (parsed once by the engine, not on every step)."""

    row: AttemptRow
    result: Result | None = None


@attrs.frozen
class Complete:
    verdict: Verified


@attrs.frozen
class Fail:
    reason: str
    #: The disagreement behind the failure (its report is kept with the build), if any.
    disagreement: NeedTieBreak | None = None


@attrs.frozen
class Choose:
    count: int
    #: ``replica`` (the first choice), ``replacement`` or ``tiebreak``.
    role: str
    exclude_operators: frozenset[str]
    #: Node key (text) -> Unix time its exclusion from this build ends.
    exclude_nodes: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen
class TieBreak:
    disagreement: NeedTieBreak
    #: The tie-break node to choose, or None while one is running.
    choose: Choose | None


@attrs.frozen
class Wait:
    #: Look again at this Unix time, or None: when an attempt changes.
    until: float | None = None
    reason: str = ""


Action = Complete | Fail | TieBreak | Choose | Wait


def backoff(base: float, tries: int, limit: float) -> float:
    """``base * 2**tries``, at most ``limit``."""
    return float(min(limit, base * 2**tries))


def _replicas(attempts: Sequence[Attempt]) -> list[Replica]:
    replicas = []
    for attempt in attempts:
        if attempt.row.state is AttemptState.SUCCEEDED:
            assert attempt.result is not None, attempt.row.id
            replicas.append(
                Replica(attempt.result.node, attempt.row.operator, attempt.result, attempt.row.id)
            )
    return replicas


def _excluded_nodes(
    attempts: Sequence[Attempt], now: float, config: EngineConfig
) -> dict[str, float]:
    ended = [a.row for a in attempts if a.row.state in (AttemptState.LOST, AttemptState.FAILED)]
    losses = Counter(a.node for a in ended)
    excluded: dict[str, float] = {}
    for row in ended:
        until = (row.ended_at or now) + backoff(
            config.node_retry_base_s, losses[row.node] - 1, config.backoff_max_s
        )
        if until > now:
            excluded[row.node] = max(until, excluded.get(row.node, 0.0))
    return excluded


def plan(build: BuildRow, attempts: Sequence[Attempt], now: float, config: EngineConfig) -> Action:
    """The next action for ``build`` given all its ``attempts`` (in creation order).

    The build must not be terminal, cancelled or waiting for its source (the engine
    handles those before asking).
    """
    active = [a for a in attempts if a.row.active]
    verdict = assess(_replicas(attempts), build.replicas)
    if isinstance(verdict, Verified):
        agreeing_ops = {r.operator for r in verdict.agreeing}
        if active and len(agreeing_ops) < build.replicas:
            return Wait(reason="the other requested replicas are still building")
        return Complete(verdict)
    failed = [a for a in attempts if a.row.state is AttemptState.FAILED]
    failed_ops = {a.row.operator for a in failed}
    if len(failed_ops) >= 2:
        # The node's signed reason when it gave one (missing-build-dependency: <name>, ...).
        states = sorted({_failure(a) for a in failed})
        return Fail(
            f"the build failed on {len(failed_ops)} operators "
            f"({', '.join(sorted(failed_ops))}): {', '.join(states)}"
        )
    if not active and len(attempts) >= config.max_attempts:
        reasons = "; ".join(
            f"{a.row.operator}: {a.row.reason or a.row.state.value}" for a in attempts[-3:]
        )
        return Fail(f"gave up after {len(attempts)} attempts ({reasons})")
    if isinstance(verdict, NeedTieBreak):
        if active:
            return TieBreak(verdict, None)
        tiebreaks = sum(1 for a in attempts if a.row.role == "tiebreak")
        if tiebreaks >= config.max_tiebreaks:
            return Fail(
                f"replicas disagree after {tiebreaks} tie-break(s); nothing stored", verdict
            )
        exclude = frozenset(verdict.operators | {a.row.operator for a in active})
        return TieBreak(
            verdict, Choose(1, "tiebreak", exclude, _excluded_nodes(attempts, now, config))
        )
    covered = frozenset(verdict.operators | {a.row.operator for a in active})
    missing = max(build.replicas, 2) - len(covered)
    if missing <= 0:
        return Wait(reason="enough replicas are building")
    if len(attempts) + missing > config.max_attempts and not active:
        missing = max(config.max_attempts - len(attempts), 0)
    if missing == 0:
        return Wait(reason="no attempt left to start")
    role = "replica" if not attempts else "replacement"
    return Choose(missing, role, covered, _excluded_nodes(attempts, now, config))


def _failure(attempt: Attempt) -> str:
    """How one attempt failed, in words: the node's signed reason when it gave one
    (``rejected: bad-source: not a source RPM``), else the build's exit status."""
    result = attempt.result
    if result is None:
        return attempt.row.state.value
    reason = result.environment_map.get("reason")
    if reason:
        return f"{result.state.value}: {reason}"
    if result.state.value == "failed" and result.exit_code:
        return f"exit status {result.exit_code}"
    return result.state.value


def after_no_node(
    error: NoCapableNodeError,
    choose: Choose,
    waiting_since: float | None,
    now: float,
    config: EngineConfig,
    *,
    other_operators: bool = True,
) -> Fail | Wait:
    """What to do when no node satisfies ``choose``: fail at once when the failing
    constraint cannot pass by itself (an arch no trusted node has) or when the build has
    waited ``no_node_wait_s`` since ``waiting_since``; else wait until the first exclusion
    ends (or ``node_retry_base_s``), at most ``backoff_max_s``. A tie-break fails at once
    when the trust list names no node of an operator it does not exclude
    (``other_operators`` False): no waiting can help."""
    if choose.role == "tiebreak":
        if not other_operators:
            return Fail("replicas disagree and the trust list names no node of another "
                        "operator to break the tie; nothing stored")
        outcome = after_no_node(error, attrs.evolve(choose, role="replica"), waiting_since,
                                now, config)
        if isinstance(outcome, Fail):
            return Fail(f"replicas disagree and no node could break the tie: {error}; "
                        "nothing stored")
        return outcome
    if error.constraint not in TRANSIENT_CONSTRAINTS:
        return Fail(str(error))
    if waiting_since is not None and now - waiting_since > config.no_node_wait_s:
        return Fail(str(error))
    retry = min(choose.exclude_nodes.values(), default=now + config.node_retry_base_s)
    return Wait(min(retry, now + config.backoff_max_s), str(error))
