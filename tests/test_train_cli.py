"""`edgefleet train` end to end through the real CLI: real files, SQLite, onnxruntime, LiteRT."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.bundle import read_bundle
from trainer.export import artifact_scores
from trainer.registry import Registry

pytestmark = pytest.mark.slow
NAB_FILE = "data/realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv"


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
def nab_model(nab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    registry = tmp_path_factory.mktemp("reg")
    out = edgefleet(
        "train", "--data", str(nab_dir / NAB_FILE), "--profile", "x86-64-v3", "--profile", "rpi4-arm64",
        "--name", "cpu", "--registry", str(registry), "--json",
    )
    return registry, json.loads(out.stdout)


def test_nab_training_registers_int8_onnx_and_tflite_with_parity(nab_model) -> None:
    registry, version = nab_model
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
    assert 0 < version["metrics"]["threshold"]


def test_bundles_reproduce_their_golden_vectors_in_the_real_runtimes(nab_model) -> None:
    registry, version = nab_model
    with Registry.open(registry) as reg:
        for a in version["artifacts"]:
            data = reg.bundle(a["sha256"])
            assert hashlib.sha256(data).hexdigest() == a["sha256"]
            spec, model = read_bundle(data)
            assert (spec.format, spec.quantization) == (a["format"], a["quantization"])
            windows = np.asarray(spec.golden.inputs, np.float32)
            assert windows.shape[1:] == (spec.window, len(spec.features))
            got = artifact_scores(spec, model, windows)
            np.testing.assert_allclose(got, spec.golden.outputs, rtol=spec.golden.rtol, atol=spec.golden.atol)
            assert spec.score.threshold == version["metrics"]["threshold"]
            assert spec.drift_reference["features"]["value"]["std"] > 0


def test_same_inputs_and_seed_give_the_same_bytes(nab_model, nab_dir: Path, tmp_path: Path) -> None:
    _, first = nab_model
    out = edgefleet(
        "train", "--data", str(nab_dir / NAB_FILE), "--profile", "x86-64-v3", "--profile", "rpi4-arm64",
        "--name", "cpu", "--registry", str(tmp_path), "--json", "-q",
    )
    second = json.loads(out.stdout)
    assert {a["sha256"] for a in second["artifacts"]} == {a["sha256"] for a in first["artifacts"]}


def test_registry_list_and_show(nab_model) -> None:
    registry, version = nab_model
    listed = json.loads(edgefleet("registry", "list", "--registry", str(registry), "--json").stdout)
    assert listed[0]["name"] == "cpu" and listed[0]["latest"] == 1
    shown = json.loads(edgefleet("registry", "show", "cpu@1", "--registry", str(registry), "--json").stdout)
    assert shown["artifacts"] == version["artifacts"]
    text = edgefleet("registry", "show", "cpu", "--registry", str(registry)).stdout
    assert "cpu@1" in text and "tflite" in text
    env = {**__import__("os").environ, "EDGEFLEET_REGISTRY": str(registry)}
    assert "cpu" in edgefleet("registry", "list", env=env).stdout


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
    proc = edgefleet("train", "--data", data, "--profile", profile, "--name", name,
                     "--registry", str(registry), *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert tree_digest(registry) == before


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
