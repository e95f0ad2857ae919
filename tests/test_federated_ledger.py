"""The trainer's privacy ledger, its accounting and the ``fl`` command's input checks: real
SQLite registries under ``tmp_path``, dp-accounting itself, no Flower processes."""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path

import pytest
from helpers_cli import edgefleet

from trainer.federated.accounting import compose_epsilon, local_dp_epsilon
from trainer.federated.ledger import BudgetRefused, FederatedRunRecord, PrivacyLedger
from trainer.federated.options import FederatedOptions, OptionsError
from trainer.registry import SCHEMA_VERSION, Registry


def test_the_checked_figure_poisson_subsampled_gaussian() -> None:
    rounds = [(1.0, 0.1)] * 100
    assert compose_epsilon(rounds, 1e-5) == pytest.approx(7.90, abs=0.01)
    assert compose_epsilon(rounds, 1e-5, "pld") == pytest.approx(7.05, abs=0.01)


def test_no_rounds_no_noise_and_full_participation() -> None:
    assert compose_epsilon([], 1e-5) == 0.0
    assert compose_epsilon([(0.0, 1.0)], 1e-5) == math.inf
    # sampling amplifies: the same noise at q=1 costs more than at q=0.1
    assert compose_epsilon([(1.0, 1.0)] * 3, 1e-5) > compose_epsilon([(1.0, 0.1)] * 3, 1e-5)
    with pytest.raises(ValueError):
        compose_epsilon([(1.0, 1.5)], 1e-5)


def test_local_dp_epsilon_makes_localdpmod_add_sigma_times_the_sensitivity() -> None:
    sigma, delta, clip = 1.3, 1e-5, 0.7
    eps = local_dp_epsilon(sigma, delta)
    # LocalDpMod's noise: sensitivity * sqrt(2 ln(1.25/δ)) / ε, with sensitivity = 2·clip (two
    # clipped updates of one host are up to 2C apart): σ times the sensitivity
    assert 2 * clip * math.sqrt(2 * math.log(1.25 / delta)) / eps == pytest.approx(sigma * 2 * clip)


def test_adaptive_clipping_is_charged_the_sigma_of_the_noise_flower_adds() -> None:
    from trainer.federated.accounting import adaptive_effective_multiplier
    from trainer.federated.rounds import build_strategy, charged_multiplier

    options = FederatedOptions(group="g", rounds=1, adaptive_clipping=True, noise_multiplier=1.5).check()
    strategy = build_strategy(options)
    sz, sb = strategy.noise_multiplier, strategy.clipped_count_stddev  # what Flower adds: σ_z·C and σ_b
    # the raw count Σbᵢ has sensitivity 1 and the clipped sum C: one Gaussian of (σ_z⁻² + σ_b⁻²)^-½
    assert charged_multiplier(strategy, options) == pytest.approx(1 / math.sqrt(sz ** -2 + sb ** -2))
    assert charged_multiplier(strategy, options) == pytest.approx(1.5)
    # Flower's own sizing (count centred at ½) would leave σ_b = σ at 0.756σ
    flower_sz = (1.5 ** -2 - (2 * 1.5) ** -2) ** -0.5
    assert adaptive_effective_multiplier(flower_sz, 1.5) == pytest.approx(1.5 / math.sqrt(1.75))


def test_central_dp_divides_the_noised_sum_by_the_fixed_denominator() -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from trainer.federated.rounds import fixed_denominator_step

    current = np.array([1.0, 2.0, 3.0])
    updates = [np.array([0.3, 0.0, -0.1]), np.array([0.1, 0.2, 0.1])]
    noise = np.array([0.05, -0.02, 0.01])  # σ·C drawn on the sum
    flower = current + (sum(updates) + noise) / len(updates)  # Flower's mean + σ·C/m
    step = fixed_denominator_step(ArrayRecord({"w": Array(current)}), ArrayRecord({"w": Array(flower)}),
                                  len(updates), 4.0)
    assert np.allclose(step["w"].numpy(), current + (sum(updates) + noise) / 4.0)


