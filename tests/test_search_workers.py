"""Several processes on one study: ``edgefleet search worker`` on PostgreSQL, ``search --jobs``
on SQLite, workers refusing data that differ from the study's, ``--sampler grid`` and
``--plots``, all through the real CLI in real processes.

The PostgreSQL test creates its own database on the server named by
``EDGEFLEET_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``, trust auth)
and drops it afterwards; it is skipped when that server does not answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer.data import generate_host_metrics, write_host_metrics
from trainer.search.grid import grid_of, grid_size
from trainer.search.space import SearchSpace

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE = {"windows": [8, 16], "widths": [8, 16], "bottlenecks": [4], "layers": [1, 1],
         "epochs": 3, "patience": 2, "batch_sizes": [64]}
PNG = b"\x89PNG\r\n\x1a\n"
POSTGRES = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def edgefleet(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(_argv(*args), capture_output=True, text=True, timeout=900, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


def trials_of(study: str, storage: str) -> list[dict[str, object]]:
    """State, worker and surplus mark of every trial, read with Optuna in this process."""
    import optuna

    s = optuna.load_study(study_name=study, storage=storage)
    return [{"state": t.state.name, "worker": t.user_attrs.get("worker"), "surplus": t.user_attrs.get("surplus"),
             "params": t.params} for t in s.get_trials(deepcopy=False)]


def _complete(trials: list[dict[str, object]]) -> list[dict[str, object]]:
    others = [t for t in trials if t["state"] != "COMPLETE"]
    assert all(t["state"] == "FAIL" and t["surplus"] for t in others), others  # only surplus trials fail
    return [t for t in trials if t["state"] == "COMPLETE"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("workers")
    write_host_metrics(generate_host_metrics(1200, seed=3), w / "host.csv", w / "host.labels.json")
    (w / "space.json").write_text(json.dumps(SPACE))
    return w


def _search(work: Path, registry: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return edgefleet("search", "--data", str(work / "host.csv"), "--name", "host", "--registry", str(registry),
                     "--space", str(work / "space.json"), "--profile", "x86-64-v3", "--pruner", "none", *extra)


def test_the_grid_takes_every_choice_and_three_values_per_range() -> None:
    grid = grid_of(SearchSpace(layers=(1, 6), learning_rate=(1e-4, 1e-2), weight_decay=(1e-5, 1e-5)))
    assert grid["layers"] == [1, 4, 6] and grid_of(SearchSpace(layers=(1, 2)))["layers"] == [1, 2]
    assert grid["learning_rate"] == [1e-4, 1e-3, 1e-2] and grid["weight_decay"] == [1e-5]
    assert grid["family"] == ["forecaster", "autoencoder"] and grid["width"] == [32, 64, 128, 256, 512]
    assert grid["forecaster.taper"] == [1, 2, 4, 8]
    assert grid_size(grid) == 2 * 3 * 3 * 5 * 2 * 2 * 4 * 3 * 3 * 3 * 1


@pytest.fixture(scope="module")
def jobs(work: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A two-objective search of 5 trials in two local processes (``--jobs 2``) on SQLite."""
    registry = tmp_path_factory.mktemp("jobs") / "reg"
    proc = _search(work, registry, "--trials", "5", "--jobs", "2", "--objectives", "quality,latency",
                   "--plots", str(registry.parent / "plots"), "--json")
    return registry, proc.stdout


@pytest.mark.slow
def test_jobs_2_runs_the_trials_in_two_processes_and_registers_once(jobs: tuple[Path, str]) -> None:
    registry, stdout = jobs
    (version,) = json.loads(stdout)["versions"]
    complete = _complete(trials_of("host", f"sqlite:///{registry / 'search.sqlite3'}"))
    assert len(complete) == 5
    assert len({t["worker"] for t in complete}) == 2, complete
    assert version["lineage"]["search"]["trial"] in range(len(complete) + 1)
    plots = registry.parent / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["history.png", "importances.png", "pareto.png"]
    assert all(p.read_bytes().startswith(PNG) for p in plots.iterdir())


@pytest.mark.slow
def test_search_show_writes_plots(jobs: tuple[Path, str], tmp_path: Path) -> None:
    registry, _ = jobs
    edgefleet("search", "show", "host", "--registry", str(registry), "--plots", str(tmp_path / "p"))
    written = sorted((tmp_path / "p").iterdir())
    assert [p.name for p in written] == ["history.png", "importances.png", "pareto.png"]
    assert all(p.read_bytes().startswith(PNG) for p in written)


@pytest.mark.slow
def test_a_worker_refuses_data_missing_or_changed(jobs: tuple[Path, str], work: Path) -> None:
    registry, _ = jobs
    storage = f"sqlite:///{registry / 'search.sqlite3'}"
    before = trials_of("host", storage)
    data = work / "host.csv"
    saved = data.read_bytes()
    try:
        data.unlink()
        gone = edgefleet("search", "worker", "--study", "host", "--storage", storage, "--trials", "9", check=False)
        data.write_bytes(saved + saved.splitlines(keepends=True)[-1])
        changed = edgefleet("search", "worker", "--study", "host", "--storage", storage, "--trials", "9", check=False)
    finally:
        data.write_bytes(saved)
    for proc, needle in ((gone, "cannot be read here"), (changed, "differs from the study's")):
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        (line,) = proc.stderr.splitlines()
        assert needle in line and str(data) in line
    assert trials_of("host", storage) == before


