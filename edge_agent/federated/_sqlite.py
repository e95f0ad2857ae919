"""The SQLite connection settings both federated state files share."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["connect", "transaction"]


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
