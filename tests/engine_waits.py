"""Waiting for a build engine without polling: each condition is checked whenever the
engine reports a change (``Engine.wait_changed``: a build accepted, an attempt running or
ended, a build finished), so a test wakes exactly when there is something to look at;
and an engine run so that a test can kill it and know when it has stopped."""

from __future__ import annotations

from collections.abc import Callable

import trio

from p2pbuild.dispatcher._db import AttemptRow, BuildRow
from p2pbuild.dispatcher._engine import Engine


async def wait_build(engine: Engine, build_id: str, test: Callable[[BuildRow], bool]) -> BuildRow:
    """The build once ``test`` holds for it."""
    while True:
        build = engine.db.build(build_id)
        if test(build):
            return build
        await engine.wait_changed()


async def wait_attempts(
    engine: Engine, build_id: str, test: Callable[[list[AttemptRow]], bool]
) -> list[AttemptRow]:
    """The build's attempts once ``test`` holds for them."""
    while True:
        attempts = engine.db.attempts(build_id)
        if test(attempts):
            return attempts
        await engine.wait_changed()


async def wait_all_done(engine: Engine, build_ids: list[str]) -> None:
    """Until every build in ``build_ids`` is finished (verified, failed or cancelled)."""
    for build_id in build_ids:
        await wait_build(engine, build_id, lambda b: b.state.terminal)


class EngineTask:
    """An engine run in its own cancel scope: :meth:`kill` stops it as a dying dispatcher
    process would (no shutdown), and returns once it has stopped."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def run(self, engine: Engine, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self.scope:
                await engine.run(task_status=task_status)
        finally:
            self.stopped.set()

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def start_engine(nursery: trio.Nursery, engine: Engine) -> EngineTask:
    """Run ``engine`` in ``nursery``; returns once it runs."""
    task = EngineTask()
    await nursery.start(task.run, engine)
    return task
