"""The Koji tasks this build host holds, in SQLite: what a restart needs to finish them.

``kojid`` keeps no state: after a restart it frees every task the hub still shows open on
the host ("stale"), and Koji hands them out again. For a content generator that is not
enough, because a task owns things outside the task: a build reservation on the hub
(``CGInitBuild``: build id and token, without which the NVR stays ``BUILDING`` and the next
attempt fails) and a P2P build in the engine (which the engine resumes by itself). So each
task we take gets one row, written *before* each step that creates something:

========== =====================================================================================
phase      meaning
========== =====================================================================================
reserving  NVR known, ``CGInitBuild`` about to be sent: if we die before its answer is
           stored, the hub may hold a reservation whose token we never saw
reserved   ``build_id`` and ``token`` held; ``p2p_build_id`` once the engine accepted the build
imported   ``CGImport`` succeeded; the task is to be tagged and closed with the build
refunded   the reservation is refunded (the hub confirmed it); the task is to fail, be
           refused or end as cancelled, as ``outcome`` says
released   the task left this host while we were away: reservation refunded, the P2P build
           kept for the task's next attempt here (until the task ends elsewhere)
done       the hub has the task's outcome, or the task is gone; nothing left to do
========== =====================================================================================

A row leaves ``done`` only when the same task comes back for a fresh attempt
(:meth:`TaskStore.begin`). Every change is one ``BEGIN IMMEDIATE ... COMMIT`` with the
matching entry of the append-only ``events`` table. WAL journal, ``synchronous=FULL``: a
reservation token is a promise to the hub, and losing it on a power cut would strand the
NVR (the same reasoning as the dispatcher's database, ``dispatcher/_db.py``).

Threads: like the dispatcher's database, a :class:`TaskStore` is used from the trio thread
that opened it; the host's worker threads reach it through ``trio.from_thread``.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import attrs

from .. import _sqlite
from ..dispatcher import ConfigError
from ._rpm import Nvr

__all__ = ["TaskEvent", "TaskPhase", "TaskRow", "TaskStore"]


class TaskPhase(enum.StrEnum):
    RESERVING = "reserving"
    RESERVED = "reserved"
    IMPORTED = "imported"
    REFUNDED = "refunded"
    RELEASED = "released"
    DONE = "done"


_MIGRATIONS: tuple[str, ...] = (
    # version 1
    """
    CREATE TABLE tasks (
        task_id INTEGER PRIMARY KEY,
        phase TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started INTEGER NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        release TEXT NOT NULL,
        epoch INTEGER,
        source_name TEXT NOT NULL,
        source_sha256 TEXT NOT NULL,
        owner TEXT NOT NULL,
        user TEXT NOT NULL,
        build_id INTEGER,
        token TEXT,
        p2p_build_id TEXT,
        outcome TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tasks_phase ON tasks(phase);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        task_id INTEGER NOT NULL,
        event TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX events_task ON events(task_id, id);
    """ + _sqlite.append_only("events", "the event log"),
)


@attrs.frozen
class TaskRow(Nvr):
    """One Koji task of this host (module doc)."""

    task_id: int
    phase: TaskPhase = attrs.field(converter=TaskPhase)
    created_at: float
    updated_at: float
    #: When the task's current attempt chain began (the CG metadata's ``start_time``).
    started: int
    name: str
    version: str
    release: str
    epoch: int | None
    source_name: str
    source_sha256: str
    #: The Koji user who submitted the task ('' if unknown).
    owner: str
    #: The engine's user for the P2P build (``koji:<owner>``).
    user: str
    build_id: int | None
    token: str | None = attrs.field(repr=False)
    p2p_build_id: str | None
    #: JSON ``{"kind": "fail"|"refuse"|"cancel", "code": int, "message": str}`` once refunded.
    outcome: str

    @property
    def outcome_map(self) -> dict[str, Any]:
        value = json.loads(self.outcome) if self.outcome else {}
        assert isinstance(value, dict)
        return value



@attrs.frozen
class TaskEvent:
    at: float
    task_id: int
    event: str
    detail: dict[str, Any]


class TaskStore:
    """One SQLite file. Open with :meth:`open`, close with :meth:`close`.

    Methods raise :class:`sqlite3.Error` only for a broken database or disk (a local
    failure), and :class:`KeyError` when asked to move a task that has no row (a bug).
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: Path | str) -> TaskStore:
        """Open (creating and migrating as needed) the store at ``path``. Raises
        :class:`ConfigError` for a file that is not a store or is from a newer p2pbuild."""
        path = Path(path)
        connection = _sqlite.connect_wal(path, "a koji task store", error=ConfigError)
        _sqlite.migrate(connection, _MIGRATIONS, path, error=ConfigError)
        return cls(connection, path)

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return _sqlite.transaction(self._db)

    @staticmethod
    def _event(db: sqlite3.Connection, at: float, task_id: int, event: str,
               **detail: Any) -> None:
        db.execute(
            "INSERT INTO events (at, task_id, event, detail) VALUES (?, ?, ?, ?)",
            (at, task_id, event, json.dumps(detail, sort_keys=True, default=str)),
        )

    # -- reading -------------------------------------------------------------------------------

    def get(self, task_id: int) -> TaskRow | None:
        row = self._db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else TaskRow(**dict(row))

    def unfinished(self) -> list[TaskRow]:
        """Every row not ``done``, oldest task first."""
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE phase != ? ORDER BY task_id", (TaskPhase.DONE.value,)
        )
        return [TaskRow(**dict(r)) for r in rows]

    def holder_of(self, build_id: int) -> int | None:
        """The task whose row holds the reservation of Koji build ``build_id``, if any."""
        row = self._db.execute(
            "SELECT task_id FROM tasks WHERE build_id = ? AND token IS NOT NULL "
            "AND phase IN (?, ?)",
            (build_id, TaskPhase.RESERVED.value, TaskPhase.IMPORTED.value),
        ).fetchone()
        return None if row is None else int(row[0])

    def linked_p2p_builds(self) -> set[str]:
        """Every P2P build id some row names (any phase)."""
        rows = self._db.execute(
            "SELECT p2p_build_id FROM tasks WHERE p2p_build_id IS NOT NULL"
        )
        return {str(r[0]) for r in rows}

    def events(self, task_id: int | None = None) -> list[TaskEvent]:
        """The event log, oldest first, of one task or all."""
        if task_id is None:
            rows = self._db.execute("SELECT * FROM events ORDER BY id")
        else:
            rows = self._db.execute(
                "SELECT * FROM events WHERE task_id = ? ORDER BY id", (task_id,)
            )
        return [TaskEvent(r["at"], r["task_id"], r["event"], json.loads(r["detail"]))
                for r in rows]

    # -- writing -------------------------------------------------------------------------------

    def begin(
        self, task_id: int, *, now: float, started: int, name: str, version: str,
        release: str, epoch: int | None, source_name: str, source_sha256: str, owner: str,
        user: str,
    ) -> TaskRow:
        """Start a fresh attempt chain for ``task_id`` in phase ``reserving`` (replacing a
        ``done`` row of an earlier attempt)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO tasks (task_id, phase, created_at, updated_at, started, "
                "name, version, release, epoch, source_name, source_sha256, owner, user, "
                "build_id, token, p2p_build_id, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, '')",
                (task_id, TaskPhase.RESERVING.value, now, now, started, name, version, release,
                 epoch, source_name, source_sha256, owner, user),
            )
            self._event(db, now, task_id, "begin", nvr=f"{name}-{version}-{release}",
                        sha256=source_sha256)
        row = self.get(task_id)
        assert row is not None
        return row

    def _move(self, task_id: int, now: float, event: str, detail: dict[str, Any],
              **fields: Any) -> TaskRow:
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [v.value if isinstance(v, enum.Enum) else v for v in fields.values()]
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE tasks SET {sets}, updated_at = ? WHERE task_id = ?",
                (*values, now, task_id),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"no koji task {task_id} in the store")
            self._event(db, now, task_id, event, **detail)
        row = self.get(task_id)
        assert row is not None
        return row

    def reserving(self, task_id: int, now: float) -> TaskRow:
        """A released task is about to be reserved again (its P2P build kept)."""
        return self._move(task_id, now, "reserving", {}, phase=TaskPhase.RESERVING,
                          build_id=None, token=None, outcome="")

    def reserved(self, task_id: int, build_id: int, token: str, now: float) -> TaskRow:
        return self._move(task_id, now, "reserved", {"build_id": build_id},
                          phase=TaskPhase.RESERVED, build_id=build_id, token=token)

    def linked(self, task_id: int, p2p_build_id: str | None, now: float, *,
               how: str = "submitted") -> TaskRow:
        """The task's P2P build (``how``: submitted, adopted; None: dropped)."""
        return self._move(task_id, now, f"p2p-{how}", {"p2p_build_id": p2p_build_id},
                          p2p_build_id=p2p_build_id)

    def imported(self, task_id: int, now: float) -> TaskRow:
        return self._move(task_id, now, "imported", {}, phase=TaskPhase.IMPORTED)

    def refunded(self, task_id: int, outcome: dict[str, Any], now: float) -> TaskRow:
        return self._move(task_id, now, "refunded", outcome, phase=TaskPhase.REFUNDED,
                          outcome=json.dumps(outcome, sort_keys=True))

    def released(self, task_id: int, now: float, *, keep_p2p: bool) -> TaskRow:
        fields: dict[str, Any] = {"phase": TaskPhase.RELEASED, "build_id": None,
                                  "token": None}
        if not keep_p2p:
            fields["p2p_build_id"] = None
        return self._move(task_id, now, "released", {"keep_p2p": keep_p2p}, **fields)

    def done(self, task_id: int, now: float, why: str) -> TaskRow | None:
        """The task needs nothing more from us. No row: nothing to do (returns None)."""
        if self.get(task_id) is None:
            return None
        return self._move(task_id, now, "done", {"why": why}, phase=TaskPhase.DONE)

    def note(self, task_id: int, now: float, event: str, **detail: Any) -> None:
        """Append an event without changing the row (resumed, recovered ...)."""
        with self._transaction() as db:
            self._event(db, now, task_id, event, **detail)

