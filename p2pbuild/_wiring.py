"""The roles of a dispatcher machine wired together, in one place above them all: the
dispatcher (``p2pbuild.dispatcher``) and, when its configuration file has a ``[koji]``
section, the Koji build host (``p2pbuild.koji``) over the dispatcher's build service.

Neither package imports the other's wiring: the dispatcher knows nothing of Koji, and the
Koji host sees only :class:`~p2pbuild.dispatcher.EngineBuildService` through its
``BuildService`` protocol. ``p2pbuild dispatcher run``, the tests and the benchmarks start
a dispatcher machine with :func:`load_service_config` and :func:`serve_dispatcher`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .dispatcher import (
    ConfigError,
    DispatcherConfig,
    EngineBuildService,
    NodeFinder,
    RunningDispatcher,
    load_config,
    run_dispatcher,
)

if TYPE_CHECKING:
    from .koji import KojiConfig, KojiHost

__all__ = ["RunningService", "ServiceConfig", "load_service_config", "serve_dispatcher"]

#: The sections of the dispatcher's file that belong to the roles wired here.
ROLE_SECTIONS = ("koji",)


@attrs.frozen
class ServiceConfig:
    """A dispatcher machine's configuration: the dispatcher's, and the Koji host's if any."""

    dispatcher: DispatcherConfig
    koji: KojiConfig | None = None


def load_service_config(path: Path) -> ServiceConfig:
    """Read the dispatcher's configuration file with its ``[koji]`` section. Raises
    :class:`ConfigError` (also when ``[koji]`` is there and the ``koji`` client is not
    installed)."""
    config = load_config(path, extra_sections=ROLE_SECTIONS)
    table = config.sections.get("koji")
    if not table:
        return ServiceConfig(config)
    try:
        from .koji import koji_config
    except ImportError as exc:
        raise ConfigError(
            f"{path} [koji]: the koji client is not installed ({exc}); "
            "install p2pbuild[koji]"
        ) from None

    def rel(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else path.parent / p

    return ServiceConfig(config, koji_config(table, f"{path} [koji]", rel))


@attrs.frozen
class RunningService:
    """What :func:`serve_dispatcher` reports once the dispatcher listens and the Koji host
    (if configured) has started."""

    dispatcher: RunningDispatcher
    #: The Koji build host (``p2pbuild.koji.KojiHost``) when ``[koji]`` is configured.
    koji: KojiHost | None = None


async def serve_dispatcher(
    config: ServiceConfig,
    *,
    finder: NodeFinder | None = None,
    clock: Any = time.time,
    task_status: trio.TaskStatus[RunningService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the dispatcher, and the Koji build host over its build service, until
    cancelled. Raises what :func:`~p2pbuild.dispatcher.run_dispatcher` and
    :func:`~p2pbuild.koji.serve_koji_host` raise at start."""
    async with trio.open_nursery() as nursery:
        running: RunningDispatcher = await nursery.start(
            lambda task_status: run_dispatcher(config.dispatcher, finder=finder, clock=clock,
                                               task_status=task_status)
        )
        host = None
        if config.koji is not None:
            from .koji import serve_koji_host

            host = await nursery.start(
                serve_koji_host, config.koji, EngineBuildService(running.engine),
                config.dispatcher.state_dir / "koji",
            )
        task_status.started(RunningService(running, host))
