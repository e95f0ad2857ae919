"""``edgefleet compress`` end to end through the real CLI: a version trained on synthetic host
metrics, compressed by real recipes, its artifacts checked against their golden vectors in
the agent's runtimes (onnxruntime and LiteRT) and against the torch model rebuilt from the
registered spec and weights; the quality gate and bad input leave the registry unchanged.

Sizes and parameter counts are asserted, never times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import edgefleet

from edge_agent.runtime import open_runtime
from edge_agent.runtime._base import smoke_test
from shared.bundle import read_bundle
from trainer.data import generate_host_metrics, write_host_metrics
from trainer.export.parity import TOLERANCES
from trainer.models import ArchitectureSpec, load_weights, parameter_count, score_windows
from trainer.registry import Registry

pytestmark = pytest.mark.slow
PROFILE = ("--profile", "rpi4-arm64")  # LiteRT preferred, onnxruntime allowed: both runtimes


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """host@1: the default forecaster trained 3 epochs on synthetic host metrics (registry, CSV)."""
    folder = tmp_path_factory.mktemp("compress")
    csv = folder / "host.csv"
    write_host_metrics(generate_host_metrics(1500, seed=3), csv, folder / "host.labels.json")
    registry = folder / "reg"
    edgefleet("train", "--data", str(csv), *PROFILE, "--name", "host", "--registry", str(registry),
              "--epochs", "3", "-q")
    return registry, csv


def compress(host: tuple[Path, Path], ref: str, recipe: str, *extra: str, check: bool = True):
    registry, csv = host
    return edgefleet("compress", ref, "--recipe", recipe, *PROFILE, "--data", str(csv),
                     "--registry", str(registry), *extra, check=check)


def check_artifacts(registry: Path, name: str, version: int) -> dict[tuple[str, str], tuple]:
    """Every artifact of ``name@version`` passes its golden vectors in the agent's runtime, and
    scores them as the torch model rebuilt from the registered spec and weights does."""
    with Registry.open(registry) as reg:
        record = reg.get(name, version)
        model = load_weights(ArchitectureSpec.from_json(record.architecture), reg.weights(record))
        bundles = {(a.format, a.quantization): read_bundle(reg.bundle(a.sha256)) for a in record.artifacts}
    assert bundles
    for (fmt, quant), (spec, model_bytes) in bundles.items():
        runtime = open_runtime(spec, model_bytes, threads=1)
        try:
            smoke_test(runtime, spec)
            golden = np.asarray(spec.golden.inputs, np.float32)
            got = runtime.score(golden)
        finally:
            runtime.close()
        want = score_windows(model, golden)
        bound = TOLERANCES[quant].max_rel_error * spec.score.threshold
        assert np.max(np.abs(got - want)) <= bound, (fmt, quant)
    return bundles


@pytest.fixture(scope="module")
def pruned(host: tuple[Path, Path]) -> dict:
    """host@1 compressed by prune:0.5,finetune:5,quantize:int8: compress's --json output."""
    return json.loads(compress(host, "host@1", "prune:0.5,finetune:5,quantize:int8", "--json").stdout)


