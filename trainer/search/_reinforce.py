"""A policy-gradient NAS controller as an Optuna sampler.

REINFORCE with a reward baseline: Williams, "Simple Statistical Gradient-Following Algorithms
for Connectionist Reinforcement Learning", Machine Learning 8, 229-256 (1992). Used as a NAS
controller by Zoph and Le, "Neural Architecture Search with Reinforcement Learning", ICLR
2017. Their controller is an RNN that samples decisions one after another; this one is
factorized (one independent softmax per parameter), which is what a few dozen to a few
hundred trials can fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial

from trainer.search._history import base_seed, completed_trials, trial_rng, violation
from trainer.search.errors import SearchError


class ReinforceSampler(BaseSampler):
    """REINFORCE (Williams 1992) over softmax policies, one per parameter.

    Actions: a categorical parameter has one logit per choice. An int or float parameter with
    at most ``n_bins`` distinct values has one logit per value; any other has ``n_bins`` bins
    of equal width (on the log scale when the distribution is logarithmic), and a value is
    drawn uniformly inside the chosen bin, then snapped to the step. Floats are thus learned
    coarsely, never delegated to another sampler.

    Learning: for each completed trial in trial-number order, the reward is the objective
    value (negated when the study minimizes), the advantage is its gap to an exponential
    moving-average baseline divided by a moving-average spread (scale-free, bounded by
    ``1/sqrt(1 - baseline_decay)``), and every logit vector takes the step
    ``learning_rate * advantage * (onehot(action) - softmax(logits))``, the gradient of the
    log-probability of the action the trial took.

    Search space: every parameter that completed trials used with one distribution, not just
    those all trials share, so that the parameters of each branch of a conditional space learn
    from the trials that took that branch. Parameters no completed trial has yet are drawn at
    random.

    Guarantees: the policy is rebuilt from ``study.get_trials()`` for every trial and no
    state is kept between trials, so several processes sharing one study learn from all
    trials, and a seeded sequential study is reproducible. All trials count as on-policy
    samples, including those proposed by other workers with a slightly older policy (as with
    the asynchronous workers of Zoph and Le). Single-objective only.

    Budgets: a trial outside its ``trial.set_constraint`` budgets gets advantage -1 (one
    spread below the baseline, whatever its objective value: a model that cannot ship is
    a bad outcome however well it detects) and does not move the baseline or the spread.

    Args:
        learning_rate: Step size of the logit updates.
        baseline_decay: Weight of the past in the moving averages, in [0, 1).
        n_bins: Number of bins for wide int and float ranges; at least 2.
        seed: Seed for all random draws; None draws fresh entropy.

    Raises:
        ValueError: On arguments outside those ranges or a negative seed.
    """

    def __init__(
        self,
        *,
        learning_rate: float = 0.2,
        baseline_decay: float = 0.9,
        n_bins: int = 8,
        seed: int | None = None,
    ) -> None:
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        if not 0 <= baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        self._learning_rate = learning_rate
        self._baseline_decay = baseline_decay
        self._n_bins = n_bins
        self._seed = base_seed(seed)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Every parameter that the completed trials used with one distribution.

        Raises:
            SearchError: The study has more than one objective.
        """
        if len(study.directions) > 1:
            raise SearchError(
                "reinforce is single-objective; use tpe, gp, nsga2 or evolution "
                "for several objectives"
            )
        space: dict[str, BaseDistribution] = {}
        conflicting: set[str] = set()
        for past in completed_trials(study):
            for name, distribution in past.distributions.items():
                if name in conflicting or distribution.single():
                    continue
                if space.setdefault(name, distribution) != distribution:
                    conflicting.add(name)
                    del space[name]
        return dict(sorted(space.items()))

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """Rebuild the policy from the completed trials and sample every parameter from it."""
        if not search_space:
            return {}
        actions = {name: _Actions(d, self._n_bins) for name, d in search_space.items()}
        logits = self._policy(study, actions)
        rng = trial_rng(self._seed, trial, "policy")
        params = {}
        for name, action in actions.items():
            k = int(rng.choice(action.size, p=_softmax(logits[name])))
            params[name] = action.value(k, rng)
        return params

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Draw a parameter that no completed trial has used yet, uniformly at random."""
        rng = trial_rng(self._seed, trial, "independent:" + param_name)
        sampler = RandomSampler(seed=int(rng.integers(2**32)))
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def _policy(self, study: Study, actions: dict[str, _Actions]) -> dict[str, np.ndarray]:
        """Replay the REINFORCE updates of all completed trials; return the logits per name."""
        sign = -1.0 if study.directions[0] == StudyDirection.MINIMIZE else 1.0
        decay = self._baseline_decay
        logits = {name: np.zeros(action.size) for name, action in actions.items()}
        baseline: float | None = None
        spread = 0.0
        for past in completed_trials(study):
            if violation(past) > 0:
                advantage = -1.0
            else:
                reward = sign * past.values[0]
                if baseline is None:
                    baseline = reward
                    continue
                gap = reward - baseline
                spread = decay * spread + (1 - decay) * gap * gap
                advantage = gap / math.sqrt(spread) if spread > 0 else 0.0
                baseline = decay * baseline + (1 - decay) * reward
            for name, action in actions.items():
                if past.distributions.get(name) != action.distribution:
                    continue
                step = -_softmax(logits[name])
                step[action.index(past.params[name])] += 1.0
                logits[name] += self._learning_rate * advantage * step
        return logits


@dataclass(frozen=True)
class _Actions:
    """The controller's discrete actions for one parameter, and the values they stand for."""

    distribution: BaseDistribution
    n_bins: int

    @property
    def size(self) -> int:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return len(d.choices)
        n_values = _n_values(d)
        return n_values if n_values is not None and n_values <= self.n_bins else self.n_bins

    def index(self, value: Any) -> int:
        """The action that produced ``value`` (a value of the distribution)."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return int(d.to_internal_repr(value))
        assert isinstance(d, IntDistribution | FloatDistribution)
        if self.size == _n_values(d):
            return int(round((value - d.low) / _step(d)))
        low, high = _scaled(d, d.low), _scaled(d, d.high)
        position = (_scaled(d, value) - low) / (high - low)
        return min(self.size - 1, max(0, int(position * self.size)))

    def value(self, k: int, rng: np.random.Generator) -> Any:
        """A value for action ``k``: the choice, the k-th value, or a draw inside bin ``k``."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return d.choices[k]
        assert isinstance(d, IntDistribution | FloatDistribution)
        if self.size == _n_values(d):
            x = d.low + k * _step(d)
        else:
            low, high = _scaled(d, d.low), _scaled(d, d.high)
            width = (high - low) / self.size
            u = rng.uniform(low + k * width, low + (k + 1) * width)
            x = math.exp(u) if d.log else u
            if _n_values(d) is not None:
                x = d.low + round((x - d.low) / _step(d)) * _step(d)
        x = min(max(x, d.low), d.high)
        return int(round(x)) if isinstance(d, IntDistribution) else float(x)


def _n_values(d: BaseDistribution) -> int | None:
    """Number of distinct values of a stepped distribution; None for a continuous float."""
    if isinstance(d, IntDistribution):
        return (d.high - d.low) // d.step + 1
    if isinstance(d, FloatDistribution) and d.step is not None:
        return int(round((d.high - d.low) / d.step)) + 1
    return None


def _step(d: IntDistribution | FloatDistribution) -> float:
    return float(d.step) if d.step is not None else 0.0


def _scaled(d: IntDistribution | FloatDistribution, x: float) -> float:
    return math.log(x) if d.log else float(x)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()
