"""Time-series cross-validation in ``edgefleet search --folds K``: the fold layout (no
look-ahead, expanding), the objective's data per fold, and the real CLI on a tiny space
(Optuna on SQLite, torch, the exports measured in their runtimes, the registry).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_cli import edgefleet

from trainer.data import expanding_folds, generate_host_metrics, write_host_metrics
from trainer.search.errors import SearchError
from trainer.search.objective import MIN_HELD_ROWS, load_folds, synthetic_data, synthetic_folds

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE: dict[str, Any] = {"windows": [8, 16], "widths": [8, 16], "bottlenecks": [4], "layers": [1, 1],
         "epochs": 3, "patience": 2, "batch_sizes": [64]}
ROWS = 1200


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic host metrics, their labels and the tiny search space."""
    w = tmp_path_factory.mktemp("folds")
    write_host_metrics(generate_host_metrics(ROWS, seed=3), w / "host.csv", w / "host.labels.json")
    (w / "space.json").write_text(json.dumps(SPACE))
    return w


@pytest.mark.parametrize("rows", [10, 99, 100, 1200, 4033])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
def test_every_validation_row_comes_after_every_training_row_and_folds_expand(rows: int, k: int) -> None:
    folds = expanding_folds(rows, k)
    assert len(folds) == k
    for fold in folds:
        assert len(fold.train) > 0 and len(fold.validation) > 0
        assert min(fold.validation) > max(fold.train)  # no look-ahead
        assert fold.validation.start == fold.train.stop  # no gap, no overlap
    for before, after in zip(folds, folds[1:]):
        assert after.train_end > before.train_end  # expanding
        assert after.train_end == before.validation_end  # the next fold trains on this block too
    assert folds[-1].validation_end == rows  # the last block is validated on
    sizes = {len(f.validation) for f in folds}
    assert len(sizes) == 1  # blocks of equal size


def test_folds_need_rows_and_at_least_one_fold() -> None:
    with pytest.raises(ValueError):
        expanding_folds(100, 0)
    with pytest.raises(ValueError):
        expanding_folds(3, 3)


def test_each_folds_objective_data_holds_no_row_after_its_block(work: Path) -> None:
    from shared.series import read_series

    values = read_series(work / "host.csv").values
    folds = synthetic_folds([work / "host.csv"], seed=0, folds=3)
    layout = expanding_folds(ROWS, 3)
    assert len(folds) == 3
    for data, fold in zip(folds, layout):
        (train,) = data.train
        assert len(train) == fold.train_end
        np.testing.assert_array_equal(train, values[: fold.train_end])
        (clean,) = data.clean
        np.testing.assert_array_equal(clean, values[: fold.validation_end])
        assert len(data.evaluate) == 5  # one copy of the block per injected kind
        for ev in data.evaluate:
            # judged from the first row of the block on, never past it
            assert ev.first == fold.train_end and len(ev.values) == fold.validation_end
            np.testing.assert_array_equal(ev.values[: ev.first], values[: fold.train_end])
            assert len(ev.labels) == fold.validation_end - fold.train_end
    # one fold is the search's single hold-out split, unchanged
    (single,) = synthetic_folds([work / "host.csv"], seed=0, folds=1)
    plain = synthetic_data([work / "host.csv"], seed=0)
    assert [ev.first for ev in single.evaluate] == [ev.first for ev in plain.evaluate]
    for a, b in zip(single.evaluate, plain.evaluate):
        np.testing.assert_array_equal(a.values, b.values)


def test_too_few_rows_for_the_folds_and_folds_with_labels_are_refused(work: Path) -> None:
    too_many = ROWS // MIN_HELD_ROWS  # blocks of fewer than MIN_HELD_ROWS rows
    with pytest.raises(SearchError, match=f"too few for --folds {too_many}"):
        synthetic_folds([work / "host.csv"], seed=0, folds=too_many)
    with pytest.raises(SearchError, match="--folds must be at least 1"):
        load_folds([work / "host.csv"], None, seed=0, folds=0)
    with pytest.raises(SearchError, match="unlabelled objective"):
        load_folds([work / "host.csv"], work / "host.labels.json", seed=0, folds=2)


