"""The Koji task store (SQLite), the recorded outcomes, and settling a reservation on the
test hub (refund, a lost token's reservation) with the real koji client."""

from __future__ import annotations

import json
import sqlite3
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import koji
import koji.tasks
import pytest

from p2pbuild.dispatcher import ConfigError
from p2pbuild.koji import NodeProof, build_metadata
from p2pbuild.koji._resume import (
    TaskCancelled,
    outcome_error,
    outcome_of,
    recover_lost_reservation,
    refund,
)
from p2pbuild.koji._store import TaskPhase, TaskRow, TaskStore
from p2pbuild.testing._kojihub import KojiTestHub, seed_hub

HOST = "p2p-gw.example.org"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    opened = TaskStore.open(tmp_path / "tasks.db")
    yield opened
    opened.close()


def begin(store: TaskStore, task_id: int, *, release: str = "1", now: float = 100.0) -> TaskRow:
    return store.begin(
        task_id, now=now, started=int(now), name="hello", version="1.0", release=release,
        epoch=None, source_name=f"hello-1.0-{release}.src.rpm", source_sha256="ab" * 32,
        owner="plainuser", user="koji:plainuser",
    )


def test_a_task_through_its_phases_survives_reopening(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "tasks.db")
    row = begin(store, 7)
    assert row.phase is TaskPhase.RESERVING and row.nvr == "hello-1.0-1"
    assert row.build_id is None and row.token is None and row.p2p_build_id is None
    store.reserved(7, 42, "secret-token", 101.0)
    store.linked(7, "p2p-1", 102.0)
    assert store.holder_of(42) == 7
    assert store.linked_p2p_builds() == {"p2p-1"}
    store.close()
    # What a kill leaves is what the next start reads.
    store = TaskStore.open(tmp_path / "tasks.db")
    row = store.get(7)
    assert row is not None
    assert (row.phase, row.build_id, row.token, row.p2p_build_id) == (
        TaskPhase.RESERVED, 42, "secret-token", "p2p-1")
    assert "secret-token" not in repr(row)
    assert [r.task_id for r in store.unfinished()] == [7]
    store.imported(7, 103.0)
    store.done(7, 104.0, "reported")
    assert store.unfinished() == []
    assert store.holder_of(42) is None
    assert [e.event for e in store.events(7)] == [
        "begin", "reserved", "p2p-submitted", "imported", "done"]
    assert store.events(7)[-1].detail == {"why": "reported"}
    with sqlite3.connect(tmp_path / "tasks.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM events")
    store.close()


def test_release_keeps_or_drops_the_p2p_build_and_a_new_attempt_starts_afresh(
    store: TaskStore,
) -> None:
    begin(store, 1)
    store.reserved(1, 5, "t", 1.0)
    store.linked(1, "p2p-a", 2.0)
    row = store.released(1, 3.0, keep_p2p=True)
    assert (row.phase, row.build_id, row.token, row.p2p_build_id) == (
        TaskPhase.RELEASED, None, None, "p2p-a")
    row = store.reserving(1, 4.0)
    assert row.phase is TaskPhase.RESERVING and row.p2p_build_id == "p2p-a"
    assert store.released(1, 5.0, keep_p2p=False).p2p_build_id is None
    store.refunded(1, {"kind": "fail", "code": 1005, "message": "no"}, 6.0)
    row = store.get(1)
    assert row is not None
    assert row.outcome_map == {"kind": "fail", "code": 1005, "message": "no"}
    store.done(1, 7.0, "reported")
    # The task comes back for a fresh attempt: a clean row.
    row = begin(store, 1, release="2", now=8.0)
    assert (row.phase, row.release, row.outcome, row.created_at) == (
        TaskPhase.RESERVING, "2", "", 8.0)
    assert store.done(99, 9.0, "no such task") is None
    with pytest.raises(KeyError):
        store.imported(99, 9.0)


