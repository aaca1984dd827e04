"""Node ratings from what this dispatcher observed (design item 13).

The model (``docs/dispatcher.md`` has the derivation). Four signals per node, each an
exponentially recency-weighted average with half-life ``H``: an observation made ``dt``
seconds ago has weight ``w = 2 ** (-dt / H)``.

* success ``S``: 1 for an attempt that produced a signed, re-hashing result; 0 for one that
  timed out, vanished, was unreachable, returned a bad result, or failed a build that
  another operator built fine.
* agreement ``A``: 1 for a result that matched the verified outputs, 0 for an outlier.
* speed ``T``: ``x = ln(duration / median duration of the peers on the same job)``; the
  node's speed is ``min(1, exp(-mean x))`` (as fast as its peers or faster: 1; twice as
  slow: 0.5).
* reliability ``M``: mean time between failures from status heartbeats,
  ``MTBF = (up_prior + up) / (failures_prior + failures)`` where ``up`` is the observed
  (decayed) uptime and a failure is a restart (uptime went down) or the node vanishing from
  the DHT while it had our job; ``M = MTBF / (MTBF + mtbf_scale)``.

Prior: every average starts from a pseudo-observation of weight ``prior_weight`` at the
prior mean ``m``: ``S = (m * k + sum(w * x)) / (k + sum(w))``. For success and agreement
``m`` is the population mean of the nodes we know (default 0.9 when we know none), so a
new node starts level with the typical node: neither favoured nor shut out.

Score: ``score = S * A**2 * (0.75 + 0.25 * T) * (0.75 + 0.25 * M)`` in [0, 1]. Agreement
is squared because a node that returns different bytes is the one failure the farm exists
to catch; speed and reliability only tune the order among good nodes.

Aggregates are kept incrementally (decayed sums with their time), so an observation costs
one row update; every observation is also logged (``observations`` table). The book keeps
the aggregate and heartbeat rows in memory, loaded once and updated by its own writes (it
is their only writer), so that a selection does not read both tables whole; it reloads
them after any rolled-back transaction of the database.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ..dht import NodeEntry
from ._db import AttemptRow, AttemptState, Database, HeartbeatRow, ObservationRow, RatingRow
from ._verify import Verified

__all__ = [
    "DEFAULT_MODEL",
    "Decayed",
    "NodeRating",
    "RatingBook",
    "RatingModel",
    "Signal",
    "combine",
    "mtbf_score",
    "observe_uptime",
]


class Signal(enum.StrEnum):
    SUCCESS = "success"
    AGREEMENT = "agreement"
    SPEED = "speed"


@attrs.frozen
class RatingModel:
    """The model's constants (seconds where a time)."""

    half_life_s: float = 14 * 86400.0
    prior_weight: float = 3.0
    default_prior: float = 0.9
    #: Speed observations are log ratios; their prior is 0 (as fast as peers).
    speed_prior_weight: float = 2.0
    mtbf_prior_s: float = 7 * 86400.0
    mtbf_prior_failures: float = 1.0
    mtbf_scale_s: float = 86400.0


DEFAULT_MODEL = RatingModel()


@attrs.frozen
class Decayed:
    """A decayed weighted sum: ``value_sum = sum(w_i * x_i)``, ``weight_sum = sum(w_i)``, with
    weights as of time ``at``."""

    value_sum: float = 0.0
    weight_sum: float = 0.0
    at: float = 0.0

    def decayed_to(self, now: float, half_life: float) -> Decayed:
        """The same sums with weights as of ``now`` (never increases them)."""
        factor = 2.0 ** (-max(now - self.at, 0.0) / half_life)
        return Decayed(self.value_sum * factor, self.weight_sum * factor, max(now, self.at))

    def add(self, value: float, now: float, half_life: float) -> Decayed:
        """Add one observation of ``value`` made at ``now``."""
        current = self.decayed_to(now, half_life)
        return Decayed(current.value_sum + value, current.weight_sum + 1.0, current.at)

    def mean(self, now: float, half_life: float, prior_mean: float, prior_weight: float) -> float:
        """The recency-weighted mean with the prior pseudo-observation."""
        current = self.decayed_to(now, half_life)
        return (prior_mean * prior_weight + current.value_sum) / (
            prior_weight + current.weight_sum
        )


def mtbf_score(up_s: float, failures: float, model: RatingModel = DEFAULT_MODEL) -> tuple[
    float, float
]:
    """``(MTBF in seconds, M in [0, 1])`` from decayed uptime and failure count."""
    mtbf = (model.mtbf_prior_s + up_s) / (model.mtbf_prior_failures + failures)
    return mtbf, mtbf / (mtbf + model.mtbf_scale_s)


