"""The one way p2pbuild keeps state in SQLite: WAL connect, transactions, migrations.

Three stores use it: the dispatcher's database (``dispatcher/_db.py``), the Koji task store
(``koji/_store.py``) and the node's state file (``node/_state.py``). Each keeps its schema
as a tuple of migration scripts; the schema version is ``PRAGMA user_version``, and
:func:`migrate` applies the scripts the file has not seen yet, each in one transaction.

Errors: a file that is not a database, cannot use WAL, or is from a newer p2pbuild is
reported as the caller's own error class (``error``, a ``LocalError`` of its subsystem)
with a one-line message naming the file; anything else (``sqlite3.Error`` for a broken
disk) propagates.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "SYNCHRONOUS", "append_only", "connect_wal", "migrate", "schema_version", "statements",
    "transaction",
]

#: ``synchronous`` settings a store may ask for (``OFF`` would risk corruption).
SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")


def connect_wal(
    path: Path,
    what: str,
    *,
    error: type[Exception],
    synchronous: str = "FULL",
    rows: bool = True,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """A connection to the SQLite file at ``path`` in WAL mode, autocommit (transactions
    are explicit, :func:`transaction`), foreign keys on, rows as :class:`sqlite3.Row`
    (plain tuples with ``rows=False``).

    Raises ``error`` naming ``what`` the file should be if it is not a database, or if
    WAL cannot be enabled.
    """
    if synchronous not in SYNCHRONOUS:
        raise error(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
    try:
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=check_same_thread
        )
    except sqlite3.Error as exc:
        raise error(f"{path}: cannot open {what}: {exc}") from None
    if rows:
        connection.row_factory = sqlite3.Row
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise error(f"{path} is not {what}: {exc}") from None
    if mode != "wal":
        connection.close()
        raise error(f"{path}: cannot enable WAL mode (got {mode})")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.execute("PRAGMA busy_timeout=5000")
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def schema_version(connection: sqlite3.Connection) -> int:
    value: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return value


def migrate(
    connection: sqlite3.Connection,
    migrations: Sequence[str],
    path: Path,
    *,
    error: type[Exception],
) -> None:
    """Apply the ``migrations`` the file at ``path`` has not seen, each script and its
    version bump in one transaction. Raises ``error`` (and closes the connection) for a
    file from a newer p2pbuild (a version beyond the known scripts)."""
    version = schema_version(connection)
    if version > len(migrations):
        connection.close()
        raise error(
            f"{path} has schema version {version}; this p2pbuild knows up to {len(migrations)}"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        # executescript commits first; run the statements one by one inside BEGIN.
        with transaction(connection) as db:
            for statement in statements(script):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={number}")


def append_only(table: str, what: str) -> str:
    """The triggers (a migration script's part) that keep ``table`` append-only, as an
    audit trail or event log must be: an UPDATE or a DELETE aborts with ``<what> is
    append-only``."""
    return "".join(
        f"    CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table}\n"
        f"        BEGIN SELECT RAISE(ABORT, '{what} is append-only'); END;\n"
        for verb in ("UPDATE", "DELETE")
    )


def statements(script: str) -> Iterator[str]:
    """Split a migration script into statements (triggers hold ``;`` inside
    ``BEGIN ... END``)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()
