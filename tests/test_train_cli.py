"""`edgefleet train` end to end through the real CLI: real files, SQLite, onnxruntime, LiteRT.

Registry, reproducibility and golden-vector tests train on synthetic host metrics
(:mod:`trainer.data.synthetic`); only the test of training on a real NAB series needs the
team's NAB data (marked ``nab``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.bundle import TensorSpec, read_bundle
from trainer.data import generate_host_metrics, write_host_metrics
from trainer.registry import Registry

pytestmark = pytest.mark.slow
NAB_FILE = "data/realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv"
PROFILES = ("--profile", "x86-64-v3", "--profile", "rpi4-arm64")


def edgefleet(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


def tree_digest(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def host_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic host metrics (4 features, labelled anomalies after the first 30%)."""
    folder = tmp_path_factory.mktemp("data")
    write_host_metrics(generate_host_metrics(1500, seed=3), folder / "host.csv", folder / "host.labels.json")
    return folder / "host.csv"


def _train_host(csv: Path, registry: Path) -> dict:
    out = edgefleet("train", "--data", str(csv), *PROFILES, "--name", "host", "--registry", str(registry),
                    "--epochs", "3", "--seed", "0", "--json", "-q")
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def host_model(host_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    registry = tmp_path_factory.mktemp("reg")
    return registry, _train_host(host_csv, registry)


@pytest.mark.nab
def test_nab_training_registers_int8_onnx_and_tflite_with_parity(nab_dir: Path, tmp_path: Path) -> None:
    out = edgefleet("train", "--data", str(nab_dir / NAB_FILE), *PROFILES, "--name", "cpu",
                    "--registry", str(tmp_path), "--json")
    version = json.loads(out.stdout)
    assert version["version"] == 1 and version["model"] == "cpu"
    for key in ("version", "metrics", "lineage", "artifacts"):
        assert key in version
    arts = {(a["format"], a["quantization"]): a for a in version["artifacts"]}
    assert set(arts) == {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")}
    for a in arts.values():
        for key in ("format", "quantization", "size_bytes", "sha256", "profiles", "parity"):
            assert key in a
        assert a["parity"]["passed"] and a["parity"]["windows"] > 100
    for fmt in ("onnx", "tflite"):
        ratio = arts[(fmt, "int8")]["size_bytes"] / arts[(fmt, "fp32")]["size_bytes"]
        assert ratio <= 0.30, f"{fmt} int8 is {ratio:.1%} of fp32"
    assert arts[("onnx", "int8")]["profiles"] == ["rpi4-arm64", "x86-64-v3"]
    assert arts[("tflite", "int8")]["profiles"] == ["rpi4-arm64"]  # x86-64-v3 allows ONNX only
    assert version["lineage"]["datasets"][0]["rows"] == 4032
    # 5-minute samples and enough rows: the default forecaster reads one day back
    assert version["architecture"]["season"] == 288 and version["architecture"]["centering"] == "window"
    assert 0 < version["metrics"]["threshold"]
    # and its score pipeline judges errors against a robust history, does not report what
    # happened at the same time the day before, and checks values against the training range
    pipeline = version["lineage"]["score_pipeline"]
    assert pipeline["kind"] == "edgefleet.likelihood/6" and pipeline["robust_history"] is True
    assert pipeline["robust_early"] is True and pipeline["range_tolerance"] == 0.05
    assert "value_range" not in pipeline and "prior" not in pipeline  # data, in the bundle only
    assert pipeline["season"] == 288


@pytest.mark.nab
def test_seasonal_repeats_can_be_left_out(nab_dir: Path, tmp_path: Path) -> None:
    out = edgefleet("train", "--data", str(nab_dir / NAB_FILE), "--profile", "x86-64-v3", "--name", "cpu",
                    "--registry", str(tmp_path), "--epochs", "2", "--no-seasonal-repeats",
                    "--no-robust-history", "--no-range-check", "--json")
    version = json.loads(out.stdout)
    assert version["architecture"]["season"] == 288  # the model still reads a day back
    assert version["lineage"]["score_pipeline"]["kind"] == "edgefleet.likelihood/1"


# -- golden vectors, checked without edgefleet's runtime code ----------------------------------
# The trainer computes the golden outputs with edge_agent.runtime; checking them with that same
# code would prove nothing. A bare onnxruntime session and a bare LiteRT interpreter, fed as
# the bundle's TensorSpecs say, must reproduce them.

_ORT_TYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(int16)": "int16", "tensor(uint16)": "uint16"}


def _to_model(x: np.ndarray, ts: TensorSpec) -> np.ndarray:
    """Real values as the model's input tensor: affine-quantized when the spec says integer."""
    dtype = np.dtype(ts.dtype)
    if dtype.kind == "f":
        return x.astype(dtype)
    assert ts.quantization, f"integer tensor {ts.name} without quantization params in spec.json"
    info = np.iinfo(dtype)
    q = np.round(x / ts.quantization["scale"]) + ts.quantization["zero_point"]
    return np.clip(q, info.min, info.max).astype(dtype)


def _from_model(y: np.ndarray, ts: TensorSpec) -> np.ndarray:
    """The model's output tensor as real values (dequantized when the spec says integer)."""
    if np.dtype(ts.dtype).kind == "f":
        return y.astype(np.float64)
    assert ts.quantization, f"integer tensor {ts.name} without quantization params in spec.json"
    return (y.astype(np.float64) - ts.quantization["zero_point"]) * ts.quantization["scale"]


def _onnxruntime_scores(model: bytes, ins: TensorSpec, outs: TensorSpec, windows: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, _ORT_TYPES[inp.type]) == (ins.name, ins.dtype)
    assert tuple(d if isinstance(d, int) else None for d in inp.shape) == ins.shape
    assert (out.name, _ORT_TYPES[out.type]) == (outs.name, outs.dtype)
    (y,) = session.run([out.name], {inp.name: _to_model(windows, ins)})
    return _from_model(np.asarray(y).reshape(len(windows)), outs)


def _litert_scores(model: bytes, ins: TensorSpec, outs: TensorSpec, windows: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert np.dtype(inp["dtype"]) == np.dtype(ins.dtype) and tuple(inp["shape"]) == ins.shape
    assert np.dtype(out["dtype"]) == np.dtype(outs.dtype) and tuple(out["shape"]) == outs.shape
    scores = []
    for window in windows:  # the exported graph's batch is fixed (spec shape says so)
        interpreter.set_tensor(inp["index"], _to_model(window.reshape(ins.shape), ins))
        interpreter.invoke()
        scores.append(_from_model(interpreter.get_tensor(out["index"]), outs).item())
    return np.asarray(scores)


def test_bundles_reproduce_their_golden_vectors_in_bare_runtimes(host_model) -> None:
    registry, version = host_model
    seen = set()
    with Registry.open(registry) as reg:
        for a in version["artifacts"]:
            data = reg.bundle(a["sha256"])
            assert hashlib.sha256(data).hexdigest() == a["sha256"]
            spec, model = read_bundle(data)
            assert (spec.format, spec.quantization) == (a["format"], a["quantization"])
            (ins,), (outs,) = spec.inputs, spec.outputs
            windows = np.asarray(spec.golden.inputs, np.float32)
            assert windows.shape[1:] == (spec.window, len(spec.features)) == ins.shape[1:]
            score = _onnxruntime_scores if spec.format == "onnx" else _litert_scores
            got = score(model, ins, outs, windows)
            np.testing.assert_allclose(got, spec.golden.outputs, rtol=spec.golden.rtol, atol=spec.golden.atol)
            assert spec.score.threshold == version["metrics"]["threshold"]
            assert all(spec.drift_reference["features"][f]["std"] > 0 for f in spec.features)
            seen.add((spec.format, spec.quantization))
    assert seen == {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")}


def test_same_inputs_and_seed_give_the_same_bytes(host_model, host_csv: Path, tmp_path: Path) -> None:
    _, first = host_model
    second = _train_host(host_csv, tmp_path)
    assert {a["sha256"] for a in second["artifacts"]} == {a["sha256"] for a in first["artifacts"]}


def test_registry_list_and_show(host_model) -> None:
    registry, version = host_model
    listed = json.loads(edgefleet("registry", "list", "--registry", str(registry), "--json").stdout)
    assert listed[0]["name"] == "host" and listed[0]["latest"] == 1
    shown = json.loads(edgefleet("registry", "show", "host@1", "--registry", str(registry), "--json").stdout)
    assert shown["artifacts"] == version["artifacts"]
    text = edgefleet("registry", "show", "host", "--registry", str(registry)).stdout
    assert "host@1" in text and "tflite" in text
    assert "recipe batch_size=64 epochs=" in text  # the recipe behind the version
    env = {**__import__("os").environ, "EDGEFLEET_REGISTRY": str(registry)}
    assert "host" in edgefleet("registry", "list", env=env).stdout


def test_a_reader_that_goes_away_is_not_an_error(host_model) -> None:
    registry, _ = host_model
    # `edgefleet registry show host@1 | head -0`: the reader is gone before the first line
    # (closed before the interpreter has even started, so every write meets a closed pipe)
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "registry", "show", "host@1",
                             "--registry", str(registry)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0 and "Traceback" not in err, err


def test_profiles_commands() -> None:
    names = [p["name"] for p in json.loads(edgefleet("profiles", "list", "--json").stdout)]
    for required in ("x86-64-v3", "x86-64-v4-vnni", "rpi5-arm64", "rpi4-arm64", "cortex-a53", "jetson-orin-nano-cpu"):
        assert required in names
    assert "Cortex-A72" in edgefleet("profiles", "show", "rpi4-arm64").stdout


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("timestamp,value\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    t = np.arange(400)
    vals = 10 + np.sin(t / 10)
    return _csv(tmp_path / "ok.csv", [f"2026-01-01 00:{i // 60:02d}:{i % 60:02d},{v:.4f}" for i, v in zip(t, vals)])


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "cannot read"),
        ("malformed", "non-numeric value"),
        ("profile", "unknown firmware profile"),
        ("short", "too few"),
        ("nan", "no numeric value"),
        ("fraction", "--train-fraction"),
        ("name", "bad model name"),
        ("season_rows", "too few for --season 500"),
        ("season_family", "needs a forecasting family"),
        ("season_word", "expected auto, off or a positive number of rows"),
    ],
)
def test_bad_input_one_line_exit_2_registry_unchanged(case: str, needle: str, tmp_path: Path, small_csv: Path) -> None:
    registry = tmp_path / "reg"
    edgefleet("train", "--data", str(small_csv), "--profile", "x86-64-v3", "--name", "ok",
              "--registry", str(registry), "--epochs", "1", "-q")
    before = tree_digest(registry)
    data, profile, name, extra = str(small_csv), "x86-64-v3", "m", []
    if case == "missing":
        data = str(tmp_path / "nope.csv")
    elif case == "malformed":
        data = str(_csv(tmp_path / "bad.csv", ["2026-01-01 00:00:00,1", "2026-01-01 00:05:00,oops"]))
    elif case == "profile":
        profile = "esp32-nope"
    elif case == "short":
        data = str(_csv(tmp_path / "short.csv", [f"2026-01-01 00:{i:02d}:00,{i}" for i in range(20)]))
    elif case == "nan":
        data = str(_csv(tmp_path / "nan.csv", [f"2026-01-01 00:{i:02d}:00,nan" for i in range(50)]))
    elif case == "fraction":
        extra = ["--train-fraction", "1.5"]
    elif case == "name":
        name = "../evil"
    elif case == "season_rows":
        extra = ["--season", "500"]
    elif case == "season_family":
        extra = ["--family", "autoencoder", "--season", "100"]
    elif case == "season_word":
        extra = ["--season", "daily"]
    proc = edgefleet("train", "--data", data, "--profile", profile, "--name", name,
                     "--registry", str(registry), *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert tree_digest(registry) == before


def test_sort_dedupe_repairs_the_order_says_so_and_keeps_it_in_the_lineage(tmp_path: Path, small_csv: Path) -> None:
    lines = small_csv.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rows[10], rows[11] = rows[11], rows[10]  # one row out of order
    rows[20:20] = [rows[19], rows[19]]  # a timestamp three times
    messy = tmp_path / "messy.csv"
    messy.write_text("\n".join([header, *rows]) + "\n")
    registry = tmp_path / "reg"
    train = ["train", "--data", str(messy), "--profile", "x86-64-v3", "--name", "m",
             "--registry", str(registry), "--epochs", "1", "--json", "-q"]
    refused = edgefleet(*train, check=False)
    assert refused.returncode == 2 and not registry.exists()
    assert refused.stderr.splitlines() == [
        f"edgefleet: error: {messy}:13: timestamp {rows[11].split(',')[0]!r} is earlier than "
        f"{rows[10].split(',')[0]!r} on line 12; rows must be in time order with distinct "
        "timestamps (or pass --sort-dedupe)"
    ]
    proc = edgefleet(*train, "--sort-dedupe")
    assert proc.stderr.splitlines()[0] == (  # printed even with -q; parity notes may follow
        "messy.csv: --sort-dedupe moved 1 row(s) into time order and dropped 2 row(s) repeating a timestamp"
    )
    dataset = json.loads(proc.stdout)["lineage"]["datasets"][0]
    assert dataset["time_order"] == {"moved": 1, "dropped": 2}
    assert dataset["rows"] == 400 and dataset["first"] < dataset["last"]


def test_only_the_rows_trained_on_must_be_in_time_order(tmp_path: Path, small_csv: Path) -> None:
    from trainer.pipeline import TrainError, TrainRequest, prepare

    lines = small_csv.read_text().splitlines()
    lines.insert(351, lines[350])  # a repeated timestamp at row 350 of 400
    late = tmp_path / "late.csv"
    late.write_text("\n".join(lines) + "\n")

    def request(fraction: float) -> TrainRequest:
        return TrainRequest(data=[late], profiles=["x86-64-v3"], name="m", train_fraction=fraction)

    assert prepare(request(0.5)).datasets[0]["rows_used"] == 200  # rows past 200 are not read
    with pytest.raises(TrainError, match=r"late.csv:352: timestamp .* repeats .* on line 351"):
        prepare(request(1.0))


def test_unknown_version_and_missing_registry_are_usage_errors(tmp_path: Path) -> None:
    proc = edgefleet("registry", "show", "cpu@1", "--registry", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and "no registry" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "none").exists()


def test_multivariate_synthetic_data_and_train_fraction(tmp_path: Path) -> None:
    csv = tmp_path / "host.csv"
    edgefleet("data", "synth", "--out", str(csv), "--rows", "1500", "--seed", "4")
    out = json.loads(edgefleet("train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host",
                               "--registry", str(tmp_path / "reg"), "--epochs", "3",
                               "--train-fraction", "0.5", "--json", "-q").stdout)
    assert out["lineage"]["datasets"][0]["rows_used"] == 750
    assert out["architecture"]["features"] == 4
    spec, _ = read_bundle(Registry.open(tmp_path / "reg").bundle(out["artifacts"][0]["sha256"]))
    assert spec.features == ("cpu", "memory", "disk", "network")


def test_two_train_processes_at_once_do_not_corrupt_the_registry(small_csv: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--data", str(small_csv), "--profile", "x86-64-v3",
           "--name", "race", "--registry", str(registry), "--epochs", "2", "--json", "-q"]
    procs = [subprocess.Popen([*cmd, "--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(json.loads(o[0])["version"] for o in outs) == [1, 2]
    with Registry.open(registry) as reg:
        assert [v.version for v in reg.versions("race")] == [1, 2]
        assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for v in reg.versions("race"):
            for a in v.artifacts:
                read_bundle(reg.bundle(a.sha256))