def combine(success: float, agreement: float, speed: float, reliability: float) -> float:
    """The score from the four signals (module docstring)."""
    return success * agreement**2 * (0.75 + 0.25 * speed) * (0.75 + 0.25 * reliability)


def observe_uptime(
    previous: HeartbeatRow | None,
    node: str,
    operator: str,
    uptime_s: int,
    now: float,
    model: RatingModel = DEFAULT_MODEL,
) -> tuple[HeartbeatRow, bool]:
    """Fold one status heartbeat (the node's reported uptime) into its history.

    Returns the new row and whether this heartbeat shows a failure (the uptime went down:
    the node restarted since we last looked). Up time between two heartbeats counts only as
    far as the node's own uptime confirms it.
    """
    if previous is None:
        return HeartbeatRow(node, operator, now, now, uptime_s, 0.0, 0.0, now), False
    half = model.half_life_s
    factor = 2.0 ** (-max(now - previous.at, 0.0) / half)
    up, failures = previous.up_s * factor, previous.failures * factor
    failed = uptime_s < previous.last_uptime_s
    if failed:
        failures += 1.0
        up += min(float(uptime_s), max(now - previous.last_seen, 0.0))
    else:
        up += min(float(uptime_s - previous.last_uptime_s), max(now - previous.last_seen, 0.0))
    row = HeartbeatRow(
        node, operator, previous.first_seen, now, uptime_s, up, failures, max(now, previous.at)
    )
    return row, failed


@attrs.frozen
class NodeRating:
    """A node's rating now: the four signals, MTBF, the score and how much evidence."""

    node: str
    success: float
    agreement: float
    speed: float
    mtbf_s: float
    reliability: float
    score: float
    observations: float

    def to_json(self) -> dict[str, object]:
        return {k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in attrs.asdict(self).items()}


