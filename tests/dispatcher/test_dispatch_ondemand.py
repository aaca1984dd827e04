"""On-demand nodes: standby after an idle time, woken by a dispatcher's signed request,
pools that keep some awake. Real push nodes on loopback TLS, the real engine and SQLite."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from engine_waits import wait_build
from push_nodes import PushNodes
from waits import wait_until

from p2pbuild._codec import encode
from p2pbuild._wake import WakeRequest
from p2pbuild.dispatcher._db import BuildRow, BuildState, Database
from p2pbuild.dispatcher._engine import BuildRequest, Engine, EngineConfig
from p2pbuild.dispatcher._sink import RepositorySink
from p2pbuild.dispatcher._waking import KeepAwake
from p2pbuild.https import pinned_client
from p2pbuild.node._ondemand import OnDemandConfig
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import FarmNode

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob"), ("n3", "carol")])
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
SOURCE = b"not really an srpm, the instant runner never reads it\n"


class Farm(PushNodes):
    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        super().__init__(nursery, tmp, FIXTURE)
        self.engine: Engine | None = None
        self._published = trio.Event()

    async def add(self, name: str, *, idle_s: float | None = 0.5, pools: tuple[str, ...] = (),
                  hook: tuple[str, ...] = ()) -> FarmNode:
        on_demand = None if idle_s is None else OnDemandConfig(idle_s, 5, hook=hook)
        return await self.add_node(
            name, slots=1, pools=pools, on_demand=on_demand,
            on_change=self._publish,
        )

    async def start_engine(self) -> Engine:
        engine = Engine(
            db=Database.open(self.tmp / "dispatcher.db"), identity=DISPATCHER,
            trust_list=FIXTURE.trust_list, finder=self.finder,
            sink=RepositorySink(self.tmp / "repo"),
            config=EngineConfig(
                state_dir=self.tmp / "state", follow_interval_s=1.0, backoff_base_s=0.05,
                backoff_max_s=0.5, node_retry_base_s=0.2, no_node_wait_s=5.0,
                node_timeout_s=5.0, wake_poll_s=0.1,
            ),
            rng=random.Random(1),
        )
        await self.nursery.start(engine.run)
        self.engine = engine
        return engine

    def submit(self, **kwargs: object) -> BuildRow:
        assert self.engine is not None
        store = self.engine.sources
        store.root.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256(SOURCE).hexdigest()
        store.path(sha).write_bytes(SOURCE)
        return self.engine.accept(BuildRequest(
            source_name="hello-1.0-1.src.rpm", source_sha256=sha, source_size=len(SOURCE),
            **kwargs,  # type: ignore[arg-type]
        ), "user-1", None)

    def _publish(self, node: FarmNode) -> None:
        """A node's standby state changed: it republishes its status (here, in the finder)."""
        self.finder.put(node.entry())
        self._published.set()
        self._published = trio.Event()

    async def wait_published(self, test: Callable[[], bool], timeout: float = 10) -> None:
        """Until ``test()`` holds, looked at again whenever a node republishes its state."""
        with trio.fail_after(timeout):
            while not test():
                await self._published.wait()

    def standby(self, name: str) -> bool:
        entry = self.finder.entries[self.nodes[name].identity.public_key]
        return entry.status is not None and entry.status.standby


@pytest.fixture
async def farm(nursery: trio.Nursery, tmp_path: Path) -> Farm:
    return Farm(nursery, tmp_path)


