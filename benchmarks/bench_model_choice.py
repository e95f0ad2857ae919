"""Which model should ``edgefleet train`` build by default? NAB scores of the candidates.

Every candidate runs through ``edgefleet evaluate``'s harness on the team's 28 NAB files:
trained on each file's probationary rows, its absolute errors through the default streaming
score pipeline, int8 ONNX through the agent's detector, scored with the NAB-compatible scorer
(optimized threshold and own decisions). Candidates: the forecaster at windows 64 and 32 and
the autoencoder at window 64, default hidden widths. Writes the ``model-choice`` section of
docs/model-choice.md and of docs/benchmarks.md.

Run: ``.venv/bin/python benchmarks/bench_model_choice.py``. Needs ``../shared/data/nab``; exits
0 with a message when it is absent.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _report import markdown_table, print_table, update_benchmarks_doc
from bench_detection import DOCS, fmt, nab_inputs, quality

from trainer.evaluation.harness import EvaluateRequest, evaluate

REPO = Path(__file__).resolve().parent.parent
COMMAND = ".venv/bin/python benchmarks/bench_model_choice.py"
CANDIDATES = {
    "forecaster w64 (default)": {},
    "forecaster w32": {"window": 32},
    "autoencoder w64": {"family": "autoencoder"},
}


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
        rows[label] = quality(results, own=True)
    wall = time.monotonic() - started
    header = ["candidate", *next(iter(rows.values())).keys()]
    table = [[label, *(fmt(v) for v in q.values())] for label, q in rows.items()]
    print()
    print_table(header, table)
    print(f"\n{wall / 60:.1f} min")
    if args.no_docs:
        return 0
    markdown = "\n".join([
        f"NAB scores on the team's 28 NAB files; `opt` = threshold optimized over the files, "
        f"`own` = the detector's own decisions; F1 and time to detect (rows) are event-level. "
        f"Wall time {wall / 60:.1f} min.",
        "",
        markdown_table(header, table),
    ])
    for path in (DOCS / "model-choice.md", DOCS / "benchmarks.md"):
        update_benchmarks_doc("model-choice", markdown, command=COMMAND, path=path)
        print(f"wrote section 'model-choice' of {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