def _run(name: str, budget: float | None) -> FederatedRunRecord:
    opts = FederatedOptions(group="lab", rounds=5, epsilon_budget=budget)
    return FederatedRunRecord(run=name, created_at="", model="host", parent_version=1, group="lab",
                              strategy="fedavg", dp="central", noise_multiplier=1.0, clipping="1",
                              sampling_rate=1.0, rounds=5, epsilon_budget=budget, delta=1e-5,
                              params={"options": opts.to_json()})


def test_the_ledger_charges_before_sending_and_refuses_over_budget(tmp_path: Path) -> None:
    with Registry.open(tmp_path, create=True) as reg:
        ledger = PrivacyLedger(reg)
        ledger.create_run(_run("fl-a", 8.0))
        one = ledger.begin_round("fl-a", 1, sampling_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0,
                                 nodes_sampled=["1", "2"])
        ledger.finish_round("fl-a", 1, state="done", nodes_contributed=["b", "a"], failures=[], metrics={"x": 1.0})
        two = ledger.begin_round("fl-a", 2, sampling_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0,
                                 nodes_sampled=["1"])
        ledger.finish_round("fl-a", 2, state="failed", nodes_contributed=[], failures=[], metrics={})
        assert one == pytest.approx(compose_epsilon([(1.0, 1.0)], 1e-5))
        assert two == pytest.approx(compose_epsilon([(1.0, 1.0)] * 2, 1e-5))  # a failed round stays charged
        with pytest.raises(BudgetRefused, match=r"^round 3 refused: it would bring ε to 9\.01"):
            ledger.begin_round("fl-a", 3, sampling_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0,
                               nodes_sampled=["1"])
        record = ledger.get("fl-a")
        assert [r["state"] for r in record.round_rows] == ["done", "failed", "refused"]
        assert record.epsilon == pytest.approx(two)  # the refused round costs nothing
        assert record.round_rows[0]["nodes_contributed"] == ["a", "b"]
        assert record.to_json()["nodes"] == ["a", "b"]


def test_a_run_is_claimed_once_and_a_charged_round_is_never_replaced(tmp_path: Path) -> None:
    from trainer.federated.ledger import RunNotPending

    with Registry.open(tmp_path, create=True) as reg:
        ledger = PrivacyLedger(reg)
        ledger.create_run(_run("fl-c", None))
        ledger.claim_run("fl-c")
        with pytest.raises(RunNotPending, match="is running, not pending"):
            ledger.claim_run("fl-c")  # the app submitted again for the same run
        first = ledger.begin_round("fl-c", 1, sampling_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0,
                                   nodes_sampled=["1"])
        with pytest.raises(sqlite3.IntegrityError):
            ledger.begin_round("fl-c", 1, sampling_rate=1.0, noise_multiplier=9.0, clipping_norm=1.0,
                               nodes_sampled=["1"])
        assert ledger.get("fl-c").epsilon == pytest.approx(first)


def test_without_dp_epsilon_is_infinite_and_json_says_inf(tmp_path: Path) -> None:
    with Registry.open(tmp_path, create=True) as reg:
        ledger = PrivacyLedger(reg)
        ledger.create_run(_run("fl-off", None))
        assert ledger.begin_round("fl-off", 1, sampling_rate=1.0, noise_multiplier=0.0, clipping_norm=1.0,
                                  nodes_sampled=[]) == math.inf
        assert ledger.get("fl-off").to_json()["epsilon"] == "inf"


def test_a_v2_registry_migrates_to_the_federated_tables(tmp_path: Path) -> None:
    import sqlite3

    from trainer.registry._schema import migrate

    conn = sqlite3.connect(tmp_path / "registry.sqlite", isolation_level=None)
    assert migrate(conn, 2) == [1, 2]
    conn.close()
    with pytest.raises(Exception, match="registry migrate"):
        Registry.open(tmp_path)
    assert Registry.migrate(tmp_path) == (2, [3, 4])
    assert SCHEMA_VERSION == 4
    with Registry.open(tmp_path) as reg:
        assert PrivacyLedger(reg).runs() == []


