"""The scikit-learn model families (:data:`~trainer.models.spec.TREE_FAMILIES`): raw windows to
one score each, by the contract of the torch families (:mod:`trainer.models._networks`).

Input: float32 ``(batch, input_rows, features)`` raw values. Each window is centred (its own
per-metric mean, or the training mean), scaled by the training standard deviation and clipped
to ±``CLIP`` standard deviations, exactly as the torch families' bodies see it; the estimator
reads those values flattened row by row. Output: float32 ``(batch,)`` raw scores, higher = more
anomalous:

- ``trees`` (:class:`TreeForecaster`): a random forest forecasts the last row from the rows
  before it (and the seasonal rows); the score is the absolute forecast error of the worst
  metric in units of the training standard deviation, against the raw (unclipped) last row —
  the torch forecasters' score, term for term.
- ``isolation_forest`` (:class:`WindowIsolationForest`): the forest's anomaly score of the
  whole normalised window (scikit-learn's ``-score_samples``, in (0, 1]).

Artifact and model must put every window on the same side of every split: on data with few
distinct values (a metric recorded to three decimals) a value one float32 step off a
threshold is common, and one tree on the other side of a split moves the score by a visible
amount. So both compute the same bits: the level is summed in float64 (exact for 64 float32
values of similar magnitude, whatever the order) and divided, then rounded to float32, and the
rest is float32 in the order the exported ONNX graph (:mod:`trainer.export._trees`) computes
it; and the fitted trees' thresholds are rounded to float32 (:func:`_float32_thresholds`),
which the ONNX tree-ensemble operators store, so that scikit-learn compares with the same
thresholds. scikit-learn is imported when a model is built, not with this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.models._networks import CLIP
from trainer.models.spec import ArchitectureSpec

__all__ = ["TreeModel", "TreeForecaster", "WindowIsolationForest", "build_tree_model", "row_slices"]


def _sklearn_ensemble() -> Any:
    try:
        from sklearn import ensemble
    except ImportError as e:  # the trainer extra installs it
        raise ImportError(
            "the trees and isolation_forest families need scikit-learn: "
            "`pip install scikit-learn skl2onnx` (or install edgefleet with `pip install 'edgefleet[trainer]'`)"
        ) from e
    return ensemble


def row_slices(spec: ArchitectureSpec) -> tuple[slice, slice | None, int | None]:
    """Where the estimator's rows lie in one model input of :attr:`ArchitectureSpec.input_rows`
    rows: the centred rows, the seasonal rows (``None`` without a season) and the forecast row
    (``None`` for ``isolation_forest``, which reads every row)."""
    n = spec.input_rows
    if not spec.forecasts:
        return slice(0, n), None, None
    seasonal = None
    if spec.season:
        lo = n - 1 - spec.season - spec.season_halfwidth
        seasonal = slice(lo, lo + 2 * spec.season_halfwidth + 1)
    return slice(n - spec.window, n - 1), seasonal, n - 1


def _float32_thresholds(forest: Any) -> None:
    """Round every split threshold of a fitted forest to float32, in place.

    scikit-learn compares float32 inputs with float64 thresholds; the ONNX tree-ensemble
    operators (``ai.onnx.ml`` opset 3) hold float32 thresholds, so an input equal to a
    threshold's float32 rounding would take the other branch there. Rounded here, both
    compare with the same values (the trees' partition of the training data may move by the
    inputs that lie exactly on a rounded threshold; their leaves stay as fitted). Written
    through the tree's pickling state, the documented way to rebuild a ``Tree``.
    """
    for estimator in forest.estimators_:
        tree = estimator.tree_
        state = tree.__getstate__()
        nodes = state["nodes"]
        nodes["threshold"] = nodes["threshold"].astype(np.float32).astype(np.float64)
        tree.__setstate__(state)


class TreeModel:
    """A fitted scikit-learn estimator behind the window normalisation of its family.

    ``mean`` and ``std`` are the per-metric training statistics (float32); ``estimator`` the
    fitted scikit-learn model. Calls are safe from one thread at a time.
    """

    def __init__(self, spec: ArchitectureSpec, mean: np.ndarray, std: np.ndarray, estimator: Any) -> None:
        self.spec = spec
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.estimator = estimator

    def level(self, rows: np.ndarray) -> np.ndarray:
        """``(batch, 1, features)``: where ``rows`` are centred (see :class:`ArchitectureSpec`)."""
        if self.spec.centering == "window":
            total = rows.astype(np.float64).sum(axis=1, keepdims=True)
            return (total / rows.shape[1]).astype(np.float32)
        return np.broadcast_to(self.mean, (rows.shape[0], 1, self.spec.features))

    def normalise(self, rows: np.ndarray, level: np.ndarray) -> np.ndarray:
        """Centred on ``level``, scaled by the training std, clipped to ±CLIP (float32)."""
        return np.clip((rows - level) / self.std, np.float32(-CLIP), np.float32(CLIP))

    def inputs(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The estimator's ``(batch, values)`` float32 input and the windows' level."""
        past, seasonal, _ = row_slices(self.spec)
        x = np.asarray(windows, np.float32)
        level = self.level(x[:, past, :])
        parts = [self.normalise(x[:, past, :], level).reshape(len(x), -1)]
        if seasonal is not None:
            parts.append(self.normalise(x[:, seasonal, :], level).reshape(len(x), -1))
        return np.ascontiguousarray(np.concatenate(parts, axis=1)), level

    def fit(self, windows: np.ndarray) -> None:
        """Fit the estimator on ``(n, input_rows, features)`` training windows."""
        raise NotImplementedError

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Raw scores of ``(n, input_rows, features)`` windows, float32 ``(n,)``."""
        raise NotImplementedError

    def training_loss(self, windows: np.ndarray) -> float:
        """The family's training loss on ``windows`` (what the torch families report per epoch)."""
        return float(np.mean(self.score(windows))) if len(windows) else 0.0


