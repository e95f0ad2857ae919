"""Which model family detects NAB's labelled anomalies better: autoencoder or forecaster?

NAB protocol (see ``../shared/data/nab/README.md``): for every ``realAWSCloudwatch`` series,
train on the first 15% of the file (``train_fraction=0.15``: the probationary period), then
score every window of the whole file with the registered fp32 ONNX artifact (what an agent
runs) and flag a sample when the score of the window ending at it exceeds the calibrated
threshold of the registered version. Per file, on the samples after the probationary period:

- recall: a labelled window counts as detected if any window END timestamp inside it is
  flagged; also how far into the window the first flag came (NAB rewards early detections);
- false-positive rate: flagged samples outside every labelled window ÷ samples outside
  labelled windows;
- precision: flagged samples inside labelled windows ÷ flagged samples;
- AUC: how well the score alone separates in-window from out-of-window samples, whatever the
  threshold (tells a family's ranking apart from its threshold calibration).

Both families run at window 64 with the default hidden widths; then the winner (pooled F1 of
window recall and alarm precision, ties broken by lower false-positive rate) also runs at
window 32. Writes the ``model-family`` section of docs/benchmarks.md and the generated block
of docs/model-choice.md.

Run: ``.venv/bin/python benchmarks/bench_model_family.py [--files N] [--seeds N]``. Needs the
team's NAB data in ``../shared/data/nab``; exits 0 with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from _report import machine_line, markdown_table, print_table, update_benchmarks_doc
from scipy.stats import rankdata

from shared.bundle import read_bundle
from shared.series import read_series
from trainer.data import fill_missing, make_windows
from trainer.export import artifact_scores
from trainer.pipeline import DEFAULT_ARCHITECTURE, TrainError, TrainRequest, prepare, train
from trainer.registry import Registry

REPO = Path(__file__).resolve().parent.parent
NAB = REPO.parent / "shared" / "data" / "nab"
CATEGORY = "realAWSCloudwatch"
DOCS = REPO / "docs"
COMMAND = ".venv/bin/python benchmarks/bench_model_family.py"
PROFILE = "x86-64-v3"  # ONNX only: the cheapest export; the fp32 artifact is what we score
TRAIN_FRACTION = 0.15
EPOCHS = 30
FAMILIES = ("autoencoder", "forecaster")
WINDOWS = (64, 32)

CHOICE_HEADER = """# Model family choice

