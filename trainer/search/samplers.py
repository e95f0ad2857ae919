"""Optuna samplers by name: :func:`make_sampler`.

This module offers the two samplers the search core needs, ``tpe`` (multivariate, grouped so
that family-specific parameters are modelled together) and ``random``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trainer.search.errors import SearchError

__all__ = ["SAMPLERS", "SearchError", "make_sampler"]

SAMPLERS = ("tpe", "random")


def make_sampler(
    name: str,
    *,
    seed: int | None,
    directions: Sequence[str],
    grid: Mapping[str, Sequence[Any]] | None = None,
    constraints_func: Callable[[Any], Sequence[float]] | None = None,
) -> Any:
    """An Optuna sampler called ``name``, seeded with ``seed``.

    ``directions`` are the study's (``maximize``/``minimize``); ``constraints_func`` (a
    trial is feasible when every value it returns is ≤ 0) is passed to samplers that take
    it (TPE) when given; Optuna 5 deprecates it for ``Trial.set_constraint``, which the
    samplers read without it. ``grid`` is for a grid sampler and unused here. Raises :class:`SearchError`
    for an unknown name.
    """
    import warnings

    import optuna

    if name == "tpe":
        with warnings.catch_warnings():  # multivariate and group are flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constraints_func=constraints_func
            )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
