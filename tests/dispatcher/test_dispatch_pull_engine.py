"""The engine with pull-mode nodes that die, get cancelled, or outlive a dispatcher restart.

The nodes are in-process stand-ins speaking to the :class:`PullQueue` directly (take, renew
every heartbeat, upload), so the whole run is on trio's autojump clock and every time below
is exact virtual seconds: a node lost by its lease is noticed ``lease_s`` after its last
renewal, not after the job's hour-long time limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio._path
import trio.testing
from engine_waits import EngineTask, start_engine, wait_attempts, wait_build

from p2pbuild import Capability, FileDigest, Identity, Job, Result, Status
from p2pbuild.dispatcher._db import AttemptRow, AttemptState, BuildRow, BuildState, Database
from p2pbuild.dispatcher._engine import BuildRequest, Engine, EngineConfig
from p2pbuild.dispatcher._nodes import NodeConnector, StaticFinder
from p2pbuild.dispatcher._pull import (
    JobWithdrawnError,
    LeaseExpiredError,
    LeaseProgress,
    PullQueue,
    UnknownPullJobError,
)
from p2pbuild.dispatcher._sink import RepositorySink
from p2pbuild.dispatcher._stored import StoredBuild
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import node_entry

NODES = [("pull-a", "alice"), ("pull-b", "bob"), ("pull-c", "carol")]
FIXTURE = make_trust_list(nodes=NODES)
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
SOURCE = b"not really an srpm: the stand-in nodes never read it\n"
SOURCE_SHA = hashlib.sha256(SOURCE).hexdigest()
ARTIFACT = b"reproducible bytes\n"
LOG = b"build log\n"
T0 = float(int(time.time()))
LEASE_S, HEARTBEAT_S = 60.0, 15.0


def clock() -> float:
    return T0 + trio.current_time()


@attrs.define(eq=False)
class StandIn:
    """A pull node: polls while it has its one slot free, renews the lease of the job it
    builds every heartbeat *concurrently* with building and uploading (as the real client
    does). The first node to take a job while ``farm.doomed`` is set dies (stops doing
    anything, as on SIGKILL) ``farm.doomed`` seconds later."""

    name: str
    identity: Identity
    farm: Farm
    build_s: float = 20.0
    polling: bool = True
    #: The signed result's state; with ``partial`` the log upload never finishes.
    outcome: str = "succeeded"
    partial: bool = False
    #: When set, a build lasts until the gate opens instead of ``build_s``.
    gate: trio.Event | None = None
    taken: list[Job] = attrs.field(factory=list)
    heard: list[str] = attrs.field(factory=list)
    uploaded: list[bytes] = attrs.field(factory=list)
    dead: bool = False

    @property
    def key(self) -> object:
        return self.identity.public_key

    async def run(self) -> None:
        while True:
            if not self.polling:
                await trio.sleep(1)
                continue
            job = await self.farm.queue.take(self.identity.public_key, 30)
            if job is not None:
                self.taken.append(job)
                await self.build(job)
                if self.dead:
                    await trio.sleep_forever()

    async def build(self, job: Job) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.renew_until_cancelled, job, nursery.cancel_scope)
            die_after_s, self.farm.doomed = self.farm.doomed, None
            if die_after_s is not None:
                self.farm.victim = self
                await trio.sleep(die_after_s)
                self.dead = True  # SIGKILL: no renewal, no upload, ever again
                nursery.cancel_scope.cancel()
                return
            if self.gate is not None:
                await self.gate.wait()
            else:
                await trio.sleep(self.build_s)
            await self.upload(job)
            if self.partial:
                await trio.sleep_forever()  # renewing, until the dispatcher says gone
            nursery.cancel_scope.cancel()

    async def renew_until_cancelled(self, job: Job, build: trio.CancelScope) -> None:
        elapsed = 0
        while True:
            await trio.sleep(HEARTBEAT_S)
            elapsed += int(HEARTBEAT_S)
            try:
                self.farm.queue.renew(
                    self.identity.public_key, job.job_id, LeaseProgress("building", elapsed)
                )
            except UnknownPullJobError:
                continue  # a restarted dispatcher that has not re-offered it yet
            except (JobWithdrawnError, LeaseExpiredError) as exc:
                self.heard.append(exc.code)  # stop the build, upload nothing
                build.cancel()
                return

    async def upload(self, job: Job) -> None:
        digest = FileDigest("out/hello.txt", len(ARTIFACT), hashlib.sha256(ARTIFACT).digest())
        log = FileDigest("build.log", len(LOG), hashlib.sha256(LOG).digest())
        result = Result.create(
            self.identity, job, state=self.outcome, exit_code=0 if self.outcome == "succeeded"
            else 2, started_ms=1, ended_ms=2, environment={}, artifacts=[digest], logs=[log],
        )  # fmt: skip

        async def body(data: bytes) -> AsyncIterator[bytes]:
            yield data

        queue = self.farm.queue
        queue.receive_result(self.identity.public_key, job.job_id, result.to_bytes())
        await queue.receive_file(
            self.identity.public_key, job.job_id, "artifacts", "out/hello.txt", body(ARTIFACT)
        )
        if not self.partial:
            await queue.receive_file(
                self.identity.public_key, job.job_id, "logs", "build.log", body(LOG)
            )
        self.uploaded.append(job.job_id)


@attrs.define(eq=False)
class Farm:
    nursery: trio.Nursery
    tmp: Path
    queue: PullQueue = attrs.field(init=False)
    finder: StaticFinder = attrs.field(init=False)
    nodes: dict[str, StandIn] = attrs.field(factory=dict)
    engine: Engine | None = None
    task: EngineTask | None = None
    #: The next node to take a job dies this many seconds later; then that node.
    doomed: float | None = None
    victim: StandIn | None = None

    def __attrs_post_init__(self) -> None:
        self.queue = self.new_queue()
        self.finder = StaticFinder(FIXTURE.trust_list)

    def new_queue(self) -> PullQueue:
        return PullQueue(
            DISPATCHER.public_key, FIXTURE.trust_list, self.tmp / "pull", clock=clock,
            lease_s=LEASE_S, heartbeat_s=HEARTBEAT_S,
        )  # fmt: skip

    def add(self, name: str, **kwargs: object) -> StandIn:
        identity = FIXTURE.nodes[name]
        capability = Capability(
            arch="x86_64", os="fedora-41", cpus=4, cpu_model="test cpu", memory_mb=8192,
            disk_mb=50_000, machine="vm", build_types=("make", "rpm"), pools=(),
        )  # fmt: skip
        status = Status(load_milli=0, slots_total=1, slots_free=1, running=0, uptime_s=3600)
        self.finder.put(node_entry(identity, capability, status, now=T0))
        node = StandIn(name, identity, self, **kwargs)  # type: ignore[arg-type]
        self.nodes[name] = node
        self.nursery.start_soon(node.run)
        return node

    async def start_with(self, names: tuple[str, ...], **node: object) -> Engine:
        """Stand-in pull nodes ``names`` (``node``: as for :meth:`add`), then the engine."""
        for name in names:
            self.add(name, **node)
        return await self.start_engine()

    async def start_engine(self) -> Engine:
        engine = Engine(
            db=Database.open(self.tmp / "dispatcher.db"),
            identity=DISPATCHER,
            trust_list=FIXTURE.trust_list,
            finder=self.finder,
            sink=RepositorySink(self.tmp / "repo"),
            # A lost node stays excluded from the build for the whole test, so the
            # replacement is a live node.
            config=EngineConfig(state_dir=self.tmp / "state", node_retry_base_s=3600.0),
            connector=NodeConnector(self.queue),
            clock=clock,
            rng=random.Random(7),
        )
        self.engine, self.task = engine, await start_engine(self.nursery, engine)
        return engine

    async def kill_dispatcher(self) -> None:
        """The dispatcher process dies: its engine stops, its in-memory queue is gone."""
        assert self.task is not None
        await self.task.kill()
        self.queue = self.new_queue()

    def submit(self) -> BuildRow:
        assert self.engine is not None
        store = self.engine.sources
        store.root.mkdir(parents=True, exist_ok=True)
        store.path(SOURCE_SHA).write_bytes(SOURCE)
        request = BuildRequest("hello-1.0-1.src.rpm", SOURCE_SHA, len(SOURCE))
        return self.engine.accept(request, "user-1", None)

    async def wait_for(self, build_id: str, test: Callable[[BuildRow], bool]) -> BuildRow:
        assert self.engine is not None
        return await wait_build(self.engine, build_id, test)

    async def wait_attempts(
        self, build_id: str, test: Callable[[list[AttemptRow]], bool]
    ) -> list[AttemptRow]:
        assert self.engine is not None
        return await wait_attempts(self.engine, build_id, test)

    def by_node(self, attempts: list[AttemptRow]) -> dict[str, AttemptRow]:
        names = {str(n.identity.public_key): name for name, n in self.nodes.items()}
        return {names[a.node]: a for a in attempts}


@pytest.fixture
def farm(nursery: trio.Nursery, tmp_path: Path) -> Farm:
    return Farm(nursery, tmp_path)


@pytest.fixture(autouse=True)
def threads_hold_the_clock(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No autojump while a worker thread runs (the engine's and the queue's file I/O):
    otherwise virtual time races from timer to timer for as long as the thread takes in
    real time, and on a loaded machine leases and job lifetimes run out in the middle of a
    file copy. With this, every virtual time in these tests is the same on any machine."""
    original = trio.to_thread.run_sync
    in_flight = 0

    async def run_sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight
        in_flight += 1
        autojump_clock.autojump_threshold = math.inf
        try:
            return await original(fn, *args, **kwargs)
        finally:
            in_flight -= 1
            if in_flight == 0:
                autojump_clock.autojump_threshold = 0

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    monkeypatch.setattr(trio._path, "run_sync", run_sync)


