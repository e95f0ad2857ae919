"""``edgefleet search`` benchmarks: sample efficiency, throughput, NAB quality, Pareto front.

Four benchmarks, each a function selectable by name on the command line (all four, in this
order, without a name; ``make bench`` runs them all), each writing its own section of
docs/benchmarks.md:

- ``efficiency`` (section ``search``) — below;
- ``throughput`` (``search-throughput``) — :data:`THROUGHPUT_TRIALS` trials of ``edgefleet
  search`` with every default (space, TPE, median pruner, one split, one process) on one
  synthetic host, profile :data:`PROFILE`, each trial trained, judged, exported and timed:
  wall time, complete and pruned trials, trials per minute, whether the goal of
  :data:`THROUGHPUT_GOAL_MIN` minutes is met, the machine and its load average;
- ``quality`` (``search-quality``) — a search of :data:`QUALITY_TRIALS` trials on the
  probationary rows of the team's NAB files (temporary copies; unlabelled objective: the
  search sees no label and no row NAB scores), then the winner's architecture and recipe
  against ``edgefleet train``'s default, both through ``edgefleet evaluate``'s harness (NAB
  optimized and own decisions). Why this protocol: the docs section says;
- ``pareto`` (``search-pareto``) — a ``--objectives quality,latency`` study of
  :data:`PARETO_TRIALS` trials on one synthetic host; its Pareto-front PNG
  (``trainer/search/plots.py``) goes to ``docs/img/search-pareto.png``, shown in the README.

The machine is usually shared: each run prints the load average before and after.

**efficiency** — sample efficiency of the model-based samplers against random search.

``tpe``, ``gp`` and ``reinforce`` get N trials each; ``random`` gets 2N. For every task and
sampler the figure is the best objective value a study found, over S seeds: median and IQR
(25th-75th percentile). A model-based sampler *matches random@2N* on a task when its median is
at least random's median, and *beats* it when its median is above random's 75th percentile.

Tasks:

- **aws-cpu** — NAB ``realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv`` with NAB's
  ``combined_windows.json`` (the search's labelled mode: NAB standard score of the detector's
  own decisions);
- **art-jumpsup** — NAB ``artificialWithAnomaly/art_daily_jumpsup.csv``, labelled the same way;
- **synth-hosts** — one unlabelled host of ``edgefleet data synth`` (``generate_host_metrics``,
  four metrics, :data:`SYNTH_ROWS` rows, seed 0; its labels are not used): the search's
  unlabelled mode (event F1 on injected anomalies minus the clean-error term).

Each trial is the search's objective as ``edgefleet search`` runs it — ``suggest_candidate``,
``train_candidate`` (same training, same calibrated score pipeline) and ``measure_quality`` —
on an in-memory Optuna study with the sampler built by ``make_sampler``, but **quality only**:
the per-trial hardware check (ONNX/TFLite export, int8, latency timing against a profile's
budget) is skipped, so no trial carries constraints and every trial is feasible. The search
code has no quality-only switch; this script calls its parts directly. Pruning is off
(``--pruner none``), so every trial trains to its epoch cap or early stop and the comparison is
about sampling alone. The recipe seed of a candidate is the study's seed, as in the search.

Search space (small, to keep the run affordable): families forecaster and autoencoder; windows
16, 32; 1-2 layers; widths 16, 32, 64; bottlenecks 4, 8; centring window or train; forecaster
season auto or off; learning rate 1e-4..1e-2 and weight decay 1e-7..1e-3 (log); batch 64 or
128; at most :data:`EPOCHS` epochs, patience :data:`PATIENCE`.

Note that TPE and GP sample at random for their first 10 trials (Optuna's
``n_startup_trials``), so at N = 10 or less they are random search with half the trials, and
that GP samples the conditional parameters (``forecaster.season``, ``autoencoder.bottleneck``)
at random throughout (Optuna's GPSampler does not model a dynamic search space).

Writes the ``search`` section of docs/benchmarks.md and ``docs/img/search.png``.

Run: ``.venv/bin/python benchmarks/bench_search.py [efficiency|throughput|quality|pareto ...]
[--trials N] [--seeds S] [--jobs J] [--throughput-trials N] [--quality-trials N]
[--pareto-trials N] [--no-docs]``. ``efficiency`` and ``quality`` need ``../shared/data/nab``
and are skipped with a message when it is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from _report import machine_info, machine_line, markdown_table, print_table, update_benchmarks_doc

REPO = Path(__file__).resolve().parent.parent
NAB = REPO.parent / "shared" / "data" / "nab"
DOCS = REPO / "docs"
COMMAND = ".venv/bin/python benchmarks/bench_search.py"
TRIALS, SEEDS = 25, 10
PROFILE = "x86-64-v3"  # the reference profile (speed factor 1.0): the machine measured on
THROUGHPUT_TRIALS, THROUGHPUT_GOAL_MIN = 100, 15.0
QUALITY_TRIALS = 12  # bounds the run time; not tuned to the NAB files
PARETO_TRIALS = 20
PARETO_PNG = "search-pareto.png"
EPOCHS, PATIENCE = 8, 3
SYNTH_ROWS = 4000  # as `edgefleet data synth`; with 2000 the held-back rows get no decision at all
MODEL_BASED = ("tpe", "gp", "reinforce")
BASELINE = "random"
TASKS = {
    "aws-cpu": "realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv",
    "art-jumpsup": "artificialWithAnomaly/art_daily_jumpsup.csv",
    "synth-hosts": None,
}
SPACE = {
    "families": ["forecaster", "autoencoder"],
    "windows": [16, 32],
    "layers": [1, 2],
    "widths": [16, 32, 64],
    "bottlenecks": [4, 8],
    "centerings": ["window", "train"],
    "seasons": ["auto", "off"],
    "learning_rate": [1e-4, 1e-2],
    "weight_decay": [1e-7, 1e-3],
    "batch_sizes": [64, 128],
    "epochs": EPOCHS,
    "patience": PATIENCE,
}

_DATA: dict[str, Any] = {}  # per worker process: task → ObjectiveData, loaded once


def _task_data(task: str, workdir: str) -> Any:
    from trainer.search.objective import labelled_data, synthetic_data

    if task not in _DATA:
        nab_file = TASKS[task]
        if nab_file is None:
            from trainer.data import generate_host_metrics, write_host_metrics

            path = Path(workdir) / f"{task}-{os.getpid()}.csv"
            write_host_metrics(generate_host_metrics(SYNTH_ROWS, seed=0), path,
                               path.with_suffix(".labels.json"))
            _DATA[task] = synthetic_data([path], seed=0)
        else:
            _DATA[task] = labelled_data([NAB / "data" / nab_file], NAB / "labels" / "combined_windows.json")
    return _DATA[task]


def run_study(task: str, sampler: str, seed: int, trials: int, workdir: str) -> tuple[str, str, int, float, int]:
    """Best quality of one quality-only study; also the number of trials that failed."""
    import optuna
    import torch

    from trainer.pipeline import seasonal_lag
    from trainer.search.objective import measure_quality, train_candidate
    from trainer.search.samplers import make_sampler
    from trainer.search.space import SearchSpace
    from trainer.search.study import suggest_candidate

    torch.set_num_threads(1)
    # GPSampler warns on every trial that it samples the conditional parameters at random
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    data = _task_data(task, workdir)
    space = SearchSpace.from_json(SPACE)
    lags: dict[int, int] = {}

    def season_lag(window: int) -> int:
        if window not in lags:
            lags[window] = seasonal_lag(data.series, window)
        return lags[window]

    def objective(trial: Any) -> float:
        candidate = suggest_candidate(trial, space, len(data.features), season_lag, seed)
        return measure_quality(train_candidate(candidate, data, trial), data).quality

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner(),
                                sampler=make_sampler(sampler, seed=seed, directions=["maximize"]))
    study.optimize(objective, n_trials=trials, catch=(Exception,), gc_after_trial=False)
    done = [float(t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    return task, sampler, seed, max(done) if done else float("nan"), trials - len(done)


def plot(best: dict[tuple[str, str], list[float]], samplers: list[str], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.4 * len(TASKS), 3.4))
    for ax, task in zip(axes, TASKS):
        ax.boxplot([best[task, s] for s in samplers], whis=(0, 100))
        ax.set_xticks(range(1, len(samplers) + 1), [labels[s] for s in samplers], fontsize=7)
        ax.set_title(task, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel("best objective value (over seeds)", fontsize=8)
    fig.suptitle("best value found: boxes = IQR over seeds, line = median, whiskers = min-max", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def efficiency(args: argparse.Namespace) -> int:
    """Sample efficiency (section ``search``): model-based samplers against random@2N."""
    n, seeds = args.trials, list(range(args.seeds))
    budget = {**{s: n for s in MODEL_BASED}, BASELINE: 2 * n}
    samplers = [*MODEL_BASED, BASELINE]
    labels = {s: f"{s}@{budget[s]}" for s in samplers}
    # longest studies first, so that the last ones to finish are short
    jobs = sorted(((t, s, k) for t in TASKS for s in samplers for k in seeds), key=lambda j: -budget[j[1]])
    total_trials = sum(budget[s] for _, s, _ in jobs)
    print(f"{len(jobs)} studies, {total_trials} trials, {args.jobs} at once", flush=True)
    best: dict[tuple[str, str], list[float]] = {(t, s): [] for t in TASKS for s in samplers}
    failed = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp, \
            ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_study, t, s, k, budget[s], tmp) for t, s, k in jobs]
        for i, f in enumerate(as_completed(futures), 1):
            task, sampler, seed, value, fails = f.result()
            best[task, sampler].append(value)
            failed += fails
            print(f"  {i}/{len(jobs)} {task} {labels[sampler]} seed {seed}: best {value:.4f}"
                  f"{f' ({fails} trials failed)' if fails else ''} [{(time.monotonic() - started) / 60:.1f} min]",
                  flush=True)
    wall = time.monotonic() - started
    per_min = total_trials / (wall / 60)

    def q(task: str, sampler: str, pct: float) -> float:
        return float(np.nanpercentile(best[task, sampler], pct))

    header = ["task", "sampler", "trials", "median best", "IQR (p25-p75)", "vs random@2N"]
    table = []
    for task in TASKS:
        for s in samplers:
            verdict = "—"
            if s != BASELINE:
                matches = q(task, s, 50) >= q(task, BASELINE, 50)
                beats = q(task, s, 50) > q(task, BASELINE, 75)
                verdict = "beats" if beats else "matches" if matches else "below"
            table.append([task, s, str(budget[s]), f"{q(task, s, 50):.4f}",
                          f"{q(task, s, 25):.4f} to {q(task, s, 75):.4f}", verdict])
    seeds_note = (f"S = {len(seeds)} seeds" if len(seeds) >= 5 else
                  f"only S = {len(seeds)} seeds (fewer than the 5 wanted): the IQR is rough")
    print()
    print_table(header, table)
    print(f"\nN = {n}, {seeds_note}; wall time {wall / 60:.1f} min for {total_trials} trials "
          f"({per_min:.1f} trials/min, {args.jobs} studies at once); {failed} trials failed")
    if args.no_docs:
        return 0
    plot(best, samplers, labels, DOCS / "img" / "search.png")
    markdown = "\n".join([
        f"Sample efficiency of `edgefleet search`'s model-based samplers: `tpe`, `gp` and `reinforce` "
        f"with N = {n} trials each against `random` with 2N = {2 * n}, {seeds_note} per task and "
        "sampler; the figure is the best objective value a study found, median and IQR over seeds "
        "(higher is better). _matches_: median ≥ random@2N's median; _beats_: median > random@2N's "
        "75th percentile; _below_: neither. Tasks: `aws-cpu` = NAB "
        f"`{TASKS['aws-cpu']}`, `art-jumpsup` = NAB `{TASKS['art-jumpsup']}` (labelled mode: NAB "
        "standard score of the detector's own decisions), `synth-hosts` = one host of `edgefleet "
        f"data synth` ({SYNTH_ROWS} rows, unlabelled mode: event F1 on injected anomalies minus "
        "0.1 × clean error). Each trial is the search's objective (same training, same calibrated "
        "score pipeline) **without the per-trial hardware check** (no export, no latency timing, "
        "no budget constraints), pruning off. Small space: forecaster or autoencoder, window 16 "
        f"or 32, 1-2 layers of width 16/32/64, bottleneck 4/8, both centrings, season auto/off, "
        f"learning rate 1e-4..1e-2, weight decay 1e-7..1e-3, batch 64/128, at most {EPOCHS} "
        f"epochs (patience {PATIENCE}). TPE and GP sample at random for their first 10 trials; GP "
        "samples the conditional parameters (season, bottleneck) at random throughout. "
        f"Wall time {wall / 60:.1f} min for {total_trials} trials ({per_min:.1f} trials/min, "
        f"{args.jobs} studies at once, one torch thread each, on a machine shared with other "
        f"work); {failed} trials failed.",
        "",
        markdown_table(header, table),
        "",
        "![best value found per task and sampler](img/search.png)",
    ])
    update_benchmarks_doc("search", markdown, command=f"{COMMAND} efficiency", path=DOCS / "benchmarks.md")
    print("wrote section 'search' of docs/benchmarks.md and docs/img/search.png")
    return 0




def _load_line(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
    """The machine's load average (1, 5, 15 min) before and after a run: the run shares the
    cores with whatever else ran then."""
    return (f"load average {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f} before, "
            f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f} after (1/5/15 min)")


def _synth_csv(folder: Path) -> Path:
    """One host of ``edgefleet data synth`` (:data:`SYNTH_ROWS` rows, seed 0) as a CSV."""
    from trainer.data import generate_host_metrics, write_host_metrics

    path = folder / "host.csv"
    write_host_metrics(generate_host_metrics(SYNTH_ROWS, seed=0), path, path.with_suffix(".labels.json"))
    return path


def _run_search(request: Any) -> tuple[Any, float]:
    """``edgefleet search``'s own steps (prepare, open the study, run its trials) without the
    registration of the winner. Returns the study and the wall time of its trials."""
    from trainer.search.study import open_study, prepare_search, run_trials

    prepared = prepare_search(request)
    study = open_study(prepared)
    started = time.monotonic()
    run_trials(study, prepared, lambda line: print(f"  {line}", flush=True))
    return study, time.monotonic() - started


def _states(study: Any) -> dict[str, int]:
    out = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _candidate_text(candidate: Any) -> str:
    a, r = candidate.architecture, candidate.recipe
    return (f"{a.family}, window {a.window}, hidden {list(a.hidden)}, centring {a.centering}, season {a.season}; "
            f"lr {r.learning_rate:.2g}, weight decay {r.weight_decay:.2g}, batch {r.batch_size}, "
            f"≤ {r.epochs} epochs (patience {r.patience})")


def throughput(args: argparse.Namespace) -> int:
    """Trials per minute of ``edgefleet search`` with its defaults (section ``search-throughput``)."""
    import optuna

    from trainer.search.study import SearchRequest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = args.throughput_trials
    info = machine_info()
    before = os.getloadavg()
    print(f"throughput: {trials} trials, default space, sampler and pruner, profile {PROFILE}; "
          f"{machine_line(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        request = SearchRequest(data=[_synth_csv(Path(tmp))], profiles=[PROFILE], name="throughput",
                                registry=Path(tmp) / "registry", trials=trials, seed=0)
        study, wall = _run_search(request)
        states = _states(study)
    after = os.getloadavg()
    minutes = wall / 60
    met = minutes <= THROUGHPUT_GOAL_MIN
    if trials == THROUGHPUT_TRIALS:
        verdict = f"Goal ≤ {THROUGHPUT_GOAL_MIN:.0f} min for {THROUGHPUT_TRIALS} trials: **{'met' if met else 'not met'}**"
    else:  # the goal is about the default count only; no extrapolation is claimed
        verdict = f"Goal ≤ {THROUGHPUT_GOAL_MIN:.0f} min is for {THROUGHPUT_TRIALS} trials: not judged on {trials}"
    header = ["trials", "complete", "pruned", "failed", "wall time", "trials/min", "s/trial"]
    row = [str(trials), str(states["COMPLETE"]), str(states["PRUNED"]), str(states["FAIL"]),
           f"{minutes:.1f} min", f"{trials / minutes:.2f}", f"{wall / trials:.1f}"]
    print()
    print_table(header, [row])
    print(f"{verdict.replace('**', '')}; {_load_line(before, after)}; torch threads {_threads()}")
    if args.no_docs:
        return 0
    markdown = "\n".join([
        f"Throughput of `edgefleet search` with its defaults: {trials} trials of the default search "
        f"space (forecaster or autoencoder, windows 16/32/64, 1-2 layers of width 32-512, ≤ 40 "
        "epochs with patience 6), the default sampler (TPE) and pruner (median), one objective "
        f"(quality), one split (`--folds 1`), one process (`--jobs 1`), profile `{PROFILE}`: every "
        "trial trains (a pruned one until the pruner stops it); every trial not pruned is judged on "
        "the unlabelled objective, exported and timed against the profile's budget. "
        f"Data: one host of `edgefleet data synth` ({SYNTH_ROWS} rows, seed 0). "
        "Wall time of the trials (the study's `run_trials`; the retraining and registration of "
        "the winner afterwards are not counted). "
        f"Machine: {machine_line(info)}; torch threads {_threads()}. The machine is shared with "
        f"other work: {_load_line(before, after)}; on such a machine the wall time of the same "
        f"trials varies between runs. {verdict}.",
        "",
        markdown_table(header, [row]),
    ])
    update_benchmarks_doc("search-throughput", markdown, command=f"{COMMAND} throughput",
                          path=DOCS / "benchmarks.md")
    print("wrote section 'search-throughput' of docs/benchmarks.md")
    return 0


def _probation_heads(folder: Path) -> tuple[list[Path], list[str]]:
    """A temporary copy of each NAB file's probationary rows (NAB's first 15%, at most 750):
    the only rows the quality benchmark's search reads. Never written into the repository.

    Returns the copies, and the files left out of the search because their probationary rows,
    less the objective's held-back rows, are too few to train the default space's largest
    window (they are still evaluated)."""
    from shared.series import read_series
    from trainer.data import min_rows
    from trainer.evaluation.nab import probation_rows
    from trainer.search.objective import HOLDOUT_FRACTION
    from trainer.search.space import SearchSpace

    need = min_rows(max(SearchSpace().windows))
    heads, short = [], []
    for path in sorted((NAB / "data").rglob("*.csv")):
        rows = probation_rows(len(read_series(path)))
        if rows - int(rows * HOLDOUT_FRACTION) < need:
            short.append(f"{path.relative_to(NAB / 'data').as_posix()} ({rows} probationary rows)")
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        out = folder / "probation" / path.relative_to(NAB / "data")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
        heads.append(out)
    return heads, short


def _searched_rows(path: Path) -> int:
    """Rows the unlabelled objective trains on in ``path`` (all but the held-back ones)."""
    from shared.series import read_series
    from trainer.search.objective import HOLDOUT_FRACTION

    rows = len(read_series(path))
    return rows - int(rows * HOLDOUT_FRACTION)


def _evaluate(options: dict[str, Any], label: str) -> dict[str, Any]:
    """``edgefleet evaluate`` on the NAB files: per file, train on its probationary rows with
    ``options`` (``TrainRequest`` arguments) and detect through the agent's path."""
    from trainer.evaluation.harness import EvaluateRequest, evaluate, summarize

    def progress(done: int, total: int, key: str) -> None:
        print(f"  {label}: {done}/{total} {key}", flush=True)

    request = EvaluateRequest(data=NAB / "data", labels=NAB / "labels" / "combined_windows.json",
                              profile=PROFILE, train_options=options)
    return summarize(evaluate(request, progress)).to_json()


