"""The node's persistent state: one SQLite file (WAL) in its data directory.

What must survive a daemon restart:

* the replay cache (``replay``: job id and expiry, plus the eviction horizon in ``meta``),
  so a job admitted before the restart is still refused as ``replayed`` after it;
* every admitted job (``jobs``: the signed job's bytes, when it was accepted, its work
  directory) and, once it ended, its signed result and where its files are (``files``),
  so finished results stay downloadable until collected or expired;
* the record sequence counter (``meta``), so records published after a restart always
  have a higher ``seq`` than the ones before, even if the clock stepped back.

A job that was running when the daemon died has no result; :meth:`NodeState.unfinished`
returns it so the daemon can sign a ``handed-back`` result for it.

:class:`NodeState` implements the job service's :class:`~p2pbuild.node._service.JobStore`.
Each call is one short transaction, run synchronously on the trio thread: with WAL and
``synchronous=NORMAL`` a commit is tens of microseconds (no fsync per commit; a power cut
may lose the last commits but never corrupts the file). That costs less than a thread
hop, and keeps the order of writes the order of events. Errors (``sqlite3.Error``,
``OSError``) propagate: a node with a broken disk should stop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import attrs

from .. import _sqlite
from .._errors import LocalError, P2PBuildError
from .._jobs import Job, Result
from .._replay import ReplayCache

__all__ = ["NodeState", "StateError", "StoredJob"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replay (
    id BLOB PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS replay_expiry ON replay (expires_at);
CREATE TABLE IF NOT EXISTS jobs (
    job_id BLOB PRIMARY KEY,
    job BLOB NOT NULL,
    accepted_ms INTEGER NOT NULL,
    workdir TEXT NOT NULL,
    result BLOB,
    finished_ms INTEGER
);
CREATE TABLE IF NOT EXISTS files (
    job_id BLOB NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (job_id, kind, name)
);
"""
#: Schema versions (``PRAGMA user_version``); version 1 is written so that it also applies
#: cleanly to a file made before the version was kept there.
_MIGRATIONS = (_SCHEMA,)


class StateError(LocalError):
    """The state file cannot be used (another schema version, or not a database)."""

    code = "state"


@attrs.frozen
class StoredJob:
    """A job as the state file remembers it; ``result`` is None if it never finished."""

    job: Job
    accepted_ms: int
    workdir: Path
    result: Result | None
    finished_ms: int | None
    files: Mapping[tuple[str, str], Path]


