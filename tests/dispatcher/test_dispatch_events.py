"""The followed event stream: keep-alive lines while a build is quiet, then the events."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio
import trio.testing

from p2pbuild.dispatcher._access import Caller
from p2pbuild.dispatcher._api import _event_stream
from p2pbuild.dispatcher._db import BuildRow, BuildState, Database


@attrs.define(eq=False)
class QuietEngine:
    """The two things the stream reads from an engine: its database and a change signal."""

    db: Database
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def wait_changed(self) -> None:
        await self.changed.wait()

    @property
    def next_change(self) -> trio.Event:
        return self.changed


def quiet_engine(tmp_path: Path) -> QuietEngine:
    db = Database.open(tmp_path / "d.db")
    db.insert_build(BuildRow(
        id="b" * 32, created_at=1.0, updated_at=1.0, user="u", team=None,
        state=BuildState.RUNNING, source_name="hello-1.0-1.src.rpm", source_sha256="0" * 64,
        source_size=1, build_type="rpm", arch="x86_64", os="fedora-41", replicas=2,
    ))
    return QuietEngine(db)


async def test_a_quiet_build_gets_a_keepalive_line_each_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    engine = quiet_engine(tmp_path)
    stream = _event_stream(engine, "b" * 32, 0, True, Caller("u"), 15.0)  # type: ignore[arg-type]
    start = trio.current_time()
    first = await anext(stream)
    assert b'"accepted"' in first
    received = []
    for _ in range(3):
        received.append((await anext(stream), trio.current_time() - start))
    assert received == [(b"\n", 15.0), (b"\n", 30.0), (b"\n", 45.0)]
    engine.db.set_build_state("b" * 32, BuildState.VERIFIED, 50.0, reason="verified by a, b")
    engine.changed.set()
    last = await anext(stream)
    assert b'"build-verified"' in last
    assert [line async for line in stream] == []
    await stream.aclose()