def test_a_store_from_a_newer_p2pbuild_or_not_a_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    TaskStore.open(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(ConfigError, match="schema version 99"):
        TaskStore.open(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="not a koji task store"):
        TaskStore.open(junk)


@pytest.mark.parametrize("error", [
    koji.BuildError("Replicas disagree"),
    koji.tasks.RefuseTask("no capable p2p node: none"),
    TaskCancelled("task 3 was cancelled"),
    koji.GenericError("Build already exists: x-1-1"),
    xmlrpc.client.Fault(1, "<class 'KeyError'>: 'output'"),
])
def test_a_recorded_outcome_is_reported_as_it_was(error: Exception) -> None:
    again = outcome_error(outcome_of(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert getattr(again, "faultCode", None) == getattr(error, "faultCode", None)


def test_a_bug_is_recorded_as_a_plain_fault() -> None:
    again = outcome_error(outcome_of(ValueError("bad")))
    assert isinstance(again, xmlrpc.client.Fault)
    assert again.faultCode == 1 and again.faultString == "ValueError: bad"


def test_metadata_names_the_reservation_task_and_owner() -> None:
    proof = NodeProof(
        node="ed25519:a", fingerprint="aaaa:bbbb:cccc:dddd", operator="alice", job_id="00" * 16,
        job_sha256="11" * 32, result_sha256="22" * 32, environment={}, started_ms=1,
        ended_ms=2, artifacts={}, files=(),
    )
    kwargs: dict[str, Any] = dict(
        name="hello", version="1.0", release="1", epoch=None, source="s", start_time=1,
        end_time=2, content_generator="p2p-build", nodes=[proof], extra={}, packages=[],
    )
    assert not {"build_id", "task_id", "owner"} & set(build_metadata(**kwargs)["build"])
    build = build_metadata(**kwargs, build_id=7, task_id=10, owner="plainuser")["build"]
    assert (build["build_id"], build["task_id"], build["owner"]) == (7, 10, "plainuser")


# -- against the test hub ---------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[KojiTestHub]:
    seed_hub(tmp_path / "hub", users={"kojiadmin": "ap", "plainuser": "pp", HOST: "hp"},
             admins=("kojiadmin",), hosts={HOST: "x86_64"}, cg={"p2p-build": (HOST,),
                                                                "other-cg": (HOST,)})
    with KojiTestHub(tmp_path / "hub") as running:
        yield running


def session(hub: KojiTestHub, user: str, password: str) -> koji.ClientSession:
    client = koji.ClientSession(hub.url, {"user": user, "password": password,
                                          "max_retries": 0, "offline_retry": False})
    client.login()
    return client


def reserved_row(store: TaskStore, task_id: int, reservation: dict[str, Any]) -> TaskRow:
    begin(store, task_id)
    return store.reserved(task_id, reservation["build_id"], reservation["token"], 1.0)


def test_refund_confirms_the_reservation_is_closed(hub: KojiTestHub, store: TaskStore) -> None:
    host = session(hub, HOST, "hp")
    row = reserved_row(store, 1, host.CGInitBuild("p2p-build", {
        "name": "hello", "version": "1.0", "release": "1"}))
    assert refund(host, "p2p-build", row, koji.BUILD_STATES["FAILED"])
    # Again (an earlier refund whose answer was lost): the hub says no, the build says done.
    assert refund(host, "p2p-build", row, koji.BUILD_STATES["FAILED"])
    assert host.getBuild(row.build_id)["state"] == koji.BUILD_STATES["FAILED"]
    # A hub that is away confirms nothing: the caller keeps the row and tries again.
    hub.dispatch("testhub.setOffline", [True], {}, None)
    assert not refund(host, "p2p-build", row, koji.BUILD_STATES["FAILED"])


def test_a_reservation_whose_token_was_lost_is_cancelled_only_if_ours(
    hub: KojiTestHub, store: TaskStore,
) -> None:
    host = session(hub, HOST, "hp")
    user = session(hub, "plainuser", "pp")
    begin(store, 5)
    row = store.get(5)
    assert row is not None
    holder = store.holder_of
    # Nothing reserved: nothing to do.
    assert recover_lost_reservation(host, "p2p-build", HOST, row, holder) is None
    # Reserved by another content generator, or held by another task's row: not ours.
    other = host.CGInitBuild("other-cg", {"name": "hello", "version": "1.0", "release": "1"})
    assert recover_lost_reservation(host, "p2p-build", HOST, row, holder) is None
    host.CGRefundBuild("other-cg", other["build_id"], other["token"])
    held = host.CGInitBuild("p2p-build", {"name": "hello", "version": "1.0", "release": "1"})
    reserved_row(store, 6, held)
    assert recover_lost_reservation(host, "p2p-build", HOST, row, holder) is None
    # Ours, token lost: the host (its owner) cancels it; the NVR can be reserved again.
    store.done(6, 2.0, "test")
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE tasks SET build_id = NULL, token = NULL WHERE task_id = 6")
    assert recover_lost_reservation(host, "p2p-build", HOST, row, holder) == held["build_id"]
    assert host.getBuild(held["build_id"])["state"] == koji.BUILD_STATES["CANCELED"]
    again = host.CGInitBuild("p2p-build", {"name": "hello", "version": "1.0", "release": "1"})
    assert again["build_id"] != held["build_id"]
    # Only its owner (or an admin) may cancel a build.
    with pytest.raises(koji.ActionNotAllowed):
        user.cancelBuild(again["build_id"])


def test_the_hub_wants_the_reserved_build_named_with_its_token(hub: KojiTestHub) -> None:
    """What the real hub's CG_Importer.prep_build checks (kojihub.py, Koji 1.35)."""
    host = session(hub, HOST, "hp")
    reserved = host.CGInitBuild("p2p-build", {"name": "x", "version": "1", "release": "1"})
    metadata = {
        "metadata_version": 0,
        "build": {"name": "x", "version": "1", "release": "1", "source": "s", "extra": {},
                  "start_time": 1, "end_time": 2},
        "buildroots": [{"id": 1, "host": {"os": "f", "arch": "x86_64"},
                        "content_generator": {"name": "p2p-build", "version": "0.1"},
                        "container": {"type": "none", "arch": "x86_64"}, "tools": [],
                        "components": []}],
        "output": [],
    }
    with pytest.raises(koji.GenericError, match="no build_id in metadata"):
        host.CGImport(json.dumps(metadata), "nowhere", token=reserved["token"])
    metadata["build"]["build_id"] = reserved["build_id"]
    with pytest.raises(koji.GenericError, match="Token doesn't match"):
        host.CGImport(json.dumps(metadata), "nowhere", token="0" * 64)
    del metadata["build"]["build_id"]
    with pytest.raises(koji.GenericError, match="Build already exists"):
        host.CGImport(json.dumps(metadata), "nowhere")
