"""The roles of a dispatcher machine wired together, in one place above them all: the
dispatcher (``p2pbuild.dispatcher``) and, when its configuration file has a ``[koji]``
section, the Koji build host (``p2pbuild.koji``) over the dispatcher's build service.

Neither package imports the other's wiring: the dispatcher knows nothing of Koji, and the
Koji host sees only :class:`~p2pbuild.dispatcher.EngineBuildService` through its
``BuildService`` protocol. ``p2pbuild dispatcher run``, the tests and the benchmarks start
a dispatcher machine with :func:`load_service_config` and :func:`serve_dispatcher`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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

__all__ = [
    "RunningService",
    "ServiceConfig",
    "load_service_config",
    "lock_state_dir",
    "serve_dispatcher",
]

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


@contextlib.contextmanager
def lock_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold ``state_dir/dispatcher.lock`` (an exclusive ``flock``, released when the
    process ends, also on SIGKILL) while the block runs: one dispatcher per state
    directory, since two would share the database, the pull queue and the Koji task store
    (and log into the hub as the same host). Raises :class:`ConfigError` naming the
    holder's pid when another process has it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "dispatcher.lock"
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConfigError(
                f"{state_dir} is in use by another dispatcher (pid {holder}); stop it, or "
                "give this one its own state_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


async def serve_dispatcher(
    config: ServiceConfig,
    *,
    finder: NodeFinder | None = None,
    task_status: trio.TaskStatus[RunningService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the dispatcher, and the Koji build host over its build service, until
    cancelled. ``finder`` replaces the DHT (tests, static setups). Raises what
    :func:`~p2pbuild.dispatcher.run_dispatcher` and :func:`~p2pbuild.koji.serve_koji_host`
    raise at start, and :class:`ConfigError` when another dispatcher runs on the same state
    directory (:func:`lock_state_dir`)."""
    with lock_state_dir(config.dispatcher.state_dir):
        async with trio.open_nursery() as nursery:
            running: RunningDispatcher = await nursery.start(
                functools.partial(run_dispatcher, config.dispatcher, finder=finder)
            )
            host = None
            if config.koji is not None:
                from .koji import serve_koji_host

                host = await nursery.start(
                    serve_koji_host, config.koji, EngineBuildService(running.engine),
                    config.dispatcher.state_dir / "koji",
                )
            task_status.started(RunningService(running, host))