Generated figures sit between the `bench:model-family` markers and come from
`benchmarks/bench_model_family.py`; the prose around them is written by hand.
"""


@dataclass(frozen=True)
class Config:
    family: str
    window: int

    @property
    def label(self) -> str:
        return f"{self.family} w{self.window}"


@dataclass(frozen=True)
class FileResult:
    """Detection quality of one trained model on one whole NAB file."""

    file: str
    config: Config
    seed: int
    labelled: int
    detected: int
    alarms: int
    alarms_in_windows: int
    negatives: int
    positives: int  # scored samples inside labelled windows
    first_flag_depth: list[float]  # per detected window: fraction of it elapsed at first flag
    auc: float | None
    threshold: float
    train_seconds: float

    @property
    def recall(self) -> float | None:
        return self.detected / self.labelled if self.labelled else None

    @property
    def fpr(self) -> float:
        return (self.alarms - self.alarms_in_windows) / self.negatives if self.negatives else 0.0

    @property
    def precision(self) -> float | None:
        return self.alarms_in_windows / self.alarms if self.alarms else None


# -- data and labels --------------------------------------------------------------------------


def _ts(text: str) -> np.datetime64:
    return np.datetime64(datetime.fromisoformat(text.strip()), "s")


def load_labels() -> dict[str, list[tuple[np.datetime64, np.datetime64]]]:
    raw = json.loads((NAB / "labels" / "combined_windows.json").read_text(encoding="utf-8"))
    return {
        key.split("/", 1)[1]: [(_ts(a), _ts(b)) for a, b in wins]
        for key, wins in raw.items()
        if key.startswith(CATEGORY + "/")
    }


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -- one run ----------------------------------------------------------------------------------


def evaluate(
    csv: Path, config: Config, seed: int, labels: list, registry: Path
) -> FileResult:
    """Train on the probationary 15% of ``csv``, then score and judge the whole file.

    Raises :class:`TrainError` when the pipeline registers nothing (e.g. every artifact failed
    parity).
    """
    name = f"{config.family[:2]}-w{config.window}-s{seed}-{csv.stem}"[:64]
    request = TrainRequest(
        data=[csv], profiles=[PROFILE], name=name, epochs=EPOCHS, seed=seed,
        train_fraction=TRAIN_FRACTION, family=config.family, window=config.window,
    )
    prepared = prepare(request)
    version = train(prepared, registry).version
    threshold = float(version.metrics["threshold"])
    art = next((a for a in version.artifacts if (a.format, a.quantization) == ("onnx", "fp32")), None)
    if art is None:
        raise TrainError("the fp32 ONNX artifact did not pass its parity check")
    with Registry.open(registry) as reg:
        spec, model = read_bundle(reg.bundle(art.sha256))

    series = read_series(csv)
    ts = np.array([_ts(t) for t in series.timestamps])
    scores = artifact_scores(spec, model, make_windows(fill_missing(series.values), config.window))
    ends = np.arange(config.window - 1, len(series))  # sample each window's score belongs to
    probation = prepared.datasets[0]["rows_used"]
    keep = ends >= probation
    ends, scores = ends[keep], scores[keep]
    end_ts = ts[ends]
    flagged = scores > threshold
    inside = np.zeros(len(ends), bool)
    detected, depth = 0, []
    for start, stop in labels:
        mask = (end_ts >= start) & (end_ts <= stop)
        inside |= mask
        hits = np.flatnonzero(mask & flagged)
        if hits.size:
            detected += 1
            span = max((stop - start) / np.timedelta64(1, "s"), 1.0)
            depth.append(float((end_ts[hits[0]] - start) / np.timedelta64(1, "s") / span))
    return FileResult(
        file=csv.name, config=config, seed=seed, labelled=len(labels), detected=detected,
        alarms=int(flagged.sum()), alarms_in_windows=int((flagged & inside).sum()),
        negatives=int((~inside).sum()), positives=int(inside.sum()), first_flag_depth=depth, auc=_auc(scores, inside),
        threshold=threshold, train_seconds=float(version.metrics["train_seconds"]),
    )


# -- aggregation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    config: Config
    runs: int
    labelled: int
    detected: int
    recall: float
    precision: float
    f1: float
    mean_fpr: float
    median_fpr: float
    alarms: int
    silent_files: int
    mean_auc: float
    mean_depth: float
    base_rate: float  # share of scored samples inside labelled windows

    def key(self) -> tuple[float, float]:
        return (self.f1, -self.mean_fpr)


def summarise(config: Config, results: list[FileResult]) -> Summary:
    labelled = sum(r.labelled for r in results)
    detected = sum(r.detected for r in results)
    alarms = sum(r.alarms for r in results)
    inside = sum(r.alarms_in_windows for r in results)
    recall = detected / labelled if labelled else 0.0
    precision = inside / alarms if alarms else 0.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    fprs = [r.fpr for r in results]
    aucs = [r.auc for r in results if r.auc is not None]
    depths = [d for r in results for d in r.first_flag_depth]
    return Summary(
        config, len(results), labelled, detected, recall, precision, f1,
        float(np.mean(fprs)), float(np.median(fprs)), alarms,
        sum(1 for r in results if r.alarms == 0),
        float(np.mean(aucs)) if aucs else float("nan"),
        float(np.mean(depths)) if depths else float("nan"),
        sum(r.positives for r in results) / max(1, sum(r.positives + r.negatives for r in results)),
    )


def summarise_common(
    results: list[FileResult], failed: dict[tuple[str, Config], str], configs: list[Config]
) -> list[Summary]:
    """Summaries over the files every config registered a model for (like for like)."""
    bad = {file for file, config in failed if config in configs}
    return [
        summarise(c, [r for r in results if r.config == c and r.file not in bad]) for c in configs
    ]


SUMMARY_HEADER = ["config", "runs", "windows detected", "recall", "alarm precision", "F1",
                  "mean FPR", "median FPR", "alarms", "files w/o alarm", "mean AUC",
                  "first flag at"]


def summary_rows(summaries: list[Summary]) -> list[list[str]]:
    return [
        [s.config.label, str(s.runs), f"{s.detected}/{s.labelled}", f"{s.recall:.1%}",
         f"{s.precision:.1%}", f"{s.f1:.3f}", f"{s.mean_fpr:.2%}", f"{s.median_fpr:.2%}",
         str(s.alarms), str(s.silent_files), f"{s.mean_auc:.3f}", f"{s.mean_depth:.0%} in"]
        for s in summaries
    ]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def per_file_rows(
    results: list[FileResult], configs: list[Config], failed: dict[tuple[str, Config], str]
) -> tuple[list[str], list[list[str]]]:
    """One row per file (first seed): detected/labelled, FPR and precision for each config."""
    header = ["file", "labelled"]
    for c in configs:
        header += [f"{c.label} det", "FPR", "prec", "AUC"]
    by = {(r.file, r.config): r for r in results if r.seed == min(x.seed for x in results)}
    rows = []
    for file in sorted({r.file for r in results} | {f for f, _ in failed}):
        first = next((by[(file, c)] for c in configs if (file, c) in by), None)
        row = [file.removesuffix(".csv"), "?" if first is None else str(first.labelled)]
        for c in configs:
            r = by.get((file, c))
            if r is None:
                row += ["no model" if (file, c) in failed else "—", "", "", ""]
                continue
            row += [f"{r.detected}/{r.labelled}", f"{r.fpr:.1%}", _pct(r.precision),
                    "n/a" if r.auc is None else f"{r.auc:.2f}"]
        rows.append(row)
    return header, rows


def render(summaries: list[Summary], per_file: tuple[list[str], list[list[str]]], files: int,
           seeds: list[int], wall: float, failed: dict[tuple[str, Config], str]) -> str:
    best = max(summaries[:2], key=Summary.key)
    other = summaries[1] if best is summaries[0] else summaries[0]
    failures = [
        f"- `{file}` ({config.label}): {why}" for (file, config), why in sorted(
            failed.items(), key=lambda kv: (kv[0][0], kv[0][1].label))
    ]
    if failures:
        failures = ["Not registered (these files are left out of every summary row, so all rows "
                    "cover the same files):", "", *failures, ""]
    lines = [
        "## Model family on NAB realAWSCloudwatch",
        "",
        f"{files} files, seeds {seeds}, {EPOCHS} epochs max (early stopping), hidden "
        f"{list(DEFAULT_ARCHITECTURE.hidden)}, trained on the first {TRAIN_FRACTION:.0%} of "
        "each file (NAB's probationary period) with the pipeline's threshold calibration; every "
        "window of the file scored by the registered fp32 ONNX artifact; metrics over the "
        f"samples after the probationary period. Whole script: {wall / 60:.1f} min.",
        f"Machine: {machine_line()}.",
        "",
        "Recall = labelled windows with at least one flagged window end inside ÷ labelled "
        "windows; alarm precision = flagged samples inside labelled windows ÷ flagged samples "
        "(pooled over files); F1 of those two; FPR = flagged samples outside labelled windows ÷ "
        "samples outside them, per file; AUC = per-file ROC AUC of the raw score for in-window "
        "vs out-of-window samples (threshold-free; files without labels excluded); first flag "
        "at = how far into a detected window the first flag came (mean).",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(summaries)),
        "",
        *failures,
        f"Base rate: {summaries[0].base_rate:.1%} of the scored samples lie inside labelled "
        "windows, so that is the alarm precision of a detector that flags at random.",
        "",
        f"By pooled F1 (ties: lower mean FPR), **{best.config.label}** beats "
        f"{other.config.label} ({best.f1:.3f} vs {other.f1:.3f}).",
        "",
        f"Per file (seed {seeds[0]}):",
        "",
        markdown_table(*per_file),
    ]
    return "\n".join(lines)


# -- composition root -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--files", type=int, default=0, help="use only the first N files (0 = all)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per file and config")
    p.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = NAB / "data" / CATEGORY
    if not data_dir.is_dir():
        print(f"skipped: NAB data not found at {data_dir} (the team's data lives in ../shared/data/nab)")
        return 0
    started = time.monotonic()
    labels = load_labels()
    files = sorted(data_dir.glob("*.csv"))
    if args.files:
        files = files[: args.files]
    seeds = list(range(args.seeds))
    results: list[FileResult] = []
    failed: dict[tuple[str, Config], str] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        registry = Path(tmp) / "registry"

        def run(config: Config) -> None:
            for csv in files:
                for seed in seeds:
                    try:
                        r = evaluate(csv, config, seed, labels.get(csv.name, []), registry)
                    except TrainError as e:
                        failed[(csv.name, config)] = str(e)
                        print(f"  {config.label:16} {csv.stem:38} seed {seed}: not registered: {e}")
                        continue
                    results.append(r)
                    print(f"  {config.label:16} {csv.stem:38} seed {seed}: {r.detected}/{r.labelled} "
                          f"windows, FPR {r.fpr:.2%}, precision {_pct(r.precision)}, "
                          f"train {r.train_seconds:.1f} s", flush=True)

        families = [Config(f, WINDOWS[0]) for f in FAMILIES]
        for config in families:
            run(config)
        winner = max(summarise_common(results, failed, families), key=Summary.key).config
        for window in WINDOWS[1:]:
            run(Config(winner.family, window))
    configs = [*families, *(Config(winner.family, w) for w in WINDOWS[1:])]
    summaries = summarise_common(results, failed, configs)
    wall = time.monotonic() - started
    per_file = per_file_rows(results, configs, failed)
    print()
    print_table(SUMMARY_HEADER, summary_rows(summaries))
    print()
    print_table(*per_file)
    print(f"\n{wall / 60:.1f} min")
    if args.no_docs:
        return 0
    markdown = render(summaries, per_file, len(files), seeds, wall, failed)
    command = COMMAND + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:]))
    for path, header in ((DOCS / "benchmarks.md", None), (DOCS / "model-choice.md", CHOICE_HEADER)):
        kwargs = {"header": header} if header else {}
        update_benchmarks_doc("model-family", markdown, command=command, path=path, **kwargs)
        print(f"wrote section 'model-family' of {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
