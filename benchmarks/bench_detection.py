"""Detection quality on the team's NAB files, measured with ``edgefleet evaluate``'s harness.

Rows, all under NAB's protocol (each series streamed from its first row; models train on the
probationary rows: 15% of the file, at most 750; the NAB-compatible scorer of
``trainer.evaluation.nab``):

- **default** — ``edgefleet train`` without flags: the window-centred forecaster with one day
  of seasonal context where the rows allow it, its errors through the streaming
  anomaly-likelihood pipeline (``edgefleet.likelihood/6``: a robust history, seasonal repeats
  and the range check on the values), int8 ONNX through the agent's detector;
- **previous model** — what ``edgefleet train`` built before: the forecaster centred on the
  training mean, no seasonal context, and the fixed-threshold decision of earlier bundles
  (``score > 1.5 × p99.5 of validation scores``);
- **windowed Gaussian** — NAB's baseline on the raw values (``trainer.evaluation.baselines``);
  it has no decisions of its own.

Columns: NAB standard, reward_low_FP_rate and reward_low_FN_rate with the threshold optimized
over the file set, the same three on the detector's own ``is_anomaly`` decisions, per category,
and the mean time to detect. Writes the ``detection`` section of docs/benchmarks.md and
``docs/img/detection.png``.

Run: ``.venv/bin/python benchmarks/bench_detection.py``. Needs ``../shared/data/nab``; exits 0
with a message when it is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _report import markdown_table, print_table, update_benchmarks_doc

from shared.score_pipeline import FixedThresholdPipeline
from trainer.evaluation.baselines import windowed_gaussian
from trainer.evaluation.harness import EvaluateRequest, SeriesResult, evaluate
from trainer.evaluation.nab import PROFILES, event_metrics, nab_score, optimize_threshold

REPO = Path(__file__).resolve().parent.parent
NAB = REPO.parent / "shared" / "data" / "nab"
DOCS = REPO / "docs"
COMMAND = ".venv/bin/python benchmarks/bench_detection.py"
# What `edgefleet train` built before window centring, seasons and the score pipeline.
PREVIOUS_MODEL = {"centering": "train", "season": 0, "score_pipeline": FixedThresholdPipeline()}
SHORT = {"standard": "std", "reward_low_FP_rate": "low-FP", "reward_low_FN_rate": "low-FN"}


def quality(results: list[SeriesResult], own: bool) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in PROFILES:
        out[f"opt {SHORT[name]}"] = optimize_threshold([(r.series, r.anomaly_score) for r in results], name).score
        out[f"own {SHORT[name]}"] = nab_score([(r.series, r.is_anomaly) for r in results], name) if own else None
    ev = event_metrics([(r.series, r.is_anomaly) for r in results]) if own else None
    out["F1"] = None if ev is None else f"{ev.f1:.2f}"
    out["TTD rows"] = None if ev is None else ev.mean_delay_rows
    return out


def baseline(results: list[SeriesResult]) -> list[SeriesResult]:
    """The same series scored by the windowed Gaussian (no decisions of its own)."""
    out = []
    for r in results:
        score = windowed_gaussian(r.values[:, 0])
        out.append(SeriesResult(r.key, "windowed Gaussian", "-", r.series, r.values, score, score,
                                np.zeros(len(score), bool)))
    return out


def fmt(v: object) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def plot(rows: dict[str, dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [f"{kind} {SHORT[p]}" for kind in ("opt", "own") for p in PROFILES]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(rows)
    for k, (label, q) in enumerate(rows.items()):
        vals = [q[c] if isinstance(q[c], float) else np.nan for c in cols]
        ax.bar(np.arange(len(cols)) + k * width, vals, width, label=label)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(np.arange(len(cols)) + width * (len(rows) - 1) / 2, cols, fontsize=8)
    ax.set_ylabel("NAB score (28 files)")
    ax.legend(fontsize=8)
    ax.set_title("optimized threshold vs the detector's own decisions", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def nab_inputs(doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, Path, Path] | None:
    """Parse ``--no-docs``; the NAB data folder and labels, or ``None`` (with a message) without them."""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    p.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    args = p.parse_args(argv)
    data, labels = NAB / "data", NAB / "labels" / "combined_windows.json"
    if not data.is_dir():
        print(f"skipped: NAB data not found at {data} (the team's data lives in ../shared/data/nab)")
        return None
    return args, data, labels


def main(argv: list[str] | None = None) -> int:
    inputs = nab_inputs(__doc__, argv)
    if inputs is None:
        return 0
    args, data, labels = inputs
    started = time.monotonic()

    def progress(done: int, total: int, key: str) -> None:
        print(f"  {done}/{total} {key}", flush=True)

    runs: dict[str, list[SeriesResult]] = {}
    print("default:")
    runs["default"] = evaluate(EvaluateRequest(data, labels), progress)
    print("previous model:")
    runs["previous model"] = evaluate(
        EvaluateRequest(data, labels, train_options=PREVIOUS_MODEL), progress
    )
    runs["windowed Gaussian"] = baseline(runs["default"])
    rows = {label: quality(res, own=label != "windowed Gaussian") for label, res in runs.items()}
    header = ["detector", *next(iter(rows.values())).keys()]
    table = [[label, *(fmt(v) for v in q.values())] for label, q in rows.items()]
    cats = sorted({r.category for r in runs["default"]})
    cat_header = ["category", "files", *(f"{label} std (own)" for label in runs)]
    cat_rows = []
    for cat in cats:
        row = [cat, str(sum(r.category == cat for r in runs["default"]))]
        for label, res in runs.items():
            part = [r for r in res if r.category == cat]
            if not any(r.series.scored_windows for r in part):
                row.append("no windows")
                continue
            q = quality(part, own=label != "windowed Gaussian")
            row.append(f"{fmt(q['opt std'])} ({fmt(q['own std'])})")
        cat_rows.append(row)
    wall = time.monotonic() - started
    print()
    print_table(header, table)
    print()
    print_table(cat_header, cat_rows)
    print(f"\n{wall / 60:.1f} min")
    if args.no_docs:
        return 0
    plot(rows, DOCS / "img" / "detection.png")
    markdown = "\n".join([
        f"NAB scores on the team's {len(runs['default'])} NAB files (`../shared/data/nab`), "
        "`opt` = threshold on `anomaly_score` optimized over the files (NAB's protocol), "
        "`own` = the detector's own `is_anomaly`; F1 and mean time to detect (TTD, rows after "
        "the window start) are event-level, on own decisions. Wall time "
        f"{wall / 60:.1f} min.",
        "",
        markdown_table(header, table),
        "",
        "Per category, NAB standard, optimized (own decisions):",
        "",
        markdown_table(cat_header, cat_rows),
        "",
        "![NAB scores](img/detection.png)",
    ])
    update_benchmarks_doc("detection", markdown, command=COMMAND, path=DOCS / "benchmarks.md")
    print("wrote section 'detection' of docs/benchmarks.md and docs/img/detection.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
