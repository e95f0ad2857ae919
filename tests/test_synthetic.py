"""The synthetic host-metrics generator: deterministic, seasonal, labelled anomalies of every kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.series import read_series
from trainer.data import ANOMALY_KINDS, generate_host_metrics, write_host_metrics


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a = generate_host_metrics(1000, seed=3)
    b = generate_host_metrics(1000, seed=3)
    c = generate_host_metrics(1000, seed=4)
    assert np.array_equal(a.values, b.values) and a.anomalies == b.anomalies
    assert not np.array_equal(a.values, c.values)


def test_every_anomaly_kind_is_injected_after_the_clean_prefix() -> None:
    m = generate_host_metrics(4000, seed=0, anomalies=10)
    assert {a.kind for a in m.anomalies} == set(ANOMALY_KINDS)
    assert min(a.start for a in m.anomalies) >= int(4000 * 0.3)
    assert m.labels().sum() == sum(a.end - a.start for a in m.anomalies)


def test_daily_seasonality_in_cpu() -> None:
    m = generate_host_metrics(2880, seed=1, anomalies=0)  # 10 days of 5-minute samples
    cpu = m.values[:, 0].reshape(10, 288).mean(axis=0)
    assert cpu.max() - cpu.min() > 20  # a clear daily cycle


def test_written_csv_reads_back(tmp_path: Path) -> None:
    m = generate_host_metrics(500, seed=2, anomalies=2)
    write_host_metrics(m, tmp_path / "h.csv", tmp_path / "h.labels.json")
    s = read_series(tmp_path / "h.csv")
    assert s.features == ("cpu", "memory", "disk", "network") and len(s) == 500
    assert np.allclose(s.values, m.values, atol=1e-3)
    assert "level_shift" in (tmp_path / "h.labels.json").read_text()


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    for kwargs, needle in [({"rows": 199}, "at least 200 rows"), ({"anomalies": -3}, "negative"),
                           ({"step_seconds": 0}, "step must be positive")]:
        with pytest.raises(ValueError, match=needle):
            generate_host_metrics(**{"rows": 400, **kwargs})
