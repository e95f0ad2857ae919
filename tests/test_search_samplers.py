"""The samplers of `edgefleet search`: the factory, its refusals, and the two NAS samplers.

Studies run on real Optuna storages; the sharing tests start real processes ("spawn", so
each worker imports Optuna and this tree afresh) that meet the study only through the file.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from trainer.search import (
    SAMPLERS,
    EvolutionSampler,
    ReinforceSampler,
    SearchError,
    make_sampler,
)

OPS = ("conv", "lstm", "mlp", "dense")
GRID = {"op": ["conv", "lstm", "mlp"], "layers": [1, 2], "lr": [1e-3, 1e-2]}  # 12 points
JOIN_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def toy_loss(trial: optuna.Trial) -> float:
    """Categorical + int + float; "conv" is clearly the best op (the loss is lowest)."""
    op = trial.suggest_categorical("op", list(OPS))
    layers = trial.suggest_int("layers", 1, 4)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    return (0.0 if op == "conv" else 1.0) + 0.01 * abs(layers - 2) + 0.01 * abs(lr - 1e-2)


def toy_losses(trial: optuna.Trial) -> tuple[float, float]:
    """Two conflicting objectives: error falls and cost rises with the number of layers."""
    op = trial.suggest_categorical("op", list(OPS))
    layers = trial.suggest_int("layers", 1, 8)
    width = trial.suggest_float("width", 0.5, 2.0)
    return (0.0 if op == "conv" else 0.5) + 1.0 / (layers * width), layers * width


def nas_loss(trial: optuna.Trial) -> float:
    """A conditional space: each family has its own parameters."""
    family = trial.suggest_categorical("family", ["mlp", "cnn"])
    if family == "mlp":
        units = trial.suggest_int("units", 4, 256, log=True)
        return abs(units - 32) / 32
    kernel = trial.suggest_int("kernel", 2, 9)
    dropout = trial.suggest_float("dropout", 0.0, 0.5, step=0.1)
    return abs(kernel - 5) / 4 + dropout


def _nas_sampler(name: str, seed: int | None) -> BaseSampler:
    """Small populations, so that evolution leaves its random phase within a few trials."""
    if name == "evolution":
        return EvolutionSampler(population_size=4, tournament_size=2, seed=seed)
    return ReinforceSampler(seed=seed)


def _params(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.params for t in sorted(study.trials, key=lambda t: t.number)]


# -- the factory --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_completes_a_seeded_study(name: str) -> None:
    grid = GRID if name == "grid" else None
    study = optuna.create_study(
        sampler=make_sampler(name, seed=3, directions=["minimize"], grid=grid)
    )
    study.optimize(toy_loss, n_trials=10)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_model_based_samplers_run_past_their_random_start(name: str) -> None:
    # Both draw their first 10 trials at random; the next ones come from the fitted model
    # (TPE grouped over the branches of the conditional space, GP on torch and scipy).
    study = optuna.create_study(sampler=make_sampler(name, seed=3, directions=1))
    study.optimize(nas_loss, n_trials=14)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 14


@pytest.mark.parametrize(
    ("name", "kwargs", "hint"),
    [
        ("cmaes", {"directions": 2}, "cmaes is single-objective; use tpe, gp, nsga2"),
        ("reinforce", {"directions": ["minimize", "maximize"]}, "reinforce is single-objective"),
        ("grid", {"directions": 1}, "grid needs a grid"),
        ("grid", {"directions": 1, "grid": {"op": []}}, "grid parameter 'op' has no values"),
        ("tpe", {"directions": 1, "grid": GRID}, "only used by the grid sampler"),
        ("evolution", {"directions": 1, "constraints_func": lambda t: [0.0]}, "cannot honour"),
        ("random", {"directions": 1, "constraints_func": lambda t: [0.0]}, "use tpe, gp, nsga2"),
        ("bayes", {"directions": 1}, "unknown sampler 'bayes'; choose one of random, grid"),
        ("tpe", {"directions": ["down"]}, "unknown direction 'down'"),
        ("tpe", {"directions": 0}, "at least one objective"),
        ("tpe", {"directions": 1, "seed": -1}, "non-negative"),
    ],
)
def test_impossible_combinations_are_refused_in_one_line(
    name: str, kwargs: dict[str, Any], hint: str
) -> None:
    kwargs.setdefault("seed", 0)
    with pytest.raises(SearchError) as refused:
        make_sampler(name, **kwargs)
    message = str(refused.value)
    assert hint in message
    assert "\n" not in message
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize("name", ["tpe", "gp", "nsga2"])
def test_constraints_reach_the_samplers_that_honour_them(name: str) -> None:
    def small_models_only(trial: FrozenTrial) -> list[float]:
        return [trial.params["layers"] - 3.0]

    sampler = make_sampler(name, seed=0, directions=1, constraints_func=small_models_only)
    study = optuna.create_study(sampler=sampler)
    study.optimize(toy_loss, n_trials=4)
    assert [t.constraints for t in study.trials] == [
        {"0": t.params["layers"] - 3.0} for t in study.trials
    ]


def test_multi_objective_samplers_accept_two_directions() -> None:
    for name in ("random", "tpe", "nsga2", "evolution"):
        sampler = make_sampler(name, seed=0, directions=["minimize", "minimize"])
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        study.optimize(toy_losses, n_trials=5)
        assert len(study.best_trials) >= 1


# -- reinforce ----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_learns_to_prefer_the_better_choice(direction: str, seed: int) -> None:
    sign = 1.0 if direction == "minimize" else -1.0
    study = optuna.create_study(direction=direction, sampler=ReinforceSampler(seed=seed))
    study.optimize(lambda trial: sign * toy_loss(trial), n_trials=80)
    late = Counter(t.params["op"] for t in study.trials[40:])
    # Uniform sampling would pick "conv" 10 times in 40 (a quarter); ask for more than half.
    assert late["conv"] > 20, late


def test_reinforce_refuses_a_multi_objective_study() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=ReinforceSampler())
    with pytest.raises(SearchError, match="reinforce is single-objective"):
        study.optimize(toy_losses, n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.FAIL]


# -- evolution ----------------------------------------------------------------------------


def test_evolution_mutates_one_parameter_of_the_best_of_the_youngest() -> None:
    # With the tournament as large as the population, the winner must be the best of the
    # previous `population_size` trials: older trials have aged out, however good.
    population = 4
    sampler = EvolutionSampler(population_size=population, tournament_size=population, seed=5)
    study = optuna.create_study(sampler=sampler)
    study.optimize(toy_loss, n_trials=30)

    trials = study.trials
    evolved = [t for t in trials if EvolutionSampler.PARENT_ATTR in t.system_attrs]
    assert [t.number for t in evolved] == list(range(population, 30))
    for child in evolved:
        elders = trials[child.number - population : child.number]
        parent = trials[child.system_attrs[EvolutionSampler.PARENT_ATTR]]
        assert parent in elders
        assert parent.value == min(t.value for t in elders)
        mutated = child.system_attrs[EvolutionSampler.MUTATED_ATTR]
        changed = {k for k in parent.params if child.params[k] != parent.params[k]}
        if isinstance(parent.distributions[mutated], CategoricalDistribution):
            assert changed == {mutated}
        else:
            assert changed <= {mutated}


def test_evolution_runs_a_pareto_tournament_with_several_objectives() -> None:
    population = 4
    sampler = EvolutionSampler(population_size=population, tournament_size=population, seed=5)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(toy_losses, n_trials=24)

    trials = study.trials
    evolved = [t for t in trials if EvolutionSampler.PARENT_ATTR in t.system_attrs]
    assert len(evolved) == 24 - population
    for child in evolved:
        elders = trials[child.number - population : child.number]
        parent = trials[child.system_attrs[EvolutionSampler.PARENT_ATTR]]
        assert parent in elders
        assert not any(_dominates(t.values, parent.values) for t in elders)


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


# -- both NAS samplers --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["evolution", "reinforce"])
def test_nas_samplers_are_reproducible_with_a_seed(name: str) -> None:
    def run(seed: int) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=_nas_sampler(name, seed))
        study.optimize(nas_loss, n_trials=30)
        assert all(t.state == TrialState.COMPLETE for t in study.trials)
        return _params(study)

    first = run(seed=11)
    assert run(seed=11) == first
    assert run(seed=12) != first
    # Both branches of the conditional space were explored.
    assert {p["family"] for p in first} == {"mlp", "cnn"}


def _storage(kind: str, path: Path) -> BaseStorage:
    if kind == "sqlite":
        return RDBStorage(f"sqlite:///{path}")
    return JournalStorage(JournalFileBackend(str(path)))


def _worker(
    kind: str,
    path: Path,
    sampler_name: str,
    seed: int,
    n_trials: int,
    worker: int,
    ready: Any | None,
) -> None:
    """One search worker in its own process: load the shared study and run trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name="shared", storage=_storage(kind, path), sampler=_nas_sampler(sampler_name, seed)
    )
    if ready is not None:
        ready.wait(JOIN_TIMEOUT_S)  # both workers are loaded: start the trials together

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        return nas_loss(trial)

    study.optimize(objective, n_trials=n_trials)