@pytest.mark.parametrize(("changes", "words"), [
    ({"dp": "off", "epsilon_budget": 3.0}, "--epsilon-budget needs differential privacy"),
    ({"noise_multiplier": 0.0}, "--noise must be a positive number"),
    ({"adaptive_clipping": True, "dp": "local"}, "needs --dp central"),
    ({"fraction": 0.0}, "--fraction"),
    ({"strategy": "krum"}, "--strategy"),
    ({"strategy": "fedadam"}, "fedadam cannot run with --dp central"),
])
def test_options_that_do_not_fit_together_are_refused(changes: dict, words: str) -> None:
    with pytest.raises(OptionsError, match=words):
        FederatedOptions(group="g", rounds=1, **changes).check()


def test_poisson_sampling_draws_each_node_independently() -> None:
    from trainer.federated.rounds import poisson_sample

    nodes = list(range(2000))
    assert poisson_sample(nodes, 1.0, random.Random(0)) == nodes
    drawn = poisson_sample(nodes, 0.1, random.Random(0))
    assert 150 < len(drawn) < 250 and set(drawn) <= set(nodes)


def test_weights_survive_the_trip_through_flower_arrays() -> None:
    import torch

    from trainer.federated.server import arrays_from_weights, weights_from_arrays
    from trainer.models import ArchitectureSpec, build_network, load_weights, weights_bytes

    spec = ArchitectureSpec("forecaster", 8, 2, (4,), season=0)
    data = weights_bytes(build_network(spec))
    arrays = arrays_from_weights(data)
    back = load_weights(spec, weights_from_arrays(arrays, data))
    for k, v in build_network(spec).state_dict().items():
        assert back.state_dict()[k].dtype == v.dtype
    assert all(torch.equal(a, b) for a, b in zip(load_weights(spec, data).state_dict().values(),
                                                 back.state_dict().values()))


@pytest.mark.parametrize(("args", "words"), [
    (("start", "--model", "host", "--group", "g", "--rounds", "1"), "name the version"),
    (("start", "--model", "host@1", "--group", "g", "--rounds", "1", "--dp", "off", "--epsilon-budget", "2"),
     "--epsilon-budget needs differential privacy"),
    (("start", "--model", "host@1", "--group", "g", "--rounds", "1", "--clip", "-1"), "--clip"),
    (("start", "--model", "host@1", "--group", "g", "--rounds", "1", "--superlink", "nowhere"), "HOST:PORT"),
    (("status", "fl-nope"), "no federated run"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: tuple, words: str) -> None:
    Registry.open(tmp_path / "reg", create=True).close()
    proc = edgefleet("fl", *args, "--registry", str(tmp_path / "reg"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr


@pytest.mark.parametrize(("changes", "wrapper"), [
    ({}, "DifferentialPrivacyServerSideFixedClipping"),
    ({"adaptive_clipping": True, "noise_multiplier": 1.5}, "DifferentialPrivacyServerSideAdaptiveClipping"),
    ({"dp": "local", "strategy": "fedprox"}, "FedProx"),
    ({"dp": "off", "strategy": "fedadam"}, "FedAdam"),
])
def test_each_mode_builds_flowers_own_strategy(changes: dict, wrapper: str) -> None:
    from trainer.federated.rounds import build_strategy

    strategy = build_strategy(FederatedOptions(group="g", rounds=1, **changes).check())
    assert wrapper in [c.__name__ for c in type(strategy).__mro__]
    base = getattr(strategy, "strategy", strategy)
    assert base.fraction_evaluate == 0.0 and base.min_available_nodes == 0  # the loop samples, not Flower


def test_the_run_document_follows_the_contract() -> None:
    import json

    from shared.federated import decode_run, encode_run
    from trainer.federated.run import app_sha256, run_document

    sha = app_sha256()
    assert sha == app_sha256() and len(sha) == 64  # the FAB is built reproducibly
    run = run_document("fl-x", FederatedOptions(group="lab", rounds=1), "127.0.0.1:9092", sha, "active")
    assert decode_run(encode_run(run)) == run
    # no trusted entities: flwr 1.42 cannot sign an app submitted to a self-hosted SuperLink
    assert json.loads(encode_run(run)) == {
        "schema": "edgefleet.federated-run/1", "run": "fl-x", "group": "lab", "superlink": "127.0.0.1:9092",
        "app_sha256": sha, "trusted_entities": {}, "state": "active", "epsilon_budget": None,
        "delta": 1e-5, "insecure": True}
