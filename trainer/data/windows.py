"""Windowing, missing-value filling, the time-ordered train/validation split and
expanding-window cross-validation folds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_VALIDATION_WINDOWS",
    "Fold",
    "TimeSplit",
    "WindowSplit",
    "expanding_folds",
    "fill_missing",
    "forecast_split",
    "make_windows",
    "min_rows",
    "time_split",
]


def fill_missing(values: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs per column (leading NaNs take the first real value).

    The agent does the same at run time (it holds the last value), so training and serving
    see gaps the same way. Raises ``ValueError`` if a column has no value at all.
    """
    out = np.array(values, dtype=np.float32, copy=True)
    for j in range(out.shape[1]):
        col = out[:, j]
        ok = ~np.isnan(col)
        if not ok.any():
            raise ValueError(f"column {j} has no value")
        idx = np.where(ok, np.arange(len(col)), 0)
        np.maximum.accumulate(idx, out=idx)
        first = int(np.argmax(ok))
        idx[:first] = first
        out[:, j] = col[idx]
    return out


def make_windows(values: np.ndarray, window: int) -> np.ndarray:
    """All windows of ``window`` consecutive rows, stride 1: shape ``(n - window + 1, window, F)``."""
    if len(values) < window:
        raise ValueError(f"{len(values)} rows are fewer than one window of {window}")
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)  # (m, F, W)
    return np.ascontiguousarray(view.transpose(0, 2, 1), dtype=np.float32)


@dataclass(frozen=True)
class TimeSplit:
    """Row ranges of a time-ordered split: train rows come strictly before validation rows."""

    train: np.ndarray
    validation: np.ndarray


MIN_VALIDATION_WINDOWS = 16


def min_rows(window: int) -> int:
    """Rows needed to train: one window, plus :data:`MIN_VALIDATION_WINDOWS` to validate on."""
    return 2 * window + MIN_VALIDATION_WINDOWS - 1


def time_split(values: np.ndarray, window: int, validation_fraction: float) -> TimeSplit:
    """Split rows in time order: training gets at least one window, validation at least 16.

    Validation gets the last ``validation_fraction`` of the rows (at least
    :data:`MIN_VALIDATION_WINDOWS` windows: a threshold and a parity check need a few scores);
    windows never cross the boundary, so validation is data the model has not seen.
    """
    n = len(values)
    if n < min_rows(window):
        raise ValueError(
            f"{n} rows are too few: a window of {window} needs at least {min_rows(window)} rows"
        )
    n_val = max(window + MIN_VALIDATION_WINDOWS - 1, int(round(n * validation_fraction)))
    n_val = min(n_val, n - window)
    return TimeSplit(train=values[: n - n_val], validation=values[n - n_val :])


@dataclass(frozen=True)
class WindowSplit:
    """Windows split by the row they end on: every training window ends before the first
    validation window does. ``train_rows`` are the rows before that first validation end."""

    train: np.ndarray
    validation: np.ndarray
    train_rows: np.ndarray


def forecast_split(values: np.ndarray, rows: int, validation_fraction: float) -> WindowSplit:
    """Split a forecaster's windows of ``rows`` rows by the row each one forecasts (its last).

    Validation gets the last ``validation_fraction`` of the windows (at least
    :data:`MIN_VALIDATION_WINDOWS`); a validation window may read rows that training
    windows forecast, as a forecaster in service reads its past, but forecasts only rows that
    no training window has seen. Unlike :func:`time_split`, long inputs (a seasonal model
    reads a day back) then do not need twice their length in rows. Raises ``ValueError``
    when fewer than one training and :data:`MIN_VALIDATION_WINDOWS` validation windows fit.
    """
    n = len(values)
    count = n - rows + 1
    if count < 1 + MIN_VALIDATION_WINDOWS:
        raise ValueError(
            f"{n} rows are too few: windows of {rows} rows need at least {rows + MIN_VALIDATION_WINDOWS} rows"
        )
    n_val = min(count - 1, max(MIN_VALIDATION_WINDOWS, int(round(count * validation_fraction))))
    windows = make_windows(values, rows)
    first_val_end = count - n_val + rows - 1  # row index forecast by the first validation window
    return WindowSplit(windows[: count - n_val], windows[count - n_val :], values[:first_val_end])


@dataclass(frozen=True)
class Fold:
    """One expanding-window fold over the rows of a series: rows ``[0, train_end)`` are trained
    on, rows ``[train_end, validation_end)`` are validated on. Nothing after ``validation_end``
    belongs to the fold."""

    train_end: int
    validation_end: int

    @property
    def train(self) -> range:
        """Row indices trained on."""
        return range(self.train_end)

    @property
    def validation(self) -> range:
        """Row indices validated on (all after every training row)."""
        return range(self.train_end, self.validation_end)


def expanding_folds(rows: int, folds: int) -> list[Fold]:
    """``folds`` expanding-window folds over ``rows`` rows in time order (no shuffling).

    The rows are cut into ``folds + 1`` consecutive blocks of ``rows // (folds + 1)`` rows
    (the first block also takes the remainder); fold ``i`` (0-based) trains on blocks
    ``0..i`` and validates on block ``i + 1`` — the layout of scikit-learn's
    ``TimeSeriesSplit``. So every validation row comes after every training row of its fold,
    training never sees a row after its validation block, each fold trains on more rows than
    the one before, and the last fold validates on the last block. Raises ``ValueError`` when
    ``folds < 1`` or a block would be empty.
    """
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    block = rows // (folds + 1)
    if block < 1:
        raise ValueError(f"{rows} rows are too few for {folds} folds")
    first = rows - folds * block
    return [Fold(first + i * block, first + (i + 1) * block) for i in range(folds)]
