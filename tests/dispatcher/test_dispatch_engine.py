"""The build engine end to end over real loopback TLS, with in-process node services."""

from __future__ import annotations

import hashlib
import random
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio
from engine_waits import EngineTask, start_engine, wait_attempts, wait_build

from p2pbuild import BuildType, Job, MachineType, Result, ResultState
from p2pbuild._identity import PublicKey
from p2pbuild.dht import Query
from p2pbuild.dispatcher._db import AttemptState, BuildRow, BuildState, Database
from p2pbuild.dispatcher._engine import BuildRequest, Engine, EngineConfig
from p2pbuild.dispatcher._nodes import StaticFinder
from p2pbuild.dispatcher._select import Requirements
from p2pbuild.dispatcher._sink import RepositorySink, Settler
from p2pbuild.dispatcher._stored import StoredBuild
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import FarmNode, start_push_node
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

NODES = [
    ("alice-1", "alice"), ("alice-2", "alice"), ("bob-1", "bob"), ("carol-1", "carol"),
    ("dave-1", "dave"), ("mallory-1", "mallory"),
]
FIXTURE = make_trust_list(nodes=NODES)
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
SOURCE = b"not really an srpm, the instant runner never reads it\n"
SOURCE_SHA = hashlib.sha256(SOURCE).hexdigest()


@attrs.define(eq=False)
class Harness:
    nursery: trio.Nursery
    tmp: Path
    finder: StaticFinder
    nodes: dict[str, FarmNode] = attrs.field(factory=dict)
    engine: Engine | None = None
    task: EngineTask | None = None
    seed: int = 0

    @property
    def db_path(self) -> Path:
        return self.tmp / "dispatcher.db"

    async def add_node(
        self, name: str, runner: InstantRunner | None = None, *, listed: bool = True,
        **kwargs: object,
    ) -> FarmNode:
        node = await start_push_node(
            self.nursery, self.tmp / name, FIXTURE.nodes[name], FIXTURE.trust_list,
            runner or InstantRunner(), **kwargs,  # type: ignore[arg-type]
        )
        self.nodes[name] = node
        if listed:
            self.finder.put(node.entry())
        return node

    def list_node(self, name: str) -> None:
        self.finder.put(self.nodes[name].entry())

    async def start_engine(self, **config: object) -> Engine:
        self.seed += 1
        args: dict[str, object] = {
            "state_dir": self.tmp / "state",
            "follow_interval_s": 1.0,
            "unreachable_after_s": 1.0,
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.5,
            "node_retry_base_s": 0.2,
            "no_node_wait_s": 3.0,
            "node_timeout_s": 5.0,
        }
        args.update(config)
        engine = Engine(
            db=Database.open(self.db_path),
            identity=DISPATCHER,
            trust_list=FIXTURE.trust_list,
            finder=self.finder,
            sink=RepositorySink(self.tmp / "repo"),
            config=EngineConfig(**args),  # type: ignore[arg-type]
            rng=random.Random(self.seed),
        )
        self.engine, self.task = engine, await start_engine(self.nursery, engine)
        return engine

    async def kill_engine(self) -> None:
        assert self.task is not None
        await self.task.kill()

    def submit(self, **kwargs: object) -> BuildRow:
        assert self.engine is not None
        store = self.engine.sources
        store.root.mkdir(parents=True, exist_ok=True)
        store.path(SOURCE_SHA).write_bytes(SOURCE)
        args: dict[str, object] = {
            "source_name": "hello-1.0-1.src.rpm", "source_sha256": SOURCE_SHA,
            "source_size": len(SOURCE),
        }
        args.update(kwargs)
        return self.engine.accept(BuildRequest(**args), "user-1", None)  # type: ignore[arg-type]

    async def wait_for(
        self, build_id: str, test: Callable[[BuildRow], bool], timeout: float = 15
    ) -> BuildRow:
        assert self.engine is not None
        with trio.fail_after(timeout):
            return await wait_build(self.engine, build_id, test)

    async def wait_done(self, build_id: str, timeout: float = 15) -> BuildRow:
        return await self.wait_for(build_id, lambda b: b.state.terminal, timeout)

    async def wait_attempts(
        self, build_id: str, test: Callable[[list[object]], bool], timeout: float = 10
    ) -> None:
        assert self.engine is not None
        with trio.fail_after(timeout):
            await wait_attempts(self.engine, build_id, test)  # type: ignore[arg-type]


