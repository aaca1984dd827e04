"""The node's SQLite state file: replay cache, jobs and results across reopenings."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from p2pbuild import (
    BuildType,
    FileDigest,
    Job,
    JobSpec,
    ReplayError,
    Result,
    SourceArtifact,
    Target,
)
from p2pbuild.node import NodeState, StateError
from p2pbuild.testing import make_trust_list

FIXTURE = make_trust_list()
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["node-1"]
SPEC = JobSpec(SourceArtifact("a.tar.gz", 3, hashlib.sha256(b"abc").digest()), BuildType.MAKE,
               Target("x86_64", "fedora-41"))


def make_job(now: int, lifetime: int = 600) -> Job:
    return Job.create(DISPATCHER, SPEC, issued_at=now, lifetime=lifetime)


def test_jobs_results_and_replay_survive_reopening(tmp_path: Path) -> None:
    now = int(time.time())
    path = tmp_path / "state.sqlite3"
    done, running, short = make_job(now), make_job(now), make_job(now, lifetime=5)
    result = Result.create(
        NODE, done, state="succeeded", exit_code=0, started_ms=1, ended_ms=2, environment={},
        artifacts=[FileDigest("x.rpm", 1, bytes(32))], logs=[],
    )  # fmt: skip
    with NodeState.open(path) as state:
        assert path.stat().st_mode & 0o777 == 0o600
        state.admitted(done, 1000, tmp_path / done.id_hex)
        state.admitted(running, 2000, tmp_path / running.id_hex)
        state.admitted(short, 3000, tmp_path / short.id_hex)
        state.finished(done, result, {("artifacts", "x.rpm"): tmp_path / "x.rpm"}, 5000)
        first = state.next_seq(now)
    with NodeState.open(path) as state:
        jobs = {s.job.job_id: s for s in state.jobs()}
        assert jobs[done.job_id].result == result
        assert jobs[done.job_id].files == {("artifacts", "x.rpm"): tmp_path / "x.rpm"}
        assert jobs[done.job_id].finished_ms == 5000
        assert [s.job.job_id for s in state.unfinished()] == [running.job_id, short.job_id]
        replay = state.load_replay(now + 10)
        for job in (done, running):
            with pytest.raises(ReplayError):
                replay.check(job.job_id, job.expires_at, now + 10)
        assert short.job_id not in replay  # expired: pruned
        # seq always rises, even if the clock steps back.
        assert state.next_seq(now - 3600) == first + 1
        state.forgotten(done.job_id)
        assert done.job_id not in {s.job.job_id for s in state.jobs()}
        assert state.statistics(now)["unfinished"] == 2


def test_a_file_that_is_not_a_state_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"not sqlite" * 100)
    with pytest.raises(StateError):
        NodeState.open(path)
    other = tmp_path / "other.sqlite3"
    NodeState.open(other).close()
    db = sqlite3.connect(other)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 99"):
        NodeState.open(other)
