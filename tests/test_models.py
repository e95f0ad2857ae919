"""Model families: window centring, seasonal context, the forecaster's split, spec round trips."""

from __future__ import annotations

import numpy as np
import pytest

from shared.series import Series
from trainer.data import MIN_VALIDATION_WINDOWS, forecast_split, make_windows
from trainer.models import ArchitectureSpec, Recipe, SpecError, fit, score_windows
from trainer.pipeline import SEASON_HALFWIDTH, seasonal_lag


def _noisy_sine(n: int, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    return (10 + np.sin(2 * np.pi * t / 50) + 0.1 * rng.normal(size=n)).astype(np.float32)[:, None]


def _median_error_after_shift(centering: str) -> tuple[float, float]:
    spec = ArchitectureSpec("forecaster", 32, 1, (64,), centering)
    rows = _noisy_sine(1200)
    model = fit(spec, make_windows(rows[:900], 32), make_windows(rows[900:], 32), rows[:900],
                Recipe(epochs=15, seed=0)).model
    live = _noisy_sine(1500, seed=1)
    live[700:] += 10.0  # a level shift of about 14 training standard deviations, for good
    errors = score_windows(model, make_windows(live, 32))  # errors[i] forecasts row i + 31
    before = float(np.median(errors[300:650]))
    after = float(np.median(errors[700 + 32 :]))  # once the window holds the new level only
    return before, after


def test_window_centring_makes_a_level_shift_the_new_normal():
    before, after = _median_error_after_shift("window")
    assert after < 2 * before + 0.05, (before, after)
    # centred on the training mean, the same model keeps forecasting the old level
    before_t, after_t = _median_error_after_shift("train")
    assert after_t > 10 * after, (after_t, after)


def _series(n: int, step_s: float) -> Series:
    times = np.datetime64("2026-01-01T00:00:00") + (np.arange(n) * step_s).astype("timedelta64[s]")
    stamps = [str(t).replace("T", " ") for t in times]
    return Series(stamps, ("value",), np.zeros((n, 1), np.float32))


def test_seasonal_lag_is_one_day_when_the_rows_allow_it():
    assert seasonal_lag([_series(600, 300)], 64) == 288  # 5-minute samples, two days
    assert seasonal_lag([_series(600, 300), _series(700, 300)], 64) == 288
    # too few rows to learn from day-before pairs
    assert seasonal_lag([_series(288 + SEASON_HALFWIDTH + 100, 300)], 64) == 0
    assert seasonal_lag([_series(600, 300), _series(300, 300)], 64) == 0
    assert seasonal_lag([_series(600, 3600)], 64) == 0  # hourly: a day lies inside the window
    assert seasonal_lag([_series(600, 1)], 64) == 0  # 1 s: a day is too many rows to buffer
    assert seasonal_lag([_series(600, 300), _series(600, 600)], 64) == 0  # no common day
    assert seasonal_lag([_series(600, 7 * 60)], 64) == 206  # the nearest whole row to a day


def test_forecast_split_never_validates_on_a_forecast_row_seen_in_training():
    values = np.arange(700, dtype=np.float32)[:, None]
    split = forecast_split(values, 297, 0.2)
    train_targets, val_targets = split.train[:, -1, 0], split.validation[:, -1, 0]
    assert train_targets.max() < val_targets.min()
    assert len(split.train) + len(split.validation) == 700 - 297 + 1
    assert len(split.validation) >= MIN_VALIDATION_WINDOWS
    assert len(split.train_rows) == val_targets.min()
    with pytest.raises(ValueError, match="too few"):
        forecast_split(values[:300], 297, 0.2)


def test_spec_round_trip_and_defaults_of_older_specs():
    spec = ArchitectureSpec("forecaster", 64, 2, (512, 64), "window", season=288, season_halfwidth=8)
    assert spec.input_rows == 297
    assert ArchitectureSpec.from_json(spec.to_json()) == spec
    plain = ArchitectureSpec("forecaster", 64, 2, (512, 64))
    assert "season" not in plain.to_json() and plain.input_rows == 64
    # a spec recorded before centring and seasons existed was centred on the training mean
    old = ArchitectureSpec.from_json({"family": "forecaster", "window": 64, "features": 1, "hidden": [8]})
    assert old.centering == "train" and old.season == 0
    with pytest.raises(SpecError, match="forecaster"):
        ArchitectureSpec("autoencoder", 64, 1, (8,), season=288)
    with pytest.raises(SpecError, match="inside the window"):
        ArchitectureSpec("forecaster", 64, 1, (8,), season=40)
    with pytest.raises(SpecError, match="centering"):
        ArchitectureSpec("forecaster", 64, 1, (8,), centering="median")


def test_seasonal_forecaster_reads_the_day_before():
    spec = ArchitectureSpec("forecaster", 16, 1, (32,), season=100, season_halfwidth=2)
    model = fit(spec, make_windows(_noisy_sine(400), 103), make_windows(_noisy_sine(300, 1), 103),
                _noisy_sine(400)[:, 0:1], Recipe(epochs=2)).model
    x = make_windows(_noisy_sine(300, 2), 103)
    base = score_windows(model, x)
    changed = x.copy()
    changed[:, 1, 0] += 100.0  # row 1 is inside the seasonal slice (rows 0..4 of 103)
    assert not np.allclose(score_windows(model, changed), base)
    unused = x.copy()
    unused[:, 10, 0] += 100.0  # between the seasonal slice and the recent window: not read
    assert np.allclose(score_windows(model, unused), base)