def quality(args: argparse.Namespace) -> int:
    """The searched model against ``edgefleet train``'s default on NAB (section ``search-quality``)."""
    import optuna

    from trainer.search.space import Candidate
    from trainer.search.study import SearchRequest, winners

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        heads, short = _probation_heads(Path(tmp))
        fewest = min(_searched_rows(h) for h in heads)
        print(f"quality: search of {args.quality_trials} trials on the probationary rows of {len(heads)} "
              f"NAB files (unlabelled objective); too short to search on: {', '.join(short) or 'none'}",
              flush=True)
        request = SearchRequest(data=heads, profiles=[PROFILE], name="nab-probation",
                                registry=Path(tmp) / "registry", trials=args.quality_trials, seed=0)
        study, search_wall = _run_search(request)
        states = _states(study)
        (number,) = winners(study, [PROFILE], "best")
        winner = study.trials[number]
        candidate = Candidate.from_json(winner.user_attrs["candidate"])
    print(f"winner: trial {number}, quality {winner.values[0]:.4f}: {_candidate_text(candidate)}", flush=True)
    spec, recipe = candidate.architecture, candidate.recipe
    searched_options = {"family": spec.family, "window": spec.window, "hidden": tuple(spec.hidden),
                        "centering": spec.centering, "season": spec.season, "kernel": spec.kernel,
                        "dilations": tuple(spec.dilations), "residual": spec.residual, "heads": spec.heads,
                        "recipe": recipe, "epochs": recipe.epochs, "seed": recipe.seed}
    reports = {"default": _evaluate({"seed": 0}, "default"),
               "searched": _evaluate(searched_options, "searched")}
    wall = time.monotonic() - started
    after = os.getloadavg()
    header = ["model", "standard opt", "standard own", "low FP opt", "low FN opt", "low FP own", "low FN own",
              "F1 (own)", "detected", "false events"]
    rows = []
    for name, r in reports.items():
        nab, ev = r["nab"], r["events"]
        rows.append([name, f"{nab['standard']['optimized']:.1f}", f"{nab['standard']['own_decisions']:.1f}",
                     f"{nab['reward_low_FP_rate']['optimized']:.1f}", f"{nab['reward_low_FN_rate']['optimized']:.1f}",
                     f"{nab['reward_low_FP_rate']['own_decisions']:.1f}",
                     f"{nab['reward_low_FN_rate']['own_decisions']:.1f}",
                     f"{ev['f1']:.2f}", f"{ev['detected']}/{ev['windows']}", str(ev["false_events"])])
    categories = sorted(set().union(*(r["categories"] for r in reports.values())))
    cat_header = ["category", *(f"{n} (opt / own)" for n in reports)]
    cat_rows = [[c, *(f"{r['categories'][c]['standard']['optimized']:.1f} / "
                      f"{r['categories'][c]['standard']['own_decisions']:.1f}" if c in r["categories"] else "-"
                      for r in reports.values())] for c in categories]
    print()
    print_table(header, rows)
    print()
    print_table(cat_header, cat_rows)
    print(f"\nsearch {search_wall / 60:.1f} min ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
          f"{states['FAIL']} failed); total {wall / 60:.1f} min; {_load_line(before, after)}")
    if args.no_docs:
        return 0
    files = reports["searched"]["files"]
    season_note = ""
    if not spec.season:
        from trainer.pipeline import MIN_SEASONAL_WINDOWS, SEASON_HALFWIDTH, SEASON_SECONDS

        day = SEASON_SECONDS // 300  # NAB's 5-minute samples
        season_note = (
            " The winner has no seasonal context: a day of context needs "
            f"{day + SEASON_HALFWIDTH + MIN_SEASONAL_WINDOWS} rows to train on in every series searched "
            f"on (`trainer.pipeline.seasonal_lag`), and the search trains on as few as {fewest} "
            "(70% of a file's probationary rows), while the default, trained on all of a file's "
            "probationary rows, takes one day of context where they allow it.")
    left_out = (f" {len(short)} file(s) are evaluated but not searched on: their probationary rows, less "
                "the held-back 30%, are too few for the default space's largest window: "
                f"{'; '.join(short)}." if short else "")
    markdown = "\n".join([
        f"The searched model against `edgefleet train`'s default on the team's {files} NAB files, "
        "both scored by `edgefleet evaluate`'s harness: per file, train on its probationary rows "
        "(NAB's first 15%, at most 750), stream the whole file through the agent's detector "
        f"(profile `{PROFILE}`, int8 ONNX), score NAB standard / low FP / low FN with the "
        "threshold optimized over the files (_opt_, NAB's protocol) and on the detector's own "
        "decisions (_own_), plus event F1 on own decisions.",
        "",
        f"**The search never sees a label, nor a row NAB scores.** It ran {args.quality_trials} "
        "trials (default space, sampler and pruner; one split) of the *unlabelled* objective "
        "(seeded synthetic anomalies injected into held-back rows, what `edgefleet search` does "
        f"without `--labels`) on a temporary copy of the probationary rows only of {len(heads)} "
        "files, rows NAB does not score; the winner's architecture and recipe were then trained per "
        f"file by the evaluator.{left_out} Searching with labels on one NAB category and scoring the others was the "
        "other option; it was not taken because the categories differ in kind (5 artificial "
        "files without anomalies, 6 artificial with, 17 real AWS series), so the choice made on "
        "one would be judged on data unlike it, and the labelled files it would search on are "
        "then missing from the comparison. Nothing here was tuned to these files: the number of "
        f"trials ({args.quality_trials}) only bounds the run time, and the search's seed is 0. TPE "
        "samples at random for its first 10 trials, so so few trials are close to a random search.",
        "",
        f"Winner: trial {number} of {len(study.trials)} ({states['COMPLETE']} complete, {states['PRUNED']} "
        f"pruned, {states['FAIL']} failed), objective {winner.values[0]:.4f}: {_candidate_text(candidate)}. "
        f"Search {search_wall / 60:.1f} min, whole benchmark {wall / 60:.1f} min; "
        f"{_load_line(before, after)}.{season_note}",
        "",
        markdown_table(header, rows),
        "",
        "NAB standard per category:",
        "",
        markdown_table(cat_header, cat_rows),
    ])
    update_benchmarks_doc("search-quality", markdown, command=f"{COMMAND} quality",
                          path=DOCS / "benchmarks.md")
    print("wrote section 'search-quality' of docs/benchmarks.md")
    return 0


