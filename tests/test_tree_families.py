"""The tree families (``trees``: a random-forest forecaster; ``isolation_forest``) end to end:
spec, real scikit-learn fits, skl2onnx export composed with the window normalisation and the
score, parity and golden vectors in the agent's own onnxruntime runtime, ``edgefleet train
--family`` (and its refusal for TFLite-only profiles) and searches that sample them.

Trained on synthetic host metrics (:mod:`trainer.data.synthetic`), small forests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_cli import REPO_ROOT, edgefleet
from test_edge_imports import CHILD as AGENT_WITHOUT_TRAINER_PACKAGES

from edge_agent.runtime import open_runtime, smoke_test
from shared.bundle import read_bundle
from shared.profiles import load_profile
from shared.score_pipeline import LikelihoodPipeline
from trainer.data import generate_host_metrics, write_host_metrics
from trainer.export import ExportInputs, artifact_scores, build_artifact
from trainer.export.targets import profile_variant, refusal
from trainer.models import ArchitectureSpec, Recipe, SpecError, TreeModel, fit, score_windows
from trainer.models.spec import TREE_FAMILIES
from trainer.pipeline import TrainRequest, spec_for, training_windows
from trainer.registry import Registry
from trainer.scoring import ThresholdPolicy, calibrate
from trainer.search.errors import SearchError
from trainer.search.grid import grid_of
from trainer.search.space import SearchSpace, for_profiles, suggest

WINDOW = 16
SPECS = {
    "trees": ArchitectureSpec("trees", WINDOW, 4, (), n_estimators=30, max_depth=6),
    # one day of 5-minute rows back, centred on the training mean
    "trees-seasonal-train": ArchitectureSpec("trees", WINDOW, 1, (), centering="train", season=288,
                                             n_estimators=20, max_depth=4),
    "isolation_forest": ArchitectureSpec("isolation_forest", WINDOW, 1, (), n_estimators=50, max_samples=128),
    "isolation_forest-train": ArchitectureSpec("isolation_forest", WINDOW, 4, (), centering="train",
                                               n_estimators=30, max_samples=64),
}


# -- spec -----------------------------------------------------------------------------------------


def test_tree_specs_round_trip_and_refuse_what_they_cannot_take() -> None:
    for spec in SPECS.values():
        assert ArchitectureSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
        assert spec.tree_ensemble and spec.hidden == ()
    assert SPECS["trees"].to_json()["max_depth"] == 6 and "max_samples" not in SPECS["trees"].to_json()
    assert SPECS["isolation_forest"].to_json()["max_samples"] == 128
    assert "max_depth" not in SPECS["isolation_forest"].to_json()
    assert SPECS["trees"].forecasts and SPECS["trees"].score_kind == "forecast_mae"
    assert not SPECS["isolation_forest"].forecasts and SPECS["isolation_forest"].score_kind == "isolation_score"
    # the other families write exactly the keys they did before
    old = {"family": "forecaster", "window": 64, "features": 1, "hidden": [512, 64], "centering": "window"}
    assert ArchitectureSpec.from_json(old).to_json() == old
    with pytest.raises(SpecError, match="hidden must be empty"):
        ArchitectureSpec("trees", 16, 1, (8,))
    with pytest.raises(SpecError, match="n_estimators >= 1"):
        ArchitectureSpec("isolation_forest", 16, 1, (), n_estimators=0)
    with pytest.raises(SpecError, match="max_samples >= 2"):
        ArchitectureSpec("isolation_forest", 16, 1, (), max_samples=1)
    with pytest.raises(SpecError, match="max_depth is a parameter of another family"):
        ArchitectureSpec("isolation_forest", 16, 1, (), max_depth=3)
    with pytest.raises(SpecError, match="n_estimators is a parameter of another family"):
        ArchitectureSpec("forecaster", 16, 1, (8,), n_estimators=10)
    with pytest.raises(SpecError, match="seasonal context"):
        ArchitectureSpec("isolation_forest", 16, 1, (), season=288)
    with pytest.raises(SpecError, match="bad architecture spec"):
        ArchitectureSpec.from_json({**SPECS["trees"].to_json(), "max_depth": "deep"})
    request = TrainRequest(data=[], profiles=[], name="m", family="trees")
    assert spec_for(request, 2, 0) == ArchitectureSpec("trees", 64, 2, ())


# -- fit, export, parity, golden vectors in the agent's runtime --------------------------------------


@dataclass
class Trained:
    spec: ArchitectureSpec
    model: TreeModel
    inputs: ExportInputs
    normal: np.ndarray  # validation windows of data without anomalies


@pytest.fixture(scope="module", params=sorted(SPECS))
def trained(request: pytest.FixtureRequest) -> Trained:
    host = generate_host_metrics(1500, seed=3, anomalies=0)
    spec = SPECS[request.param]
    values = np.ascontiguousarray(host.values[:, : spec.features], np.float32)
    train_w, val_w, rows = training_windows(spec, [values])
    result = fit(spec, train_w, val_w, rows, Recipe(seed=0))
    assert isinstance(result.model, TreeModel) and result.best_epoch == 1
    val_scores = score_windows(result.model, val_w)
    score = calibrate(val_scores, spec.score_kind, ThresholdPolicy(), LikelihoodPipeline().calibrated(val_scores))
    holdout = np.ascontiguousarray(val_w[:: max(1, len(val_w) // 256)])
    inputs = ExportInputs(
        name="m", module=result.model, window=spec.input_rows, features=tuple(host.features)[: spec.features],
        score=score, calibration=holdout, holdout=holdout, reference_scores=score_windows(result.model, holdout),
        drift_reference={"features": {}, "score": {}}, lineage={}, architecture=spec.to_json(),
    )
    return Trained(spec, result.model, inputs, np.ascontiguousarray(val_w))


def test_onnx_artifact_passes_parity_and_its_golden_vectors_in_the_agent_runtime(trained: Trained) -> None:
    art = build_artifact("onnx", "fp32", trained.inputs)
    assert art.parity.passed, art.parity.failures
    assert art.parity.max_rel_error < 1e-4  # the same float32 arithmetic, split for split
    spec, model = read_bundle(art.bundle)
    # the input and output every other family's graph has: the agent needs no change
    assert (spec.inputs[0].name, spec.inputs[0].shape) == ("window", (None, trained.spec.input_rows, trained.spec.features))
    assert (spec.outputs[0].name, spec.outputs[0].shape) == ("score", (None,))
    assert spec.quantization == "fp32" and spec.architecture == trained.spec.to_json()
    graph = onnx.load_from_string(model)
    assert {o.domain: o.version for o in graph.opset_import} == {"": 18, "ai.onnx.ml": 3}
    assert any(n.op_type == "TreeEnsembleRegressor" and n.domain == "ai.onnx.ml" for n in graph.graph.node)
    assert [i.name for i in graph.graph.input] == ["window"] and [o.name for o in graph.graph.output] == ["score"]
    runtime = open_runtime(spec, model, threads=1)
    try:
        smoke_test(runtime, spec)
        one = np.array([runtime.score_one(w) for w in trained.inputs.holdout[:8]])
    finally:
        runtime.close()
    assert np.allclose(one, trained.inputs.reference_scores[:8], rtol=1e-5, atol=1e-6)
    # same data, same seed: the same bytes (bundles are reproducible)
    assert build_artifact("onnx", "fp32", trained.inputs).bundle == art.bundle


def test_no_int8_or_tflite_artifact_of_a_tree_family(trained: Trained) -> None:
    for fmt, quant in (("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")):
        with pytest.raises(ValueError, match="ONNX fp32 only"):
            build_artifact(fmt, quant, trained.inputs)


@pytest.mark.parametrize("trained", ["trees", "isolation_forest"], indirect=True)
def test_an_injected_spike_scores_above_every_normal_window(trained: Trained) -> None:
    art = build_artifact("onnx", "fp32", trained.inputs)
    spec, model = read_bundle(art.bundle)
    spiked = trained.normal.copy()
    spiked[:, -1, 0] += 6 * trained.model.std[0]  # the newest row of the first metric, 6 sigma up
    normal_scores = artifact_scores(spec, model, trained.normal)
    spiked_scores = artifact_scores(spec, model, spiked)
    assert spiked_scores.min() > normal_scores.max(), (spiked_scores.min(), normal_scores.max())


@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_artifact_and_model_agree_on_a_metric_of_few_distinct_values(family: str) -> None:
    # a metric recorded to three decimals, as many real series are: windows repeat values, and
    # a normalised value one float32 step off from the model's would cross splits (the level
    # of a 64-row window summed in float32 in another order than the graph's does)
    rng = np.random.default_rng(0)
    levels = np.array([0.066, 0.132, 0.134, 0.136, 0.2], np.float32)
    values = rng.choice(levels, p=[0.1, 0.2, 0.5, 0.15, 0.05], size=(1500, 1))
    spec = ArchitectureSpec(family, 64, 1, (), n_estimators=50)
    train_w, val_w, rows = training_windows(spec, [values])
    model = fit(spec, train_w, val_w, rows, Recipe(seed=0)).model
    reference = score_windows(model, val_w)
    score = calibrate(reference, spec.score_kind, ThresholdPolicy(), LikelihoodPipeline().calibrated(reference))
    inputs = ExportInputs(
        name="m", module=model, window=64, features=("value",), score=score, calibration=val_w, holdout=val_w,
        reference_scores=reference, drift_reference={"features": {}, "score": {}}, lineage={},
        architecture=spec.to_json(),
    )
    art = build_artifact("onnx", "fp32", inputs)
    assert art.parity.passed and art.parity.max_abs_error < 1e-5, art.parity


@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_the_agent_runs_a_tree_artifact_without_torch_onnx_or_scikit_learn(family: str, tmp_path: Path) -> None:
    # one metric and a window of 8, as the agent child of test_edge_imports feeds
    spec = ArchitectureSpec(family, 8, 1, (), n_estimators=10)
    values = np.ascontiguousarray(generate_host_metrics(600, seed=1).values[:, :1], np.float32)
    train_w, val_w, rows = training_windows(spec, [values])
    model = fit(spec, train_w, val_w, rows, Recipe(seed=0)).model
    val_scores = score_windows(model, val_w)
    score = calibrate(val_scores, spec.score_kind, ThresholdPolicy(), LikelihoodPipeline().calibrated(val_scores))
    inputs = ExportInputs(
        name="m", module=model, window=8, features=("value",), score=score, calibration=val_w, holdout=val_w,
        reference_scores=val_scores, drift_reference={"features": {}, "score": {}}, lineage={},
        architecture=spec.to_json(),
    )
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(build_artifact("onnx", "fp32", inputs).bundle)
    # the child blocks torch, optuna, onnx, sklearn and skl2onnx, smoke-tests the golden
    # vectors and detects on 40 samples
    proc = subprocess.run([sys.executable, "-c", AGENT_WITHOUT_TRAINER_PACKAGES, str(bundle)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["detections"] == 40 - 8 + 1


# -- which profiles can run a tree family --------------------------------------------------------------


def test_tree_families_run_on_onnx_profiles_only_as_fp32() -> None:
    x86, rpi4, a53 = (load_profile(n) for n in ("x86-64-v3", "rpi4-arm64", "cortex-a53"))
    assert profile_variant("trees", x86) == ("onnx", "fp32")  # it prefers int8: none exists
    assert profile_variant("isolation_forest", rpi4) == ("onnx", "fp32")  # it prefers tflite
    assert profile_variant("trees", a53) is None
    assert profile_variant("linear", a53) == ("tflite", "int8")
    assert refusal(["trees", "linear"], [x86, rpi4]) is None
    why = refusal(["trees", "linear"], [x86, a53])
    assert why is not None and "the trees family exports to ONNX fp32 only" in why and "cortex-a53" in why
    space, left_out = for_profiles(SearchSpace(families=("trees", "isolation_forest", "linear")), [x86, a53])
    assert space.families == ("linear",) and left_out is not None
    assert left_out.families == ("trees", "isolation_forest")
    assert for_profiles(SearchSpace(families=("trees",)), [x86]) == (SearchSpace(families=("trees",)), None)
    with pytest.raises(SearchError, match="no family of the search space"):
        for_profiles(SearchSpace(families=("trees", "isolation_forest")), [a53])


def test_space_suggests_tree_candidates_without_a_training_recipe() -> None:
    space = SearchSpace.from_json({"families": ["trees", "isolation_forest"], "tree_estimators": [10, 20],
                                   "tree_depths": [3], "isolation_samples": [32, 64]})
    grid = grid_of(space)
    assert grid["trees.n_estimators"] == [10, 20] and grid["isolation_forest.max_samples"] == [32, 64]
    assert "learning_rate" not in grid and "batch_size" not in grid
    assert "learning_rate" in grid_of(SearchSpace.from_json({"families": ["trees", "linear"]}))
    with pytest.raises(SearchError, match="isolation_samples"):
        SearchSpace.from_json({"isolation_samples": [1]})

    class FixedTrial:  # answers each question with the named choice (or the first); records them
        def __init__(self, choices: dict[str, object]) -> None:
            self.choices, self.asked = choices, []

        def suggest_categorical(self, name: str, options: list[object]) -> object:
            self.asked.append(name)
            return self.choices.get(name, options[0])

        def suggest_int(self, name: str, low: int, high: int) -> int:
            self.asked.append(name)
            return low

        def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
            self.asked.append(name)
            return low

    trial = FixedTrial({"family": "isolation_forest", "isolation_forest.max_samples": 64})
    candidate = suggest(trial, space, features=2, seed=7)
    assert candidate.architecture == ArchitectureSpec("isolation_forest", 16, 2, (), n_estimators=10, max_samples=64)
    assert candidate.recipe == Recipe(epochs=space.epochs, patience=space.patience, seed=7)
    assert "learning_rate" not in trial.asked and "isolation_forest.season" not in trial.asked
    trees = suggest(FixedTrial({"family": "trees", "trees.season": "off"}), space, features=2)
    assert trees.architecture.family == "trees" and trees.architecture.max_depth == 3


# -- through the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_host_metrics(generate_host_metrics(1200, seed=3), folder / "host.csv", folder / "host.labels.json")
    return folder / "host.csv"


@pytest.mark.slow
@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_train_family_registers_one_onnx_fp32_artifact_for_every_onnx_profile(
    family: str, host_csv: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "reg"
    out = json.loads(edgefleet("train", "--data", str(host_csv), "--profile", "x86-64-v3", "--profile",
                               "rpi4-arm64", "--name", family, "--family", family, "--window", "16",
                               "--registry", str(registry), "--json", "-q").stdout)
    assert out["architecture"]["family"] == family and out["rejected"] == []
    with Registry.open(registry) as reg:
        record = reg.get(family, out["version"])
        (art,) = record.artifacts
        bundle = reg.bundle(art.sha256)
    assert (art.format, art.quantization) == ("onnx", "fp32")
    assert sorted(art.profiles) == ["rpi4-arm64", "x86-64-v3"]
    assert record.lineage["software"]["skl2onnx"] != "unknown"
    spec, model = read_bundle(bundle)
    runtime = open_runtime(spec, model, threads=2)
    try:
        smoke_test(runtime, spec)  # what an agent does before the model may serve
    finally:
        runtime.close()


@pytest.mark.parametrize("profiles", [["cortex-a53"], ["x86-64-v3", "cortex-a53"]])
def test_train_tree_family_for_a_tflite_only_profile_exits_2_and_registers_nothing(
    profiles: list[str], host_csv: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "reg"
    argv = [a for p in profiles for a in ("--profile", p)]
    proc = edgefleet("train", "--data", str(host_csv), *argv, "--name", "t", "--family", "trees",
                     "--registry", str(registry), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ONNX fp32 only" in lines[0] and "cortex-a53" in lines[0], proc.stderr
    assert proc.stdout == "" and not registry.exists()


@pytest.mark.slow
def test_search_samples_and_registers_the_tree_families(host_csv: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.json"  # a grid of two points: one per tree family
    space.write_text(json.dumps({"families": ["trees", "isolation_forest"], "windows": [8], "widths": [8],
                                 "layers": [1, 1], "seasons": ["off"], "centerings": ["window"],
                                 "tree_estimators": [20], "tree_depths": [4], "isolation_samples": [64]}))
    registry = tmp_path / "reg"
    out = json.loads(edgefleet("search", "--data", str(host_csv), "--name", "host", "--registry", str(registry),
                               "--space", str(space), "--sampler", "grid", "--trials", "2", "--profile",
                               "x86-64-v3", "--json", "-q").stdout)
    assert out["left_out"] is None
    shown = json.loads(edgefleet("search", "show", "host", "--registry", str(registry), "--json").stdout)
    archs = [t["candidate"]["architecture"] for t in shown["trials"]]
    assert sorted(a["family"] for a in archs) == ["isolation_forest", "trees"]
    for t in shown["trials"]:  # measured in onnxruntime as the artifact x86-64-v3 agents run
        (hw,) = t["hardware"]
        assert (hw["format"], hw["quantization"]) == ("onnx", "fp32") and hw["parity_passed"]
        assert hw["latency_p99_ms_here"] > 0 and hw["model_ram_mb"] > 0
    (version,) = out["versions"]
    assert version["architecture"]["family"] in TREE_FAMILIES
    assert [(a["format"], a["quantization"]) for a in version["artifacts"]] == [("onnx", "fp32")]


@pytest.mark.slow
def test_search_leaves_tree_families_out_for_a_tflite_profile_and_says_so_once(
    host_csv: Path, tmp_path: Path
) -> None:
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"families": ["trees", "linear"], "windows": [8], "widths": [8], "layers": [1, 1],
                                 "seasons": ["off"], "centerings": ["window"], "learning_rate": [1e-3, 1e-3],
                                 "weight_decay": [1e-5, 1e-5], "epochs": 2, "patience": 1, "batch_sizes": [64]}))
    registry = tmp_path / "reg"
    proc = edgefleet("search", "--data", str(host_csv), "--name", "host", "--registry", str(registry),
                     "--space", str(space), "--trials", "1", "--profile", "x86-64-v3", "--profile", "cortex-a53",
                     "--json")
    notes = [line for line in proc.stderr.splitlines() if "left out of the search space" in line]
    assert len(notes) == 1 and "trees" in notes[0] and "cortex-a53" in notes[0], proc.stderr
    out = json.loads(proc.stdout)
    assert out["left_out"]["families"] == ["trees"]
    shown = json.loads(edgefleet("search", "show", "host", "--registry", str(registry), "--json").stdout)
    assert [t["candidate"]["architecture"]["family"] for t in shown["trials"]] == ["linear"]
    # a space of tree families only, for that profile set: nothing to search
    space.write_text(json.dumps({"families": ["trees", "isolation_forest"]}))
    refused = edgefleet("search", "--data", str(host_csv), "--name", "other", "--registry", str(tmp_path / "r2"),
                        "--space", str(space), "--trials", "1", "--profile", "cortex-a53", check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "no family of the search space" in refused.stderr and not (tmp_path / "r2").exists()
