"""The SQLite connection settings both federated state files share."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edge_agent.federated._errors import FederatedStateError

__all__ = ["connect", "open_state", "transaction"]


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode (transactions are explicit), WAL, with a busy timeout.

    The agent writes and the SuperNode's ClientApp processes read (and charge the ledger)
    concurrently: WAL lets readers proceed while one writer commits, and ``BEGIN IMMEDIATE``
    in :func:`transaction` serialises writers across processes.
    """
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    # Keep the WAL small on small state partitions (see edge_agent.outbox).
    conn.execute("PRAGMA wal_autocheckpoint=200")
    conn.execute("PRAGMA journal_size_limit=1048576")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; rolls back on any exception (if SQLite has not already)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def open_state(path: Path, what: str, schema_version: int, tables: Sequence[str]) -> sqlite3.Connection:
    """:func:`connect` to ``path`` and, in one transaction, stamp a new file with
    ``schema_version`` (a ``meta`` table), refuse one stamped with another version, and run
    ``tables`` (``CREATE … IF NOT EXISTS`` statements). ``what`` names the file in errors.
    Raises :class:`FederatedStateError`; ``sqlite3.Error`` is left to the caller."""
    conn = connect(path)
    with transaction(conn) as c:
        c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (schema_version,))
        version = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        if version == schema_version:
            for statement in tables:
                c.execute(statement)
    if version != schema_version:
        conn.close()
        raise FederatedStateError(f"{path}: {what} schema {version}, this agent reads {schema_version}")
    return conn
