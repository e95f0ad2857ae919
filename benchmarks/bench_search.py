"""Sample efficiency of ``edgefleet search``'s model-based samplers against random search.

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

Run: ``.venv/bin/python benchmarks/bench_search.py [--trials N] [--seeds S] [--jobs J]``. Needs
``../shared/data/nab``; exits 0 with a message when it is absent.
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
from _report import markdown_table, print_table, update_benchmarks_doc

REPO = Path(__file__).resolve().parent.parent
NAB = REPO.parent / "shared" / "data" / "nab"
DOCS = REPO / "docs"
COMMAND = ".venv/bin/python benchmarks/bench_search.py"
TRIALS, SEEDS = 25, 10
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
        if TASKS[task] is None:
            from trainer.data import generate_host_metrics, write_host_metrics

            path = Path(workdir) / f"{task}-{os.getpid()}.csv"
            write_host_metrics(generate_host_metrics(SYNTH_ROWS, seed=0), path,
                               path.with_suffix(".labels.json"))
            _DATA[task] = synthetic_data([path], seed=0)
        else:
            _DATA[task] = labelled_data([NAB / "data" / TASKS[task]], NAB / "labels" / "combined_windows.json")
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
    done = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    p.add_argument("--trials", type=int, default=TRIALS, help="N: trials of each model-based sampler "
                   "(random gets 2N; default %(default)s)")
    p.add_argument("--seeds", type=int, default=SEEDS, help="S: seeds per task and sampler (default %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="studies run at once, one thread each (default: logical cores, %(default)s)")
    args = p.parse_args(argv)
    if args.trials < 1 or args.seeds < 1 or args.jobs < 1:
        p.error("--trials, --seeds and --jobs must be at least 1")
    if not (NAB / "data").is_dir():
        print(f"skipped: NAB data not found at {NAB / 'data'} (the team's data lives in ../shared/data/nab)")
        return 0
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
    update_benchmarks_doc("search", markdown, command=COMMAND, path=DOCS / "benchmarks.md")
    print("wrote section 'search' of docs/benchmarks.md and docs/img/search.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