def pareto(args: argparse.Namespace) -> int:
    """A quality × latency study and its Pareto-front PNG (section ``search-pareto``)."""
    import shutil

    import optuna
    from optuna.trial import TrialState

    from trainer.search.plots import write_plots
    from trainer.search.space import Candidate
    from trainer.search.study import OBJECTIVES, SearchRequest, pareto_front

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    before = os.getloadavg()
    trials = args.pareto_trials
    print(f"pareto: {trials} trials, objectives quality,latency, profile {PROFILE}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        request = SearchRequest(data=[_synth_csv(Path(tmp))], profiles=[PROFILE], name="pareto",
                                registry=Path(tmp) / "registry", trials=trials, seed=0,
                                objectives=("quality", "latency"))
        study, wall = _run_search(request)
        written = {p.name: p for p in write_plots(study, Path(tmp) / "plots")}
        if "pareto.png" not in written:
            print("no Pareto-front plot could be drawn", file=sys.stderr)
            return 1
        if not args.no_docs:
            (DOCS / "img").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(written["pareto.png"], DOCS / "img" / PARETO_PNG)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        front = sorted(pareto_front(done, [OBJECTIVES[o] for o in ("quality", "latency")]),
                       key=lambda t: t.values[1])
        states = _states(study)
    after = os.getloadavg()
    header = ["trial", "quality", "latency p99 (ms)", "candidate"]
    rows = [[str(t.number), f"{t.values[0]:.4f}", f"{t.values[1]:.3f}",
             _candidate_text(Candidate.from_json(t.user_attrs["candidate"]))] for t in front]
    print()
    print_table(header, rows)
    print(f"wall {wall / 60:.1f} min; {_load_line(before, after)}")
    if args.no_docs:
        return 0
    markdown = "\n".join([
        f"Quality against latency: `edgefleet search --objectives quality,latency` with {trials} trials "
        f"(default space and sampler; profile `{PROFILE}`; one host of `edgefleet data synth`, "
        f"{SYNTH_ROWS} rows, unlabelled objective). Latency is the p99 of the profile's preferred "
        "artifact measured in its runtime, scaled by the profile's speed factor. No trial is "
        "pruned: Optuna's pruners do not support several objectives (`Trial.report` is not "
        "supported for multi-objective optimization), so the search reports nothing there. "
        f"{states['COMPLETE']} complete, {states['FAIL']} failed; wall {wall / 60:.1f} min; "
        f"{_load_line(before, after)}. The plot is `trainer/search/plots.py`'s, as "
        "`edgefleet search --plots DIR` writes it. Pareto front, fastest first:",
        "",
        markdown_table(header, rows),
        "",
        f"![quality against latency, Pareto front highlighted](img/{PARETO_PNG})",
    ])
    update_benchmarks_doc("search-pareto", markdown, command=f"{COMMAND} pareto", path=DOCS / "benchmarks.md")
    print(f"wrote section 'search-pareto' of docs/benchmarks.md and docs/img/{PARETO_PNG}")
    return 0