@attrs.define(eq=False)
class RatingBook:
    """Ratings persisted in a :class:`Database`: record observations, read scores."""

    db: Database
    model: RatingModel = DEFAULT_MODEL
    #: (db.rollbacks when loaded, aggregates by (node, kind), heartbeats by node).
    _cache: tuple[int, dict[tuple[str, str], RatingRow], dict[str, HeartbeatRow]] | None = (
        attrs.field(default=None, init=False)
    )

    #: When each node's status record was last folded in (:meth:`status_heartbeats`).
    _folded: dict[str, float] = attrs.field(factory=dict, init=False)

    def _rows(self) -> tuple[dict[tuple[str, str], RatingRow], dict[str, HeartbeatRow]]:
        cache = self._cache
        if cache is None or cache[0] != self.db.rollbacks:
            cache = self._cache = (
                self.db.rollbacks,
                {(row.node, row.kind): row for row in self.db.ratings()},
                {row.node: row for row in self.db.heartbeats()},
            )
        return cache[1], cache[2]

    def record(
        self, node: str, signal: Signal, value: float, now: float, *,
        build_id: str | None = None, reason: str = "",
    ) -> None:
        """Log one observation and update the node's aggregate (one transaction)."""
        rows, _ = self._rows()
        row = rows.get((node, signal.value))
        state = Decayed(at=now) if row is None else Decayed(row.value_sum, row.weight_sum, row.at)
        state = state.add(value, now, self.model.half_life_s)
        updated = RatingRow(node, signal.value, state.value_sum, state.weight_sum, state.at)
        self.db.add_observation(
            ObservationRow(now, node, signal.value, value, build_id), updated, reason=reason
        )
        rows[(node, signal.value)] = updated

    def record_verdict(
        self, verdict: Verified, attempts: Sequence[AttemptRow], now: float, *, build_id: str
    ) -> None:
        """What a verified build says of its nodes: agreement for every replica (an
        outlier's artifacts differed), a failure for each attempt whose build failed where
        other operators succeeded, and the agreeing nodes' relative build times."""
        agreeing = {r.attempt for r in verdict.agreeing}
        for replica in (*verdict.agreeing, *verdict.outliers):
            ok = replica.attempt in agreeing
            self.record(
                str(replica.node), Signal.AGREEMENT, 1.0 if ok else 0.0, now, build_id=build_id,
                reason="" if ok else "outlier: artifacts differ from the verified build",
            )
        for attempt in attempts:
            if attempt.state is AttemptState.FAILED:
                self.record(
                    attempt.node, Signal.SUCCESS, 0.0, now, build_id=build_id,
                    reason="build failed where other operators succeeded",
                )
        self.record_durations(
            {str(r.node): r.result.duration_ms for r in verdict.agreeing}, now,
            build_id=build_id,
        )

    def record_durations(
        self, durations_ms: Mapping[str, int], now: float, *, build_id: str | None = None
    ) -> None:
        """Record relative build times of the nodes that built the same job: each node's
        duration against the median of the others'."""
        if len(durations_ms) < 2:
            return
        for node, duration in durations_ms.items():
            peers = [d for n, d in durations_ms.items() if n != node]
            median = statistics.median(peers)
            ratio = max(duration, 1) / max(median, 1)
            self.record(node, Signal.SPEED, math.log(ratio), now, build_id=build_id)

    def heartbeat(self, node: str, operator: str, uptime_s: int, now: float) -> bool:
        """Fold a status heartbeat in; returns True if it revealed a restart (a failure)."""
        _, beats = self._rows()
        row, failed = observe_uptime(beats.get(node), node, operator, uptime_s, now, self.model)
        self.db.put_heartbeat(row, failure_reason="restarted (uptime went down)" if failed else "")
        beats[node] = row
        return failed

    def status_heartbeats(
        self, entries: Iterable[NodeEntry], now: float, interval_s: float
    ) -> None:
        """Fold in the status records of directory ``entries`` (:meth:`heartbeat`), each
        node's at most once per ``interval_s``."""
        for entry in entries:
            key = str(entry.publisher)
            if entry.status is None or now - self._folded.get(key, -math.inf) < interval_s:
                continue
            self._folded[key] = now
            operator = entry.trust.operator if entry.trust else "?"
            self.heartbeat(key, operator, entry.status.uptime_s, now)

    def node_failed(self, node: str, operator: str, now: float, reason: str) -> None:
        """Count a failure seen otherwise than by heartbeat (vanished from the DHT)."""
        _, beats = self._rows()
        previous = beats.get(node)
        if previous is None:
            previous = HeartbeatRow(node, operator, now, now, 0, 0.0, 0.0, now)
        factor = 2.0 ** (-max(now - previous.at, 0.0) / self.model.half_life_s)
        row = attrs.evolve(
            previous, up_s=previous.up_s * factor, failures=previous.failures * factor + 1.0,
            at=max(now, previous.at), last_seen=now,
        )
        self.db.put_heartbeat(row, failure_reason=reason)
        beats[node] = row

    def ratings(self, now: float, nodes: Iterable[str] = ()) -> dict[str, NodeRating]:
        """Ratings of every node with observations, plus ``nodes`` (at the prior)."""
        model = self.model
        half = model.half_life_s
        states: dict[str, dict[str, Decayed]] = {}
        rows, beats = self._rows()
        for row in rows.values():
            states.setdefault(row.node, {})[row.kind] = Decayed(
                row.value_sum, row.weight_sum, row.at
            )
        for node in [*beats, *nodes]:
            states.setdefault(node, {})
        priors = {}
        for signal in (Signal.SUCCESS, Signal.AGREEMENT):
            # Population mean of the nodes with real evidence, without the prior.
            means = []
            for kinds in states.values():
                state = kinds.get(signal.value)
                if state is None:
                    continue
                current = state.decayed_to(now, half)
                if current.weight_sum >= 1.0:
                    means.append(current.value_sum / current.weight_sum)
            priors[signal] = statistics.fmean(means) if means else model.default_prior
        result = {}
        for node, kinds in states.items():
            empty = Decayed(at=now)
            success = kinds.get(Signal.SUCCESS.value, empty).mean(
                now, half, priors[Signal.SUCCESS], model.prior_weight
            )
            agreement = kinds.get(Signal.AGREEMENT.value, empty).mean(
                now, half, priors[Signal.AGREEMENT], model.prior_weight
            )
            log_ratio = kinds.get(Signal.SPEED.value, empty).mean(
                now, half, 0.0, model.speed_prior_weight
            )
            speed = min(1.0, math.exp(-log_ratio))
            beat = beats.get(node)
            if beat is not None:
                factor = 2.0 ** (-max(now - beat.at, 0.0) / half)
                mtbf, reliability = mtbf_score(beat.up_s * factor, beat.failures * factor, model)
            else:
                mtbf, reliability = mtbf_score(0.0, 0.0, model)
            evidence = sum(s.decayed_to(now, half).weight_sum for s in kinds.values())
            result[node] = NodeRating(
                node, success, agreement, speed, mtbf, reliability,
                combine(success, agreement, speed, reliability), evidence,
            )
        return result