@pytest.fixture
async def farm(nursery: trio.Nursery, tmp_path: Path) -> Harness:
    return Harness(nursery, tmp_path, StaticFinder(FIXTURE.trust_list))


def running(n: int) -> Callable[[list[object]], bool]:
    return lambda attempts: sum(
        1 for a in attempts if a.state is AttemptState.RUNNING  # type: ignore[attr-defined]
    ) >= n


async def test_build_verified_by_two_operators_and_stored(farm: Harness) -> None:
    for name in ("alice-1", "alice-2", "bob-1", "carol-1"):
        await farm.add_node(name)
    engine = await farm.start_engine()
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    attempts = engine.db.attempts(build.id)
    assert len(attempts) == 2
    assert len({a.operator for a in attempts}) == 2
    assert all(a.state is AttemptState.SUCCEEDED for a in attempts)
    stored = Path(done.sink_path)
    assert stored == farm.tmp / "repo" / "hello-1.0-1"
    assert (stored / "artifacts" / "out" / "hello.txt").read_bytes() == b"hello\n"
    manifest = StoredBuild.read(stored)
    assert manifest.build_id == build.id
    assert len(manifest.verified_by) == 2
    assert len(list((stored / "proof").glob("*.result"))) == 2
    assert not list((farm.tmp / "repo").glob(".incoming-*"))
    events = [e.event for e in engine.db.audit_entries(build.id)]
    assert events[0] == "accepted"
    assert events.count("node-chosen") == 2
    assert events[-1] == "build-verified"
    chosen = [e for e in engine.db.audit_entries(build.id) if e.event == "node-chosen"]
    assert all("reason" in e.detail and "rating" in e.detail for e in chosen)
    ratings = engine.ratings.ratings(engine.clock())
    assert all(ratings[a.node].observations >= 2 for a in attempts)
    # Affinity remembered for the user.
    assert engine.db.platform("user-1") == ("x86_64", "fedora-41", "vm")


async def test_a_verified_build_whose_rename_a_power_cut_undid_is_renamed_at_start(
    farm: Harness,
) -> None:
    """The repository directory is synced after the verified state (off the critical path):
    a power cut between the two leaves the build under its staging name, and the next start
    puts it back where the database says it is."""
    for name in ("alice-1", "bob-1"):
        await farm.add_node(name)
    engine = await farm.start_engine()
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    await farm.kill_engine()
    stored = Path(done.sink_path)
    expected = {p.relative_to(stored): p.read_bytes() for p in stored.rglob("*") if p.is_file()}
    # What a power cut before the repository's fsync may leave: the staging directory.
    stored.rename(stored.parent / f".incoming-{build.id[:16]}-x1y2z3")
    # ... and an interrupted store of another build, which is left alone.
    (stored.parent / ".incoming-0123456789abcdef-q").mkdir()
    engine = await farm.start_engine()
    assert {p.relative_to(stored): p.read_bytes() for p in stored.rglob("*")
            if p.is_file()} == expected
    assert StoredBuild.read(stored).build_id == build.id
    assert sorted(p.name for p in stored.parent.glob(".incoming-*")) == [
        ".incoming-0123456789abcdef-q"
    ]
    assert "mended" in [e.event for e in engine.db.audit_entries(build.id)]