def two_running(attempts: list[AttemptRow]) -> bool:
    return sum(a.state is AttemptState.RUNNING for a in attempts) == 2


async def test_pull_node_that_dies_mid_build_is_replaced_after_its_lease(
    autojump_clock: trio.abc.Clock, farm: Farm
) -> None:
    engine = await farm.start_with(("pull-a", "pull-b", "pull-c"), build_s=20.0)
    farm.doomed = 10.0  # the first node to take a job dies 10 s into it, unrenewed
    build = farm.submit()
    start = trio.current_time()
    done = await farm.wait_for(build.id, lambda b: b.state.terminal)
    victim = farm.victim
    assert victim is not None
    victim_name, victim_job = victim.name, victim.taken[0]
    assert done.state is BuildState.VERIFIED, done.reason
    attempts = farm.by_node(engine.db.attempts(build.id))
    lost = attempts[victim_name]
    assert lost.state is AttemptState.LOST
    assert lost.reason.startswith("lease-expired: ")
    # Lost exactly lease_s after it took the job, and replaced at that moment: not after
    # the job's lifetime (time limit 3600 s + 600 s margin).
    assert lost.sent_at == T0 + start
    assert lost.ended_at == lost.sent_at + LEASE_S
    chosen = [e.at for e in engine.db.audit_entries(build.id) if e.event == "node-chosen"]
    assert chosen[-1] == lost.ended_at
    # (tests/e2e checks the whole recovery in real time.)
    (spare,) = {"pull-a", "pull-b", "pull-c"} - {victim_name, *(
        n for n, a in attempts.items() if a.role == "replica" and n != victim_name
    )}
    assert attempts[spare].role == "replacement"
    assert attempts[spare].state is AttemptState.SUCCEEDED
    # Counted and audited like any lost node.
    assert dict(engine.statistics().node_errors) == {"lease-expired": 1}
    assert farm.queue.statistics().leases_expired == 1
    audit = [e for e in engine.db.audit_entries(build.id) if e.event == "attempt-lost"]
    assert [(e.node, e.detail["reason"][:14]) for e in audit] == [
        (str(victim.identity.public_key), "lease-expired:")
    ]
    # The victim comes back from the dead with a result: refused, not stored.
    with pytest.raises(LeaseExpiredError):
        await victim.upload(victim_job)
    assert farm.queue.artifact(victim_job.job_id, "out/hello.txt") is None


