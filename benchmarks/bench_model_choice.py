"""Which model should ``edgefleet train`` build by default? Scores of the candidates on two kinds of data.

- **NAB** — every candidate runs through ``edgefleet evaluate``'s harness on the team's 28 NAB
  files: trained on each file's probationary rows, its absolute errors through the streaming
  score pipeline, int8 ONNX through the agent's detector, scored with the NAB-compatible scorer
  (optimized threshold and own decisions).
- **synthetic hosts** — the demo's data (``edgefleet data synth``: three hosts, four metrics,
  5000 five-minute rows, ten injected anomalies each after the first 35%): one model trained on
  the first 1500 rows of the three hosts, the agent's detector over the rest (warm: it has the
  rows before), event recall and precision as the demo table counts them. These series are
  multivariate and their anomalies are dense and alike, which NAB's are not: a candidate has
  to do well on both.

Candidates: the default (forecaster, window 64, centred on each window's mean, one day of
seasonal context), the same with the score pipeline's recurrence step, and the default
without each of its parts in turn (the score pipeline's range check, robust history and
seasonal repeats; seasonal context; window centring), the forecaster at
window 32 and the autoencoder, default hidden widths; the linear, conv (TCN: kernel 3,
dilations 1, 2, 4, 8, 32 channels) and attention (two self-attention blocks of width 32, 4
heads) forecasters with the default's window, centring and season. Writes the
``model-choice`` section of docs/model-choice.md and of
docs/benchmarks.md.

Run: ``.venv/bin/python benchmarks/bench_model_choice.py``. Needs ``../shared/data/nab``; exits
0 with a message when it is absent.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import markdown_table, print_table, update_benchmarks_doc
from bench_detection import DOCS, fmt, nab_inputs, quality

from shared.score_pipeline import RANGE_TOLERANCE, LikelihoodPipeline
from trainer.evaluation.harness import EvaluateRequest, evaluate

REPO = Path(__file__).resolve().parent.parent
COMMAND = ".venv/bin/python benchmarks/bench_model_choice.py"
CANDIDATES: dict[str, dict[str, Any]] = {
    "default: forecaster w64, centred, season": {},
    "default without range check": {"score_pipeline": LikelihoodPipeline(robust_history=True, robust_early=True)},
    "default without robust history": {"score_pipeline": LikelihoodPipeline(range_tolerance=RANGE_TOLERANCE)},
    "default without seasonal repeats": {"seasonal_repeats": False},
    "default, history clipped only after the learning period": {
        "score_pipeline": LikelihoodPipeline(robust_history=True, range_tolerance=RANGE_TOLERANCE)},
    "default + recurrences 2": {
        "score_pipeline": LikelihoodPipeline(recurrences=2, robust_history=True, robust_early=True,
                                             range_tolerance=RANGE_TOLERANCE)},
    "no season": {"season": 0},
    "no season, centred on training mean": {"season": 0, "centering": "train"},
    "forecaster w32": {"window": 32},
    "autoencoder w64, centred": {"family": "autoencoder"},
    "linear w64, centred, season": {"family": "linear"},
    "conv (TCN) w64, centred, season": {"family": "conv"},
    "attention w64, centred, season": {"family": "attention"},
    "random forest (trees) w64, centred, season": {"family": "trees"},
    "isolation forest w64": {"family": "isolation_forest"},
}
HOSTS, ROWS, HISTORY, ANOMALIES = 3, 5000, 1500, 10


def synthetic_hosts(options: dict[str, Any], workdir: Path) -> dict[str, str]:
    """Event recall and precision of a candidate on the demo's synthetic hosts."""
    from edge_agent.detector import Detector
    from edge_agent.runtime import open_runtime
    from shared.bundle import read_bundle
    from trainer.backtest import choose_artifact
    from trainer.data import generate_host_metrics, write_host_metrics
    from trainer.pipeline import TrainRequest, prepare, train
    from trainer.registry import Registry

    hosts, files = [], []
    for i in range(HOSTS):
        m = generate_host_metrics(ROWS, seed=100 + i, anomalies=ANOMALIES, clean_prefix=0.35)
        full = workdir / f"host-{i}.csv"
        write_host_metrics(m, full)
        lines = full.read_text().splitlines(keepends=True)
        history = workdir / f"host-{i}.history.csv"
        history.write_text("".join(lines[: HISTORY + 1]))
        hosts.append(m)
        files.append(history)
    registry = workdir / "registry"
    request = TrainRequest(data=files, profiles=["x86-64-v3"], name="host", epochs=20, **options)
    record = train(prepare(request), registry).version
    with Registry.open(registry) as reg:
        artifact = choose_artifact(record.artifacts, None, "x86-64-v3")
        spec, model = read_bundle(reg.bundle(artifact.sha256))
    found = injected = true_events = events = 0
    for m in hosts:
        detector = Detector(open_runtime(spec, model, threads=1), spec, model_version=record.version)
        alarms = []
        for k in range(HISTORY - spec.window + 1, ROWS):
            d = detector.push(m.timestamps[k], [float(v) for v in m.values[k]])
            if d is not None and d.is_anomaly:
                alarms.append(k)
        # as the demo counts: an event finds an anomaly while the recent window still holds it
        recent = int(record.architecture["window"])
        spans = [(a.start, a.end - 1 + recent) for a in m.anomalies]
        found += sum(any(s <= k <= e for k in alarms) for s, e in spans)
        true_events += sum(any(s <= k <= e for s, e in spans) for k in alarms)
        injected += len(spans)
        events += len(alarms)
    precision = true_events / events if events else 0.0
    return {"synth recall": f"{found / injected:.2f}", "synth precision": f"{precision:.2f}"}


def main(argv: list[str] | None = None) -> int:
    inputs = nab_inputs(__doc__, argv)
    if inputs is None:
        return 0
    args, data, labels = inputs
    started = time.monotonic()
    rows = {}
    for label, options in CANDIDATES.items():
        print(f"{label}:", flush=True)
        results = evaluate(EvaluateRequest(data, labels, train_options=options),
                           lambda done, total, key: print(f"  {done}/{total} {key}", flush=True))
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
            rows[label] = {**quality(results, own=True), **synthetic_hosts(options, Path(tmp))}
        print(f"  synthetic hosts: recall {rows[label]['synth recall']}, "
              f"precision {rows[label]['synth precision']}", flush=True)
    wall = time.monotonic() - started
    header = ["candidate", *next(iter(rows.values())).keys()]
    table = [[label, *(fmt(v) for v in q.values())] for label, q in rows.items()]
    print()
    print_table(header, table)
    print(f"\n{wall / 60:.1f} min")
    if args.no_docs:
        return 0
    markdown = "\n".join([
        "NAB scores on the team's 28 NAB files; `opt` = threshold optimized over the files, "
        "`own` = the detector's own decisions; F1 and time to detect (rows) are event-level. "
        f"`synth` = event recall and precision on the demo's synthetic hosts ({HOSTS} hosts, "
        f"{ANOMALIES} injected anomalies each). Wall time {wall / 60:.1f} min.",
        "",
        markdown_table(header, table),
    ])
    for path in (DOCS / "model-choice.md", DOCS / "benchmarks.md"):
        update_benchmarks_doc("model-choice", markdown, command=COMMAND, path=path)
        print(f"wrote section 'model-choice' of {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
