"""The dispatcher's ``/metrics`` in the Prometheus text format (``prometheus-client``).

Nothing in the engine counts for it: gauges are read at scrape time (builds and attempts by
state from the database, node states from one directory lookup, the engine's node error
counters, the DHT's statistics) and the counters and the overhead histogram are folded in
from the audit trail, which already records every decision. Each scrape reads only the
audit entries appended since the previous one, so after a restart the counters start from
the whole trail: they count since the database was created, not since the process started.

Families (all prefixed ``p2pbuild_dispatcher_`` except the DHT's ``p2pbuild_dht_``):

    builds{state}                       gauge: builds by state
    queue_length                        gauge: builds accepted and waiting for a node
    attempts{state}                     gauge: attempts by state
    nodes{state}                        gauge: nodes seen by liveness (online, draining,
                                        standby, offline)
    verifications_total{outcome}        counter: agreed (verified without disagreement),
                                        mismatch (replicas disagreed), tie-break (tie-break
                                        attempts started)
    builds_finished_total{state}        counter: verified, failed, cancelled
    node_errors_total{code}             counter: lost or refused attempts by code
    dispatch_overhead_seconds           histogram: time from acceptance to verified, beyond
                                        the longest build time of its agreeing results
    p2pbuild_dht_lookups_total          counter: the dispatcher's DHT lookups
    p2pbuild_dht_rejected_records_total{reason}   counter: records refused by reason
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..dht import DhtStatistics
from ._db import AttemptState, BuildState
from ._views import WebReader

__all__ = ["CONTENT_TYPE", "DispatcherMetrics", "OVERHEAD_BUCKETS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OVERHEAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PREFIX = "p2pbuild_dispatcher_"


def _detail(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


@attrs.define(eq=False)
class _AuditTally:
    """Counters folded from audit entries, one batch at a time."""

    overhead: Histogram
    after: int = 0
    outcomes: Counter[str] = attrs.field(factory=Counter)
    finished: Counter[str] = attrs.field(factory=Counter)
    #: Per build still open: (accepted at, longest successful build time in seconds).
    _open: dict[str, tuple[float, float]] = attrs.field(factory=dict)
    _disagreed: set[str] = attrs.field(factory=set)

    def fold(self, reader: WebReader, batch: int = 5000) -> None:
        while True:
            rows = reader.events(after=self.after, limit=batch)
            for row in rows:
                self._one(row["build_id"], row["event"], row["at"], row["detail"])
                self.after = row["id"]
            if len(rows) < batch:
                return

    def _one(self, build_id: str | None, event: str, at: float, detail_text: str) -> None:
        if build_id is None:
            return
        if event == "accepted":
            self._open[build_id] = (at, 0.0)
            return
        if event == "node-chosen":
            if '"tiebreak"' in detail_text and _detail(detail_text).get("role") == "tiebreak":
                self.outcomes["tie-break"] += 1
            return
        if event == "build-running":
            reason = str(_detail(detail_text).get("reason", ""))
            if reason.startswith("replicas disagree") and build_id not in self._disagreed:
                self._disagreed.add(build_id)
                self.outcomes["mismatch"] += 1
            return
        if event == "attempt-succeeded":
            accepted, longest = self._open.get(build_id, (at, 0.0))
            duration = _detail(detail_text).get("duration_ms", 0)
            if isinstance(duration, int | float):
                longest = max(longest, duration / 1000)
            self._open[build_id] = (accepted, longest)
            return
        if event in ("build-verified", "build-failed", "build-cancelled"):
            state = event.removeprefix("build-")
            self.finished[state] += 1
            opened = self._open.pop(build_id, None)
            disagreed = build_id in self._disagreed
            self._disagreed.discard(build_id)
            if state == "verified":
                if not disagreed:
                    self.outcomes["agreed"] += 1
                if opened is not None:
                    self.overhead.observe(max(0.0, at - opened[0] - opened[1]))


@attrs.define(eq=False)
class DispatcherMetrics(Collector):
    """The registry behind ``/metrics``. Call :meth:`refresh` (reads the new audit
    entries) and then :meth:`render`; ``node_states`` and ``node_errors`` and ``dht``
    give the live values at each scrape."""

    reader: WebReader
    node_errors: Callable[[], Mapping[str, int]]
    dht: Callable[[], DhtStatistics | None] = lambda: None
    registry: CollectorRegistry = attrs.field(
        factory=lambda: CollectorRegistry(auto_describe=False)
    )
    node_states: Mapping[str, int] = attrs.field(factory=dict)
    _tally: _AuditTally = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        overhead = Histogram(
            _PREFIX + "dispatch_overhead_seconds",
            "Time from acceptance to verified beyond the longest build of its agreeing results",
            buckets=OVERHEAD_BUCKETS, registry=self.registry,
        )
        self._tally = _AuditTally(overhead)
        self.registry.register(self)

    def refresh(self, node_states: Mapping[str, int] | None = None) -> None:
        self._tally.fold(self.reader)
        if node_states is not None:
            self.node_states = dict(node_states)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        builds = GaugeMetricFamily(_PREFIX + "builds", "Builds by state", labels=["state"])
        counts = self.reader.counts("builds")
        for state in BuildState:
            builds.add_metric([state.value], counts.get(state.value, 0))
        yield builds
        yield GaugeMetricFamily(_PREFIX + "queue_length",
                                "Builds accepted and waiting for a node",
                                value=counts.get(BuildState.QUEUED.value, 0))
        attempts = GaugeMetricFamily(_PREFIX + "attempts", "Attempts by state", labels=["state"])
        counts = self.reader.counts("attempts")
        for attempt_state in AttemptState:
            attempts.add_metric([attempt_state.value], counts.get(attempt_state.value, 0))
        yield attempts
        nodes = GaugeMetricFamily(_PREFIX + "nodes", "Nodes seen, by liveness",
                                  labels=["state"])
        for state_name in ("online", "draining", "standby", "offline"):
            nodes.add_metric([state_name], self.node_states.get(state_name, 0))
        yield nodes
        outcomes = CounterMetricFamily(_PREFIX + "verifications", "Verification outcomes",
                                       labels=["outcome"])
        for outcome in ("agreed", "mismatch", "tie-break"):
            outcomes.add_metric([outcome], self._tally.outcomes.get(outcome, 0))
        yield outcomes
        finished = CounterMetricFamily(_PREFIX + "builds_finished", "Builds finished, by state",
                                       labels=["state"])
        for state_name in ("verified", "failed", "cancelled"):
            finished.add_metric([state_name], self._tally.finished.get(state_name, 0))
        yield finished
        errors = CounterMetricFamily(_PREFIX + "node_errors", "Node errors by code",
                                     labels=["code"])
        for code, count in sorted(self.node_errors().items()):
            errors.add_metric([code], count)
        yield errors
        stats = self.dht()
        if stats is not None:
            yield CounterMetricFamily("p2pbuild_dht_lookups", "DHT lookups",
                                      value=stats.lookups)
            rejected = CounterMetricFamily("p2pbuild_dht_rejected_records",
                                           "DHT records rejected, by reason", labels=["reason"])
            for reason, count in sorted(stats.rejected.items()):
                rejected.add_metric([reason], count)
            yield rejected