async def test_a_cancelled_build_stops_the_pull_nodes_that_took_it(
    autojump_clock: trio.abc.Clock, farm: Farm
) -> None:
    # pull-a takes its job; pull-b is busy (not polling), so its job stays offered.
    a = farm.add("pull-a", build_s=600.0)
    b = farm.add("pull-b", build_s=600.0, polling=False)
    engine = await farm.start_engine()
    build = farm.submit()
    attempts = await farm.wait_attempts(build.id, lambda atts: len(atts) == 2 and any(
        x.state is AttemptState.RUNNING for x in atts))
    states = {name: x.state for name, x in farm.by_node(attempts).items()}
    # A pull attempt runs once its node took the job, not when it is offered.
    assert states == {"pull-a": AttemptState.RUNNING, "pull-b": AttemptState.PENDING}
    await trio.sleep(40)
    cancelled_at = trio.current_time()
    engine.cancel(build.id, "user-1")
    done = await farm.wait_for(build.id, lambda b: b.state.terminal)
    assert done.state is BuildState.CANCELLED
    while not a.heard:
        await trio.sleep(1)
    # pull-a heard "withdrawn" at its next renewal and stopped: no upload.
    assert a.heard == ["withdrawn"]
    assert trio.current_time() - cancelled_at <= HEARTBEAT_S
    assert a.uploaded == []
    # pull-b's offer is gone too: when it polls again it gets nothing.
    b.polling = True
    await trio.sleep(60)
    assert b.taken == []
    stats = farm.queue.statistics()
    assert (stats.pending, stats.taken, stats.withdrawn_taken) == (0, 0, 1)


