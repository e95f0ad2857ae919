"""Training data: CSV loading (via :mod:`shared.series`), windowing and synthetic host metrics."""

from trainer.data.synthetic import (
    ANOMALY_KINDS,
    Anomaly,
    HostMetrics,
    generate_host_metrics,
    write_host_metrics,
)
from trainer.data.windows import TimeSplit, fill_missing, make_windows, min_rows, time_split

__all__ = [
    "ANOMALY_KINDS",
    "Anomaly",
    "HostMetrics",
    "TimeSplit",
    "fill_missing",
    "generate_host_metrics",
    "make_windows",
    "min_rows",
    "time_split",
    "write_host_metrics",
]