def test_prune_finetune_int8_registers_a_smaller_version_with_lineage(host: tuple[Path, Path], pruned: dict) -> None:
    registry, _ = host
    obj = pruned
    two_ref = obj["ref"]
    assert two_ref == f"host@{obj['version']}" and obj["version"] > 1
    lineage = obj["lineage"]
    assert lineage["parent_version"] == 1
    assert lineage["compression"]["parent"] == "host@1"
    assert lineage["compression"]["recipe"] == "prune:0.5:magnitude:layer,finetune:5,quantize:int8"
    # the parent's training figures are not claimed for the compressed model
    assert not {"best_epoch", "epochs_run", "val_loss", "train_seconds"} & set(obj["metrics"])
    assert "search" not in lineage
    assert {(a["format"], a["quantization"]) for a in obj["artifacts"]} == {("onnx", "int8"), ("tflite", "int8")}
    rows = {r["step"]: r for r in obj["rows"]}
    assert list(rows) == ["parent", "prune:0.5:magnitude:layer", "finetune:5", "quantize:int8"]
    parent, shipped = rows["parent"], rows["quantize:int8"]
    assert (shipped["format"], shipped["quantization"]) == ("tflite", "int8")  # what rpi4-arm64 runs
    # the default forecaster's hidden layers (512, 64) lose half their neurons
    assert shipped["parameters"] < 0.5 * parent["parameters"]
    assert shipped["flops"] < 0.5 * parent["flops"]
    assert shipped["model_bytes"] < 0.6 * parent["model_bytes"]
    assert shipped["deflated_bytes"] < shipped["model_bytes"]
    for r in obj["rows"]:
        assert r["parity_passed"] and r["latency_p99_ms"] > 0 and 0 <= r["agreement"] <= 1
    with Registry.open(registry) as reg:
        one, two = reg.get("host", 1), reg.get("host", obj["version"])
    sizes = {(a.format, a.quantization): a.model_bytes for a in one.artifacts}
    for a in two.artifacts:
        assert a.model_bytes < 0.6 * sizes[(a.format, a.quantization)]
    bundles = check_artifacts(registry, "host", obj["version"])
    spec, _ = bundles[("tflite", "int8")]
    assert spec.architecture["layers"]  # the pruned shapes, recorded in the spec
    with Registry.open(registry) as reg:
        model = load_weights(ArchitectureSpec.from_json(two.architecture), reg.weights(two))
    assert parameter_count(model) == shipped["parameters"]
    shown = edgefleet("registry", "show", two_ref, "--registry", str(registry)).stdout
    assert "parent version 1" in shown
    assert "compressed from host@1 by prune:0.5:magnitude:layer,finetune:5,quantize:int8" in shown


def test_a_compressed_version_compresses_again_low_rank_then_sparsity(host: tuple[Path, Path], pruned: dict) -> None:
    """The pruned version → low rank, fine-tuning, unstructured sparsity, fp32 artifacts."""
    registry, _ = host
    out = compress(host, pruned["ref"], "lowrank:0.8,finetune:2,sparsify:0.6,quantize:fp32", "--json")
    obj = json.loads(out.stdout)
    version = obj["version"]
    assert obj["lineage"]["parent_version"] == pruned["version"]
    rows = {r["step"]: r for r in obj["rows"]}
    low, sparse = rows["lowrank:0.8"], rows["sparsify:0.6"]
    assert low["parameters"] < rows["parent"]["parameters"]
    assert any(len(shape) == 3 for shape in obj["architecture"]["layers"].values())  # factorized pairs
    # masks: same shapes, same operations; 60% zeros shrink only the deflated file
    assert sparse["parameters"] == rows["finetune:2"]["parameters"]
    assert sparse["flops"] == rows["finetune:2"]["flops"]
    assert sparse["nonzero_parameters"] < 0.45 * sparse["parameters"]
    assert sparse["latency_changes"] is False
    assert sparse["deflated_bytes"] < 0.75 * rows["finetune:2"]["deflated_bytes"]
    assert {(a["format"], a["quantization"]) for a in obj["artifacts"]} == {("onnx", "fp32"), ("tflite", "fp32")}
    check_artifacts(registry, "host", version)


def test_distillation_into_a_smaller_student_with_dynamic_quantization(host: tuple[Path, Path]) -> None:
    registry, _ = host
    obj = json.loads(compress(host, "host@1", "distill:64-16:epochs=3,quantize:dynamic", "--json").stdout)
    assert obj["architecture"]["hidden"] == [64, 16] and "layers" not in obj["architecture"]
    student = obj["rows"][-1]
    assert student["parameters"] < 0.15 * obj["rows"][0]["parameters"]
    assert student["scheme"] == "dynamic"
    bundles = check_artifacts(registry, "host", obj["version"])
    assert {spec.extra.get("quantization_scheme") for spec, _ in bundles.values()} == {"dynamic"}


