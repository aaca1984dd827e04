"""A farm of real processes started for one test and stopped after it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from p2pbuild.testing import LocalFarm, NodeSpec, open_local_farm


@asynccontextmanager
async def farm_of(
    tmp_path: Path, specs: Sequence[NodeSpec], *, start: Sequence[str] | None = None
) -> AsyncIterator[LocalFarm]:
    """A :class:`LocalFarm` of ``specs`` with ``start`` (default: every node) running."""
    farm = LocalFarm.create(tmp_path / "farm", specs)
    async with open_local_farm(farm):
        with trio.fail_after(60):
            await farm.start_all(nodes=start)
        yield farm