BENCHES = {"efficiency": efficiency, "throughput": throughput, "quality": quality, "pareto": pareto}
NEEDS_NAB = ("efficiency", "quality")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("benches", nargs="*", metavar="BENCH",
                   help=f"which to run, of {', '.join(BENCHES)} (default: all, in that order)")
    p.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    p.add_argument("--trials", type=int, default=TRIALS, help="efficiency: N, trials of each model-based "
                   "sampler (random gets 2N; default %(default)s)")
    p.add_argument("--seeds", type=int, default=SEEDS,
                   help="efficiency: S, seeds per task and sampler (default %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="efficiency: studies run at once, one thread each (default: logical cores, %(default)s)")
    p.add_argument("--throughput-trials", type=int, default=THROUGHPUT_TRIALS, metavar="N",
                   help="throughput: trials (default %(default)s)")
    p.add_argument("--quality-trials", type=int, default=QUALITY_TRIALS, metavar="N",
                   help="quality: trials of the search on the probationary rows (default %(default)s)")
    p.add_argument("--pareto-trials", type=int, default=PARETO_TRIALS, metavar="N",
                   help="pareto: trials of the quality,latency study (default %(default)s)")
    args = p.parse_args(argv)
    unknown = [b for b in args.benches if b not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHES)}")
    counts = (args.trials, args.seeds, args.jobs, args.throughput_trials, args.quality_trials, args.pareto_trials)
    if min(counts) < 1:
        p.error("trial, seed and job counts must be at least 1")
    status = 0
    for name in args.benches or list(BENCHES):
        if name in NEEDS_NAB and not (NAB / "data").is_dir():
            print(f"{name}: skipped: NAB data not found at {NAB / 'data'} "
                  "(the team's data lives in ../shared/data/nab)")
            continue
        status = BENCHES[name](args) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
