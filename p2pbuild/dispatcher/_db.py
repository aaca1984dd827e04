"""The dispatcher's state in SQLite (design item 15): builds, attempts, signed results,
rating observations, node heartbeats, user platforms, API tokens, leases (``_leasing.py``
reads and writes that table) and an append-only audit.

Durability: WAL journal with ``synchronous=FULL``. In WAL mode ``NORMAL`` already survives a
killed *process* (a commit is in the WAL before ``COMMIT`` returns), but may lose the last
commits on power loss; ``FULL`` syncs the WAL on every commit. A dispatcher answers "202
accepted" only after the build's row is committed, and that promise ("nothing accepted is
lost") should hold across a power cut too, so ``FULL``. The cost is one WAL fsync per
transaction, which is why every state change is a single short transaction (measured by
``bench/dispatch.py``).

Crash safety: every function that writes runs one ``BEGIN IMMEDIATE ... COMMIT``; a state
change and the audit entry that explains it are committed together or not at all. The audit
table refuses ``UPDATE`` and ``DELETE`` (triggers).

Fewer syncs: the engine groups writes that belong together into one transaction with
:meth:`Database.batch` (each grouped write is a savepoint inside it, still all or nothing),
and a few writes whose loss on power failure is harmless are committed without a WAL sync
(``durable=False``: an attempt moving from pending to running, which a restart re-derives by
sending the job again; a push attempt's result, which a restart fetches again from the
node that keeps it, as it does for a running attempt (a pull attempt's result is durable:
its node deletes its copy once uploaded, and the queue its files once stored); rating
observations and heartbeats; the user's last platform). They are still atomic and survive a
killed process, and the next
durable commit syncs them with it, at the latest the one that marks the build verified or
failed. Accepted builds, attempts (signed jobs) and build states are always durable.

Threads: a :class:`Database` is used from the one trio thread that opened it. Calls are
short and synchronous; they block the event loop for the length of one transaction.

Schema versions live in ``PRAGMA user_version``; :data:`MIGRATIONS` are applied in order,
each in its own transaction, when a database is opened.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from .. import _sqlite
from ._errors import BadRequestError, ConfigError, UnknownBuildError

__all__ = [
    "ACTIVE_ATTEMPT_STATES",
    "AttemptRow",
    "AttemptState",
    "AuditRow",
    "BuildRow",
    "BuildState",
    "Database",
    "HeartbeatRow",
    "MIGRATIONS",
    "ObservationRow",
    "RatingRow",
]


class BuildState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    VERIFIED = "verified"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (BuildState.VERIFIED, BuildState.FAILED, BuildState.CANCELLED)


class AttemptState(enum.StrEnum):
    #: Job signed and recorded; not yet known to have reached the node.
    PENDING = "pending"
    #: The node accepted the job.
    RUNNING = "running"
    #: A signed ``succeeded`` result arrived and every artifact re-hashed.
    SUCCEEDED = "succeeded"
    #: The build ran and did not succeed (signed result with another state).
    FAILED = "failed"
    #: The node failed us: timeout, vanished, unreachable, refused, bad result.
    LOST = "lost"
    CANCELLED = "cancelled"


ACTIVE_ATTEMPT_STATES = (AttemptState.PENDING, AttemptState.RUNNING)

MIGRATIONS: tuple[str, ...] = (
    # version 1
    """
    CREATE TABLE builds (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        user TEXT NOT NULL,
        team TEXT,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        source_name TEXT NOT NULL,
        source_sha256 TEXT NOT NULL,
        source_size INTEGER NOT NULL,
        source_url TEXT NOT NULL DEFAULT '',
        source_ready INTEGER NOT NULL,
        build_type TEXT NOT NULL,
        arch TEXT NOT NULL,
        os TEXT NOT NULL,
        machine TEXT,
        pool TEXT,
        replicas INTEGER NOT NULL,
        min_memory_mb INTEGER NOT NULL DEFAULT 0,
        min_disk_mb INTEGER NOT NULL DEFAULT 0,
        options TEXT NOT NULL DEFAULT '{}',
        time_limit_s INTEGER NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        sink_path TEXT NOT NULL DEFAULT '',
        report TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX builds_state ON builds(state);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        build_id TEXT NOT NULL REFERENCES builds(id),
        node TEXT NOT NULL,
        operator TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        tls_sha256 BLOB NOT NULL,
        role TEXT NOT NULL,
        job_id TEXT NOT NULL UNIQUE,
        job BLOB NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        sent_at REAL,
        ended_at REAL
    );
    CREATE INDEX attempts_build ON attempts(build_id);
    CREATE TABLE results (
        attempt_id INTEGER PRIMARY KEY REFERENCES attempts(id),
        build_id TEXT NOT NULL REFERENCES builds(id),
        node TEXT NOT NULL,
        raw BLOB NOT NULL,
        state TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE observations (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        node TEXT NOT NULL,
        kind TEXT NOT NULL,
        value REAL NOT NULL,
        build_id TEXT
    );
    CREATE INDEX observations_node ON observations(node);
    CREATE TABLE ratings (
        node TEXT NOT NULL,
        kind TEXT NOT NULL,
        value_sum REAL NOT NULL,
        weight_sum REAL NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (node, kind)
    );
    CREATE TABLE heartbeats (
        node TEXT PRIMARY KEY,
        operator TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        last_uptime_s INTEGER NOT NULL,
        up_s REAL NOT NULL,
        failures REAL NOT NULL,
        at REAL NOT NULL
    );
    CREATE TABLE platforms (
        user TEXT PRIMARY KEY,
        arch TEXT NOT NULL,
        os TEXT NOT NULL,
        machine TEXT,
        at REAL NOT NULL
    );
    CREATE TABLE tokens (
        sha256 TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        team TEXT,
        source TEXT NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        build_id TEXT,
        node TEXT,
        event TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_build ON audit(build_id, id);
    """ + _sqlite.append_only("audit", "the audit trail"),
    # version 2: leases (``_leases.py``, ``_leasing.py``) and the lease a build runs under
    """
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        team TEXT,
        state TEXT NOT NULL,
        request TEXT NOT NULL,
        nodes TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        ended_at REAL
    );
    CREATE INDEX leases_state ON leases(state);
    ALTER TABLE builds ADD COLUMN lease_id TEXT;
    """,
    # version 3: every selection counts the active attempts per node; without an index
    # that read every attempt ever made (tens of milliseconds at 100,000).
    """
    CREATE INDEX attempts_state ON attempts(state);
    """,
)


def _enum_or_none(cls: type[enum.StrEnum]) -> Any:
    return lambda v: None if v is None else cls(v)


@attrs.frozen
class BuildRow:
    id: str
    created_at: float
    updated_at: float
    user: str
    team: str | None
    state: BuildState = attrs.field(converter=BuildState)
    reason: str = ""
    source_name: str = ""
    source_sha256: str = ""
    source_size: int = 0
    source_url: str = ""
    source_ready: bool = attrs.field(default=True, converter=bool)
    build_type: str = "rpm"
    arch: str = ""
    os: str = ""
    machine: str | None = None
    pool: str | None = None
    replicas: int = 2
    min_memory_mb: int = 0
    min_disk_mb: int = 0
    options: str = "{}"
    time_limit_s: int = 3600
    cancel_requested: bool = attrs.field(default=False, converter=bool)
    sink_path: str = ""
    report: str = ""
    #: The lease whose nodes the build runs on (``_leases.py``), if any.
    lease_id: str | None = None

    @property
    def options_map(self) -> dict[str, Any]:
        value = json.loads(self.options)
        assert isinstance(value, dict)
        return value

    def to_json(self) -> dict[str, Any]:
        body = attrs.asdict(self)
        body["state"] = self.state.value
        body["options"] = self.options_map
        return body


_BUILD_COLUMNS = [f.name for f in attrs.fields(BuildRow)]


@attrs.frozen
class AttemptRow:
    id: int
    build_id: str
    node: str
    operator: str
    endpoint: str
    tls_sha256: bytes
    role: str
    job_id: str
    job: bytes = attrs.field(repr=False)
    state: AttemptState = attrs.field(converter=AttemptState)
    reason: str
    created_at: float
    sent_at: float | None
    ended_at: float | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_ATTEMPT_STATES

    def to_json(self) -> dict[str, Any]:
        """The row as the API shows it inside its build: every column but the build's id
        and the node's signed job and certificate pin (``redact_build`` hides more)."""
        body = attrs.asdict(self, filter=lambda a, _: a.name not in _ATTEMPT_UNSHOWN)
        body["state"] = self.state.value
        return body


_ATTEMPT_UNSHOWN = frozenset({"build_id", "tls_sha256", "job"})


_ATTEMPT_COLUMNS = [f.name for f in attrs.fields(AttemptRow)]


@attrs.frozen
class AuditRow:
    id: int
    at: float
    build_id: str | None
    node: str | None
    event: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class ObservationRow:
    at: float
    node: str
    kind: str
    value: float
    build_id: str | None


@attrs.frozen
class RatingRow:
    """An exponentially decayed sum of observations, as of ``at``."""

    node: str
    kind: str
    value_sum: float
    weight_sum: float
    at: float


@attrs.frozen
class HeartbeatRow:
    node: str
    operator: str
    first_seen: float
    last_seen: float
    last_uptime_s: int
    up_s: float
    failures: float
    at: float


def connect_wal(path: Path, what: str, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection to the SQLite file at ``path`` in WAL mode (``_sqlite.connect_wal``),
    rows as :class:`sqlite3.Row`, for the calling thread only.

    Raises :class:`ConfigError` naming ``what`` the file should be if it is not a database,
    or if WAL cannot be enabled.
    """
    return _sqlite.connect_wal(path, what, error=ConfigError, synchronous=synchronous)


class Database:
    """One SQLite file. Open with :meth:`open`; close with :meth:`close`.

    Methods raise :class:`sqlite3.Error` only for a broken database or disk (a local
    failure that should stop the dispatcher), :class:`UnknownBuildError` for an unknown id.
    """

    def __init__(
        self, connection: sqlite3.Connection, path: Path, *, synchronous: str = "FULL"
    ) -> None:
        self._db = connection
        self.path = path
        self._synchronous = synchronous
        #: Nesting depth of transaction(): inner ones are savepoints of the outermost.
        self._depth = 0
        #: Counts rolled-back transactions and savepoints: a reader that caches rows it
        #: wrote (RatingBook) reloads when this changes, as a write it saw may be undone.
        self.rollbacks = 0

    @classmethod
    def open(cls, path: Path | str, *, synchronous: str = "FULL") -> Database:
        """Open (creating and migrating as needed) the database at ``path``.

        Raises :class:`ConfigError` if the file is from a newer p2pbuild (unknown schema
        version) or is not a database.
        """
        path = Path(path)
        connection = connect_wal(path, "a dispatcher database", synchronous=synchronous)
        _sqlite.migrate(connection, MIGRATIONS, path, error=ConfigError)
        return cls(connection, path, synchronous=synchronous)

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return _sqlite.schema_version(self._db)

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises.

        Inside another transaction (see :meth:`batch`) it is a savepoint of that one: rolled
        back alone if the block raises, committed with the outer transaction otherwise.
        ``durable=False`` commits without syncing the WAL (module doc) when the database is
        opened with ``synchronous=FULL`` or ``EXTRA``; it has no effect on an inner one.
        """
        if self._depth:
            self._depth += 1
            self._db.execute("SAVEPOINT inner")
            try:
                yield self._db
            except BaseException:
                self.rollbacks += 1
                self._db.execute("ROLLBACK TO inner")
                self._db.execute("RELEASE inner")
                raise
            finally:
                self._depth -= 1
            self._db.execute("RELEASE inner")
            return
        relaxed = not durable and self._synchronous != "NORMAL"
        if relaxed:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                self.rollbacks += 1
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            self._db.execute("COMMIT")
        finally:
            if relaxed:
                self._db.execute(f"PRAGMA synchronous={self._synchronous}")

    @contextmanager
    def batch(self, *, durable: bool = True) -> Iterator[None]:
        """Group every write of the block into one transaction (at most one sync; none
        with ``durable=False``, see :meth:`transaction`).

        The block must not wait on anything (no ``await``): another task's write would
        join the transaction. Raises what the block raises, after rolling all of it back.
        """
        with self.transaction(durable=durable):
            yield

    # -- audit ---------------------------------------------------------------------------------

    @staticmethod
    def _audit(
        db: sqlite3.Connection,
        at: float,
        event: str,
        build_id: str | None = None,
        node: str | None = None,
        **detail: Any,
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, build_id, node, event, detail) VALUES (?, ?, ?, ?, ?)",
            (at, build_id, node, event, json.dumps(detail, sort_keys=True, default=str)),
        )

    def audit(
        self, at: float, event: str, build_id: str | None = None, node: str | None = None,
        **detail: Any,
    ) -> None:
        """Append one decision to the audit trail (its own transaction)."""
        with self.transaction() as db:
            self._audit(db, at, event, build_id, node, **detail)

    def audit_entries(
        self, build_id: str | None = None, *, after: int = 0, limit: int = 1000
    ) -> list[AuditRow]:
        """Audit entries with id > ``after``, oldest first, of one build or all."""
        if build_id is None:
            rows = self._db.execute(
                "SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            )
        else:
            rows = self._db.execute(
                "SELECT * FROM audit WHERE build_id = ? AND id > ? ORDER BY id LIMIT ?",
                (build_id, after, limit),
            )
        return [
            AuditRow(r["id"], r["at"], r["build_id"], r["node"], r["event"],
                     json.loads(r["detail"]))
            for r in rows
        ]

    # -- builds --------------------------------------------------------------------------------

    def insert_build(self, build: BuildRow) -> None:
        """Record an accepted build (and audit it) in one transaction."""
        values = attrs.astuple(build, recurse=False)
        values = tuple(v.value if isinstance(v, enum.Enum) else v for v in values)
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO builds ({', '.join(_BUILD_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_BUILD_COLUMNS))})",
                values,
            )
            self._audit(
                db, build.created_at, "accepted", build.id, user=build.user, team=build.team,
                source=build.source_name, sha256=build.source_sha256, arch=build.arch,
                os=build.os, build_type=build.build_type, replicas=build.replicas,
                machine=build.machine, pool=build.pool,
                **({"lease": build.lease_id} if build.lease_id else {}),
            )

    def build(self, build_id: str) -> BuildRow:
        """Raises :class:`UnknownBuildError`."""
        row = self._db.execute("SELECT * FROM builds WHERE id = ?", (build_id,)).fetchone()
        if row is None:
            raise UnknownBuildError(f"no build {build_id[:40]}")
        return BuildRow(**dict(row))

    def resolve_build(self, text: str) -> str:
        """The id of the build ``text`` names: its id, a unique prefix of it (4 or more hex
        digits), or its source's NVR or file name (``hello-1.0-1`` or
        ``hello-1.0-1.src.rpm``; the newest such build). Raises :class:`UnknownBuildError`
        (no such build, or a prefix of several)."""
        text = text.strip()
        if not text or len(text) > 300:
            raise UnknownBuildError("no build named by an empty or overlong name")
        row = self._db.execute("SELECT id FROM builds WHERE id = ?", (text,)).fetchone()
        if row is not None:
            return str(row[0])
        lowered = text.lower()
        if len(lowered) >= 4 and all(c in "0123456789abcdef" for c in lowered):
            rows = self._db.execute(
                "SELECT id FROM builds WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 6",
                (len(lowered), lowered),
            ).fetchall()
            if len(rows) == 1:
                return str(rows[0][0])
            if rows:
                shown = ", ".join(str(r[0])[:12] for r in rows[:5])
                more = ", ..." if len(rows) > 5 else ""
                raise UnknownBuildError(
                    f"{text} is the start of several builds ({shown}{more}); give more of the id"
                )
        names = (text, text + ".src.rpm")
        row = self._db.execute(
            "SELECT id FROM builds WHERE source_name IN (?, ?) ORDER BY created_at DESC, id "
            "LIMIT 1", names,
        ).fetchone()
        if row is not None:
            return str(row[0])
        raise UnknownBuildError(f"no build {text[:64]} (not an id, a unique id prefix or an NVR)")

    def builds(
        self, *, states: Sequence[BuildState] = (), limit: int = 100, user: str | None = None
    ) -> list[BuildRow]:
        """Builds, newest first; filtered by state and user when given."""
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += [s.value for s in states]
        if user is not None:
            where.append("user = ?")
            args.append(user)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.execute(
            f"SELECT * FROM builds {clause} ORDER BY created_at DESC, id LIMIT ?",
            (*args, limit),
        )
        return [BuildRow(**dict(r)) for r in rows]

    def set_build_state(
        self, build_id: str, state: BuildState, now: float, *, reason: str = "",
        sink_path: str | None = None, report: str | None = None, **detail: Any,
    ) -> None:
        """Move a build to ``state`` and audit it with ``reason`` and ``detail``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE builds SET state = ?, reason = ?, updated_at = ?, "
                "sink_path = COALESCE(?, sink_path), report = COALESCE(?, report) WHERE id = ?",
                (state.value, reason, now, sink_path, report, build_id),
            )
            self._audit(db, now, f"build-{state.value}", build_id, reason=reason, **detail)

    def set_source_ready(self, build_id: str, now: float, size: int) -> None:
        """The source was fetched from its URL and is ``size`` bytes."""
        with self.transaction() as db:
            db.execute(
                "UPDATE builds SET source_ready = 1, source_size = ?, updated_at = ? "
                "WHERE id = ?",
                (size, now, build_id),
            )
            self._audit(db, now, "source-fetched", build_id, size=size)

    def request_cancel(self, build_id: str, now: float, by: str) -> BuildRow:
        """Mark a build for cancellation; the engine carries it out. Raises
        :class:`UnknownBuildError`, or :class:`BadRequestError` for a build that has
        already ended."""
        build = self.build(build_id)
        if build.state.terminal:
            raise BadRequestError(
                f"build {build_id} has already ended ({build.state.value}); nothing to cancel"
            )
        with self.transaction() as db:
            db.execute(
                "UPDATE builds SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                (now, build_id),
            )
            self._audit(db, now, "cancel-requested", build_id, by=by)
        return self.build(build_id)

    # -- attempts ------------------------------------------------------------------------------

    def insert_attempt(
        self,
        *,
        build_id: str,
        node: str,
        operator: str,
        endpoint: str,
        tls_sha256: bytes,
        role: str,
        job_id: str,
        job: bytes,
        now: float,
        why: dict[str, Any],
    ) -> AttemptRow:
        """Record a signed job for a chosen node (state ``pending``), moving the build to
        ``running``, with the selection's reasons in the audit trail."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO attempts (build_id, node, operator, endpoint, tls_sha256, role, "
                "job_id, job, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (build_id, node, operator, endpoint, tls_sha256, role, job_id, job,
                 AttemptState.PENDING.value, now),
            )
            db.execute(
                "UPDATE builds SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                (BuildState.RUNNING.value, now, build_id, BuildState.QUEUED.value),
            )
            self._audit(
                db, now, "node-chosen", build_id, node, operator=operator, role=role,
                job_id=job_id, **why,
            )
        attempt_id = cursor.lastrowid
        assert attempt_id is not None
        return self.attempt(attempt_id)

    def attempt(self, attempt_id: int) -> AttemptRow:
        row = self._db.execute("SELECT * FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        assert row is not None, attempt_id
        return AttemptRow(**dict(row))

    def attempts(self, build_id: str) -> list[AttemptRow]:
        rows = self._db.execute(
            "SELECT * FROM attempts WHERE build_id = ? ORDER BY id", (build_id,)
        )
        return [AttemptRow(**dict(r)) for r in rows]

    def active_attempts_by_node(self) -> dict[str, int]:
        """How many pending or running attempts each node has, over all builds."""
        rows = self._db.execute(
            "SELECT node, COUNT(*) FROM attempts WHERE state IN (?, ?) GROUP BY node",
            tuple(s.value for s in ACTIVE_ATTEMPT_STATES),
        )
        return {r[0]: r[1] for r in rows}

    def set_attempt_state(
        self, attempt: AttemptRow, state: AttemptState, now: float, *, reason: str = "",
        **detail: Any,
    ) -> None:
        """Move an attempt to ``state`` (``running`` sets ``sent_at``; the final states
        set ``ended_at``), audited."""
        # pending -> running need not survive a power cut: a restart sends the job again
        # and the node answers "replayed" (module doc).
        with self.transaction(durable=state is not AttemptState.RUNNING) as db:
            if state is AttemptState.RUNNING:
                db.execute(
                    "UPDATE attempts SET state = ?, sent_at = COALESCE(sent_at, ?) WHERE id = ?",
                    (state.value, now, attempt.id),
                )
            else:
                db.execute(
                    "UPDATE attempts SET state = ?, reason = ?, ended_at = ? WHERE id = ?",
                    (state.value, reason, now, attempt.id),
                )
            self._audit(
                db, now, f"attempt-{state.value}", attempt.build_id, attempt.node,
                attempt=attempt.id, job_id=attempt.job_id, reason=reason, **detail,
            )

    def store_result(
        self, attempt: AttemptRow, raw: bytes, result_state: str, final: AttemptState,
        now: float, *, reason: str = "", **detail: Any,
    ) -> None:
        """Keep a node's signed result bytes and end the attempt in one transaction."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO results (attempt_id, build_id, node, raw, state, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (attempt.id, attempt.build_id, attempt.node, raw, result_state, now),
            )
            db.execute(
                "UPDATE attempts SET state = ?, reason = ?, ended_at = ? WHERE id = ?",
                (final.value, reason, now, attempt.id),
            )
            self._audit(
                db, now, f"attempt-{final.value}", attempt.build_id, attempt.node,
                attempt=attempt.id, job_id=attempt.job_id, result=result_state, reason=reason,
                **detail,
            )

    def result_bytes(self, attempt_id: int) -> bytes | None:
        row = self._db.execute(
            "SELECT raw FROM results WHERE attempt_id = ?", (attempt_id,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    # -- ratings -------------------------------------------------------------------------------

    def add_observation(
        self, obs: ObservationRow, rating: RatingRow, *, reason: str = ""
    ) -> None:
        """Log an observation and store the node's updated aggregate, atomically (not
        synced on its own: module doc)."""
        with self.transaction(durable=False) as db:
            db.execute(
                "INSERT INTO observations (at, node, kind, value, build_id) VALUES (?,?,?,?,?)",
                (obs.at, obs.node, obs.kind, obs.value, obs.build_id),
            )
            db.execute(
                "INSERT OR REPLACE INTO ratings (node, kind, value_sum, weight_sum, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (rating.node, rating.kind, rating.value_sum, rating.weight_sum, rating.at),
            )
            if reason:
                self._audit(
                    db, obs.at, "rating", obs.build_id, obs.node, kind=obs.kind,
                    value=round(obs.value, 4), reason=reason,
                )

    def rating(self, node: str, kind: str) -> RatingRow | None:
        row = self._db.execute(
            "SELECT * FROM ratings WHERE node = ? AND kind = ?", (node, kind)
        ).fetchone()
        return None if row is None else RatingRow(**dict(row))

    def ratings(self) -> list[RatingRow]:
        return [RatingRow(**dict(r)) for r in self._db.execute("SELECT * FROM ratings")]

    def observations(self, node: str) -> list[ObservationRow]:
        rows = self._db.execute(
            "SELECT at, node, kind, value, build_id FROM observations WHERE node = ? "
            "ORDER BY id", (node,),
        )
        return [ObservationRow(**dict(r)) for r in rows]

    def heartbeat(self, node: str) -> HeartbeatRow | None:
        row = self._db.execute("SELECT * FROM heartbeats WHERE node = ?", (node,)).fetchone()
        return None if row is None else HeartbeatRow(**dict(row))

    def heartbeats(self) -> list[HeartbeatRow]:
        return [HeartbeatRow(**dict(r)) for r in self._db.execute("SELECT * FROM heartbeats")]

    def put_heartbeat(self, row: HeartbeatRow, *, failure_reason: str = "") -> None:
        with self.transaction(durable=False) as db:
            db.execute(
                "INSERT OR REPLACE INTO heartbeats (node, operator, first_seen, last_seen, "
                "last_uptime_s, up_s, failures, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(row),
            )
            if failure_reason:
                self._audit(db, row.last_seen, "node-failure", None, row.node,
                            reason=failure_reason)

    # -- affinity and tokens -------------------------------------------------------------------

    def platform(self, user: str) -> tuple[str, str, str | None] | None:
        row = self._db.execute(
            "SELECT arch, os, machine FROM platforms WHERE user = ?", (user,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def set_platform(self, user: str, arch: str, os: str, machine: str | None, now: float) -> None:
        with self.transaction(durable=False) as db:
            db.execute(
                "INSERT OR REPLACE INTO platforms (user, arch, os, machine, at) "
                "VALUES (?, ?, ?, ?, ?)", (user, arch, os, machine, now),
            )

    def replace_tokens(self, source: str, tokens: Sequence[tuple[str, str, str | None]]) -> None:
        """Replace the tokens that came from ``source`` (e.g. ``config``) with ``tokens``,
        each ``(sha256 hex, user, team)``."""
        with self.transaction() as db:
            db.execute("DELETE FROM tokens WHERE source = ?", (source,))
            db.executemany(
                "INSERT OR REPLACE INTO tokens (sha256, user, team, source) VALUES (?,?,?,?)",
                [(h, u, t, source) for h, u, t in tokens],
            )

    def token(self, sha256_hex: str) -> tuple[str, str | None] | None:
        row = self._db.execute(
            "SELECT user, team FROM tokens WHERE sha256 = ?", (sha256_hex,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

