"""Time series as edgefleet reads them: CSV with a timestamp column and numeric columns.

Two layouts are accepted, both with a header row:

- NAB style, univariate: ``timestamp,value``;
- multivariate: ``timestamp,<feature>,<feature>,...``.

Empty cells and ``nan`` are missing values (kept as NaN; a column with no value at all is an
error). Anything else that is not a number is a malformed row, reported with its line number.
Shared by the trainer (training data) and the agent (``csv:`` source, offline detection), so
both read a file the same way. Standard library and numpy only.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

__all__ = ["Series", "SeriesError", "read_series", "iter_csv_rows", "file_sha256"]


class SeriesError(ValueError):
    """A time-series file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Series:
    """Timestamps (as written in the file), feature names and a ``(rows, features)`` array."""

    timestamps: list[str]
    features: tuple[str, ...]
    values: np.ndarray  # float32, shape (rows, features); NaN = missing

    def __len__(self) -> int:
        return len(self.timestamps)

    def head(self, rows: int) -> Series:
        """The first ``rows`` rows."""
        return Series(self.timestamps[:rows], self.features, self.values[:rows])


def _check_timestamp(text: str, where: str) -> str:
    text = text.strip()
    try:
        datetime.fromisoformat(text)
    except ValueError:
        try:
            float(text)  # epoch seconds are fine too
        except ValueError:
            raise SeriesError(f"{where}: timestamp {text!r} is neither ISO 8601 nor a number") from None
    return text


def _parse_value(text: str, where: str, column: str) -> float:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "null", "none"):
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise SeriesError(f"{where}: column {column!r} has non-numeric value {text!r}") from None
    if math.isinf(value):
        raise SeriesError(f"{where}: column {column!r} has an infinite value")
    return value


def iter_csv_rows(path: Path) -> Iterator[tuple[str, tuple[str, ...], list[float]]]:
    """Yield ``(timestamp, features, values)`` row by row (for streaming sources).

    Raises :class:`SeriesError` on the first malformed line, naming file and line.
    """
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise SeriesError(f"cannot read {path}: {e.strerror or e}") from e
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise SeriesError(f"{path}: file is empty") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise SeriesError(f"{path}:1: unreadable header: {e}") from e
        header = [h.strip() for h in header]
        if len(header) < 2 or not header[0]:
            raise SeriesError(f"{path}:1: header must be 'timestamp,<column>[,<column>...]'")
        features = tuple(header[1:])
        if any(not f for f in features) or len(set(features)) != len(features):
            raise SeriesError(f"{path}:1: column names must be non-empty and distinct")
        line = 1
        try:
            for line, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                where = f"{path}:{line}"
                if len(row) != len(header):
                    raise SeriesError(f"{where}: expected {len(header)} fields, found {len(row)}")
                ts = _check_timestamp(row[0], where)
                yield ts, features, [_parse_value(v, where, c) for v, c in zip(row[1:], features)]
        except (csv.Error, UnicodeDecodeError) as e:
            raise SeriesError(f"{path}:{line}: unreadable row: {e}") from e


def read_series(path: str | Path) -> Series:
    """Read a whole CSV into a :class:`Series`.

    Raises :class:`SeriesError` for a missing file, a malformed row, no data rows, or a column
    with no numeric value at all.
    """
    path = Path(path)
    timestamps: list[str] = []
    rows: list[list[float]] = []
    features: tuple[str, ...] = ()
    for ts, row_features, values in iter_csv_rows(path):
        timestamps.append(ts)
        rows.append(values)
        features = row_features
    if not rows:
        raise SeriesError(f"{path}: no data rows")
    table = np.asarray(rows, dtype=np.float64)
    for j, name in enumerate(features):
        if np.all(np.isnan(table[:, j])):
            raise SeriesError(f"{path}: column {name!r} has no numeric value (all missing)")
    if np.any(np.abs(table[np.isfinite(table)]) > np.finfo(np.float32).max):
        raise SeriesError(f"{path}: a value does not fit in float32")
    return Series(timestamps, features, table.astype(np.float32))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (dataset lineage)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
