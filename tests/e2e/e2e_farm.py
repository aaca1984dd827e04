"""A farm of real processes started for one test and stopped after it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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


async def wait_log(farm: LocalFarm, build: dict[str, Any], node: str, text: bytes,
                   timeout: float = 60) -> None:
    """Follow the live log of ``node``'s running attempt at ``build`` (streamed from the
    node through the dispatcher, as the build's page shows it) until ``text`` arrived."""
    (attempt,) = [a for a in build["attempts"]
                  if farm.node_name(a["node"]) == node and a["state"] == "running"]
    received = b""
    path = f"/builds/{build['id']}/attempts/{attempt['id']}/log"
    with trio.fail_after(timeout):
        async with farm.http() as http, http.stream("GET", path) as response:
            assert response.status_code == 200, await response.aread()
            async for chunk in response.aiter_bytes():
                received += chunk
                if text in received:
                    return
    raise AssertionError(f"{node}'s log ended without {text!r}: {received[-2000:]!r}")