async def test_standby_node_is_woken_by_a_signed_request_and_builds(
    farm: Farm, tmp_path: Path
) -> None:
    hook_log = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$1" >> {hook_log}\n')
    hook.chmod(0o755)
    await farm.add("n1", hook=(str(hook),))
    await farm.add("n2", hook=(str(hook),))
    # Idle: both publish standby (and their owner's hook ran).
    await farm.wait_published(lambda: farm.standby("n1") and farm.standby("n2"))
    await wait_until(lambda: hook_log.exists() and hook_log.read_text().count("standby") == 2,
                     10, "both standby hooks ran")
    capability = farm.finder.entries[farm.nodes["n1"].identity.public_key].capability
    assert capability.wake_s == 5 and capability.wake_url.endswith("/v1/wake")
    engine = await farm.start_engine()
    build = farm.submit()
    with trio.fail_after(20):
        await wait_build(engine, build.id, lambda b: b.state.terminal)
    done = engine.db.build(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    events = [(e.event, e.node) for e in engine.db.audit_entries(build.id)]
    names = [event for event, _ in events]
    assert names.count("node-wake") == 2 and names.count("node-awake") == 2
    assert max(i for i, n in enumerate(names) if n == "node-awake") < names.index("node-chosen")
    assert all(node.on_demand is not None and node.on_demand.wakes == 1
               for node in farm.nodes.values())
    assert hook_log.read_text().split() == ["standby", "standby", "wake", "wake"]


async def test_an_awake_node_is_preferred_and_standby_woken_only_when_needed(
    farm: Farm,
) -> None:
    await farm.add("n1")
    await farm.add("n2")
    await farm.add("n3", idle_s=None)  # always on
    await farm.wait_published(lambda: farm.standby("n1") and farm.standby("n2"))
    engine = await farm.start_engine()
    build = farm.submit()
    with trio.fail_after(20):
        await wait_build(engine, build.id, lambda b: b.state.terminal)
    assert engine.db.build(build.id).state is BuildState.VERIFIED
    operators = {a.operator for a in engine.db.attempts(build.id)}
    # Two operators are needed: the awake carol and one sleeper, woken.
    assert "carol" in operators and len(operators) == 2
    wakes = [e for e in engine.db.audit_entries(build.id) if e.event == "node-wake"]
    assert len(wakes) == 1


async def test_forged_or_replayed_wake_requests_are_refused(farm: Farm) -> None:
    node = await farm.add("n1", idle_s=0.3)
    on_demand = node.on_demand
    assert on_demand is not None
    await farm.wait_published(lambda: on_demand.standby)
    key = node.identity.public_key

    async def post(body: bytes) -> httpx.Response:
        async with pinned_client(node.tls.sha256, base_url=node.url) as http:
            return await http.post("/v1/wake", content=body)

    now = int(on_demand.clock())
    # Signed by a trusted node's key, not a dispatcher's.
    forged = WakeRequest.create(FIXTURE.nodes["n2"], key, issued_at=now)
    response = await post(forged.to_bytes())
    assert response.status_code == 403 and response.json()["error"] == "forbidden"
    # Signed by the dispatcher under another domain (not a wake request signature).
    unsigned = [1, DISPATCHER.public_key.raw, key.raw, now, bytes(16)]
    from p2pbuild._identity import Domain

    other = encode([*unsigned, DISPATCHER.sign(Domain.JOB_CONTROL, encode(unsigned))])
    response = await post(other)
    assert response.status_code == 401 and response.json()["error"] == "bad-signature"
    # For another node; garbage; stale.
    response = await post(WakeRequest.create(
        DISPATCHER, FIXTURE.nodes["n2"].public_key, issued_at=now).to_bytes())
    assert response.status_code >= 400
    assert (await post(b"\x93garbage")).status_code == 400
    response = await post(WakeRequest.create(DISPATCHER, key, issued_at=now - 600).to_bytes())
    assert response.status_code >= 400 and response.json()["error"] == "expired"
    assert on_demand.standby and on_demand.wakes == 0 and on_demand.refused == 5
    # A genuine request wakes it; the same bytes again are a replay.
    genuine = WakeRequest.create(DISPATCHER, key, issued_at=now)
    response = await post(genuine.to_bytes())
    assert response.status_code == 202 and response.json() == {"standby": False}
    assert on_demand.wakes == 1
    await farm.wait_published(lambda: on_demand.standby)
    response = await post(genuine.to_bytes())
    assert response.status_code >= 400 and response.json()["error"] == "replayed"
    assert on_demand.standby and on_demand.wakes == 1


async def test_a_pool_keeping_one_awake_lets_the_other_sleep_and_wakes_it_under_load(
    farm: Farm,
) -> None:
    await farm.add("n1", idle_s=2.0, pools=("p",))
    await farm.add("n2", idle_s=2.0, pools=("p",))
    keep = KeepAwake(DISPATCHER, farm.finder, {"p": 1}, time.time, interval_s=0.3)
    farm.nursery.start_soon(keep.run)

    def one_asleep() -> bool:
        return sorted([farm.standby("n1"), farm.standby("n2")]) == [False, True]

    await farm.wait_published(one_asleep)
    # It stays so over several idle periods: the kept node's idle time keeps restarting.
    for _ in range(10):
        await trio.sleep(0.3)
        assert one_asleep()
    asleep = next(n for n in ("n1", "n2") if farm.standby(n))
    engine = await farm.start_engine()
    build = farm.submit(pool="p")
    with trio.fail_after(20):
        await wait_build(engine, build.id, lambda b: b.state.terminal)
    assert engine.db.build(build.id).state is BuildState.VERIFIED
    woken = [e.node for e in engine.db.audit_entries(build.id) if e.event == "node-awake"]
    assert woken == [str(farm.nodes[asleep].identity.public_key)]
    assert keep.sent >= 10

