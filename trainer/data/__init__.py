"""Training data: CSV loading (via :mod:`shared.series`), windowing and synthetic host metrics."""

from trainer.data.synthetic import (
    ANOMALY_KINDS,
    Anomaly,
    HostMetrics,
    generate_host_metrics,
    write_host_metrics,
)
from trainer.data.windows import (
    MIN_VALIDATION_WINDOWS,
    Fold,
    TimeSplit,
    WindowSplit,
    expanding_folds,
    fill_missing,
    forecast_split,
    make_windows,
    min_rows,
    time_split,
)

__all__ = [
    "MIN_VALIDATION_WINDOWS",
    "ANOMALY_KINDS",
    "Anomaly",
    "Fold",
    "HostMetrics",
    "TimeSplit",
    "WindowSplit",
    "expanding_folds",
    "fill_missing",
    "forecast_split",
    "generate_host_metrics",
    "make_windows",
    "min_rows",
    "time_split",
    "write_host_metrics",
]