@attrs.define(eq=False)
class NodeState:
    """The open state file. Build with :meth:`open`; close with :meth:`close` (or use it
    as a context manager)."""

    path: Path
    _db: sqlite3.Connection

    @classmethod
    def open(cls, path: Path) -> NodeState:
        """Open (creating if needed) the state file at ``path``.

        Raises :class:`StateError` for a file of another schema version or that is not a
        SQLite database, and ``OSError`` if the directory is not writable.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        db = _sqlite.connect_wal(
            path, "a node state file", error=StateError, synchronous="NORMAL", rows=False,
            check_same_thread=False,
        )
        try:
            _sqlite.migrate(db, _MIGRATIONS, path, error=StateError)
            # Files from before user_version was kept say their version in ``meta``.
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                db.close()
                raise StateError(f"{path}: schema version {row[0]}, expected {_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StateError(f"{path}: not a usable state database ({exc})") from None
        path.chmod(0o600)
        return cls(path, db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> NodeState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return _sqlite.transaction(self._db)

    # -- meta ----------------------------------------------------------------------------------

    def _meta(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row is not None else default

    def _set_meta(self, db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def next_seq(self, now: float) -> int:
        """A record ``seq`` higher than every one returned before, by this or an earlier
        run: the current time in milliseconds, or the last ``seq`` plus one if the clock
        has not moved on (or stepped back)."""
        with self._transaction() as db:
            seq = max(int(now * 1000), self._meta("seq") + 1)
            self._set_meta(db, "seq", seq)
        return seq

    def started(self, now: float) -> int:
        """Count a daemon start; returns how many starts there were, this one included."""
        with self._transaction() as db:
            starts = self._meta("starts") + 1
            self._set_meta(db, "starts", starts)
            self._set_meta(db, "started_at", int(now))
        return starts

    # -- replay cache --------------------------------------------------------------------------

    def load_replay(self, now: float, *, max_entries: int = 100_000) -> ReplayCache:
        """The replay cache as persisted, without the ids expired at ``now`` (which are
        also deleted from the file)."""
        with self._transaction() as db:
            db.execute("DELETE FROM replay WHERE expires_at <= ?", (int(now),))
        cache = ReplayCache(max_entries=max_entries, horizon=self._meta("replay_horizon"))
        rows = self._db.execute("SELECT id, expires_at FROM replay ORDER BY expires_at")
        for item_id, expires_at in rows:
            try:
                cache.add(bytes(item_id), int(expires_at), now)
            except P2PBuildError:
                continue  # under the horizon already: refused anyway
        return cache

    def replay_horizon(self, horizon: int) -> None:
        with self._transaction() as db:
            self._set_meta(db, "replay_horizon", horizon)

    def prune(self, now: float) -> None:
        """Delete replay ids that expired at ``now``."""
        with self._transaction() as db:
            db.execute("DELETE FROM replay WHERE expires_at <= ?", (int(now),))

    # -- jobs (the JobStore protocol) ----------------------------------------------------------

    def admitted(self, job: Job, accepted_ms: int, workdir: Path) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO replay VALUES (?, ?)", (job.job_id, job.expires_at)
            )
            db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, NULL, NULL)",
                (job.job_id, job.raw, accepted_ms, str(workdir)),
            )

    def finished(
        self, job: Job, result: Result, files: Mapping[tuple[str, str], Path], finished_ms: int
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET result = ?, finished_ms = ? WHERE job_id = ?",
                (result.raw, finished_ms, job.job_id),
            )
            db.execute("DELETE FROM files WHERE job_id = ?", (job.job_id,))
            db.executemany(
                "INSERT INTO files VALUES (?, ?, ?, ?)",
                [(job.job_id, kind, name, str(path)) for (kind, name), path in files.items()],
            )

    def forgotten(self, job_id: bytes) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    # -- reading back --------------------------------------------------------------------------

    def jobs(self) -> list[StoredJob]:
        """Every remembered job, oldest first. A row that no longer parses (a file edited
        by hand, a format change) is deleted and skipped."""
        stored = []
        rows = self._db.execute(
            "SELECT job_id, job, accepted_ms, workdir, result, finished_ms FROM jobs "
            "ORDER BY accepted_ms"
        ).fetchall()
        for job_id, job_raw, accepted_ms, workdir, result_raw, finished_ms in rows:
            try:
                job = Job.from_bytes(bytes(job_raw))
                result = Result.from_bytes(bytes(result_raw)) if result_raw is not None else None
            except P2PBuildError:
                self.forgotten(bytes(job_id))
                continue
            files = {
                (kind, name): Path(path)
                for kind, name, path in self._db.execute(
                    "SELECT kind, name, path FROM files WHERE job_id = ?", (job_id,)
                )
            }
            stored.append(
                StoredJob(job, int(accepted_ms), Path(workdir), result, finished_ms, files)
            )
        return stored

    def unfinished(self) -> list[StoredJob]:
        """Jobs admitted but without a result: running when the daemon stopped."""
        return [s for s in self.jobs() if s.result is None]

    def statistics(self, now: float | None = None) -> dict[str, int]:
        """Counts for ``p2pbuild node status`` when the daemon is not running."""
        now = time.time() if now is None else now
        (finished,) = self._db.execute(
            "SELECT count(*) FROM jobs WHERE result IS NOT NULL"
        ).fetchone()
        (unfinished,) = self._db.execute(
            "SELECT count(*) FROM jobs WHERE result IS NULL"
        ).fetchone()
        (replay,) = self._db.execute(
            "SELECT count(*) FROM replay WHERE expires_at > ?", (int(now),)
        ).fetchone()
        return {
            "finished": int(finished),
            "unfinished": int(unfinished),
            "replay_ids": int(replay),
            "starts": self._meta("starts"),
            "started_at": self._meta("started_at"),
            "seq": self._meta("seq"),
        }
