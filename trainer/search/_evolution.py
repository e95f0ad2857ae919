"""Regularized (aging) evolution as an Optuna sampler.

Real, Aggarwal, Huang and Le, "Regularized Evolution for Image Classifier Architecture
Search", AAAI 2019 (arXiv:1802.01548), Algorithm 1: the population is the ``P`` youngest
models; each cycle samples ``S`` of them, mutates one parameter of the best, adds the child
and removes the *oldest* model, however good it is. Aging instead of removing the worst keeps
the search from clinging to one lucky evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial

from trainer.search._history import base_seed, completed_trials, trial_rng, violation

_MUTATION_TRIES = 8


class EvolutionSampler(BaseSampler):
    """Regularized evolution (Real et al. 2019) over categorical, int and float parameters.

    The first ``population_size`` completed trials are sampled at random. After that, each
    trial takes the ``population_size`` youngest completed trials (highest trial numbers: age
    is birth order) as the population, draws ``tournament_size`` of them without replacement,
    and copies the winner's parameters with exactly one of them changed. A mutated categorical
    takes another choice; a mutated int or float is drawn again from its distribution (log
    scale and step respected). Parameters the parent never had (a branch of a conditional
    space that the mutation opened) are drawn at random.

    Multi-objective studies use a Pareto tournament: the winner is drawn uniformly from the
    members of the tournament that no other member dominates, so one objective is never
    silently preferred over the others.

    The parent's trial number and the name of the mutated parameter are stored on the child
    as the system attributes :attr:`PARENT_ATTR` and :attr:`MUTATED_ATTR` (the lineage;
    absent on the trials that filled the population).

    Why not Optuna's ``BaseGASampler``: it models a generational GA (each trial is assigned a
    generation, parents are selected once per generation and cached in study attributes).
    Regularized evolution is steady-state: the population changes after every completed
    trial. Forcing it into generations would change the algorithm, so this sampler derives
    everything from ``study.get_trials()`` instead.

    Guarantees: no state is kept between trials. The proposal for trial *n* depends only on
    ``seed``, *n* and the completed trials visible when *n* starts, so several processes can
    share one study, and a seeded sequential study is reproducible.

    Budgets: ``trial.set_constraint`` values decide a tournament first (Deb's rules): a
    feasible contestant beats an infeasible one, and among infeasible ones the least
    violation wins; objectives decide among the feasible (or equally infeasible) ones.

    Args:
        population_size: ``P``, the number of youngest completed trials that form the
            population. At least 2.
        tournament_size: ``S``, the number of population members per tournament,
            between 1 and ``population_size``.
        seed: Seed for all random draws; None draws fresh entropy.

    Raises:
        ValueError: On sizes outside those ranges or a negative seed.
    """

    PARENT_ATTR = "evolution:parent"
    MUTATED_ATTR = "evolution:mutated"

    def __init__(
        self, *, population_size: int = 20, tournament_size: int = 5, seed: int | None = None
    ) -> None:
        if population_size < 2:
            raise ValueError(f"population_size must be at least 2, got {population_size}")
        if not 1 <= tournament_size <= population_size:
            raise ValueError(
                f"tournament_size must be between 1 and population_size ({population_size}), "
                f"got {tournament_size}"
            )
        self._population_size = population_size
        self._tournament_size = tournament_size
        self._seed = base_seed(seed)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Run the tournament, store the lineage on the trial, return the parent's space.

        Empty while the population is still being filled at random.
        """
        history = completed_trials(study)
        if len(history) < self._population_size:
            return {}
        population = history[-self._population_size :]
        rng = trial_rng(self._seed, trial, "tournament")
        picks = rng.choice(len(population), size=self._tournament_size, replace=False)
        parent = _tournament_winner([population[i] for i in picks], study.directions, rng)
        mutable = sorted(name for name, d in parent.distributions.items() if not d.single())
        mutated = mutable[rng.integers(len(mutable))] if mutable else None
        study._storage.set_trial_system_attr(trial._trial_id, self.PARENT_ATTR, parent.number)
        study._storage.set_trial_system_attr(trial._trial_id, self.MUTATED_ATTR, mutated)
        return dict(parent.distributions)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """Copy the parent's parameters and mutate the one chosen in the tournament."""
        if not search_space:
            return {}
        attrs = study._storage.get_trial_system_attrs(trial._trial_id)
        parent = next(t for t in completed_trials(study) if t.number == attrs[self.PARENT_ATTR])
        child = dict(parent.params)
        mutated = attrs[self.MUTATED_ATTR]
        if mutated is not None:
            rng = trial_rng(self._seed, trial, "mutation")
            child[mutated] = _mutate(
                study, trial, mutated, parent.params[mutated], search_space[mutated], rng
            )
        return child

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Draw a parameter the parent does not have (or any, while the population fills)."""
        rng = trial_rng(self._seed, trial, "independent:" + param_name)
        return _draw(study, trial, param_name, param_distribution, rng)


def _tournament_winner(
    contestants: list[FrozenTrial],
    directions: Sequence[StudyDirection],
    rng: np.random.Generator,
) -> FrozenTrial:
    least = min(violation(t) for t in contestants)
    contestants = [t for t in contestants if violation(t) == least]
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in directions]
    costs = [[s * v for s, v in zip(signs, t.values)] for t in contestants]
    if len(signs) == 1:
        return contestants[int(np.argmin([c[0] for c in costs]))]
    front = [
        t
        for t, mine in zip(contestants, costs)
        if not any(_dominates(other, mine) for other in costs)
    ]
    return front[rng.integers(len(front))]


def _dominates(a: list[float], b: list[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (all minimized)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def _mutate(
    study: Study,
    trial: FrozenTrial,
    name: str,
    value: Any,
    distribution: BaseDistribution,
    rng: np.random.Generator,
) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        current = int(distribution.to_internal_repr(value))
        others = [i for i in range(len(distribution.choices)) if i != current]
        return distribution.choices[others[rng.integers(len(others))]]
    # A narrow int range can redraw the same value; a few tries make a change near-certain
    # without enumerating ranges that may be huge.
    new = value
    for _ in range(_MUTATION_TRIES):
        new = _draw(study, trial, name, distribution, rng)
        if new != value:
            break
    return new


def _draw(
    study: Study,
    trial: FrozenTrial,
    name: str,
    distribution: BaseDistribution,
    rng: np.random.Generator,
) -> Any:
    # RandomSampler already handles log scales, steps and int rounding correctly.
    sampler = RandomSampler(seed=int(rng.integers(2**32)))
    return sampler.sample_independent(study, trial, name, distribution)
