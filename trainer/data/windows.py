"""Windowing, missing-value filling and the time-ordered train/validation split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_VALIDATION_WINDOWS", "fill_missing", "make_windows", "min_rows", "TimeSplit", "time_split"]


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