@pytest.mark.slow
def test_grid_sampler_runs_ten_trials_of_the_space_grid(work: Path, tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    _search(work, registry, "--sampler", "grid", "--trials", "10", "-q")
    complete = _complete(trials_of("host", f"sqlite:///{registry / 'search.sqlite3'}"))
    assert len(complete) == 10
    grid = grid_of(SearchSpace.from_json(SPACE))
    for t in complete:
        params = t["params"]
        assert isinstance(params, dict)
        assert all(v in grid[k] for k, v in params.items()), params
    points = {tuple(sorted(t["params"].items())) for t in complete}  # type: ignore[union-attr]
    assert len(points) == 10  # no point twice
    # a point whose family does not ask for one of the grid's conditional parameters repeats
    # another point's candidate: it is not trained again, its figures are the first one's
    import optuna

    study = optuna.load_study(study_name="host", storage=f"sqlite:///{registry / 'search.sqlite3'}")
    first: dict[str, optuna.trial.FrozenTrial] = {}
    repeats = 0
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        key = json.dumps(t.user_attrs["candidate"], sort_keys=True)
        if key in first:
            repeats += 1
            assert t.user_attrs["same_as"] == first[key].number and t.values == first[key].values
            assert t.user_attrs["hardware"] == first[key].user_attrs["hardware"]
        else:
            first[key] = t
            assert "same_as" not in t.user_attrs
    assert repeats >= 1  # the seeded grid order draws an autoencoder point twice


@pytest.fixture
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped after), as an SQLAlchemy URL."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {POSTGRES}: {str(e).strip().splitlines()[0]}")
    name = f"edgefleet_search_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield POSTGRES.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(work: Path, tmp_path: Path, postgres: str) -> None:
    registry = tmp_path / "reg"
    _search(work, registry, "--trials", "1", "--storage", postgres, "--study", "shared", "-q")
    workers = [subprocess.Popen(_argv("search", "worker", "--study", "shared", "--storage", postgres,
                                      "--trials", "7"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env(), cwd=tmp_path)
               for _ in range(2)]
    try:
        results = [w.communicate(timeout=900) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (_, err) in zip(workers, results):
        assert w.returncode == 0, err[-3000:]
        assert "search shared:" in err  # progress of the study's finished trials
    complete = _complete(trials_of("shared", postgres))
    assert len(complete) == 7
    ran = {str(t["worker"]).rsplit(":", 1)[1] for t in complete}
    assert {str(w.pid) for w in workers} <= ran, ran
    assert not (tmp_path / ".edgefleet").exists()  # workers register nothing
    shown = json.loads(edgefleet("search", "show", "shared", "--storage", postgres, "--json").stdout)
    assert len(shown["trials"]) == 7



def test_a_ctrl_c_while_optuna_creates_a_trial_fails_that_trial_instead_of_leaving_it_running(
        tmp_path: Path) -> None:
    """A SIGINT to the process arriving inside ``study.ask`` (here: from the sampler) waits for
    the objective, also when other threads run (torch, onnxruntime and LiteRT start some), which
    the kernel may hand a process-directed signal to."""
    import signal
    import threading

    import optuna

    from trainer.search.study import _InterruptsInsideTrials

    class InterruptingSampler(optuna.samplers.RandomSampler):
        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            super().before_trial(study, trial)
            if trial.number == 1:  # Ctrl-C after trial 0 stored, while trial 1 is being created
                os.kill(os.getpid(), signal.SIGINT)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.sqlite3'}", sampler=InterruptingSampler(seed=1))
    interrupts = _InterruptsInsideTrials()
    assert interrupts.active
    done = threading.Event()
    workers = [threading.Thread(target=done.wait) for _ in range(4)]

    def objective(trial: optuna.Trial) -> float:
        interrupts.objective_started()
        try:
            if trial.number == 0:
                for w in workers:
                    w.start()
            return trial.suggest_float("x", 0, 1)
        finally:
            interrupts.objective_ended()

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts:
                study.optimize(objective, n_trials=5)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=10)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL"]
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back


def test_the_running_trial_of_a_killed_process_is_marked_failed_once_its_heartbeat_is_stale(
        tmp_path: Path) -> None:
    import sqlite3

    import optuna

    from trainer.search.study import GRACE_S, open_storage

    url = f"sqlite:///{tmp_path / 's.sqlite3'}"
    optuna.create_study(study_name="s", storage=open_storage(url))
    # a process that starts a trial and blocks in its objective until it is killed
    code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import optuna\n"
            "from trainer.search.study import open_storage\n"
            f"s = optuna.load_study(study_name='s', storage=open_storage({url!r}))\n"
            "def objective(t):\n"
            "    s._storage.record_heartbeat(t._trial_id)  # as its heartbeat thread does, now\n"
            "    print('started', flush=True); sys.stdin.read(); return 0.0\n"
            "s.optimize(objective, n_trials=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    proc.kill()
    proc.wait(timeout=30)
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]
    # as if GRACE_S had passed since its last heartbeat
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        updated = db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?)",
                             (f"-{GRACE_S + 1} seconds",)).rowcount
    assert updated == 1
    study.optimize(lambda t: 1.0, n_trials=1)  # the next trial any process starts finds it
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "COMPLETE"]


def test_a_repeated_candidate_is_not_registered_twice_from_a_front() -> None:
    import optuna

    from trainer.search.hardware import BUDGETS
    from trainer.search.study import winners

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["quality", "latency"])
    for number, attrs in enumerate([{}, {"same_as": 0}, {}]):
        t = study.ask()
        t.set_user_attr("constraints", [-1.0] * len(BUDGETS))
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, [0.5, 1.0] if number < 2 else [0.4, 0.5])
    assert winners(study, ["x86-64-v3"], "front") == {0: ["x86-64-v3"], 2: ["x86-64-v3"]}