class TreeForecaster(TreeModel):
    """``trees``: a random forest predicts the last row, normalised, from the rows before it."""

    def _targets(self, x: np.ndarray, level: np.ndarray) -> np.ndarray:
        _, _, last = row_slices(self.spec)
        return ((x[:, last, :] - level[:, 0, :]) / self.std).astype(np.float32)

    def fit(self, windows: np.ndarray) -> None:
        features, level = self.inputs(windows)
        targets = self._targets(np.asarray(windows, np.float32), level)
        # one metric: a 1-d target (scikit-learn warns on a one-column 2-d one)
        self.estimator.fit(features, targets[:, 0] if targets.shape[1] == 1 else targets)
        _float32_thresholds(self.estimator)

    def feature_errors(self, windows: np.ndarray) -> np.ndarray:
        """``(n, features)`` absolute forecast errors in units of the training std."""
        x = np.asarray(windows, np.float32)
        _, _, last = row_slices(self.spec)
        features, level = self.inputs(x)
        predicted = self.estimator.predict(features).astype(np.float32).reshape(len(x), self.spec.features)
        return np.abs((predicted * self.std + level[:, 0, :] - x[:, last, :]) / self.std)

    def score(self, windows: np.ndarray) -> np.ndarray:
        if len(windows) == 0:
            return np.zeros(0, np.float32)
        return self.feature_errors(windows).max(axis=1).astype(np.float32)

    def training_loss(self, windows: np.ndarray) -> float:
        # the squared error, as the torch forecasters' training loss
        return float(np.mean(self.feature_errors(windows) ** 2)) if len(windows) else 0.0


class WindowIsolationForest(TreeModel):
    """``isolation_forest``: an isolation forest over the whole normalised window."""

    def fit(self, windows: np.ndarray) -> None:
        # fewer windows than max_samples: each tree takes them all (scikit-learn would warn)
        self.estimator.set_params(max_samples=min(self.spec.max_samples, len(windows)))
        self.estimator.fit(self.inputs(windows)[0])
        _float32_thresholds(self.estimator)

    def score(self, windows: np.ndarray) -> np.ndarray:
        if len(windows) == 0:
            return np.zeros(0, np.float32)
        return (-self.estimator.score_samples(self.inputs(windows)[0])).astype(np.float32)


def build_tree_model(spec: ArchitectureSpec, mean: np.ndarray, std: np.ndarray, seed: int) -> TreeModel:
    """An unfitted model of a tree family, its estimator seeded with ``seed`` (one thread)."""
    ensemble = _sklearn_ensemble()
    if spec.family == "trees":
        forest = ensemble.RandomForestRegressor(
            n_estimators=spec.n_estimators, max_depth=spec.max_depth, random_state=seed, n_jobs=1
        )
        return TreeForecaster(spec, mean, std, forest)
    if spec.family == "isolation_forest":
        # max_samples above the number of windows: scikit-learn takes them all (and warns)
        isolation = ensemble.IsolationForest(
            n_estimators=spec.n_estimators, max_samples=spec.max_samples, random_state=seed, n_jobs=1
        )
        return WindowIsolationForest(spec, mean, std, isolation)
    raise ValueError(f"{spec.family} is not a tree family")