async def test_after_a_dispatcher_restart_leases_start_afresh(
    autojump_clock: trio.abc.Clock, farm: Farm
) -> None:
    engine = await farm.start_with(("pull-a", "pull-b", "pull-c"), build_s=200.0)
    build = farm.submit()
    farm.doomed = 10.0  # the first node to take a job dies while the dispatcher is down
    running = await farm.wait_attempts(build.id, two_running)
    names = farm.by_node(running)
    assert farm.victim is not None
    dead_name = farm.victim.name
    (alive_name,) = set(names) - {dead_name}
    await trio.sleep(5)
    await farm.kill_dispatcher()
    await trio.sleep(95)  # down longer than a lease: the old leases are long past
    restart = trio.current_time()
    engine = await farm.start_engine()
    done = await farm.wait_for(build.id, lambda b: b.state.terminal)
    assert done.state is BuildState.VERIFIED, done.reason
    attempts = farm.by_node(engine.db.attempts(build.id))
    lost = attempts[dead_name]
    assert lost.state is AttemptState.LOST and lost.reason.startswith("lease-expired")
    # Lost one whole lease after the restart, not at once for the time it was down.
    assert lost.ended_at is not None
    assert lost.ended_at == T0 + restart + LEASE_S
    # The node that kept building through the restart was not lost and not re-run: the
    # same job, taken once, delivered to the restarted dispatcher.
    alive = farm.nodes[alive_name]
    assert attempts[alive_name].state is AttemptState.SUCCEEDED
    assert attempts[alive_name].job_id == names[alive_name].job_id
    assert len(alive.taken) == 1 and alive.heard == []
    assert "resumed" in [e.event for e in engine.db.audit_entries(build.id)]


