"""What the stateless samplers derive from a study: its completed trials and per-trial RNGs.

Samplers built on these helpers keep no state between trials in process memory. Every
decision for trial *n* is a function of the seed, *n* and the trials stored in the study, so
several processes that share one study behave like one process, and a study resumed in a new
process continues exactly as it would have in the old one.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


def base_seed(seed: int | None) -> int:
    """Return ``seed``, or fresh OS entropy when it is None.

    Raises:
        ValueError: ``seed`` is negative (NumPy seed sequences take non-negative integers).
    """
    if seed is None:
        return int(np.random.SeedSequence().entropy)  # type: ignore[arg-type]
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def trial_rng(seed: int, trial: FrozenTrial, salt: str = "") -> np.random.Generator:
    """A generator that depends only on the seed, the trial number and ``salt``.

    ``salt`` separates streams within one trial (for example one per parameter name); crc32
    keeps it stable across processes, unlike ``hash()``.
    """
    return np.random.default_rng([seed, trial.number, zlib.crc32(salt.encode())])


def completed_trials(study: Study) -> list[FrozenTrial]:
    """COMPLETE trials with finite values, in trial-number order.

    Failed and pruned trials carry no final value and are left out, as Optuna's own samplers
    do.
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    finite = [t for t in trials if t.values and all(math.isfinite(v) for v in t.values)]
    return sorted(finite, key=lambda t: t.number)


def violation(trial: FrozenTrial) -> float:
    """How far ``trial`` is outside its budgets: the sum of its positive ``set_constraint``
    values (0.0 for a feasible trial, or one with no constraints). Samplers compare trials by
    it first, as Deb's constrained tournament and Optuna's constrained samplers do: any
    feasible trial beats any infeasible one, and of two infeasible ones the lesser violation
    wins."""
    return float(sum(max(0.0, v) for v in trial.constraints.values()))