async def test_the_build_is_verified_before_its_directory_name_is_synced(
    farm: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two journal commits on the critical path, not three: the repository directory's
    fsync after the rename comes once the build is marked verified, one for every build
    verified meanwhile."""
    for name in ("alice-1", "bob-1"):
        await farm.add_node(name)
    engine = await farm.start_engine()
    seen: list[dict[str, BuildState]] = []
    settled = trio.Event()
    settle = Settler.settle

    async def watch(self: Settler, errors: Counter[str]) -> None:
        if self.pending:
            seen.append({b: engine.db.build(b).state for b in self.pending})
            await settle(self, errors)
            settled.set()
        else:
            await settle(self, errors)

    monkeypatch.setattr(Settler, "settle", watch)
    engine.settler.delay_s = 0.5
    builds = [farm.submit(), farm.submit(source_name="hello-1.0-2.src.rpm")]
    for build in builds:
        done = await farm.wait_done(build.id)
        assert done.state is BuildState.VERIFIED, done.reason
    with trio.fail_after(10):
        while {b for group in seen for b in group} != {b.id for b in builds}:
            await settled.wait()
            settled = trio.Event()
    # Usually one fsync for both (verified within the half second); never before verified.
    assert all(state is BuildState.VERIFIED for group in seen for state in group.values())
    assert "sink" not in dict(engine.statistics().node_errors)


async def test_agreeing_replicas_artifacts_are_downloaded_once(
    farm: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replicas that sign the same digest need not both send the bytes: one download per
    distinct artifact of a build (half the dispatcher's inbound traffic), each replica's
    logs still fetched from it."""
    from p2pbuild.dispatcher._nodes import PushNodeClient

    fetched: list[tuple[str, str, str]] = []
    download = PushNodeClient.download

    async def count(self: PushNodeClient, job_id: bytes, item: object, dest: Path,
                    kind: str = "artifacts") -> None:
        fetched.append((self.endpoint, kind, item.name))  # type: ignore[attr-defined]
        await download(self, job_id, item, dest, kind)  # type: ignore[arg-type]

    monkeypatch.setattr(PushNodeClient, "download", count)
    for name in ("alice-1", "bob-1"):
        await farm.add_node(name)
    await farm.start_engine()
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    artifacts = [f for f in fetched if f[1] == "artifacts"]
    assert [name for _, _, name in artifacts] == ["out/hello.txt"]
    assert len({endpoint for endpoint, kind, _ in fetched if kind == "logs"}) == 2
    stored = Path(done.sink_path)
    assert (stored / "artifacts" / "out" / "hello.txt").read_bytes() == b"hello\n"
    assert len(StoredBuild.read(stored).verified_by) == 2


async def test_engine_parses_each_result_once(
    farm: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The planner sees every ended attempt's result on every step; the engine keeps the
    # result its attempt task parsed rather than reading and parsing the stored bytes again.
    for name in ("alice-1", "bob-1", "carol-1"):
        await farm.add_node(name)
    engine = await farm.start_engine()
    parsed = []
    from_bytes = Result.from_bytes.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Result], data: bytes) -> Result:
        parsed.append(data)
        return from_bytes(cls, data)  # type: ignore[no-any-return]

    monkeypatch.setattr(Result, "from_bytes", classmethod(counting))
    reads = []
    result_bytes = engine.db.result_bytes
    monkeypatch.setattr(engine.db, "result_bytes", lambda i: reads.append(i) or result_bytes(i))
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    assert reads == []
    # One parse per result, as it arrives from its node.
    assert len(parsed) == 2