def test_quality_gate_refuses_a_step_that_loses_too_much_and_registers_nothing(host: tuple[Path, Path]) -> None:
    registry, _ = host
    before = tree_digest(registry)
    proc = compress(host, "host@1", "prune:0.9,quantize:int8", "--max-quality-drop", "0.05", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "step prune:0.9:magnitude:layer lost" in last and "--max-quality-drop 0.05" in last
    assert "nothing registered" in last
    assert tree_digest(registry) == before
    # the same recipe with room for its drop goes through
    ok = compress(host, "host@1", "prune:0.9,quantize:int8", "--max-quality-drop", "100", "--json")
    assert json.loads(ok.stdout)["lineage"]["compression"]["recipe"].startswith("prune:0.9")


@pytest.mark.parametrize("args, words", [
    (("host@1", "--recipe", "prune:2"), "prune: the ratio must be in (0, 1), got 2"),
    (("host@1", "--recipe", "shrink:0.5"), "unknown step 'shrink'"),
    (("host@1", "--recipe", "quantize:int8,finetune:1"), "quantize must be the last step"),
    (("host@9", "--recipe", "finetune:1"), "no version host@9"),
    (("host", "--recipe", "finetune:1"), "name the version to compress: host@N"),
    (("host@1", "--recipe", "finetune:1", "--max-quality-drop", "-1"), "must be a number >= 0"),
    (("host@1", "--recipe", "quantize:int8", "--profile", "no-such-board"), "no-such-board"),
    (("host@1", "--recipe", "distill:front,quantize:int8"), "distill:front: the model was not registered by edgefleet search"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(host: tuple[Path, Path], args: tuple, words: str) -> None:
    registry, csv = host
    before = tree_digest(registry)
    proc = edgefleet("compress", *args, "--profile", "rpi4-arm64", "--data", str(csv), "--registry", str(registry),
                     check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]
    assert tree_digest(registry) == before


def test_pruning_a_linear_model_is_refused_before_any_work(host: tuple[Path, Path], tmp_path: Path) -> None:
    _, csv = host
    registry = tmp_path / "reg"
    edgefleet("train", "--data", str(csv), *PROFILE, "--name", "lin", "--family", "linear",
              "--registry", str(registry), "--epochs", "1", "-q")
    before = tree_digest(registry)
    proc = edgefleet("compress", "lin@1", "--recipe", "prune:0.5", *PROFILE, "--data", str(csv),
                     "--registry", str(registry), check=False)
    assert proc.returncode == 2 and "nothing to prune" in proc.stderr
    assert tree_digest(registry) == before


SPACE = {"windows": [16], "widths": [16, 32], "bottlenecks": [4], "layers": [1, 1],
         "epochs": 3, "patience": 2, "batch_sizes": [64]}


def test_search_compresses_its_winners_with_the_same_recipes(host: tuple[Path, Path], tmp_path: Path) -> None:
    _, csv = host
    (tmp_path / "space.json").write_text(json.dumps(SPACE))
    registry = tmp_path / "reg"
    common = ("search", "--data", str(csv), "--name", "small", "--registry", str(registry), "--space",
              str(tmp_path / "space.json"), *PROFILE, "--trials", "2")
    bad = edgefleet(*common, "--compress", "prune:0.5,quantize:int4", check=False)
    assert bad.returncode == 2 and "--compress: quantize needs one of" in bad.stderr
    assert not registry.exists()
    out = json.loads(edgefleet(*common, "--compress", "prune:0.5,finetune:2,quantize:int8", "--json").stdout)
    (winner,), (small,) = out["versions"], out["compressed"]
    assert small["lineage"]["parent_version"] == winner["version"]
    assert small["lineage"]["compression"]["parent"] == winner["ref"]
    rows = small["lineage"]["compression"]["steps"]
    assert rows[-1]["parameters"] < rows[0]["parameters"]
    check_artifacts(registry, "small", small["version"])


def test_distill_front_takes_the_smallest_front_member_as_student(host: tuple[Path, Path], tmp_path: Path) -> None:
    """distill:front on the largest member of a search front trains a student with the widths
    of the member with the smallest artifact (itself when the front holds one)."""
    _, csv = host
    (tmp_path / "space.json").write_text(json.dumps({**SPACE, "widths": [8, 64], "families": ["forecaster"]}))
    registry = tmp_path / "reg"
    out = json.loads(edgefleet("search", "--data", str(csv), "--name", "f", "--registry", str(registry), "--space",
                               str(tmp_path / "space.json"), *PROFILE, "--trials", "6", "--objectives",
                               "quality,size", "--register", "front", "--json").stdout)
    sizes = {}
    for v in out["versions"]:
        size = max(a["model_bytes"] for a in v["artifacts"] if a["quantization"] == "int8")
        sizes[v["version"]] = (size, tuple(v["architecture"]["hidden"]))
    largest = max(sizes, key=lambda k: sizes[k][0])
    smallest = min(sizes.values())
    obj = json.loads(edgefleet("compress", f"f@{largest}", "--recipe", "distill:front,quantize:int8", *PROFILE,
                               "--data", str(csv), "--registry", str(registry), "--json").stdout)
    assert tuple(obj["architecture"]["hidden"]) == smallest[1]
    assert obj["lineage"]["compression"]["recipe"].startswith(f"distill:{'-'.join(map(str, smallest[1]))}:")
    assert any(n.startswith("distill:front took widths") for n in obj["notes"])
    check_artifacts(registry, "f", obj["version"])


def test_search_leaves_a_winner_the_recipe_cannot_apply_to_uncompressed(host: tuple[Path, Path], tmp_path: Path) -> None:
    """A linear winner has nothing to prune: it stays registered uncompressed, with a note."""
    _, csv = host
    (tmp_path / "space.json").write_text(json.dumps({**SPACE, "families": ["linear"]}))
    registry = tmp_path / "reg"
    proc = edgefleet("search", "--data", str(csv), "--name", "lin", "--registry", str(registry), "--space",
                     str(tmp_path / "space.json"), *PROFILE, "--trials", "1", "--compress",
                     "prune:0.5,quantize:int8", "--json")
    out = json.loads(proc.stdout)
    assert len(out["versions"]) == 1 and out["compressed"] == []
    assert f"{out['versions'][0]['ref']} left uncompressed: prune: the linear family" in proc.stderr


def test_a_version_registered_without_weights_is_refused(host: tuple[Path, Path], tmp_path: Path) -> None:
    _, csv = host
    registry = tmp_path / "reg"
    with Registry.open(registry, create=True) as reg:  # as versions from before the registry kept weights
        reg.register("old", metrics={}, params={}, lineage={}, architecture={}, artifacts=[])
    before = tree_digest(registry)
    proc = edgefleet("compress", "old@1", "--recipe", "quantize:int8", *PROFILE, "--data", str(csv),
                     "--registry", str(registry), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "edgefleet: error: old@1 was registered without its model weights (by an older edgefleet): "
        "train it again to compress or fine-tune it"]
    assert tree_digest(registry) == before


def test_with_labels_the_quality_is_the_nab_score(host: tuple[Path, Path], tmp_path: Path) -> None:
    """NAB windows of the generated anomalies: steps train on NAB's probationary rows, and the
    quality is NAB's standard score (0-100) of each artifact's own decisions."""
    _, csv = host
    anomalies = json.loads((csv.parent / "host.labels.json").read_text())["anomalies"]
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"host.csv": [[a["start_time"], a["end_time"]] for a in anomalies]}))
    registry = tmp_path / "reg"
    edgefleet("train", "--data", str(csv), *PROFILE, "--name", "lab", "--window", "16", "--season", "off",
              "--registry", str(registry), "--epochs", "2", "-q")
    obj = json.loads(edgefleet("compress", "lab@1", "--recipe", "sparsify:0.5,quantize:int8", *PROFILE,
                               "--data", str(csv), "--labels", str(labels), "--registry", str(registry),
                               "--json").stdout)
    compression = obj["lineage"]["compression"]
    assert compression["quality"] == "nab_standard"
    assert compression["datasets"][0]["rows_used"] == 225  # NAB's probationary 15% of 1500 rows
    parent = obj["rows"][0]
    assert parent["step"] == "parent" and 0 < parent["quality"] <= 100
    check_artifacts(registry, "lab", 2)


def test_a_tree_family_version_is_refused_in_one_line(host: tuple[Path, Path], tmp_path: Path) -> None:
    _, csv = host
    registry = tmp_path / "reg"
    edgefleet("train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "forest", "--family", "trees",
              "--registry", str(registry), "-q")
    with Registry.open(registry) as reg:
        assert reg.get("forest", 1).weights is None  # a tree ensemble has no torch weights
    before = tree_digest(registry)
    proc = edgefleet("compress", "forest@1", "--recipe", "quantize:int8", "--profile", "x86-64-v3",
                     "--data", str(csv), "--registry", str(registry), check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "forest@1 is a trees model: compress works on the torch families" in line
    assert tree_digest(registry) == before


@pytest.mark.nab
def test_evaluate_compress_reports_the_compressed_models_and_the_change(nab_dir: Path, tmp_path: Path) -> None:
    """``evaluate --compress``: each series' trained model is compressed on its probationary
    rows; the compressed version is what is detected with, the uncompressed one beside it."""
    from trainer.evaluation.harness import EvaluateRequest, evaluate, summarize
    from trainer.evaluation.nab import PROFILES

    data = tmp_path / "realAWSCloudwatch"
    data.mkdir()
    name = "rds_cpu_utilization_cc0c53.csv"
    (data / name).write_bytes((nab_dir / "data" / "realAWSCloudwatch" / name).read_bytes())
    request = EvaluateRequest(data=tmp_path, labels=nab_dir / "labels" / "combined_windows.json",
                              train_options={"epochs": 3}, compress="prune:0.5,finetune:2,quantize:int8")
    (result,) = evaluate(request)
    assert result.parent is not None
    assert result.model.endswith("@2") and result.parent.model.endswith("@1")
    assert result.artifact == "onnx/int8"
    assert len(result.is_anomaly) == len(result.parent.is_anomaly) == len(result.series)
    report = summarize([result])
    assert report.compress is not None and report.compress["not_compressed"] == []
    # a series the recipe could not compress counts with its uncompressed model, listed with the reason
    kept = dataclasses.replace(result.parent, key="other.csv", parent=result.parent, compress_error="why")
    both = summarize([result, kept]).compress
    assert both is not None and both["not_compressed"] == [{"key": "other.csv", "reason": "why"}]
    for profile in PROFILES:
        before = report.compress["parent_nab"][profile]["optimized"]
        assert report.compress["change"][profile]["optimized"] == pytest.approx(report.nab[profile]["optimized"] - before)
    # and without --compress the report carries no compress part
    assert summarize([result.parent]).compress is None


@pytest.mark.nab
def test_evaluate_compress_that_applies_to_no_series_is_one_clear_error(nab_dir: Path, tmp_path: Path) -> None:
    """A recipe no trained model can take (pruning a linear forecaster) fails in one line; a
    series whose model it cannot take is otherwise evaluated uncompressed and listed."""
    from trainer.evaluation.harness import EvaluateError, EvaluateRequest, evaluate

    labels = nab_dir / "labels" / "combined_windows.json"
    jumps = tmp_path / "art_daily_jumpsup.csv"
    jumps.write_bytes((nab_dir / "data" / "artificialWithAnomaly" / jumps.name).read_bytes())
    with pytest.raises(EvaluateError, match=r"--compress prune:0.5 applied to no series: .*art_daily_jumpsup.csv: "
                                            r".*prune: the linear family has one layer"):
        evaluate(EvaluateRequest(data=jumps, labels=labels, train_options={"epochs": 2, "family": "linear"},
                                 compress="prune:0.5"))