def _run_processes(targets: list[tuple[Any, ...]], together: bool) -> None:
    """Run `_worker` in one spawned process per argument tuple; concurrently if `together`."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(len(targets)) if together else None
    batches = [targets] if together else [[t] for t in targets]
    for batch in batches:
        processes = [context.Process(target=_worker, args=(*args, ready)) for args in batch]
        for process in processes:
            process.start()
        try:
            for process in processes:
                process.join(JOIN_TIMEOUT_S)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        assert [p.exitcode for p in processes] == [0] * len(processes)


def _new_study(kind: str, path: Path) -> None:
    optuna.create_study(study_name="shared", storage=_storage(kind, path), direction="minimize")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evolution", "reinforce"])
def test_a_study_continued_in_another_process_goes_on_as_in_one(name: str, tmp_path: Path) -> None:
    # The samplers keep nothing in process memory: 10 trials in one process and 10 more in a
    # fresh process propose exactly what 20 trials in a single process propose.
    alone = optuna.create_study(sampler=_nas_sampler(name, seed=21))
    alone.optimize(nas_loss, n_trials=20)

    path = tmp_path / "study.journal"
    _new_study("journal", path)
    _run_processes(
        [("journal", path, name, 21, 10, 0), ("journal", path, name, 21, 10, 1)], together=False
    )
    relayed = optuna.load_study(study_name="shared", storage=_storage("journal", path))
    assert [t.user_attrs["worker"] for t in relayed.trials] == [0] * 10 + [1] * 10
    assert _params(relayed) == _params(alone)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
@pytest.mark.parametrize("name", ["evolution", "reinforce"])
def test_two_processes_share_one_study(name: str, kind: str, tmp_path: Path) -> None:
    path = tmp_path / ("study.db" if kind == "sqlite" else "study.journal")
    _new_study(kind, path)
    _run_processes([(kind, path, name, 4, 12, 0), (kind, path, name, 4, 12, 1)], together=True)
    study = optuna.load_study(study_name="shared", storage=_storage(kind, path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 24
    assert sorted(t.number for t in study.trials) == list(range(24))
    assert Counter(t.user_attrs["worker"] for t in study.trials) == {0: 12, 1: 12}


# -- budgets (trial.set_constraint) -------------------------------------------------------


def budgeted_loss(trial: optuna.Trial) -> float:
    """``toy_loss`` whose best op, "conv", is over budget: the best feasible op is another."""
    loss = toy_loss(trial)
    trial.set_constraint("ram", 1.0 if trial.params["op"] == "conv" else -1.0)
    return loss


def test_an_evolution_tournament_prefers_a_feasible_parent_however_good_the_other() -> None:
    population = 4
    sampler = EvolutionSampler(population_size=population, tournament_size=population, seed=5)
    study = optuna.create_study(sampler=sampler)
    study.optimize(budgeted_loss, n_trials=30)
    trials = study.trials
    for child in trials[population:]:
        elders = trials[child.number - population : child.number]
        parent = trials[child.system_attrs[EvolutionSampler.PARENT_ATTR]]
        feasible = [t for t in elders if t.params["op"] != "conv"]
        if feasible:
            assert parent.params["op"] != "conv"
            assert parent.value == min(t.value for t in feasible)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_learns_to_avoid_a_choice_that_is_over_budget(seed: int) -> None:
    study = optuna.create_study(sampler=ReinforceSampler(seed=seed))
    study.optimize(budgeted_loss, n_trials=80)
    late = Counter(t.params["op"] for t in study.trials[40:])
    # the best objective is "conv"'s, over budget: uniform sampling picks it 10 times in 40
    assert late["conv"] < 10, late
