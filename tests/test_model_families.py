"""The linear (ridge), conv (TCN) and attention forecaster families end to end: spec, network,
training, ONNX int8 and TFLite int8 export, parity in bare onnxruntime / LiteRT sessions and in
the agent's runtime, ``edgefleet train --family`` and searches over them.

Trained on synthetic host metrics (:mod:`trainer.data.synthetic`), a few epochs each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers_cli import edgefleet

from shared.bundle import read_bundle
from shared.drift import score_reference
from shared.score_pipeline import LikelihoodPipeline
from trainer.cli_common import FAMILY_CHOICES
from trainer.data import generate_host_metrics, make_windows, write_host_metrics
from trainer.export import ExportInputs, build_artifact
from trainer.export._onnx import export_onnx_fp32, quantize_onnx_int8
from trainer.export._tflite import export_tflite_int8
from trainer.export.bundles import artifact_scores
from trainer.export.parity import TOLERANCES, check_parity
from trainer.models import (
    FAMILIES,
    ArchitectureSpec,
    Recipe,
    SpecError,
    build_network,
    fit,
    score_windows,
)
from trainer.pipeline import TrainRequest, spec_for, training_windows
from trainer.registry import Registry
from trainer.scoring import ThresholdPolicy, calibrate
from trainer.search.grid import grid_of, grid_size
from trainer.search.space import SearchSpace

REPO_ROOT = Path(__file__).resolve().parents[1]
WINDOW = 16
SPECS = {
    "linear": ArchitectureSpec("linear", WINDOW, 4, ()),
    "conv": ArchitectureSpec("conv", WINDOW, 4, (16, 16, 16), kernel=3, dilations=(1, 2, 4)),
    # one day of 5-minute rows back, as `edgefleet train` picks for these data
    "conv-seasonal": ArchitectureSpec("conv", WINDOW, 4, (8, 16), kernel=3, dilations=(1, 2), season=288),
    # one metric: a one-channel Conv1d input (torch.export once fixed its batch to 1)
    "conv-one-metric": ArchitectureSpec("conv", WINDOW, 1, (8, 8), kernel=3, dilations=(1, 2)),
    "attention": ArchitectureSpec("attention", WINDOW, 4, (16, 16), heads=2),
    # one metric, one block, one day of seasonal context read into the head
    "attention-seasonal-one-metric": ArchitectureSpec("attention", WINDOW, 1, (8,), heads=4, season=288),
}


# -- spec ---------------------------------------------------------------------------------------


def test_spec_round_trip_of_the_new_families_and_older_specs_unchanged() -> None:
    for spec in [*SPECS.values(), ArchitectureSpec("conv", 64, 1, (8, 4), kernel=5, dilations=(1, 3),
                                                   residual=False)]:
        assert ArchitectureSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert SPECS["linear"].to_json()["hidden"] == []
    assert SPECS["conv"].to_json()["dilations"] == [1, 2, 4] and SPECS["conv"].receptive_field == 15
    # older families write (and read) exactly the keys they always did
    old = {"family": "forecaster", "window": 64, "features": 1, "hidden": [512, 64], "centering": "window"}
    assert ArchitectureSpec.from_json(old).to_json() == old
    with pytest.raises(SpecError, match="hidden must be empty"):
        ArchitectureSpec("linear", 16, 1, (8,))
    with pytest.raises(SpecError, match="one positive dilation per hidden width"):
        ArchitectureSpec("conv", 16, 1, (8, 8), dilations=(1,))
    with pytest.raises(SpecError, match="conv parameters"):
        ArchitectureSpec("forecaster", 16, 1, (8,), dilations=(1,))
    with pytest.raises(SpecError, match="conv parameters"):
        ArchitectureSpec("linear", 16, 1, (), kernel=5)
    with pytest.raises(SpecError, match="residual"):
        ArchitectureSpec.from_json({**SPECS["conv"].to_json(), "residual": "yes"})
    assert FAMILY_CHOICES == FAMILIES


def test_attention_spec_keeps_heads_and_refuses_widths_heads_do_not_divide() -> None:
    spec = SPECS["attention"]
    assert spec.to_json()["heads"] == 2 and "kernel" not in spec.to_json()
    assert ArchitectureSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert "heads" not in SPECS["conv"].to_json() and "heads" not in SPECS["linear"].to_json()
    assert spec.forecasts and spec.score_kind == "forecast_mae"
    with pytest.raises(SpecError, match="divisible by heads"):
        ArchitectureSpec("attention", 16, 1, (12,), heads=5)
    with pytest.raises(SpecError, match="one width for every block"):
        ArchitectureSpec("attention", 16, 1, (16, 8), heads=2)
    with pytest.raises(SpecError, match="heads is an attention parameter"):
        ArchitectureSpec("conv", 16, 1, (8,), dilations=(1,), heads=2)
    with pytest.raises(SpecError, match="conv parameters"):
        ArchitectureSpec("attention", 16, 1, (8,), heads=2, kernel=5)


def test_train_request_defaults_per_family() -> None:
    def spec(family: str) -> ArchitectureSpec:
        return spec_for(TrainRequest(data=[], profiles=[], name="m", family=family), 2, 0)

    assert spec("linear").hidden == () and spec("linear").dilations == ()
    conv = spec("conv")
    assert conv.kernel == 3 and conv.dilations == (1, 2, 4, 8) and len(conv.hidden) == 4 and conv.residual
    assert spec("forecaster").hidden == (512, 64)
    attention = spec("attention")
    assert attention.hidden == (32, 32) and attention.heads == 4 and attention.dilations == ()


# -- networks -------------------------------------------------------------------------------------


def test_conv_blocks_are_causal_and_see_their_receptive_field_only() -> None:
    # centred on the training mean, so that the window's level does not carry far rows along
    spec = ArchitectureSpec("conv", 32, 1, (4, 4), centering="train", kernel=3, dilations=(1, 2))
    torch.manual_seed(0)
    model = build_network(spec).eval()
    x = np.random.default_rng(0).normal(size=(8, 32, 1)).astype(np.float32)
    base = score_windows(model, x)
    last_past = 32 - 2  # the head reads the last time step of the rows before the forecast row
    inside, outside = x.copy(), x.copy()
    inside[:, last_past - spec.receptive_field + 1, 0] += 3.0
    outside[:, last_past - spec.receptive_field, 0] += 3.0
    assert not np.allclose(score_windows(model, inside), base)
    assert np.allclose(score_windows(model, outside), base)


def test_attention_reads_every_row_before_the_forecast_row() -> None:
    # unlike the conv family's receptive field, attention reaches the window's first row
    spec = ArchitectureSpec("attention", 32, 1, (8, 8), centering="train", heads=2)
    torch.manual_seed(0)
    model = build_network(spec).eval()
    x = np.random.default_rng(0).normal(size=(8, 32, 1)).astype(np.float32)
    base = score_windows(model, x)
    first = x.copy()
    first[:, 0, 0] += 3.0
    assert not np.allclose(score_windows(model, first), base)
    # each window is scored on its own: a batch gives what its windows give one by one
    one_by_one = np.concatenate([score_windows(model, x[i : i + 1]) for i in range(len(x))])
    assert np.allclose(one_by_one, base, atol=1e-5)


def test_linear_forecaster_learns_a_ramp() -> None:
    # one linear map extrapolates a noisy ramp; the window's level is in float outside it
    rows = (np.arange(600, dtype=np.float32) + np.random.default_rng(0).normal(0, 0.3, 600))[:, None]
    spec = ArchitectureSpec("linear", 8, 1, ())
    train_w, val_w, normal = training_windows(spec, [rows.astype(np.float32)])
    model = fit(spec, train_w, val_w, normal, Recipe(epochs=30, learning_rate=1e-2)).model
    ramp = make_windows(np.arange(1000, 1100, dtype=np.float32)[:, None], 8)
    jumped = ramp.copy()
    jumped[:, -1, 0] += 50.0
    assert score_windows(model, ramp).max() < 0.5 * score_windows(model, jumped).min()


# -- export and parity ------------------------------------------------------------------------------


@dataclass
class Trained:
    spec: ArchitectureSpec
    model: torch.nn.Module
    calibration: np.ndarray
    holdout: np.ndarray
    reference: np.ndarray
    threshold: float
    features: tuple[str, ...]


@pytest.fixture(scope="module", params=sorted(SPECS))
def trained(request: pytest.FixtureRequest) -> Trained:
    host = generate_host_metrics(1500, seed=3)
    spec = SPECS[request.param]
    features = tuple(host.features)[: spec.features]
    values = np.ascontiguousarray(host.values[:, : spec.features], np.float32)
    train_w, val_w, rows = training_windows(spec, [values])
    result = fit(spec, train_w, val_w, rows, Recipe(epochs=4, seed=0))
    val_scores = score_windows(result.model, val_w)
    score = calibrate(val_scores, spec.score_kind, ThresholdPolicy(), LikelihoodPipeline().calibrated(val_scores))
    holdout = val_w[:: max(1, len(val_w) // 256)]
    calibration = np.concatenate([train_w, val_w])[:: max(1, (len(train_w) + len(val_w)) // 256)]
    return Trained(spec, result.model, np.ascontiguousarray(calibration), np.ascontiguousarray(holdout),
                   score_windows(result.model, holdout), score.threshold, features)


def _onnxruntime_scores(model: bytes, windows: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: windows})
    return np.asarray(y, np.float64).reshape(len(windows))


def _litert_scores(model: bytes, windows: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    scores = []
    for window in windows:  # batch fixed to 1
        interpreter.set_tensor(inp["index"], window[None])
        interpreter.invoke()
        scores.append(float(interpreter.get_tensor(out["index"]).reshape(())))
    return np.asarray(scores)


def test_onnx_int8_scores_agree_with_torch_in_onnxruntime(trained: Trained) -> None:
    int8 = quantize_onnx_int8(export_onnx_fp32(trained.model, trained.holdout[:1]), trained.calibration)
    got = _onnxruntime_scores(int8, trained.holdout)
    report = check_parity(trained.reference, got, trained.threshold, TOLERANCES["int8"])
    assert report.passed, report.failures
    graph = onnx.load_from_string(int8).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    if trained.spec.family == "conv":
        # every convolution reads dequantized int8 weights and dequantized activations (QDQ)
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        convs = [n for n in graph.node if n.op_type in ("Conv", "QLinearConv")]
        assert len(convs) >= len(trained.spec.hidden)
        for conv in convs:
            if conv.op_type == "Conv":
                assert made_by.get(conv.input[0]) == "DequantizeLinear", conv.input[0]
                assert made_by.get(conv.input[1]) == "DequantizeLinear", conv.input[1]
        weights = {i.name: i for i in graph.initializer}
        int8_weights = [w for w in weights.values() if w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 3]
        assert len(int8_weights) >= len(trained.spec.hidden)  # the Conv1d kernels, stored int8
    if trained.spec.family == "attention":
        # every matrix product (projections, query·key, weights·value, MLP, head) reads
        # dequantized inputs; softmax and layer norm stay float
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
        # per block: q, k, v, out, two MLP layers and two activation products; embed and head
        assert len(products) >= 8 * len(trained.spec.hidden) + 2
        for node in products:
            assert [made_by.get(i) for i in node.input[:2]] == ["DequantizeLinear"] * 2, node.op_type
        assert {"Softmax", "LayerNormalization"} <= set(ops)


def test_tflite_int8_scores_agree_with_torch_in_litert(trained: Trained) -> None:
    model = export_tflite_int8(trained.model, trained.calibration)
    got = _litert_scores(model, trained.holdout)
    report = check_parity(trained.reference, got, trained.threshold, TOLERANCES["int8"])
    assert report.passed, report.failures
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    int8 = [t for t in interpreter.get_tensor_details() if np.dtype(t["dtype"]) == np.int8]
    layers = 1 if trained.spec.family == "linear" else len(trained.spec.hidden) + 1
    assert len(int8) >= layers  # weights (and activations) of every layer quantized
    if trained.spec.family == "attention":
        # every nn.Linear (embedding, q, k, v, output, two MLP layers per block, head) runs
        # int8; the activation products stay float BATCH_MATMUL (no quantizer annotation)
        ops = interpreter._get_ops_details()
        kinds = {op["op_name"] for op in ops}
        assert "SOFTMAX" in kinds and "BATCH_MATMUL" in kinds
        dtype = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
        connected = [op for op in ops if op["op_name"] == "FULLY_CONNECTED"]
        assert len(connected) == 6 * len(trained.spec.hidden) + 2
        assert all(dtype[op["inputs"][1]] == np.int8 for op in connected)


def test_bundles_pass_parity_in_the_agent_runtime(trained: Trained) -> None:
    inputs = ExportInputs(
        name="m", module=trained.model, window=trained.spec.input_rows, features=trained.features,
        score=calibrate(trained.reference, trained.spec.score_kind, ThresholdPolicy(),
                        LikelihoodPipeline().calibrated(trained.reference)),
        calibration=trained.calibration, holdout=trained.holdout,
        reference_scores=trained.reference,
        drift_reference={"features": {}, "score": {}}, lineage={}, architecture=trained.spec.to_json(),
    )
    for fmt in ("onnx", "tflite"):
        art = build_artifact(fmt, "int8", inputs)
        assert art.parity.passed, (fmt, art.parity.failures)
        spec, model = read_bundle(art.bundle)
        assert spec.window == trained.spec.input_rows
        # the score reference is this artifact's own scores on the holdout, not the trained model's
        own = artifact_scores(spec, model, trained.holdout)
        assert spec.drift_reference["score"] == score_reference(own)


# -- search space -----------------------------------------------------------------------------------


def test_space_with_the_new_families_and_its_grid() -> None:
    space = SearchSpace.from_json({"families": ["linear", "conv"], "kernels": [3, 5], "conv_levels": [1, 3]})
    grid = grid_of(space)
    assert grid["conv.kernel"] == [3, 5] and grid["conv.levels"] == [1, 2, 3]
    assert "linear.season" in grid and "conv.season" in grid
    # no parameter of a family the space does not name: it would only repeat candidates
    assert "forecaster.season" not in grid and "autoencoder.bottleneck" not in grid
    assert grid_size(grid) == 2 * 3 * 2 * 5 * 2 * 2 * 2 * 2 * 3 * 3 * 3 * 3  # was 6 times as many
    # the default space (MLP families) keeps the grid it had
    assert "conv.kernel" not in grid_of(SearchSpace())
    assert grid_size(grid_of(SearchSpace())) == 2 * 3 * 2 * 5 * 2 * 2 * 4 * 3 * 3 * 3 * 3
    from trainer.search.errors import SearchError

    with pytest.raises(SearchError, match="conv_levels"):
        SearchSpace.from_json({"conv_levels": [3, 1]})
    with pytest.raises(SearchError, match="families"):
        SearchSpace.from_json({"families": ["transformer"]})


def test_space_with_attention_its_grid_and_head_counts() -> None:
    from trainer.search.errors import SearchError
    from trainer.search.space import suggest

    space = SearchSpace.from_json({"families": ["attention"], "heads": [2, 3], "attention_widths": [8, 12]})
    grid = grid_of(space)
    assert grid["attention.heads"] == [2, 3] and grid["attention.width"] == [8, 12]
    assert "attention.season" in grid and "attention.heads" not in grid_of(SearchSpace())
    with pytest.raises(SearchError, match="attention_widths"):
        SearchSpace.from_json({"heads": [4], "attention_widths": [6]})

    class FixedTrial:  # answers each question with the named choice (or a range's low end)
        def __init__(self, choices: dict[str, object]) -> None:
            self.choices = choices

        def suggest_categorical(self, name: str, options: list[object]) -> object:
            return self.choices.get(name, options[0])

        def suggest_int(self, name: str, low: int, high: int) -> int:
            return int(self.choices.get(name, low))  # type: ignore[call-overload]

        def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
            return low

    def candidate(width: int, heads: int) -> ArchitectureSpec:
        trial = FixedTrial({"attention.width": width, "attention.heads": heads, "layers": 2})
        return suggest(trial, space, features=3).architecture

    assert candidate(12, 3).hidden == (12, 12) and candidate(12, 3).heads == 3
    # 3 does not divide 8: the largest head count of the space that does
    assert candidate(8, 3).heads == 2


def test_resume_reads_a_stored_space_without_the_attention_keys_as_the_defaults() -> None:
    from trainer.search.study import _space_with_defaults

    stored = SearchSpace().to_json()
    del stored["heads"], stored["attention_widths"]  # a study begun before the family
    assert _space_with_defaults(stored) == SearchSpace().to_json()
    changed = {**stored, "windows": [8]}
    assert _space_with_defaults(changed) != SearchSpace().to_json()


# -- through the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_host_metrics(generate_host_metrics(1200, seed=3), folder / "host.csv", folder / "host.labels.json")
    return folder / "host.csv"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linear", "conv", "attention"])
def test_train_family_through_the_cli_registers_int8_artifacts(family: str, host_csv: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    out = json.loads(edgefleet("train", "--data", str(host_csv), "--profile", "x86-64-v3", "--profile",
                               "rpi4-arm64", "--name", family, "--family", family, "--window", "16",
                               "--epochs", "2", "--registry", str(registry), "--json", "-q").stdout)
    assert out["architecture"]["family"] == family
    with Registry.open(registry) as reg:
        record = reg.get(family, out["version"])
        kinds = {(a.format, a.quantization) for a in record.artifacts}
        assert {("onnx", "int8"), ("tflite", "int8")} <= kinds
        for a in record.artifacts:
            spec, _ = read_bundle(reg.bundle(a.sha256))
            assert spec.lineage["datasets"][0]["file"] == "host.csv"
    assert ArchitectureSpec.from_json(record.architecture).family == family


@pytest.mark.slow
def test_search_over_linear_and_conv_runs_trials_of_both(host_csv: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.json"  # a grid of two points: one per family
    space.write_text(json.dumps({"families": ["linear", "conv"], "windows": [8], "widths": [8], "layers": [1, 1],
                                 "conv_levels": [2, 2], "seasons": ["off"], "centerings": ["window"], "bottlenecks": [4],
                                 "learning_rate": [1e-3, 1e-3], "weight_decay": [1e-5, 1e-5],
                                 "epochs": 2, "patience": 1, "batch_sizes": [64]}))
    registry = tmp_path / "reg"
    edgefleet("search", "--data", str(host_csv), "--name", "host", "--registry", str(registry),
              "--space", str(space), "--sampler", "grid", "--trials", "2", "--profile", "x86-64-v3", "-q")
    shown = json.loads(edgefleet("search", "show", "host", "--registry", str(registry), "--json").stdout)
    archs = [t["candidate"]["architecture"] for t in shown["trials"]]
    assert sorted(a["family"] for a in archs) == ["conv", "linear"]
    (conv,) = [a for a in archs if a["family"] == "conv"]
    assert conv["hidden"] == [8, 8] and conv["dilations"] == [1, 2] and conv["kernel"] == 3
    with Registry.open(registry) as reg:
        assert reg.get("host").architecture["family"] in ("linear", "conv")


@pytest.mark.slow
def test_search_trial_of_the_attention_family_registers_it(host_csv: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.json"  # a grid of one point
    space.write_text(json.dumps({"families": ["attention"], "windows": [8], "widths": [8], "layers": [1, 1],
                                 "heads": [2], "attention_widths": [8], "seasons": ["off"],
                                 "centerings": ["window"], "bottlenecks": [4], "learning_rate": [1e-3, 1e-3],
                                 "weight_decay": [1e-5, 1e-5], "epochs": 2, "patience": 1, "batch_sizes": [64]}))
    registry = tmp_path / "reg"
    edgefleet("search", "--data", str(host_csv), "--name", "host", "--registry", str(registry),
              "--space", str(space), "--sampler", "grid", "--trials", "1", "--profile", "x86-64-v3", "-q")
    shown = json.loads(edgefleet("search", "show", "host", "--registry", str(registry), "--json").stdout)
    (trial,) = shown["trials"]
    arch = trial["candidate"]["architecture"]
    assert arch["family"] == "attention" and arch["hidden"] == [8] and arch["heads"] == 2
    with Registry.open(registry) as reg:
        assert reg.get("host").architecture == arch
