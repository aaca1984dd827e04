"""What the Koji tests share: a :class:`~p2pbuild.testing._kojifarm.KojiFarm` started in the
test's own nursery (:func:`open_farms`), the task id the ``koji`` command prints, and
waiting on the nodes' builds through their events rather than by looking again."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

import trio

from p2pbuild import PublicKey
from p2pbuild.node._service import JobRunner, JobService
from p2pbuild.testing import TrustFixture, make_trust_list
from p2pbuild.testing._kojifarm import KojiFarm, start_koji_farm
from p2pbuild.testing._runner import InstantRunner

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob"), ("n3", "carol")])


def task_id_of(out: str) -> int:
    """The task id in the output of ``koji build --nowait`` (or ``--wait``)."""
    line = next(x for x in out.splitlines() if x.startswith("Created task:"))
    return int(line.split(":")[1])


class Farms:
    """Starts a KojiFarm in the nursery :func:`open_farms` holds."""

    def __init__(self, nursery: trio.Nursery, tmp: Path, fixture: TrustFixture) -> None:
        self.nursery, self.tmp, self.fixture = nursery, tmp, fixture
        self.farm: KojiFarm | None = None

    async def start(self, runners: dict[str, Any], **kwargs: Any) -> KojiFarm:
        self.farm = await start_koji_farm(self.nursery, self.tmp, runners, self.fixture,
                                          **kwargs)
        return self.farm


@contextlib.asynccontextmanager
async def open_farms(tmp: Path, fixture: TrustFixture = FIXTURE) -> AsyncIterator[Farms]:
    """At the end stops the dispatcher and nodes, then the hub process."""
    holder = None
    try:
        async with trio.open_nursery() as nursery:
            holder = Farms(nursery, tmp, fixture)
            yield holder
            nursery.cancel_scope.cancel()
    finally:
        if holder is not None and holder.farm is not None:
            with trio.CancelScope(shield=True):
                await holder.farm.hub.stop()


class _Node(Protocol):
    @property
    def service(self) -> JobService: ...
    @property
    def runner(self) -> JobRunner: ...


async def wait_building(nodes: Iterable[_Node], timeout: float = 30) -> None:
    """Until every node's :class:`InstantRunner` has started its job (a gated one then
    waits at the gate)."""
    with trio.fail_after(timeout):
        for node in nodes:
            assert isinstance(node.runner, InstantRunner)
            await node.runner.wait_runs(1)


async def wait_stopped(nodes: Iterable[_Node], timeout: float = 30) -> None:
    """Until no node runs a job."""
    with trio.fail_after(timeout):
        for node in nodes:
            await node.service.wait_idle()


async def submit_building(farm: KojiFarm, srpm: Path) -> tuple[int, dict[PublicKey, bytes]]:
    """``koji build --nowait`` of ``srpm``, once every node builds its job (gated runners
    wait there): the task id, and each node's job id by its key."""
    code, out, err = await farm.koji("build", "--nowait", "f40-p2p", str(srpm))
    assert code == 0, out + err
    task_id = task_id_of(out)
    await wait_building(farm.nodes.values())
    return task_id, {n.identity.public_key: n.service.running_jobs()[0]
                     for n in farm.nodes.values()}
