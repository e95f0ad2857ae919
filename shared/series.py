"""Time series as edgefleet reads them: CSV with a timestamp column and numeric columns.

Two layouts are accepted, both with a header row:

- NAB style, univariate: ``timestamp,value``;
- multivariate: ``timestamp,<feature>,<feature>,...``.

Empty cells and ``nan`` are missing values (kept as NaN; a column with no value at all is an
error). Anything else that is not a number is a malformed row, reported with its line number.
Timestamps are ISO 8601 (naive ones are taken as UTC when ordering) or finite epoch seconds.

Rows are read as written. Whoever needs time order asks for it: ``read_series(path,
strict_time=True)`` refuses a repeated or earlier timestamp, naming file and line, and
:func:`sort_dedupe` repairs a series explicitly and says how much it changed. The agent's
streaming ``csv:`` source (:func:`iter_csv_rows`) passes rows on as they come.

Shared by the trainer (training data) and the agent (``csv:`` source, offline detection), so
both read a file the same way. Standard library and numpy only.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

__all__ = [
    "Series",
    "SeriesError",
    "TimeOrderError",
    "TimeOrderRepair",
    "file_sha256",
    "iter_csv_rows",
    "read_series",
    "read_series_ordered_head",
    "sort_dedupe",
    "timestamp_key",
]


class SeriesError(ValueError):
    """A time-series file is missing, unreadable or malformed."""


class TimeOrderError(SeriesError):
    """A row's timestamp repeats or precedes the previous row's (``strict_time`` reads).

    ``row`` is the offending row's index among the data rows (0-based): every row before it
    is in strict time order.
    """

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row


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


def timestamp_key(text: str) -> float:
    """Seconds since the epoch for an ISO 8601 timestamp (naive = UTC) or epoch seconds.

    Only for ordering and comparing the rows of one file. Raises :class:`ValueError` for
    anything else, NaN and infinities included.
    """
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        seconds = float(text)  # epoch seconds are fine too
        if not math.isfinite(seconds):
            raise ValueError(f"not a finite number: {text!r}") from None
        return seconds
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _check_timestamp(text: str, where: str) -> tuple[str, float]:
    text = text.strip()
    try:
        return text, timestamp_key(text)
    except ValueError:
        raise SeriesError(f"{where}: timestamp {text!r} is neither ISO 8601 nor a number") from None


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
    """Yield ``(timestamp, features, values)`` row by row (for streaming sources), as written.

    Raises :class:`SeriesError` on the first malformed line, naming file and line.
    """
    for _line, ts, _key, features, values in _rows(path):
        yield ts, features, values


def _rows(path: Path) -> Iterator[tuple[int, str, float, tuple[str, ...], list[float]]]:
    """``(line, timestamp, timestamp_key, features, values)`` for every data row."""
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
                ts, key = _check_timestamp(row[0], where)
                values = [_parse_value(v, where, c) for v, c in zip(row[1:], features)]
                yield line, ts, key, features, values
        except (csv.Error, UnicodeDecodeError) as e:
            raise SeriesError(f"{path}:{line}: unreadable row: {e}") from e


def read_series(path: str | Path, *, strict_time: bool = False) -> Series:
    """Read a whole CSV into a :class:`Series`, rows in file order.

    With ``strict_time``, every row's timestamp must be later than the previous row's.
    Raises :class:`SeriesError` for a missing file, a malformed row, no data rows, or a column
    with no numeric value at all; :class:`TimeOrderError` (naming file and line of the first
    offending row) for a repeated or earlier timestamp under ``strict_time``.
    """
    path = Path(path)
    timestamps: list[str] = []
    rows: list[list[float]] = []
    features: tuple[str, ...] = ()
    last: tuple[float, str, int] | None = None  # key, text and line of the previous row
    for line, ts, key, row_features, values in _rows(path):
        if strict_time and last is not None and key <= last[0]:
            _, prev, prev_line = last
            how = "repeats" if key == last[0] else "is earlier than"
            raise TimeOrderError(
                f"{path}:{line}: timestamp {ts!r} {how} {prev!r} on line {prev_line}; "
                "rows must be in time order with distinct timestamps",
                row=len(rows),
            )
        last = (key, ts, line)
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


@dataclass(frozen=True)
class TimeOrderRepair:
    """What :func:`sort_dedupe` changed: rows moved into time order, repeated rows dropped."""

    moved: int
    dropped: int

    @property
    def changed(self) -> bool:
        return bool(self.moved or self.dropped)


def read_series_ordered_head(path: str | Path, head_rows: Callable[[int], int]) -> Series:
    """Read a whole CSV whose first ``head_rows(n)`` rows (of ``n``) must be in strict time order.

    The rows a model trains on must be; disorder after them is let be (NAB's own files repeat
    an hour at a daylight-saving change, after their probationary rows). Raises
    :class:`TimeOrderError` (naming file and line) for disorder within the head, and
    :class:`SeriesError` for anything :func:`read_series` refuses.
    """
    try:
        return read_series(path, strict_time=True)
    except TimeOrderError as e:
        full = read_series(path)
        if e.row < head_rows(len(full)):
            raise
        return full


def sort_dedupe(series: Series) -> tuple[Series, TimeOrderRepair]:
    """Put ``series`` in time order, keeping the first row (in file order) of each timestamp.

    ``moved`` is the fewest rows that had to move to restore order (rows outside the longest
    subsequence already in order), ``dropped`` the rows whose timestamp repeated an earlier row's.
    Pure: the input is not modified. Raises :class:`SeriesError` for an unparsable timestamp.
    """
    keys = []
    for i, ts in enumerate(series.timestamps):
        try:
            keys.append(timestamp_key(ts))
        except ValueError:
            raise SeriesError(f"row {i + 1}: timestamp {ts!r} is neither ISO 8601 nor a number") from None
    seen: set[float] = set()
    kept = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            kept.append(i)
    order = sorted(kept, key=keys.__getitem__)
    repair = TimeOrderRepair(
        moved=len(kept) - _longest_increasing_subsequence([keys[i] for i in kept]),
        dropped=len(keys) - len(kept),
    )
    if not repair.changed:
        return series, repair
    index = np.asarray(order, dtype=np.intp)
    return Series([series.timestamps[i] for i in order], series.features, series.values[index]), repair


def _longest_increasing_subsequence(keys: list[float]) -> int:
    """Length of the longest strictly increasing subsequence (patience sorting, n log n)."""
    tails: list[float] = []
    for key in keys:
        at = bisect.bisect_left(tails, key)
        if at == len(tails):
            tails.append(key)
        else:
            tails[at] = key
    return len(tails)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (dataset lineage)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
