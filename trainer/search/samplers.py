"""The samplers of ``edgefleet search``, by name, and the combinations they cannot serve.

Optuna's samplers are used as they are; two NAS samplers are written here on
:class:`optuna.samplers.BaseSampler`: :class:`EvolutionSampler` (regularized evolution,
Real et al. 2019) and :class:`ReinforceSampler` (a REINFORCE controller, Williams 1992).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

from trainer.search._evolution import EvolutionSampler
from trainer.search._reinforce import ReinforceSampler
from trainer.search.errors import SearchError

__all__ = ["SAMPLERS", "EvolutionSampler", "ReinforceSampler", "make_sampler"]

SAMPLERS: tuple[str, ...] = (
    "random",
    "grid",
    "tpe",
    "gp",
    "cmaes",
    "nsga2",
    "evolution",
    "reinforce",
)
"""Sampler names accepted by :func:`make_sampler`, in the order a CLI lists them."""

_SINGLE_OBJECTIVE = ("cmaes", "reinforce")
# Optuna 5.1 passes the (deprecated) `constraints_func` to these samplers only (and to
# NSGA-III); they read the constraint values back from the trials. CmaEsSampler warns that it
# ignores them, Random and Grid ignore them silently. The two samplers of this package take no
# `constraints_func` but honour the values an objective sets with `trial.set_constraint` (what
# `edgefleet search` does), as TPE, GP and NSGA-II do.
_CONSTRAINED = ("tpe", "gp", "nsga2")
_DIRECTIONS = ("minimize", "maximize")

ConstraintsFunc = Callable[[FrozenTrial], Sequence[float]]


def make_sampler(
    name: str,
    *,
    seed: int | None,
    directions: Sequence[str] | int,
    grid: dict[str, list[Any]] | None = None,
    constraints_func: ConstraintsFunc | None = None,
) -> BaseSampler:
    """Build the sampler called ``name`` for a study with the given objectives.

    ``tpe`` is multivariate with group decomposition, so that the parameters of each branch
    of a conditional space (say, the kernel sizes of a convolutional family) are modelled
    jointly instead of one by one. ``gp`` is Optuna's GPSampler (needs torch and scipy),
    ``cmaes`` its CmaEsSampler (needs cmaes; categorical parameters fall back to random
    sampling), ``nsga2`` its NSGAIISampler with the default population of 50.

    Args:
        name: One of :data:`SAMPLERS`.
        seed: Seed of the sampler, or None for fresh entropy. Non-negative.
        directions: ``"minimize"``/``"maximize"`` per objective, or just the number of
            objectives.
        grid: Values per parameter; required by ``grid`` and refused by every other sampler.
        constraints_func: Returns constraint values for a finished trial (feasible when all
            are <= 0); only ``tpe``, ``gp`` and ``nsga2`` honour it. Optuna 5 deprecates it
            (with a FutureWarning) in favour of ``trial.set_constraint`` in the objective,
            which the same three samplers read.

    Returns:
        A new sampler; it holds no study and may be passed to ``optuna.create_study``.

    Raises:
        SearchError: The name is unknown, or the combination cannot work (for example
            ``cmaes`` with two objectives, ``grid`` without a grid, constraints with a
            sampler that ignores them). The message is one line for the CLI.
    """
    if name not in SAMPLERS:
        raise SearchError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    n_objectives = _count_objectives(directions)
    if seed is not None and seed < 0:
        raise SearchError(f"seed must be a non-negative integer, got {seed}")
    if n_objectives > 1 and name in _SINGLE_OBJECTIVE:
        raise SearchError(
            f"{name} is single-objective; use tpe, gp, nsga2, evolution or random "
            f"for {n_objectives} objectives"
        )
    if name == "grid":
        _check_grid(grid)
    elif grid is not None:
        raise SearchError(f"a grid is only used by the grid sampler, not by {name}")
    if constraints_func is not None and name not in _CONSTRAINED:
        raise SearchError(f"{name} cannot honour constraints; use {', '.join(_CONSTRAINED)}")

    samplers = optuna.samplers
    match name:
        case "random":
            return samplers.RandomSampler(seed=seed)
        case "grid":
            assert grid is not None
            return samplers.GridSampler(grid, seed=seed)
        case "tpe":
            with warnings.catch_warnings():
                # `group` has carried an experimental flag since Optuna 2.8; it is chosen on
                # purpose for conditional spaces, so the warning would only be noise.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return samplers.TPESampler(
                    seed=seed, multivariate=True, group=True, constraints_func=constraints_func
                )
        case "gp":
            return samplers.GPSampler(seed=seed, constraints_func=constraints_func)
        case "cmaes":
            return samplers.CmaEsSampler(seed=seed)
        case "nsga2":
            return samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func)
        case "evolution":
            return EvolutionSampler(seed=seed)
        case "reinforce":
            return ReinforceSampler(seed=seed)
    raise AssertionError(f"sampler {name!r} is listed but not built")


def _count_objectives(directions: Sequence[str] | int) -> int:
    if isinstance(directions, bool):
        raise SearchError("directions must be a number of objectives or a list of directions")
    if isinstance(directions, int):
        if directions < 1:
            raise SearchError(f"a search needs at least one objective, got {directions}")
        return directions
    if isinstance(directions, str):
        directions = [directions]
    if not directions:
        raise SearchError("a search needs at least one objective, got none")
    for direction in directions:
        if direction not in _DIRECTIONS:
            raise SearchError(f"unknown direction {direction!r}; use minimize or maximize")
    return len(directions)


def _check_grid(grid: dict[str, list[Any]] | None) -> None:
    if not grid:
        raise SearchError("grid needs a grid: a list of values for each parameter")
    for param, values in grid.items():
        if not values:
            raise SearchError(f"grid parameter {param!r} has no values")
