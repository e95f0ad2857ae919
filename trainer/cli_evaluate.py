"""``edgefleet evaluate``: the detection benchmark command (see :mod:`trainer.evaluation.harness`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from trainer.cli_common import UsageError, model_args, model_options, positive_int, print_json

__all__ = ["add_evaluate_command"]

_PROFILE_LABEL = {"standard": "standard", "reward_low_FP_rate": "low FP", "reward_low_FN_rate": "low FN"}


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _print_report(report: dict[str, Any]) -> None:
    print(f"{report['files']} series, {report['rows']} rows, {report['windows']} labelled windows")
    print()
    print(f"{'NAB profile':12s}  {'optimized':>9s}  {'threshold':>9s}  {'own decisions':>13s}")
    for name, label in _PROFILE_LABEL.items():
        q = report["nab"][name]
        print(f"{label:12s}  {q['optimized']:9.1f}  {q['threshold']:9.4f}  {q['own_decisions']:13.1f}")
    ev = report["events"]
    print()
    print(
        f"own decisions: {ev['detected']}/{ev['windows']} windows detected, {ev['false_events']} false "
        f"events; precision {ev['precision']:.2f} recall {ev['recall']:.2f} F1 {ev['f1']:.2f}; "
        f"mean time to detect {_fmt(ev['mean_delay_rows'])} rows"
    )
    if report.get("compress"):
        c = report["compress"]
        print()
        print(f"compressed with {c['recipe']}; the uncompressed models scored:")
        for name, label in _PROFILE_LABEL.items():
            q, d = c["parent_nab"][name], c["change"][name]
            print(f"  {label:10s}  optimized {q['optimized']:5.1f} (change {d['optimized']:+.1f})  "
                  f"own decisions {q['own_decisions']:5.1f} (change {d['own_decisions']:+.1f})")
        pe = c["parent_events"]
        print(f"  own decisions: {pe['detected']}/{pe['windows']} windows detected, {pe['false_events']} false events")
        for miss in c["not_compressed"]:
            print(f"  not compressed (evaluated uncompressed): {miss['key']}: {miss['reason']}")
    if len(report["categories"]) > 1:
        print()
        print(f"{'category':28s}  {'standard':>8s}  {'own':>6s}  {'low FP':>6s}  {'low FN':>6s}  {'F1':>5s}")
        for cat, q in report["categories"].items():
            print(
                f"{cat:28s}  {q['standard']['optimized']:8.1f}  {q['standard']['own_decisions']:6.1f}  "
                f"{q['reward_low_FP_rate']['optimized']:6.1f}  {q['reward_low_FN_rate']['optimized']:6.1f}  "
                f"{q['events']['f1']:5.2f}"
            )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluation.harness import (
        EvaluateError,
        EvaluateRequest,
        evaluate,
        plot_series,
        summarize,
    )
    from trainer.progress import ProgressBar

    options: dict[str, Any] = {"seed": args.seed, **model_options(args)}
    if args.epochs:
        options["epochs"] = args.epochs
    request = EvaluateRequest(
        data=Path(args.data), labels=Path(args.labels), model=args.model,
        registry=Path(args.registry), profile=args.profile, train_options=options, compress=args.compress,
        keep_models=Path(args.keep_models) if args.keep_models else None,
    )
    if args.plots:
        plots = Path(args.plots)
        if plots.exists() and not plots.is_dir():
            raise UsageError(f"--plots {plots} exists and is not a folder")
    bar = ProgressBar("evaluating", total=1, enabled=not args.quiet)

    def progress(done: int, total: int, key: str) -> None:
        bar.total = total
        bar.update(done, key)

    try:
        results = evaluate(request, progress)
        bar.finish()
        report = summarize(results).to_json()
        if report["compress"] is None:
            del report["compress"]
        else:
            report["compress"] = {"recipe": args.compress, **report["compress"]}
    except EvaluateError as e:
        bar.finish()
        raise UsageError(str(e)) from e
    if args.plots:
        plots.mkdir(parents=True, exist_ok=True)
        for r in results:
            plot_series(r, plots / (r.key.replace("/", "__").removesuffix(".csv") + ".png"))
        report["plots"] = str(plots)
    if args.json:
        print_json(report)
    else:
        _print_report(report)
        if args.plots:
            print(f"\nplots: {plots}/")
    return 0


def add_evaluate_command(sub: Any, registry_arg: Any, json_arg: Any) -> None:
    """Register ``evaluate`` on the ``edgefleet`` subparsers."""
    p = sub.add_parser(
        "evaluate",
        help="benchmark detection on labelled series (NAB-compatible score, own decisions, events)",
        description=(
            "Train on each series' probationary rows (NAB: 15%%, at most 750 rows), or take "
            "--model, run the agent's detection path over the whole series, and score it."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR|CSV", help="a labelled CSV, or a folder of them")
    p.add_argument("--labels", required=True, metavar="LABELS.json",
                   help="anomaly windows per file, as NAB's combined_windows.json")
    p.add_argument("--model", metavar="NAME@VERSION", help="evaluate this registered model on every series")
    p.add_argument("--train-fraction", choices=("probation",), default="probation",
                   help="without --model: train each series on its probationary rows (the default)")
    p.add_argument("--profile", default="x86-64-v3", help="run the artifact this profile's agents run")
    p.add_argument("--compress", metavar="RECIPE",
                   help="also compress each trained model with this recipe (as `edgefleet compress`, on the "
                        "same probationary rows), evaluate the compressed models, and report the change")
    p.add_argument("--epochs", type=positive_int, help="training epochs (default: train's)")
    p.add_argument("--seed", type=int, default=0)
    model_args(p)
    p.add_argument("--keep-models", metavar="DIR",
                   help="register the models trained (and compressed) here instead of in a temporary registry")
    p.add_argument("--plots", metavar="DIR", help="write one PNG per series here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    registry_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_evaluate)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: edgefleet evaluate")
