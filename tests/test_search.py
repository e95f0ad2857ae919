"""`edgefleet search` end to end through the real CLI: real data, Optuna on SQLite, torch,
litert-torch/onnxruntime exports measured in their runtimes, the registry.

Tiny spaces (windows 8-16, widths 8-16, 3 epochs) and 2-3 trials keep each search short.
The labelled search reads the team's NAB data (marked ``nab``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cli import edgefleet

from shared.bundle import read_bundle
from shared.profiles import load_profile
from trainer.data import generate_host_metrics, write_host_metrics
from trainer.registry import Registry

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
NAB_FILE = "data/realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv"
SPACE = {"windows": [8, 16], "widths": [8, 16], "bottlenecks": [4], "layers": [1, 1],
         "epochs": 3, "patience": 2, "batch_sizes": [64]}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic host metrics and the tiny search space."""
    w = tmp_path_factory.mktemp("search")
    write_host_metrics(generate_host_metrics(1200, seed=3), w / "host.csv", w / "host.labels.json")
    (w / "space.json").write_text(json.dumps(SPACE))
    return w


def _search(work: Path, registry: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return edgefleet("search", "--data", str(work / "host.csv"), "--name", "host", "--registry", str(registry),
                     "--space", str(work / "space.json"), *extra, check=check)


def test_unlabelled_search_registers_an_rpi4_int8_tflite_that_meets_every_rpi4_budget(work: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    proc = _search(work, registry, "--profile", "rpi4-arm64", "--trials", "2", "--json")
    assert "search host: 2/2 trials" in proc.stderr
    out = json.loads(proc.stdout)
    (version,) = out["versions"]
    search = version["lineage"]["search"]
    assert search["study"] == "host"
    assert search["candidate"]["architecture"] == version["architecture"]
    assert search["candidate"]["recipe"] == version["lineage"]["recipe"]
    profile = load_profile("rpi4-arm64")
    with Registry.open(registry) as reg:
        record = reg.get("host", version["version"])
        (art,) = [a for a in record.artifacts if (a.format, a.quantization) == ("tflite", "int8")]
        bundle = reg.bundle(art.sha256)
    assert "rpi4-arm64" in art.profiles
    spec, model = read_bundle(bundle)
    assert len(model) <= profile.budget.model_flash_kb * 1024
    # what the search measured for that profile (latency scaled by its speed_factor, the
    # runtime's RAM): recorded in the lineage and within every budget. (Not measured again
    # here: a test does not assert timings of a shared machine.)
    (hw,) = [h for h in search["hardware"] if (h["profile"], h["format"], h["quantization"])
             == ("rpi4-arm64", "tflite", "int8")]
    assert hw["failures"] == [] and all(c <= 0 for c in hw["constraints"])
    assert hw["latency_p99_ms"] <= profile.budget.latency_p99_ms
    assert hw["model_ram_mb"] <= profile.budget.model_ram_mb
    assert hw["artifact_bytes"] <= profile.budget.model_flash_kb * 1024
    shown = json.loads(edgefleet("search", "show", "host", "--registry", str(registry), "--json").stdout)
    assert [t["trial"] for t in shown["trials"]] and shown["trials"][0]["candidate"]
    # the registered trial is the best of those that meet the rpi4 budgets
    feasible = [t for t in shown["trials"] if t["feasible"]["rpi4-arm64"]]
    assert search["trial"] == max(feasible, key=lambda t: t["values"][0])["trial"]


@pytest.mark.nab
def test_labelled_search_on_a_nab_file(nab_dir: Path, tmp_path: Path, work: Path) -> None:
    registry = tmp_path / "reg"
    edgefleet("search", "--data", str(nab_dir / NAB_FILE), "--labels", str(nab_dir / "labels/combined_windows.json"),
              "--profile", "x86-64-v3", "--name", "cpu", "--registry", str(registry), "--trials", "2",
              "--space", str(work / "space.json"), "-q")
    shown = json.loads(edgefleet("search", "show", "cpu", "--registry", str(registry), "--json").stdout)
    assert len(shown["trials"]) == 2
    assert all("nab_standard" in t["quality_details"] for t in shown["trials"])
    with Registry.open(registry) as reg:
        record = reg.get("cpu")
    assert record.lineage["search"]["values"][0] == max(t["values"][0] for t in shown["trials"])
    # retrained, as its candidates were, on each file's own probationary rows
    assert record.lineage["train_fraction"] == "probation"


def test_impossible_budget_exits_2_and_registers_nothing(work: Path, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (REPO_ROOT / "firmware_profiles" / "x86-64-v3.toml").read_text()
    text = text.replace('name = "x86-64-v3"', 'name = "tiny-mcu"')
    lines = [("latency_p99_ms = 0.00001" if line.startswith("latency_p99_ms") else line) for line in text.splitlines()]
    (profiles / "tiny-mcu.toml").write_text("\n".join(lines) + "\n")
    registry = tmp_path / "reg"
    proc = _search(work, registry, "--profile", "tiny-mcu", "--profiles-dir", str(profiles), "--trials", "2", "-q",
                   check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no candidate" in lines[0] and "latency_p99_ms exceeded by 2" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (registry / "registry.sqlite").exists()


def test_an_interrupted_study_resumes(work: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "trainer.cli", "search", "--data", str(work / "host.csv"), "--name", "host",
            "--registry", str(registry), "--space", str(work / "space.json"), "--profile", "x86-64-v3",
            "--trials", "50"]
    # started as a CI runner or a background job of a script starts it: with SIGINT ignored
    # (`trap '' INT` in a shell that then execs it; no Python code runs between fork and exec)
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", *argv],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait for the first finished trial
            if "search host: 1/50 trials" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (registry / "registry.sqlite").exists()
    again = _search(work, registry, "--profile", "x86-64-v3", "--trials", "3", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    # the study's trials were scored on host.csv: other data, or another seed, is refused
    other = work / "other.csv"
    write_host_metrics(generate_host_metrics(1200, seed=4), other)
    changed = edgefleet("search", "--data", str(other), "--name", "host", "--registry", str(registry),
                        "--space", str(work / "space.json"), "--profile", "x86-64-v3", "--trials", "3",
                        "--resume", check=False)
    assert changed.returncode == 2 and "--resume: this run's --data differ" in changed.stderr, changed.stderr
    reseeded = _search(work, registry, "--profile", "x86-64-v3", "--trials", "3", "--resume", "--seed", "5",
                       check=False)
    assert reseeded.returncode == 2 and "this run's seed differ" in reseeded.stderr, reseeded.stderr
    resumed = _search(work, registry, "--profile", "x86-64-v3", "--trials", "3", "--resume")
    assert "search host: 3/3 trials" in resumed.stderr
    shown = json.loads(edgefleet("search", "show", "host", "--registry", str(registry), "--json").stdout)
    assert len(shown["trials"]) >= 3
    with Registry.open(registry) as reg:
        assert reg.get("host").lineage["search"]["study"] == "host"


def test_trials_over_the_trial_timeout_end_pruned_with_their_reason(work: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    proc = _search(work, registry, "--profile", "x86-64-v3", "--trials", "3", "--trial-timeout", "0.000001",
                   check=False)
    # every candidate stopped: none to register, one clear line, exit 2
    assert proc.returncode == 2, proc.stderr
    assert "trial 0 stopped: over --trial-timeout before training" in proc.stderr
    assert "no candidate" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    import optuna

    study = optuna.load_study(study_name="host", storage=f"sqlite:///{registry / 'search.sqlite3'}")
    assert [t.state.name for t in study.trials] == ["PRUNED"] * 3
    assert all(t.user_attrs["timeout"].startswith("over --trial-timeout") for t in study.trials)
    assert not (registry / "registry.sqlite").exists()  # nothing registered


def test_the_trial_timeout_is_checked_after_each_epoch_and_before_each_fold(tmp_path: Path) -> None:
    from trainer.search.objective import TrialTimeoutError, synthetic_folds, train_candidate
    from trainer.search.space import Candidate

    csv = tmp_path / "host.csv"
    write_host_metrics(generate_host_metrics(1200, seed=3), csv)
    folds = synthetic_folds([csv], seed=0, folds=2)
    candidate = Candidate.from_json({
        "architecture": {"family": "forecaster", "window": 8, "features": 4, "hidden": [8], "centering": "window"},
        "recipe": {"epochs": 5, "patience": 5, "batch_size": 64, "learning_rate": 1e-3, "weight_decay": 1e-5,
                   "seed": 0}})
    ticks = iter(range(100))
    # the clock reads 0 before training, then 1, 2, 3 … after each epoch
    with pytest.raises(TrialTimeoutError, match="over --trial-timeout at epoch 2"):
        train_candidate(candidate, folds[0], deadline=1.5, clock=lambda: float(next(ticks)))
    ticks = iter(range(100))
    with pytest.raises(TrialTimeoutError, match="over --trial-timeout at fold 2 epoch 1"):
        train_candidate(candidate, folds[1], fold=1, deadline=0.5, clock=lambda: float(next(ticks)))
    with pytest.raises(TrialTimeoutError, match="over --trial-timeout before fold 2"):
        train_candidate(candidate, folds[1], fold=1, deadline=-1.0)
