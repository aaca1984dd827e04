"""Fewer syncs per build: grouped writes (batch, savepoints), writes committed without a WAL
sync, and the rating book's in-memory rows staying true to the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from p2pbuild.dispatcher._db import AttemptState, BuildRow, BuildState, Database
from p2pbuild.dispatcher._ratings import RatingBook, Signal


def build_row(build_id: str) -> BuildRow:
    return BuildRow(
        id=build_id, created_at=1.0, updated_at=1.0, user="u", team=None,
        state=BuildState.QUEUED, source_name="hello-1.0-1.src.rpm", source_sha256="0" * 64,
        source_size=1, build_type="rpm", arch="x86_64", os="fedora-41", replicas=2,
    )


def _synchronous(db: Database) -> int:
    value: int = db._db.execute("PRAGMA synchronous").fetchone()[0]
    return value


def test_batch_commits_once_and_rolls_back_whole(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "d.db")
    commits: list[str] = []
    db._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    with db.batch():
        db.insert_build(build_row("a" * 32))
        db.insert_build(build_row("b" * 32))
        db.set_platform("u", "x86_64", "fedora-41", None, 1.0)
    assert commits == ["COMMIT"]
    def failing_batch() -> None:
        with db.batch():
            db.insert_build(build_row("c" * 32))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert sorted(b.id for b in db.builds(limit=10)) == ["a" * 32, "b" * 32]
    assert db.audit_entries("c" * 32) == []
    # An inner write that fails is undone alone (a savepoint); the rest still commits.
    before = db.rollbacks
    with db.batch():
        db.insert_build(build_row("d" * 32))
        with pytest.raises(sqlite3.IntegrityError):
            db.insert_build(build_row("a" * 32))  # same id: its audit entry is undone too
    assert db.rollbacks == before + 1
    assert db.build("d" * 32).state is BuildState.QUEUED
    assert [e.event for e in db.audit_entries("a" * 32)] == ["accepted"]
    db.close()
    again = Database.open(tmp_path / "d.db")
    assert sorted(b.id for b in again.builds(limit=10)) == ["a" * 32, "b" * 32, "d" * 32]


def test_non_durable_writes_skip_only_the_sync(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "d.db")
    assert _synchronous(db) == 2  # FULL
    seen: list[int] = []
    db._db.set_trace_callback(
        lambda sql: seen.append(0 if "synchronous=NORMAL" in sql else 2)
        if sql.startswith("PRAGMA synchronous") else None
    )
    db.insert_build(build_row("a" * 32))
    assert seen == []  # durable: no change
    db.set_platform("u", "x86_64", "fedora-41", "vm", 2.0)
    assert seen == [0, 2]  # relaxed for the commit, FULL again after it
    assert _synchronous(db) == 2
    attempt = db.insert_attempt(
        build_id="a" * 32, node="n", operator="o", endpoint="https://x", tls_sha256=b"",
        role="replica", job_id="j" * 32, job=b"job", now=3.0, why={},
    )
    seen.clear()
    db.set_attempt_state(attempt, AttemptState.RUNNING, 4.0)
    assert seen == [0, 2]
    seen.clear()
    db.set_attempt_state(attempt, AttemptState.LOST, 5.0, reason="gone")
    assert seen == []
    db.close()
    # Committed all the same: a killed process or a close loses nothing.
    again = Database.open(tmp_path / "d.db")
    assert again.platform("u") == ("x86_64", "fedora-41", "vm")
    assert again.attempt(attempt.id).state is AttemptState.LOST


def test_rating_book_rows_follow_writes_and_rollbacks(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "d.db")
    book = RatingBook(db)
    book.record("n1", Signal.SUCCESS, 1.0, 10.0)
    book.heartbeat("n1", "op", 100, 10.0)
    cached = book.ratings(20.0)["n1"]
    fresh = RatingBook(db).ratings(20.0)["n1"]
    assert cached == fresh
    # A grouped write that is rolled back must not survive in the book's memory.
    def failing_batch() -> None:
        with db.batch():
            book.record("n1", Signal.SUCCESS, 0.0, 11.0)
            book.record("n2", Signal.SUCCESS, 0.0, 11.0)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert book.ratings(20.0)["n1"] == fresh
    assert "n2" not in book.ratings(20.0)
    # Later writes land in both.
    book.record("n1", Signal.AGREEMENT, 0.0, 12.0)
    book.node_failed("n1", "op", 12.0, "vanished")
    assert book.ratings(20.0) == RatingBook(db).ratings(20.0)