def _search(work: Path, registry: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return edgefleet("search", "--data", str(work / "host.csv"), "--name", "host", "--registry", str(registry),
                     "--space", str(work / "space.json"), "--profile", "x86-64-v3", *extra, check=check)


@pytest.mark.parametrize("folds, why", [
    ("0", "must be at least 1"),
    ("x", "not an integer"),
    (str(ROWS // MIN_HELD_ROWS), "too few for --folds"),
])
def test_bad_folds_exit_2_with_one_line_and_nothing_written(work: Path, tmp_path: Path, folds: str, why: str) -> None:
    registry = tmp_path / "reg"
    proc = _search(work, registry, "--trials", "1", "--folds", folds, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and why in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not registry.exists()


def test_folds_with_labels_exit_2(work: Path, tmp_path: Path) -> None:
    proc = _search(work, tmp_path / "reg", "--trials", "1", "--folds", "2", "--labels",
                   str(work / "host.labels.json"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "unlabelled objective" in lines[0], proc.stderr


def test_help_says_multi_objective_studies_are_not_pruned() -> None:
    text = " ".join(edgefleet("search", "--help").stdout.split())
    assert "with several --objectives no trial is pruned" in text
    assert "--folds K" in text


def _stored(registry: Path, study: str = "host") -> list[Any]:
    """The study's trials as Optuna stored them (read in this process)."""
    import optuna

    storage = f"sqlite:///{registry / 'search.sqlite3'}"
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


@pytest.mark.slow
def test_a_two_fold_search_averages_its_folds_and_resume_and_workers_keep_them(work: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    proc = _search(work, registry, "--trials", "2", "--folds", "2", "--json")
    assert "search host: 2/2 trials" in proc.stderr
    (version,) = json.loads(proc.stdout)["versions"]
    shown = json.loads(edgefleet("search", "show", "host", "--registry", str(registry), "--json").stdout)
    epochs = SPACE["epochs"]
    trials = {t.number: t for t in _stored(registry)}
    complete = shown["trials"]
    assert complete, shown
    for row in complete:
        details = row["quality_details"]
        assert details["folds"] == 2 and len(details["fold_quality"]) == 2
        assert row["values"][0] == pytest.approx(float(np.mean(details["fold_quality"])))
        stored = trials[row["trial"]]
        assert stored.user_attrs["fold_quality"] == details["fold_quality"]
        steps = sorted(stored.intermediate_values)
        # only the first fold reports (epochs 1..): a pruner never compares two folds' losses
        assert steps == list(range(1, len(steps) + 1)) and 0 < len(steps) <= epochs
    assert version["lineage"]["search"]["study"] == "host"

    # the study keeps its folds: --resume with another value is refused, one line, exit 2
    other = _search(work, registry, "--trials", "3", "--resume", "--folds", "3", check=False)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1 and "this run's folds differ" in lines[0], other.stderr
    plain = _search(work, registry, "--trials", "3", "--resume", check=False)
    assert plain.returncode == 2 and "this run's folds differ" in plain.stderr, plain.stderr

    # a worker takes the folds from the study: it refuses to be given them, and runs on them
    given = edgefleet("search", "worker", "--study", "host", "--registry", str(registry), "--folds", "2",
                      check=False)
    assert given.returncode == 2 and "--folds" in given.stderr
    from trainer.search.study import default_storage
    from trainer.search.worker import join_study

    study, prepared = join_study("host", default_storage(registry), 3, None, registry)
    assert prepared.request.folds == 2 and len(prepared.folds) == 2
    assert study.user_attrs["folds"] == 2


@pytest.mark.slow
def test_a_multi_objective_search_with_folds_reports_nothing_and_prunes_nothing(work: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    _search(work, registry, "--trials", "2", "--folds", "2", "--objectives", "quality,latency",
            "--pruner", "median", "-q")
    stored = _stored(registry)
    assert len(stored) == 2
    for t in stored:
        assert t.state.name == "COMPLETE"
        assert t.intermediate_values == {}
        assert len(t.user_attrs["fold_quality"]) == 2
        assert len(t.values) == 2


def test_a_column_whose_first_value_comes_after_the_first_folds_rows_is_refused(work: Path, tmp_path: Path) -> None:
    # filling its leading gap would give fold 1 a value from rows it is judged on
    lines = (work / "host.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    def without_first_metric(row: str) -> str:
        stamp, _, *rest = row.split(",")
        return ",".join([stamp, "", *rest])

    late = [without_first_metric(r) if i < len(rows) // 2 else r for i, r in enumerate(rows)]
    data = tmp_path / "late.csv"
    data.write_text("\n".join([header, *late]) + "\n")
    proc = edgefleet("search", "--data", str(data), "--name", "host", "--registry", str(tmp_path / "reg"),
                     "--space", str(work / "space.json"), "--profile", "x86-64-v3", "--trials", "1",
                     "--folds", "2", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"column {header.split(',')[1]!r} has no value in the first" in lines[0], proc.stderr


def test_the_objective_judges_each_window_with_its_newest_row() -> None:
    """The search objective decides as the agent's detector does: each window's score with the
    values of that window's newest row (the range check of the score pipeline reads them)."""
    import math
    from types import SimpleNamespace

    from edge_agent.detector import detect_series
    from edge_agent.runtime import open_runtime
    from shared.bundle import BundleSpec, GoldenVectors, ScoreSpec, TensorSpec
    from shared.score_pipeline import RANGE_TOLERANCE, LikelihoodPipeline
    from tests.test_detector import _model
    from trainer.search.objective import EvalSeries, _decisions

    rows = 4
    values = np.full((60, 1), 0.5)
    values[::7, 0] = 0.0
    values[::5, 0] = 1.0  # training range 0..1
    values[41, 0] = 1.2  # beyond it, with a score as ordinary as every other
    pipeline = LikelihoodPipeline(range_tolerance=RANGE_TOLERANCE).with_value_range(values[:30])
    score = ScoreSpec("msq", 4.0, math.log(4.0), 1.0, pipeline)
    trained = SimpleNamespace(candidate=SimpleNamespace(architecture=SimpleNamespace(input_rows=rows)), score=score)
    constant = lambda windows: np.ones(len(windows))  # noqa: E731 - the model's score does not matter here
    decided = _decisions(trained, EvalSeries(values, 30, None), constant)  # type: ignore[arg-type]
    assert np.flatnonzero(decided).tolist() == [41 - 30]
    # and the agent's detector, on the same rows and pipeline, alarms on the same row
    spec = BundleSpec(name="msq", format="onnx", quantization="fp32", model_file="model.onnx",
                      inputs=(TensorSpec("x", "float32", (None, rows, 1)),),
                      outputs=(TensorSpec("score", "float32", (None,)),), window=rows, features=("f0",),
                      score=score, golden=GoldenVectors([[[0.0]] * rows], [0.0], 1e-6, 1e-6))
    detections = detect_series(open_runtime(spec, _model(1)), spec, [str(i) for i in range(60)], values.tolist())
    assert [d.timestamp for d in detections if d.is_anomaly] == ["41"]
