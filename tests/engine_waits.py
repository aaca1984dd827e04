"""Waiting for a build engine without polling: each condition is checked whenever the
engine reports a change (``Engine.wait_changed``: a build accepted, an attempt running or
ended, a build finished), so a test wakes exactly when there is something to look at."""

from __future__ import annotations

from collections.abc import Callable

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
