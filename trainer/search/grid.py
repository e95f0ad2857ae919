"""The grid of ``--sampler grid``, built from a :class:`~trainer.search.space.SearchSpace`.

Every categorical parameter takes each of its choices. An int range takes every value when it
holds at most :data:`GRID_STEPS` of them, else :data:`GRID_STEPS` evenly spaced ones (ends
included); a float range (``learning_rate``, ``weight_decay``, both log-scaled) takes
:data:`GRID_STEPS` values evenly spaced on the log scale, ends included.

The conditional parameters of the families the space names (``forecaster.season``,
``autoencoder.bottleneck``, ``linear.season``, ``conv.*``, ``attention.*``, ``trees.*``,
``isolation_forest.*``) are in the grid too, as Optuna's
``GridSampler`` needs every parameter a trial may ask for; a point whose family does not ask
for one repeats a candidate of another point (a forecaster with each bottleneck), so a grid
holds some duplicates. Parameters of families the space does not name are left out: no trial
asks for them, and each would only multiply the grid with duplicates. For the same reason a
space of tree families only has no ``batch_size``, ``learning_rate`` or ``weight_decay``.
"""

from __future__ import annotations

import math
from typing import Any

from trainer.models.spec import TREE_FAMILIES
from trainer.search.space import SearchSpace

__all__ = ["GRID_STEPS", "grid_of", "grid_size"]

GRID_STEPS = 3
"""Values per int or float range."""


def _ints(low: int, high: int) -> list[int]:
    if high - low + 1 <= GRID_STEPS:
        return list(range(low, high + 1))
    return sorted({round(low + i * (high - low) / (GRID_STEPS - 1)) for i in range(GRID_STEPS)})


def _log_floats(low: float, high: float) -> list[float]:
    if low == high:
        return [low]
    a, b = math.log(low), math.log(high)
    values = [math.exp(a + i * (b - a) / (GRID_STEPS - 1)) for i in range(GRID_STEPS)]
    return [low, *(float(f"{v:.3g}") for v in values[1:-1]), high]  # ends exact, inner ones rounded


def grid_of(space: SearchSpace) -> dict[str, list[Any]]:
    """Values per Optuna parameter name of :func:`trainer.search.space.suggest` (rules above)."""
    grid: dict[str, list[Any]] = {
        "family": list(space.families),
        "window": list(space.windows),
        "layers": _ints(*space.layers),
        "width": list(space.widths),
        "centering": list(space.centerings),
    }
    if {"forecaster", "autoencoder"} & set(space.families):
        grid["activation"] = list(space.activations)
    if "forecaster" in space.families:
        grid["forecaster.season"] = list(space.seasons)
        if space.layers[1] > 1:
            grid["forecaster.taper"] = list(space.tapers)
    if "autoencoder" in space.families:
        grid["autoencoder.bottleneck"] = list(space.bottlenecks)
    if "linear" in space.families:
        grid["linear.season"] = list(space.seasons)
    if "conv" in space.families:
        grid["conv.season"] = list(space.seasons)
        grid["conv.kernel"] = list(space.kernels)
        grid["conv.levels"] = _ints(*space.conv_levels)
    if "attention" in space.families:
        grid["attention.season"] = list(space.seasons)
        grid["attention.width"] = list(space.attention_widths)
        grid["attention.heads"] = list(space.heads)
    if "trees" in space.families:
        grid["trees.season"] = list(space.seasons)
        grid["trees.n_estimators"] = list(space.tree_estimators)
        grid["trees.max_depth"] = list(space.tree_depths)
    if "isolation_forest" in space.families:
        grid["isolation_forest.n_estimators"] = list(space.tree_estimators)
        grid["isolation_forest.max_samples"] = list(space.isolation_samples)
    if set(space.families) <= set(TREE_FAMILIES):  # no family asks for the training recipe
        return grid
    return {
        **grid,
        "batch_size": list(space.batch_sizes),
        "learning_rate": _log_floats(*space.learning_rate),
        "weight_decay": _log_floats(*space.weight_decay),
    }


def grid_size(grid: dict[str, list[Any]]) -> int:
    """Number of points of ``grid``."""
    return math.prod(len(v) for v in grid.values())
