"""Bounded on-disk store of recent input windows the active model scored as normal.

The SuperNode's ClientApp trains on these windows; they never leave the host. The agent
appends (in batches, see :class:`edge_agent.federated.feed.WindowFeed`), the ClientApp reads.

Guarantees of :class:`WindowStore`:

* **Bounded.** At most ``max_windows`` windows over all shapes; adding beyond that drops the
  oldest first, in the same transaction as the insert.
* **Durable.** One SQLite file (WAL); a reopened store holds what was committed.
* **Shapes kept apart.** A new model may use another window length or feature count; each
  window is stored with its ``(rows, features)`` and :meth:`WindowStore.windows` returns one
  shape at a time (by default the most recently added one).
* **Thread safe** within a process (one connection under a lock); other processes may read
  and write concurrently (WAL, ``BEGIN IMMEDIATE``).

numpy only: no torch, no flwr.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from types import TracebackType

import numpy as np

from edge_agent.federated._errors import FederatedStateError
from edge_agent.federated._sqlite import open_state, transaction

__all__ = ["WindowStore"]

_SCHEMA_VERSION = 1


class WindowStore:
    """Bounded on-disk store (one SQLite file) of recent input windows the active model scored as normal.

    Raises :class:`FederatedStateError` (wrapping ``sqlite3.Error``) when the file cannot be
    opened, read or written, and ``ValueError`` for windows that are not a 3-d float array.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path, max_windows: int = 20000) -> None:
        if max_windows <= 0:
            raise ValueError("max_windows must be positive")
        self.path = Path(path)
        self.max_windows = int(max_windows)
        self._lock = threading.Lock()
        try:
            # AUTOINCREMENT: ids never reused, so "oldest" is "smallest id" even after trims
            self._conn = open_state(self.path, "window store", _SCHEMA_VERSION, [
                "CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " rows INTEGER NOT NULL, features INTEGER NOT NULL, model TEXT NOT NULL,"
                " added REAL NOT NULL, data BLOB NOT NULL)",
                "CREATE INDEX IF NOT EXISTS windows_shape ON windows (rows, features, id)"])
        except sqlite3.Error as e:
            raise FederatedStateError(f"cannot open window store {self.path}: {e}") from e

    def add(self, windows: np.ndarray, model: str) -> None:
        """Append ``windows`` (``(n, rows, features)``, stored as float32) scored by ``model``.

        One transaction: either all ``n`` windows are stored (and the oldest beyond
        ``max_windows`` dropped) or none. If ``n`` exceeds ``max_windows`` only the last
        ``max_windows`` are kept.
        """
        arr = np.asarray(windows)
        if arr.ndim != 3 or 0 in arr.shape[1:]:
            raise ValueError(f"windows must be (n, rows, features) with rows, features > 0; got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"windows must be numeric; got {arr.dtype}")
        if len(arr) == 0:
            return
        arr = np.ascontiguousarray(arr[-self.max_windows :], dtype=np.float32)
        _, rows, features = arr.shape
        now = time.time()
        data = [(rows, features, model, now, w.tobytes()) for w in arr]
        with self._lock:
            try:
                with transaction(self._conn) as c:
                    c.executemany(
                        "INSERT INTO windows (rows, features, model, added, data) VALUES (?, ?, ?, ?, ?)",
                        data,
                    )
                    c.execute(
                        "DELETE FROM windows WHERE id <= (SELECT id FROM windows ORDER BY id DESC"
                        " LIMIT 1 OFFSET ?)",
                        (self.max_windows,),
                    )
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot add to window store {self.path}: {e}") from e

    def windows(self, limit: int | None = None, *, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The stored windows of one shape as float32 ``(n, rows, features)``, oldest first.

        ``shape`` selects ``(rows, features)``; by default the shape of the most recently added
        window. ``limit`` keeps the ``limit`` most recent of them (still oldest first). With
        nothing stored the result has ``n == 0`` (``(0, 0, 0)`` when no shape is known).
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        with self._lock:
            try:
                if shape is None:
                    row = self._conn.execute(
                        "SELECT rows, features FROM windows ORDER BY id DESC LIMIT 1").fetchone()
                    if row is None:
                        return np.zeros((0, 0, 0), dtype=np.float32)
                    shape = (int(row[0]), int(row[1]))
                blobs = self._conn.execute(
                    "SELECT data FROM windows WHERE rows=? AND features=? ORDER BY id DESC LIMIT ?",
                    (shape[0], shape[1], -1 if limit is None else int(limit)),
                ).fetchall()
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot read window store {self.path}: {e}") from e
        rows, features = shape
        out = np.empty((len(blobs), rows, features), dtype=np.float32)
        for i, (blob,) in enumerate(reversed(blobs)):
            out[i] = np.frombuffer(blob, dtype=np.float32).reshape(rows, features)
        return out

    def shapes(self) -> dict[tuple[int, int], int]:
        """How many windows are stored per ``(rows, features)``."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT rows, features, COUNT(*) FROM windows GROUP BY rows, features").fetchall()
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot read window store {self.path}: {e}") from e
        return {(int(r), int(f)): int(n) for r, f, n in rows}

    def __len__(self) -> int:
        with self._lock:
            try:
                return int(self._conn.execute("SELECT COUNT(*) FROM windows").fetchone()[0])
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot read window store {self.path}: {e}") from e

    def close(self) -> None:
        """Close the database; idempotent."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> WindowStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
