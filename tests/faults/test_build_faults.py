"""Faults around builds: a node's work directory runs out of disk; nodes and the dispatcher
are killed at random points. Invariants: no accepted build is lost (each ends verified),
and nothing unverified is stored."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest
import trio
from engine_waits import wait_all_done, wait_attempts

from p2pbuild.dispatcher._db import AttemptState, BuildState, Database
from p2pbuild.dispatcher._engine import BuildRequest, Engine, EngineConfig
from p2pbuild.dispatcher._nodes import StaticFinder
from p2pbuild.dispatcher._sink import RepositorySink
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import FarmNode, start_push_node
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

NODES = [("alice-1", "alice"), ("bob-1", "bob"), ("carol-1", "carol"), ("dave-1", "dave")]
FIXTURE = make_trust_list(nodes=NODES, label="faults-")
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
SOURCE = b"fault-injection source\n"
SHA = hashlib.sha256(SOURCE).hexdigest()
BIG = b"\xab" * (3 * 1024 * 1024)


def _engine(tmp: Path, finder: StaticFinder, seed: int) -> Engine:
    return Engine(
        db=Database.open(tmp / "dispatcher.db"), identity=DISPATCHER,
        trust_list=FIXTURE.trust_list, finder=finder, sink=RepositorySink(tmp / "repo"),
        config=EngineConfig(state_dir=tmp / "state", follow_interval_s=0.5,
                            unreachable_after_s=0.5, backoff_base_s=0.05, backoff_max_s=0.2,
                            node_retry_base_s=0.2, no_node_wait_s=10.0, node_timeout_s=3.0),
        rng=random.Random(seed),
    )


def _submit(engine: Engine) -> str:
    engine.sources.root.mkdir(parents=True, exist_ok=True)
    engine.sources.path(SHA).write_bytes(SOURCE)
    return engine.accept(BuildRequest(source_name="big-1.0-1.src.rpm", source_sha256=SHA,
                                      source_size=len(SOURCE)), "user-1", None).id


def _stored_files_are_verified(repo: Path, expected: bytes) -> None:
    for path in (repo).rglob("artifacts/**/*"):
        if path.is_file():
            assert path.read_bytes() == expected


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Path:
    mount = tmp_path / "alice" / "work"
    mount.mkdir(parents=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


async def test_disk_full_in_a_nodes_work_directory(
    nursery: trio.Nursery, tmp_path: Path, small_tmpfs: Path
) -> None:
    finder = StaticFinder(FIXTURE.trust_list)
    runner = {"out/big.bin": BIG}
    # alice's work directory is a 1 MiB tmpfs: her 3 MiB artifact cannot be written.
    alice = await start_push_node(nursery, tmp_path / "alice-node", FIXTURE.nodes["alice-1"],
                                  FIXTURE.trust_list, InstantRunner(artifacts=runner))
    alice.service.work_root = small_tmpfs
    bob = await start_push_node(nursery, tmp_path / "bob", FIXTURE.nodes["bob-1"],
                                FIXTURE.trust_list, InstantRunner(artifacts=runner))
    carol = await start_push_node(nursery, tmp_path / "carol", FIXTURE.nodes["carol-1"],
                                  FIXTURE.trust_list, InstantRunner(artifacts=runner))
    finder.put(alice.entry())
    finder.put(bob.entry())
    engine = _engine(tmp_path, finder, 1)
    await nursery.start(engine.run)
    build_id = _submit(engine)
    with trio.fail_after(30):
        await wait_attempts(engine, build_id, lambda attempts: any(
            a.state in (AttemptState.FAILED, AttemptState.LOST) for a in attempts
        ))  # fmt: skip
        finder.put(carol.entry())
        await wait_all_done(engine, [build_id])
    done = engine.db.build(build_id)
    assert done.state is BuildState.VERIFIED, done.reason
    alice_attempt = next(a for a in engine.db.attempts(build_id) if a.operator == "alice")
    assert alice_attempt.state in (AttemptState.FAILED, AttemptState.LOST)
    assert (Path(done.sink_path) / "artifacts" / "out" / "big.bin").read_bytes() == BIG
    # The node survived its full disk, counted it, and keeps serving.
    assert dict(alice.service.statistics().rejected).get("disk-full", 0) >= 1
    assert alice.service.statistics().running == 0
    _stored_files_are_verified(tmp_path / "repo", BIG)


async def test_nodes_and_dispatcher_killed_at_random_points(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    rng = random.Random(2024)
    finder = StaticFinder(FIXTURE.trust_list)
    nodes: dict[str, FarmNode] = {}

    async def start(name: str, restart: int = 0) -> None:
        node = await start_push_node(
            nursery, tmp_path / f"{name}-{restart}", FIXTURE.nodes[name], FIXTURE.trust_list,
            InstantRunner(artifacts={"out/hello.txt": b"hello\n"},
                          log_lines=(b"a\n", b"b\n")),
        )
        nodes[name] = node
        finder.put(node.entry())

    for name, _ in NODES:
        await start(name)
    builds: list[str] = []
    engines: list[trio.CancelScope] = []

    async def start_engine() -> Engine:
        current = _engine(tmp_path, finder, len(engines) + 1)
        s = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with s:
                await current.run(task_status=task_status)

        await nursery.start(run)
        engines.append(s)
        return current

    engine = await start_engine()
    with trio.fail_after(90):
        for round_ in range(12):
            builds.append(_submit(engine))
            await trio.sleep(rng.uniform(0, 0.3))
            victim = rng.choice([n for n, _ in NODES])
            nodes[victim].stop()
            finder.remove(nodes[victim].identity.public_key)
            await trio.sleep(rng.uniform(0, 0.3))
            await start(victim, round_ + 1)
            if rng.random() < 0.4:
                engines[-1].cancel()  # the dispatcher dies mid-flight
                await trio.sleep(rng.uniform(0, 0.2))
                engine = await start_engine()
        await wait_all_done(engine, builds)
    states = [engine.db.build(b).state for b in builds]
    assert states == [BuildState.VERIFIED] * len(builds), [
        (engine.db.build(b).state, engine.db.build(b).reason) for b in builds
    ]
    _stored_files_are_verified(tmp_path / "repo", b"hello\n")
    assert len(engines) >= 2  # the dispatcher really was killed at least once
