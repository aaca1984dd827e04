"""Push nodes in the test's own process, listed in a static directory, for the dispatcher
tests that run an engine or a whole dispatcher over them."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pbuild.dispatcher._nodes import StaticFinder
from p2pbuild.node._service import JobRunner
from p2pbuild.testing import TrustFixture
from p2pbuild.testing._farm import FarmNode, start_push_node
from p2pbuild.testing._runner import InstantRunner


class PushNodes:
    """Nodes of ``fixture`` started in ``nursery`` under ``tmp``, each listed in
    :attr:`finder` (a :class:`StaticFinder` of the fixture's trust list)."""

    def __init__(self, nursery: trio.Nursery, tmp: Path, fixture: TrustFixture) -> None:
        self.nursery, self.tmp, self.fixture = nursery, tmp, fixture
        self.finder = StaticFinder(fixture.trust_list)
        self.nodes: dict[str, FarmNode] = {}

    async def add_node(self, name: str, runner: JobRunner | None = None,
                       **kwargs: object) -> FarmNode:
        """Start node ``name`` (an :class:`InstantRunner` unless ``runner`` is given;
        ``kwargs`` as for :func:`start_push_node`) and list it."""
        node = await start_push_node(
            self.nursery, self.tmp / name, self.fixture.nodes[name], self.fixture.trust_list,
            runner or InstantRunner(), **kwargs,  # type: ignore[arg-type]
        )
        self.nodes[name] = node
        self.finder.put(node.entry())
        return node
