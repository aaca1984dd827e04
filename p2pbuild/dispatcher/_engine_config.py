"""The build engine's bounds and timings, and its statistics: values the planner
(``_plan.py``), the config reader (``_config.py``: its ``[engine]`` keys are these fields)
and the engine share."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs

from .._jobs import DEFAULT_ARCH, DEFAULT_OS
from ._select import DEFAULT_SELECTION_POLICY, SelectionPolicy

__all__ = ["EngineConfig", "EngineStatistics"]


@attrs.frozen
class EngineConfig:
    """The engine's bounds and timings (seconds)."""

    state_dir: Path
    #: Base URL nodes fetch sources from (``<public_url>/v1/sources/<sha256>``); empty:
    #: jobs carry no URL (the inline-upload form; for tests with in-process runners).
    public_url: str = ""
    default_arch: str = DEFAULT_ARCH
    default_os: str = DEFAULT_OS
    #: A job's lifetime beyond its time limit (queueing, fetching, uploading).
    job_margin_s: int = 600
    #: How long one follow of a running job lasts before a liveness check in the DHT.
    follow_interval_s: float = 30.0
    #: Unreachable this long (consecutive) while running: the node is lost.
    unreachable_after_s: float = 60.0
    #: Submit retries when a node is busy or unreachable, with exponential backoff.
    submit_tries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    #: A lost node is excluded from the same build for backoff_base_s * 2**losses.
    node_retry_base_s: float = 5.0
    max_attempts: int = 8
    max_tiebreaks: int = 2
    #: How long to wait for a node when only transient constraints fail.
    no_node_wait_s: float = 300.0
    #: Team of each pool dedicated to one team.
    dedicated_pools: Mapping[str, str] = attrs.field(factory=dict)
    selection: SelectionPolicy = DEFAULT_SELECTION_POLICY
    max_source_bytes: int = 1024**3
    #: Hosts a source URL may name although they are not public (``_sources.py``).
    source_allow_hosts: tuple[str, ...] = ()
    #: Record a node's heartbeat at most this often.
    heartbeat_interval_s: float = 60.0
    node_timeout_s: float = 30.0
    #: While waking an on-demand node through its operator's service: how often to look
    #: for its status out of standby in the directory.
    wake_poll_s: float = 1.0


@attrs.frozen
class EngineStatistics:
    builds_running: int
    attempts_running: int
    #: Node errors by code.
    node_errors: tuple[tuple[str, int], ...]

    def to_json(self) -> dict[str, object]:
        return {
            "builds_running": self.builds_running,
            "attempts_running": self.attempts_running,
            "node_errors": dict(self.node_errors),
        }
