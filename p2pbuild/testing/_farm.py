"""A small build farm in one trio run: push-mode nodes (the real job service and HTTPS API
on loopback, with any runner) and the signed records a dispatcher would find for them.

Used by the dispatcher's tests, its benchmark and the demo::

    fixture = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob")])
    async with trio.open_nursery() as nursery:
        node = await start_push_node(nursery, tmp / "n1", fixture.nodes["n1"],
                                     fixture.trust_list, InstantRunner())
        finder = StaticFinder(fixture.trust_list)
        finder.put(node.entry())
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import tomli_w
import trio

from .._identity import Identity
from .._records import Capability, MachineType, SignedRecord, Status
from .._trust import TrustList
from ..dht import NodeEntry
from ..https import TlsMaterial, generate_tls_material
from ..node._api import NodeApiConfig, serve_node_api
from ..node._config import PullDispatcher
from ..node._ondemand import OnDemand, OnDemandConfig
from ..node._pull import PullClient
from ..node._service import JobRunner, JobService
from ._keys import TrustFixture

__all__ = [
    "FarmNode",
    "PullFarmNode",
    "node_entry",
    "start_pull_node",
    "start_push_node",
    "write_dispatcher_config",
]


def node_entry(
    identity: Identity,
    capability: Capability,
    status: Status | None = None,
    *,
    now: float | None = None,
    seq: int = 1,
    trust_list: TrustList | None = None,
) -> NodeEntry:
    """Sign ``capability`` (and ``status``) as ``identity`` and wrap them as a directory
    lookup would return them."""
    issued = int(time.time() if now is None else now)
    cap = SignedRecord.create(identity, capability, seq=seq, issued_at=issued, lifetime=3600)
    st = (
        SignedRecord.create(identity, status, seq=seq, issued_at=issued, lifetime=300)
        if status is not None else None
    )
    trust = trust_list.entry(identity.public_key) if trust_list is not None else None
    return NodeEntry(identity.public_key, cap, st, trust)


@attrs.define(eq=False)
class FarmNode:
    """A running push node: its identity, job service, runner, certificate and port."""

    identity: Identity
    service: JobService
    runner: JobRunner
    tls: TlsMaterial
    port: int
    arch: str = "x86_64"
    os: str = "fedora-41"
    machine: MachineType = MachineType.VM
    pools: tuple[str, ...] = ()
    build_types: tuple[str, ...] = ("make", "rpm")
    uptime_s: int = 3600
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: An on-demand node's standby state (its wake URL is its own ``/v1/wake``).
    on_demand: OnDemand | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def capability(self) -> Capability:
        wake_s, wake_url = 0, ""
        if self.on_demand is not None:
            wake_s = self.on_demand.config.wake_s
            wake_url = self.on_demand.config.wake_url or f"{self.url}/v1/wake"
        return Capability(
            arch=self.arch, os=self.os, cpus=4, cpu_model="test cpu", memory_mb=8192,
            disk_mb=50_000, machine=self.machine, build_types=self.build_types,
            pools=tuple(sorted(self.pools)), endpoint=self.url, tls_sha256=self.tls.sha256,
            wake_s=wake_s, wake_url=wake_url,
        )

    def status(self) -> Status:
        stats = self.service.statistics()
        return Status(
            load_milli=0, slots_total=stats.slots, slots_free=max(stats.slots - stats.running, 0),
            running=stats.running, uptime_s=self.uptime_s, draining=stats.draining,
            standby=self.on_demand is not None and self.on_demand.standby,
        )

    def entry(self, trust_list: TrustList | None = None, *, seq: int = 1) -> NodeEntry:
        return node_entry(
            self.identity, self.capability(), self.status(), seq=seq, trust_list=trust_list
        )

    def stop(self) -> None:
        """Kill the node's API and service at once (a machine that disappears)."""
        self.scope.cancel()


