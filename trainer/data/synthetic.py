"""A deterministic synthetic host-metrics generator with labelled injected anomalies.

Four metrics a host agent reads (``cpu``, ``memory``, ``disk``, ``network``) with daily and
weekly seasonality, noise and five kinds of labelled anomaly: spikes, level shifts, slow
drifts, stuck values and dropouts. Same arguments → same rows, bit for bit.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from shared.files import write_atomically

__all__ = [
    "ANOMALY_KINDS",
    "MIN_ROWS",
    "Anomaly",
    "HostMetrics",
    "generate_host_metrics",
    "write_host_metrics",
]

ANOMALY_KINDS = ("spike", "level_shift", "drift", "stuck", "dropout")
FEATURES = ("cpu", "memory", "disk", "network")
MIN_ROWS = 200  # anomalies go after a clean prefix and need room to end before the last rows


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly: rows ``[start, end)``, its kind and the metric it hits."""

    kind: str
    feature: str
    start: int
    end: int
    start_time: str
    end_time: str


@dataclass(frozen=True)
class HostMetrics:
    """Generated rows (timestamps, ``(rows, 4)`` float32 values) and the anomalies in them."""

    timestamps: list[str]
    features: tuple[str, ...]
    values: np.ndarray
    anomalies: list[Anomaly]

    def labels(self) -> np.ndarray:
        """Per-row 0/1 label: 1 inside an injected anomaly."""
        y = np.zeros(len(self.timestamps), dtype=np.int8)
        for a in self.anomalies:
            y[a.start : a.end] = 1
        return y


def generate_host_metrics(
    rows: int = 4000,
    *,
    seed: int = 0,
    step_seconds: int = 300,
    start: str = "2026-01-05 00:00:00",
    anomalies: int = 8,
    clean_prefix: float = 0.3,
) -> HostMetrics:
    """Generate ``rows`` samples every ``step_seconds`` starting at ``start``.

    Anomalies (``anomalies`` of them, kinds cycling through :data:`ANOMALY_KINDS`) are placed
    only after the first ``clean_prefix`` of the rows, so a model trained on that prefix learns
    normal behaviour. Raises ``ValueError`` for fewer than :data:`MIN_ROWS` rows, a negative
    anomaly count, a step that is not positive or a start that is not ISO 8601.
    """
    if rows < MIN_ROWS:
        raise ValueError(f"need at least {MIN_ROWS} rows, got {rows}")
    if anomalies < 0:
        raise ValueError(f"the number of anomalies cannot be negative, got {anomalies}")
    if step_seconds <= 0:
        raise ValueError(f"the step must be positive, got {step_seconds} s")
    rng = np.random.default_rng(seed)
    t = np.arange(rows, dtype=np.float64) * step_seconds
    day = 86400.0
    daily = np.sin(2 * np.pi * t / day - np.pi / 2)
    weekly = np.where(((t // day) % 7) >= 5, -0.6, 0.0)  # quieter weekends

    cpu = 35 + 18 * daily + 8 * weekly + rng.normal(0, 2.0, rows)
    memory = 55 + 6 * daily + 0.4 * np.cumsum(rng.normal(0, 0.05, rows)) + rng.normal(0, 0.6, rows)
    disk = 20 + 10 * np.clip(daily, 0, None) + rng.gamma(2.0, 1.5, rows)
    network = 120 + 60 * daily + 30 * weekly + rng.normal(0, 6.0, rows)
    values = np.stack([cpu, memory, disk, network], axis=1)

    first = int(rows * clean_prefix)
    slots: list[int] = (
        np.linspace(first, rows - 40, anomalies + 1).astype(int)[:-1].tolist() if anomalies else []
    )
    t0 = datetime.fromisoformat(start)
    stamp = [(t0 + timedelta(seconds=int(s))).strftime("%Y-%m-%d %H:%M:%S") for s in t]
    injected: list[Anomaly] = []
    for i, base in enumerate(slots):
        kind = ANOMALY_KINDS[i % len(ANOMALY_KINDS)]
        j = int(rng.integers(0, len(FEATURES)))
        begin = int(base + rng.integers(0, 20))
        col = values[:, j]
        scale = float(np.std(col[:first]))
        if kind == "spike":
            length = 3
            col[begin : begin + length] += 8 * scale
        elif kind == "level_shift":
            length = 30
            col[begin : begin + length] += 4 * scale
        elif kind == "drift":
            length = 36
            col[begin : begin + length] += np.linspace(0, 6 * scale, length)
        elif kind == "stuck":
            length = 30
            col[begin : begin + length] = col[begin]
        else:  # dropout: the metric reads zero
            length = 12
            col[begin : begin + length] = 0.0
        end = min(begin + length, rows)
        injected.append(Anomaly(kind, FEATURES[j], begin, end, stamp[begin], stamp[end - 1]))
    values = np.clip(values, 0, None).astype(np.float32)
    return HostMetrics(stamp, FEATURES, values, injected)


def write_host_metrics(metrics: HostMetrics, csv_path: Path, labels_path: Path | None = None) -> None:
    """Write the rows as a multivariate CSV and, optionally, the anomalies as JSON.

    Each file is replaced atomically (never left half-written). Raises ``OSError``.
    """
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(("timestamp", *metrics.features))
    for ts, row in zip(metrics.timestamps, metrics.values):
        w.writerow((ts, *(f"{v:.4f}" for v in row)))
    write_atomically(csv_path, text.getvalue().encode("utf-8"), sync_dir=False)
    if labels_path is not None:
        labels = json.dumps({"anomalies": [asdict(a) for a in metrics.anomalies]}, indent=2) + "\n"
        write_atomically(labels_path, labels.encode("utf-8"), sync_dir=False)
