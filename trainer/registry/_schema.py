"""Registry schema versions and the explicit migrations between them.

Each migration takes the database from version ``n - 1`` to ``n`` inside one transaction.
Version 0 is an empty file. Add a function to ``MIGRATIONS`` to change the schema; never edit
one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

SCHEMA_VERSION = 4


def _v1(conn: sqlite3.Connection) -> None:
    # One statement at a time: executescript() would COMMIT the migration's transaction.
    _run(
        conn,
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE models (
            name TEXT PRIMARY KEY,
            created_at TEXT NOT NULL
        );
        CREATE TABLE versions (
            model TEXT NOT NULL REFERENCES models(name),
            version INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            metrics TEXT NOT NULL,
            params TEXT NOT NULL,
            lineage TEXT NOT NULL,
            architecture TEXT NOT NULL,
            PRIMARY KEY (model, version)
        );
        CREATE TABLE artifacts (
            model TEXT NOT NULL,
            version INTEGER NOT NULL,
            format TEXT NOT NULL,
            quantization TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            model_bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            profiles TEXT NOT NULL,
            parity TEXT NOT NULL,
            PRIMARY KEY (model, version, format, quantization),
            FOREIGN KEY (model, version) REFERENCES versions(model, version)
        );
        CREATE INDEX artifacts_sha256 ON artifacts(sha256);
        """,
    )


def _v2(conn: sqlite3.Connection) -> None:
    # The sha256 of a version's torch weights (a blob, trainer.models.checkpoint), so that a
    # registered version can be compressed or fine-tuned later; NULL for versions from before.
    conn.execute("ALTER TABLE versions ADD COLUMN weights TEXT")


def _v3(conn: sqlite3.Connection) -> None:
    # Federated runs (trainer.federated) and their privacy ledger: one row per run, one per
    # round that was started or refused. JSON columns hold lists and dicts (nodes, metrics).
    _run(
        conn,
        """
        CREATE TABLE fl_runs (
            run TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            model TEXT NOT NULL,
            parent_version INTEGER NOT NULL,
            grp TEXT NOT NULL,
            strategy TEXT NOT NULL,
            dp TEXT NOT NULL,
            noise_multiplier REAL NOT NULL,
            clipping TEXT NOT NULL,
            sampling_rate REAL NOT NULL,
            rounds INTEGER NOT NULL,
            epsilon_budget REAL,
            delta REAL NOT NULL,
            params TEXT NOT NULL,
            state TEXT NOT NULL,
            flower_run_id TEXT,
            weights TEXT,
            result_version INTEGER,
            message TEXT,
            finished_at TEXT
        );
        CREATE TABLE fl_rounds (
            run TEXT NOT NULL REFERENCES fl_runs(run),
            round INTEGER NOT NULL,
            state TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            sampling_rate REAL NOT NULL,
            noise_multiplier REAL NOT NULL,
            clipping_norm REAL NOT NULL,
            epsilon REAL NOT NULL,
            epsilon_pld REAL,
            nodes_sampled TEXT NOT NULL,
            nodes_contributed TEXT NOT NULL,
            failures TEXT NOT NULL,
            metrics TEXT NOT NULL,
            message TEXT,
            PRIMARY KEY (run, round)
        );
        """,
    )


def _v4(conn: sqlite3.Connection) -> None:
    # Staged rollouts (trainer.fleet.rollout): one row per rollout holding the controller's
    # whole resumable state (``progress`` is JSON: the current stage's participants, their
    # counters before and at the start of the soak, the documents written), and an append-only
    # log of what happened (stage deployed, soak started, gate breached, promoted, rolled back).
    _run(
        conn,
        """
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            model TEXT NOT NULL,
            version INTEGER NOT NULL,
            previous_version INTEGER NOT NULL,
            grp TEXT NOT NULL,
            slot TEXT NOT NULL,
            stages TEXT NOT NULL,
            soak_s REAL NOT NULL,
            gates TEXT NOT NULL,
            agents TEXT NOT NULL,
            state TEXT NOT NULL,
            stage INTEGER NOT NULL,
            paused INTEGER NOT NULL,
            abort_requested INTEGER NOT NULL,
            progress TEXT NOT NULL,
            message TEXT,
            finished_at TEXT
        );
        CREATE INDEX rollouts_group ON rollouts(grp, state);
        CREATE TABLE rollout_events (
            rollout TEXT NOT NULL REFERENCES rollouts(id),
            seq INTEGER NOT NULL,
            ts TEXT NOT NULL,
            stage INTEGER NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL,
            PRIMARY KEY (rollout, seq)
        );
        """,
    )


def _run(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4}


def current_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the file (0 for an empty database)."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    ).fetchone()
    if not has_meta:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0


def _set_version(conn: sqlite3.Connection, version: int) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (str(version),),
    )


def _apply(conn: sqlite3.Connection, found: int, target: int) -> bool:
    """Apply the steps after ``found`` up to ``target`` and the version bump in one
    transaction, under SQLite's write lock; False (nothing changed) if the file is no longer
    at ``found`` once the lock is held: another process moved it meanwhile."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if current_version(conn) != found:
            conn.execute("ROLLBACK")
            return False
        for step in range(found + 1, target + 1):
            MIGRATIONS[step](conn)
        _set_version(conn, target)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply the migrations from the file's version up to ``target``; returns those applied.

    Each step and its version bump commit together, so a crash leaves a consistent version.
    """
    applied = []
    while (version := current_version(conn)) < target:
        if _apply(conn, version, version + 1):
            applied.append(version + 1)
    return applied


def create(conn: sqlite3.Connection) -> bool:
    """Give an empty database the current schema in one transaction; False if another
    process had already created it (then nothing is changed).

    One transaction, not :func:`migrate`'s commit per step: a process opening the file while
    another creates it must see version 0 (and wait for the write lock) or the current
    version, never a step between, which it would take for a registry that needs
    ``edgefleet registry migrate``.
    """
    return _apply(conn, 0, SCHEMA_VERSION)