async def _run(
    config: NodeApiConfig,
    service: JobService,
    scope: trio.CancelScope,
    on_demand: OnDemand | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await serve_node_api(config, service, on_demand=on_demand, task_status=task_status)


async def start_push_node(
    nursery: trio.Nursery,
    directory: Path,
    identity: Identity,
    trust_list: TrustList,
    runner: JobRunner,
    *,
    slots: int = 4,
    arch: str = "x86_64",
    os: str = "fedora-41",
    machine: MachineType = MachineType.VM,
    pools: Sequence[str] = (),
    on_demand: OnDemandConfig | None = None,
    on_change: Callable[[FarmNode], None] | None = None,
    build_types: Sequence[str] = ("make", "rpm"),
) -> FarmNode:
    """Start a node's job service and HTTPS API on a free loopback port in ``nursery``.

    With ``on_demand`` the node sleeps when idle and serves ``POST /v1/wake``; each change
    of its standby state calls ``on_change(node)`` (to republish it, e.g. in a finder).
    """
    (directory / "tls").mkdir(parents=True)
    tls = generate_tls_material(directory / "tls")
    service = JobService(identity, trust_list, runner, directory / "work", slots=slots)
    scope = trio.CancelScope()
    standby = None
    node: FarmNode | None = None
    if on_demand is not None:

        async def changed() -> None:
            if on_change is not None and node is not None:
                on_change(node)

        standby = OnDemand(on_demand, identity.public_key, trust_list, on_change=changed)
    port = await nursery.start(_run, NodeApiConfig(tls=tls), service, scope, standby)
    node = FarmNode(
        identity, service, runner, tls, port, arch, os, machine, tuple(pools),
        tuple(sorted(build_types)), scope=scope, on_demand=standby,
    )
    return node


@attrs.define(eq=False)
class PullFarmNode:
    """A running pull node: no port, its job service and the client that long-polls one
    dispatcher (``node._pull.PullClient``)."""

    identity: Identity
    service: JobService
    runner: JobRunner
    client: PullClient
    arch: str = "x86_64"
    os: str = "fedora-41"

    def capability(self) -> Capability:
        return Capability(
            arch=self.arch, os=self.os, cpus=4, cpu_model="test cpu", memory_mb=8192,
            disk_mb=50_000, machine=MachineType.VM, build_types=("make", "rpm"), pools=(),
        )

    def status(self) -> Status:
        stats = self.service.statistics()
        return Status(
            load_milli=0, slots_total=stats.slots, slots_free=max(stats.slots - stats.running, 0),
            running=stats.running, uptime_s=3600, draining=stats.draining,
        )

    def entry(self, trust_list: TrustList | None = None, *, seq: int = 1) -> NodeEntry:
        return node_entry(
            self.identity, self.capability(), self.status(), seq=seq, trust_list=trust_list
        )


async def start_pull_node(
    nursery: trio.Nursery,
    directory: Path,
    identity: Identity,
    trust_list: TrustList,
    runner: JobRunner,
    dispatcher: PullDispatcher,
    *,
    slots: int = 4,
    poll_timeout: float = 2.0,
    heartbeat_s: float = 15.0,
) -> PullFarmNode:
    """Start a pull node's job service and its long-poll client of ``dispatcher`` in
    ``nursery`` (a dispatcher that is away is retried, as by the node daemon)."""
    directory.mkdir(parents=True, exist_ok=True)
    service = JobService(identity, trust_list, runner, directory / "work", slots=slots)
    client = PullClient(dispatcher, identity, service, poll_timeout=poll_timeout,
                        heartbeat_s=heartbeat_s)
    await nursery.start(service.run)
    await nursery.start(client.run)
    return PullFarmNode(identity, service, runner, client)


def write_dispatcher_config(directory: Path, fixture: TrustFixture, **sections: Any) -> Path:
    """A dispatcher's directory: ``fixture``'s dispatcher key and trust list, a new TLS
    certificate, and ``dispatcher.toml`` with a ``[dispatcher]`` section naming them, an
    API on any free port, and ``sections`` (``api`` replacing that one). Returns the
    config's path."""
    fixture.dispatchers["dispatcher-1"].save(directory / "dispatcher.key")
    (directory / "trust-list.bin").write_bytes(fixture.trust_list.to_bytes())
    (directory / "tls").mkdir()
    generate_tls_material(directory / "tls")
    config = {
        "dispatcher": {"key": "dispatcher.key", "trust_list": "trust-list.bin"},
        "api": {"port": 0},
        **sections,
    }
    path = directory / "dispatcher.toml"
    path.write_text(tomli_w.dumps(config))
    return path
