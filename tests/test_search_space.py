"""The search space's MLP shapes and activations, and the default candidate a new study tries first."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from helpers_cli import REPO_ROOT, edgefleet

from edge_agent.runtime import open_runtime, smoke_test
from shared.bundle import read_bundle
from trainer.cli_common import ACTIVATION_CHOICES
from trainer.data import generate_host_metrics, write_host_metrics
from trainer.models import ArchitectureSpec, Recipe, SpecError
from trainer.models._networks import build_network
from trainer.models.spec import ACTIVATIONS
from trainer.pipeline import DEFAULT_ARCHITECTURE
from trainer.registry import Registry
from trainer.search.errors import SearchError
from trainer.search.grid import grid_of
from trainer.search.space import SearchSpace, default_params, suggest


def _suggest(params: dict, space: SearchSpace):
    study = optuna.create_study()
    study.enqueue_trial(params)
    return suggest(study.ask(), space, features=2, season_lag=lambda window: 288)


def test_the_default_parameters_rebuild_what_train_builds_by_default() -> None:
    space = SearchSpace()
    candidate = _suggest(default_params(space), space)
    arch = candidate.architecture
    assert (arch.family, arch.window, arch.hidden, arch.centering, arch.season) == (
        DEFAULT_ARCHITECTURE.family, DEFAULT_ARCHITECTURE.window, DEFAULT_ARCHITECTURE.hidden,
        DEFAULT_ARCHITECTURE.centering, 288)
    r, default = candidate.recipe, Recipe()
    assert (r.batch_size, r.learning_rate, r.weight_decay) == (
        default.batch_size, default.learning_rate, default.weight_decay)


@pytest.mark.parametrize("change", [{"windows": [16, 32]}, {"widths": [32, 64]}, {"tapers": [1, 2]},
                                    {"families": ["autoencoder"]}, {"seasons": ["off"]},
                                    {"learning_rate": [1e-2, 1e-1]}])
def test_a_space_that_cannot_express_the_default_has_none(change: dict) -> None:
    assert default_params(SearchSpace.from_json(change)) is None


def test_a_taper_narrows_each_hidden_layer() -> None:
    space = SearchSpace.from_json({"layers": [1, 3], "tapers": [1, 4]})
    base = {"family": "forecaster", "window": 16, "width": 64, "centering": "window",
            "forecaster.season": "off", "batch_size": 64, "learning_rate": 1e-3, "weight_decay": 1e-5}
    assert _suggest({**base, "layers": 3, "forecaster.taper": 4}, space).architecture.hidden == (64, 16, 4)
    assert _suggest({**base, "layers": 2, "forecaster.taper": 1}, space).architecture.hidden == (64, 64)
    assert _suggest({**base, "layers": 1}, space).architecture.hidden == (64,)


@pytest.mark.slow
def test_a_new_study_tries_the_default_first_and_a_resumed_one_does_not_again(tmp_path: Path) -> None:
    write_host_metrics(generate_host_metrics(1200, seed=4), tmp_path / "host.csv")
    (tmp_path / "space.json").write_text(json.dumps({"epochs": 2, "patience": 1}))
    # a roomy latency budget: this test is about which candidates are tried, and a p99 timed
    # on a busy machine (the full suite) can exceed the x86 budget for the default's size
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (REPO_ROOT / "firmware_profiles" / "x86-64-v3.toml").read_text().replace(
        'name = "x86-64-v3"', 'name = "roomy-x86"')
    lines = ["latency_p99_ms = 1000.0" if line.startswith("latency_p99_ms") else line for line in text.splitlines()]
    (profiles / "roomy-x86.toml").write_text("\n".join(lines) + "\n")
    common = ("--data", str(tmp_path / "host.csv"), "--name", "host", "--registry", str(tmp_path / "reg"),
              "--space", str(tmp_path / "space.json"), "--profile", "roomy-x86", "--profiles-dir", str(profiles),
              "--sampler", "random")
    edgefleet("search", *common, "--trials", "1")
    edgefleet("search", *common, "--trials", "2", "--resume")
    storage = f"sqlite:///{tmp_path / 'reg' / 'search.sqlite3'}"
    trials = optuna.load_study(study_name="host", storage=storage).get_trials()
    assert [t.user_attrs.get("baseline") for t in trials] == ["train default", None]
    assert trials[0].params == default_params(SearchSpace.from_json({"epochs": 2, "patience": 1}))


def test_the_activation_is_part_of_the_spec_and_only_of_the_mlp_families() -> None:
    spec = ArchitectureSpec("forecaster", 16, 2, (32, 8), activation="gelu")
    assert spec.to_json()["activation"] == "gelu"
    assert ArchitectureSpec.from_json(spec.to_json()) == spec
    assert "activation" not in ArchitectureSpec("forecaster", 16, 2, (32, 8)).to_json()  # as before
    with pytest.raises(SpecError, match="unknown activation 'swish'"):
        ArchitectureSpec("forecaster", 16, 2, (32,), activation="swish")
    with pytest.raises(SpecError, match="MLP families"):
        ArchitectureSpec("conv", 16, 2, (8, 8), dilations=(1, 2), activation="tanh")
    assert ACTIVATION_CHOICES == ACTIVATIONS
    torch_layers = {type(m).__name__ for m in build_network(spec).modules()}
    assert "GELU" in torch_layers and "ReLU" not in torch_layers


def test_a_space_with_activations_proposes_them_for_mlps_only() -> None:
    space = SearchSpace.from_json({"families": ["forecaster", "linear"], "activations": ["relu", "tanh"]})
    base = {"window": 16, "layers": 1, "width": 32, "centering": "window", "batch_size": 64,
            "learning_rate": 1e-3, "weight_decay": 1e-5}
    mlp = _suggest({**base, "family": "forecaster", "forecaster.season": "off", "activation": "tanh"}, space)
    assert mlp.architecture.activation == "tanh"
    linear = _suggest({**base, "family": "linear", "linear.season": "off"}, space)
    assert linear.architecture.activation == "relu"
    assert grid_of(space)["activation"] == ["relu", "tanh"]
    with pytest.raises(SearchError, match="activations"):
        SearchSpace.from_json({"activations": ["relu", "swish"]})


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_gelu_and_tanh_forecasters_ship_int8_onnx_and_tflite_that_pass_parity(activation: str, tmp_path: Path) -> None:
    write_host_metrics(generate_host_metrics(1500, seed=5), tmp_path / "host.csv")
    out = edgefleet("train", "--data", str(tmp_path / "host.csv"), "--profile", "rpi4-arm64", "--name", "host",
                    "--registry", str(tmp_path / "reg"), "--epochs", "3", "--window", "16", "--season", "off",
                    "--activation", activation, "--json")
    version = json.loads(out.stdout)
    assert version["architecture"]["activation"] == activation
    arts = {(a["format"], a["quantization"]): a for a in version["artifacts"]}
    for key in (("onnx", "int8"), ("tflite", "int8")):
        assert arts[key]["parity"]["passed"], (key, arts[key]["parity"])
    with Registry.open(tmp_path / "reg") as reg:
        for a in reg.get("host", 1).artifacts:
            spec, model = read_bundle(reg.bundle(a.sha256))
            runtime = open_runtime(spec, model, threads=1)
            smoke_test(runtime, spec)  # the bundle's golden vectors, in the agent's runtime