async def test_engine_parses_no_job_and_each_builds_options_once(
    farm: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine keeps the jobs it signs and each build's job spec: neither the signed jobs
    # (for the attempt tasks, for the proof) nor the stored options (for each selection and
    # each job) are parsed again. The nodes, in this process, parse the jobs they receive.
    for name in ("alice-1", "bob-1", "carol-1"):
        await farm.add_node(name)
    await farm.start_engine()
    parsed: list[str] = []
    from_bytes = Job.from_bytes.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Job], data: bytes, **kwargs: int) -> Job:
        parsed.append(sys._getframe(1).f_globals["__name__"])
        return from_bytes(cls, data, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(Job, "from_bytes", classmethod(counting))
    options: list[str] = []
    options_map = BuildRow.options_map.fget  # type: ignore[attr-defined]
    monkeypatch.setattr(
        BuildRow, "options_map", property(lambda row: options.append(row.id) or options_map(row))
    )
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    assert [m for m in parsed if m.startswith("p2pbuild.dispatcher")] == []
    assert len(parsed) == 2  # one by each node
    assert options == [build.id]


async def test_a_verified_build_asks_the_directory_nothing_more(
    farm: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user's platform takes the machine the proof node had when chosen: completing a
    # build costs no directory lookup (a DHT round trip in a real farm).
    for name in ("alice-1", "bob-1"):
        await farm.add_node(name, machine=MachineType.METAL)
    engine = await farm.start_engine()
    lookups: list[object] = []
    lookup = StaticFinder.lookup

    async def counting(self: StaticFinder, key: PublicKey) -> object:
        lookups.append(key)
        return await lookup(self, key)

    monkeypatch.setattr(StaticFinder, "lookup", counting)
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    assert lookups == []
    assert engine.db.platform("user-1") == ("x86_64", "fedora-41", "metal")


async def test_cancelling_a_build_cancels_its_pending_push_jobs_on_their_nodes(
    farm: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An attempt still pending may have its job on the node (sent before a restart, or the
    # node's answer not yet handled): cancelling the build cancels the job there too.
    gate = trio.Event()
    for name in ("alice-1", "bob-1"):
        await farm.add_node(name, InstantRunner(gate=gate))
    set_attempt_state = Database.set_attempt_state

    def never_running(
        self: Database, attempt: object, state: AttemptState, now: float, **kwargs: object
    ) -> None:
        if state is not AttemptState.RUNNING:
            set_attempt_state(self, attempt, state, now, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Database, "set_attempt_state", never_running)
    engine = await farm.start_engine()
    build = farm.submit()
    with trio.fail_after(10):
        for node in farm.nodes.values():
            await node.runner.wait_runs(1)  # type: ignore[attr-defined]
    assert {a.state for a in engine.db.attempts(build.id)} == {AttemptState.PENDING}
    engine.cancel(build.id, "user-1")
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.CANCELLED
    for node in farm.nodes.values():
        [job] = node.runner.runs  # type: ignore[attr-defined]
        assert node.service.status(job.job_id).state is ResultState.CANCELLED


async def test_no_node_matches_fails_with_the_reason(farm: Harness) -> None:
    await farm.add_node("alice-1")
    await farm.add_node("alice-2")
    await farm.start_engine()
    build = farm.submit(arch="s390x")
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.FAILED
    assert done.reason == "no trusted node has arch=s390x"
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.FAILED
    assert "all are operator alice; 2 replicas need 2 operators" in done.reason


async def test_tampering_node_is_caught_and_tie_break_decides(farm: Harness) -> None:
    await farm.add_node("alice-1")
    await farm.add_node("mallory-1", InstantRunner(artifacts={"out/hello.txt": b"pwned\n"}))
    await farm.add_node("carol-1", listed=False)
    engine = await farm.start_engine()
    build = farm.submit()
    # alice and mallory disagree; with no third operator the tie-break waits for one.
    await farm.wait_for(build.id, lambda b: bool(b.report))
    mallory = str(FIXTURE.nodes["mallory-1"].public_key)
    before = engine.ratings.ratings(engine.clock())[mallory].score
    farm.list_node("carol-1")
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    attempts = engine.db.attempts(build.id)
    assert [a.role for a in attempts].count("tiebreak") == 1
    manifest = StoredBuild.read(Path(done.sink_path))
    assert {n.operator for n in manifest.verified_by} == {"alice", "carol"}
    assert (Path(done.sink_path) / "artifacts/out/hello.txt").read_bytes() == b"hello\n"
    assert hashlib.sha256(b"pwned\n").hexdigest() in done.report
    assert "mallory" in done.report
    after = engine.ratings.ratings(engine.clock())
    assert after[mallory].agreement < 0.9
    assert after[mallory].score < before
    assert after[mallory].score < after[str(FIXTURE.nodes["alice-1"].public_key)].score
    report_file = farm.tmp / "state" / "reports" / f"{build.id}.txt"
    assert report_file.read_text() == done.report


async def test_vanished_node_is_replaced(farm: Harness) -> None:
    await farm.add_node("alice-1")
    stuck = await farm.add_node("bob-1", InstantRunner(gate=trio.Event()))
    await farm.add_node("carol-1", listed=False)
    engine = await farm.start_engine()
    build = farm.submit()
    await farm.wait_attempts(build.id, lambda a: any(
        x.operator == "bob" and x.state is AttemptState.RUNNING for x in a  # type: ignore[attr-defined]
    ))
    stuck.stop()
    farm.finder.remove(stuck.identity.public_key)
    farm.list_node("carol-1")
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    attempts = engine.db.attempts(build.id)
    lost = [a for a in attempts if a.state is AttemptState.LOST]
    assert [a.operator for a in lost] == ["bob"]
    assert lost[0].reason.startswith(("vanished", "node-unreachable"))
    assert {a.operator for a in attempts if a.state is AttemptState.SUCCEEDED} == {
        "alice", "carol"
    }
    assert engine.statistics().node_errors


async def test_failed_build_on_one_node_is_replaced(farm: Harness) -> None:
    await farm.add_node("alice-1")
    await farm.add_node("bob-1", InstantRunner(state=ResultState.FAILED))
    await farm.add_node("carol-1", listed=False)
    engine = await farm.start_engine()
    build = farm.submit()
    await farm.wait_attempts(build.id, lambda a: any(
        x.state is AttemptState.FAILED for x in a  # type: ignore[attr-defined]
    ))
    farm.list_node("carol-1")
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    bob = str(FIXTURE.nodes["bob-1"].public_key)
    assert engine.ratings.ratings(engine.clock())[bob].success < 0.9


async def test_build_failing_on_two_operators_fails(farm: Harness) -> None:
    await farm.add_node("alice-1", InstantRunner(state=ResultState.FAILED))
    await farm.add_node("bob-1", InstantRunner(state=ResultState.FAILED))
    await farm.start_engine()
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.FAILED
    assert done.reason.startswith("the build failed on 2 operators (alice, bob): exit status 1")


async def test_killed_dispatcher_resumes_in_flight_build(farm: Harness) -> None:
    gate = trio.Event()
    runners = [InstantRunner(gate=gate), InstantRunner(gate=gate)]
    await farm.add_node("alice-1", runners[0])
    await farm.add_node("bob-1", runners[1])
    engine = await farm.start_engine()
    build = farm.submit()
    queued = farm.submit()  # a second build, also in flight when the dispatcher dies
    await farm.wait_attempts(build.id, running(2))
    await farm.kill_engine()
    assert engine.db.build(build.id).state is BuildState.RUNNING
    gate.set()  # the nodes finish while no dispatcher is running
    for attempt in engine.db.attempts(build.id):
        node = next(n for n in farm.nodes.values() if str(n.identity.public_key) == attempt.node)
        await node.service.wait_result(bytes.fromhex(attempt.job_id))
    engine = await farm.start_engine()
    for build_id in (build.id, queued.id):
        done = await farm.wait_done(build_id)
        assert done.state is BuildState.VERIFIED, done.reason
    # Re-attached, not re-run: each node ran each build's job once.
    assert sorted(len(r.runs) for r in runners) == [2, 2]
    assert len(engine.db.attempts(build.id)) == 2
    assert "resumed" in [e.event for e in engine.db.audit_entries(build.id)]


async def test_restart_with_pending_attempts_resends_or_reattaches(farm: Harness) -> None:
    alice = await farm.add_node("alice-1")
    bob = await farm.add_node("bob-1")
    engine = await farm.start_engine()
    build = farm.submit()
    await farm.kill_engine()  # at once: the build is accepted, no job sent yet
    # A crash in the middle of sending: both jobs signed and recorded as pending; one of
    # them had reached its node before the crash.
    for attempt in engine.db.attempts(build.id):
        engine.db.set_attempt_state(attempt, AttemptState.CANCELLED, engine.clock())
    candidates = engine.candidates(await farm.finder.find(Query(arch="x86_64")))
    requirements = Requirements("x86_64", "fedora-41", BuildType.RPM)
    row = engine.db.build(build.id)
    for candidate in candidates:
        engine._create_attempt(row, candidate, "replica", 2, requirements)
    pending = [a for a in engine.db.attempts(build.id) if a.state is AttemptState.PENDING]
    assert len(pending) == 2
    alice.service.submit(next(a.job for a in pending if a.operator == "alice"))
    engine = await farm.start_engine()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    assert len(alice.runner.runs) == 1 and len(bob.runner.runs) == 1  # type: ignore[attr-defined]


async def test_cancel_reaches_the_nodes(farm: Harness) -> None:
    gate = trio.Event()
    nodes = [
        await farm.add_node("alice-1", InstantRunner(gate=gate)),
        await farm.add_node("bob-1", InstantRunner(gate=gate)),
    ]
    engine = await farm.start_engine()
    build = farm.submit()
    await farm.wait_attempts(build.id, running(2))
    engine.cancel(build.id, "user-1")
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.CANCELLED
    for attempt in engine.db.attempts(build.id):
        assert attempt.state is AttemptState.CANCELLED
    for node in nodes:
        job_ids = [bytes.fromhex(a.job_id) for a in engine.db.attempts(build.id)
                   if a.node == str(node.identity.public_key)]
        status = node.service.status(job_ids[0])
        assert status.state is ResultState.CANCELLED
    assert not (farm.tmp / "repo").exists() or not list((farm.tmp / "repo").iterdir())


async def test_dedicated_pool_and_machine_constraint(farm: Harness) -> None:
    await farm.add_node("alice-1", pools=["gpu"])
    await farm.add_node("bob-1", pools=["gpu"])
    await farm.add_node("carol-1", machine=MachineType.METAL)
    await farm.add_node("dave-1", machine=MachineType.METAL)
    engine = await farm.start_engine(dedicated_pools={"gpu": "team-gpu"})
    build = farm.submit()
    done = await farm.wait_done(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    assert {a.operator for a in engine.db.attempts(build.id)} == {"carol", "dave"}
    assert engine.db.platform("user-1") == ("x86_64", "fedora-41", "metal")
    refused = farm.submit(pool="gpu")
    done = await farm.wait_done(refused.id)
    assert done.reason == "pool gpu is dedicated to team-gpu"