# -- the engine releases what it is done with ----------------------------------------------------


def queue_is_empty(farm: Farm, jobs: list[str], *, others: bool = False) -> None:
    """No delivery and no uploaded file is left in the queue for ``jobs`` (hex ids), nor
    any other job (unless ``others``)."""
    for job_id in jobs:
        assert farm.queue.delivery(bytes.fromhex(job_id)) is None
        assert not (farm.tmp / "pull" / job_id).exists()
    if others:
        return
    stats = farm.queue.statistics()
    assert (stats.pending, stats.taken, stats.delivered, stats.refused) == (0, 0, 0, 0)


async def test_a_verified_pull_build_leaves_nothing_in_the_queue(
    autojump_clock: trio.abc.Clock, farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: dict[str, tuple[str, bytes, bytes]] = {}
    release = PullQueue.release

    def spy(queue: PullQueue, job_id: bytes) -> None:
        # What the engine kept, seen by another connection at the moment of the release:
        # the signed result committed, the artifact copied out of the queue's directory.
        with contextlib.closing(sqlite3.connect(farm.tmp / "dispatcher.db")) as other:
            attempt_id, build_id, state, raw = other.execute(
                "SELECT a.id, a.build_id, a.state, r.raw FROM attempts a JOIN results r "
                "ON r.attempt_id = a.id WHERE a.job_id = ?", (job_id.hex(),)
            ).fetchone()
        work = farm.tmp / "state" / "work" / build_id / str(attempt_id) / "out" / "hello.txt"
        released[job_id.hex()] = (state, raw, work.read_bytes())
        assert queue.artifact(job_id, "out/hello.txt") is not None  # not deleted before
        release(queue, job_id)

    monkeypatch.setattr(PullQueue, "release", spy)
    synced: dict[str, int] = {}
    store_result = Database.store_result

    def spy_store(db: Database, attempt: AttemptRow, *args: Any, **kwargs: Any) -> None:
        # The transaction the result is stored in syncs the WAL on commit (FULL = 2): the
        # node has deleted its copy, and the queue is about to delete its own.
        (synced[attempt.job_id],) = db._db.execute("PRAGMA synchronous").fetchone()
        store_result(db, attempt, *args, **kwargs)

    monkeypatch.setattr(Database, "store_result", spy_store)
    a, b = farm.add("pull-a"), farm.add("pull-b")
    engine = await farm.start_engine()
    build = farm.submit()
    done = await farm.wait_for(build.id, lambda b: b.state.terminal)
    assert done.state is BuildState.VERIFIED, done.reason
    attempts = engine.db.attempts(build.id)
    assert released == {
        x.job_id: ("succeeded", engine.db.result_bytes(x.id), ARTIFACT) for x in attempts
    }
    assert synced == {x.job_id: 2 for x in attempts}
    # The sink has the artifacts; the queue has nothing left but two tombstones.
    assert (Path(done.sink_path) / "artifacts" / "out" / "hello.txt").read_bytes() == ARTIFACT
    # The pull nodes' logs came through the queue and are kept with the build.
    stored = StoredBuild.read(Path(done.sink_path))
    assert [[log.name for log in p.logs] for p in stored.verified_by] == [["build.log"]] * 2
    assert {stored.log_path(p, p.logs[0]).read_bytes() for p in stored.verified_by} == {LOG}
    queue_is_empty(farm, [x.job_id for x in attempts])
    assert list((farm.tmp / "pull").iterdir()) == []
    stats = farm.queue.statistics()
    assert (stats.released, stats.tombstones) == (2, 2)
    # A node retrying its upload afterwards hears 410 withdrawn; nothing is stored again.
    with pytest.raises(JobWithdrawnError):
        await a.upload(a.taken[0])
    assert (a.taken, b.uploaded) == ([a.taken[0]], [b.taken[0].job_id])
    queue_is_empty(farm, [x.job_id for x in attempts])


async def test_a_failed_pull_build_leaves_nothing_in_the_queue(
    autojump_clock: trio.abc.Clock, farm: Farm
) -> None:
    engine = await farm.start_with(("pull-a", "pull-b"), outcome="failed")
    build = farm.submit()
    done = await farm.wait_for(build.id, lambda b: b.state.terminal)
    assert done.state is BuildState.FAILED and "failed on 2 operators" in done.reason
    attempts = engine.db.attempts(build.id)
    assert [x.state for x in attempts] == [AttemptState.FAILED] * 2
    assert all(engine.db.result_bytes(x.id) is not None for x in attempts)
    queue_is_empty(farm, [x.job_id for x in attempts])
    assert farm.queue.statistics().tombstones == 2


async def test_a_build_cancelled_mid_upload_leaves_nothing_in_the_queue(
    autojump_clock: trio.abc.Clock, farm: Farm
) -> None:
    # Both nodes upload their result and artifact; the log never finishes.
    a, b = farm.add("pull-a", partial=True), farm.add("pull-b", partial=True)
    engine = await farm.start_engine()
    build = farm.submit()
    while len(a.uploaded) + len(b.uploaded) < 2:
        await trio.sleep(1)
    attempts = engine.db.attempts(build.id)
    assert all((farm.tmp / "pull" / x.job_id / "artifacts").is_dir() for x in attempts)
    engine.cancel(build.id, "user-1")
    done = await farm.wait_for(build.id, lambda b: b.state.terminal)
    assert done.state is BuildState.CANCELLED
    queue_is_empty(farm, [x.job_id for x in attempts])
    while not (a.heard and b.heard):
        await trio.sleep(1)
    assert a.heard == b.heard == ["withdrawn"]
    assert farm.queue.statistics().tombstones == 2


async def test_a_result_released_before_a_restart_is_not_lost(
    autojump_clock: trio.abc.Clock, farm: Farm
) -> None:
    # The slow node finishes when the test says so, not after a virtual time: while the
    # engine copies the quick node's files in worker threads the autojump clock may skip
    # far ahead, and a slow node that finished before the restart would take its resumed
    # job a second time.
    quick, slow = farm.add("pull-a", build_s=20.0), farm.add("pull-b", gate=trio.Event())
    engine = await farm.start_engine()
    build = farm.submit()
    attempts = await farm.wait_attempts(
        build.id, lambda atts: any(x.state is AttemptState.SUCCEEDED for x in atts)
    )
    (kept,) = [x for x in attempts if x.state is AttemptState.SUCCEEDED]
    # The queue has forgotten it: the database and the work directory are its only copy.
    queue_is_empty(farm, [kept.job_id], others=True)
    await farm.kill_dispatcher()
    await trio.sleep(30)
    engine = await farm.start_engine()
    # The restarted dispatcher knows pull-b's job again (resumed, taken); then it finishes.
    while farm.queue.statistics().taken != 1:
        await trio.sleep(1)
    assert slow.gate is not None
    slow.gate.set()
    done = await farm.wait_for(build.id, lambda b: b.state.terminal)
    assert done.state is BuildState.VERIFIED, done.reason
    # Verified with the result stored before the restart: pull-a built once, not again.
    assert len(quick.taken) == 1 and len(slow.taken) == 1
    by_node = farm.by_node(engine.db.attempts(build.id))
    assert by_node["pull-a"].id == kept.id and by_node["pull-a"].state is AttemptState.SUCCEEDED
    proof = sorted(p.read_bytes() for p in (Path(done.sink_path) / "proof").glob("*.result"))
    assert engine.db.result_bytes(kept.id) in proof and len(proof) == 2
    queue_is_empty(farm, [x.job_id for x in by_node.values()])
