"""A node's ``/metrics`` in the Prometheus text format (``prometheus-client``), read from
its job service's statistics at each scrape:

    p2pbuild_node_builds_total{state}        finished builds by the state of their signed
                                             result (succeeded, failed, timed-out, ...)
    p2pbuild_node_failures_total{reason}     builds that did not succeed, by result state,
                                             and jobs refused, by error code
    p2pbuild_node_sandbox_seconds_total      time spent running builds
    p2pbuild_node_jobs_accepted_total        jobs admitted
    p2pbuild_node_slots, _running            slots and running builds
    p2pbuild_node_draining                   1 while the node is shutting down
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._service import JobServiceStatistics

__all__ = ["CONTENT_TYPE", "NodeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define(eq=False)
class NodeMetrics(Collector):
    """The registry behind a node's ``/metrics`` over ``statistics`` (the service's)."""

    statistics: Callable[[], JobServiceStatistics]
    registry: CollectorRegistry = attrs.field(
        factory=lambda: CollectorRegistry(auto_describe=False)
    )

    def __attrs_post_init__(self) -> None:
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        stats = self.statistics()
        builds = CounterMetricFamily("p2pbuild_node_builds", "Finished builds by result state",
                                     labels=["state"])
        failures = CounterMetricFamily("p2pbuild_node_failures",
                                       "Builds that did not succeed and jobs refused, by reason",
                                       labels=["reason"])
        for state, count in stats.results:
            builds.add_metric([state], count)
            if state != "succeeded":
                failures.add_metric([state], count)
        for code, count in stats.rejected:
            failures.add_metric([f"refused:{code}"], count)
        yield builds
        yield failures
        yield CounterMetricFamily("p2pbuild_node_sandbox_seconds", "Time spent running builds",
                                  value=stats.build_seconds)
        yield CounterMetricFamily("p2pbuild_node_jobs_accepted", "Jobs admitted",
                                  value=stats.accepted)
        yield GaugeMetricFamily("p2pbuild_node_slots", "Build slots", value=stats.slots)
        yield GaugeMetricFamily("p2pbuild_node_running", "Builds running", value=stats.running)
        yield GaugeMetricFamily("p2pbuild_node_draining", "1 while shutting down",
                                value=1 if stats.draining else 0)
