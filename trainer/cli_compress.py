"""``edgefleet compress NAME@V --recipe R --profile P``: compress a registered version
(:mod:`trainer.compress`), print one measured row per step and profile, register the result."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from trainer.cli_common import EXIT_FAILED, UsageError, print_json
from trainer.progress import ProgressBar

__all__ = ["add_compress_command"]

_HEADER = (f"  {'step':34} {'profile':20} {'artifact':26} {'params':>8} {'nonzero':>8} {'MFLOPs':>7} "
           f"{'bytes':>8} {'deflated':>8} {'p50 ms':>7} {'p99 ms':>7} {'quality':>8} {'change':>7} {'agree':>6}")


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_row(row: Any) -> str:
    """One measured row as a line of the table under :data:`_HEADER`."""
    artifact = f"{row.format}/{row.quantization}" + (f"/{row.scheme}" if row.scheme != "static" else "")
    line = (f"  {row.step[:34]:34} {row.profile[:20]:20} {artifact:26} {row.parameters:8d} "
            f"{row.nonzero_parameters:8d} {row.flops / 1e6:7.3f} {row.model_bytes:8d} {row.deflated_bytes:8d} "
            f"{_number(row.latency_p50_ms, '7.3f'):>7} {_number(row.latency_p99_ms, '7.3f'):>7} "
            f"{_number(row.quality, '8.4f'):>8} {_number(row.quality_change, '+7.4f'):>7} "
            f"{_number(row.agreement, '6.3f'):>6}")
    if not row.parity_passed:
        line += "  parity failed: " + "; ".join(row.failures)
    elif not row.latency_changes:
        line += "  (masks only: the runtime latency does not change)"
    return line


def cmd_compress(args: argparse.Namespace) -> int:
    from trainer.compress import CompressError, CompressRequest, QualityGateError, compress, prepare
    from trainer.registry import RegistryError

    request = CompressRequest(
        ref=args.ref, recipe=args.recipe, profiles=args.profile or [],
        data=[Path(p) for p in args.data or []], labels=Path(args.labels) if args.labels else None,
        max_quality_drop=args.max_quality_drop, seed=args.seed,
        profile_dirs=[Path(d) for d in args.profiles_dir],
    )
    try:
        prepared = prepare(request, Path(args.registry))
    except (CompressError, RegistryError) as e:
        raise UsageError(str(e)) from e
    bar = ProgressBar(f"compressing {args.ref}", total=1, enabled=not args.quiet)
    printed_header = False

    def progress(stage: str, info: dict[str, Any]) -> None:
        nonlocal printed_header
        if args.json:
            return
        if stage == "row":
            if not printed_header:
                print(_HEADER)
                printed_header = True
            print(format_row(info["row"]), flush=True)
        elif stage == "step":
            bar.note(f"step {info['step']} …")
        elif stage == "rejected":
            bar.note(f"rejected {info['format']}/{info['quantization']}: {'; '.join(info['why'])}", always=True)

    try:
        outcome = compress(prepared, progress)
    except QualityGateError as e:
        raise UsageError(str(e)) from e
    except (CompressError, RegistryError) as e:
        print(f"edgefleet compress: {e}", file=sys.stderr)
        return EXIT_FAILED
    record = outcome.version
    if args.json:
        print_json({**record.to_json(), "rows": [r.to_json() for r in outcome.rows], "notes": outcome.notes})
        return 0
    for note in outcome.notes:
        print(f"  {note}")
    print(f"registered {record.ref} (from {args.ref}, recipe {prepared.recipe.text}) in {args.registry}")
    return 0


def _drop(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_compress_command(sub: Any, registry_arg: Any, json_arg: Any) -> None:
    """Register ``compress`` on the ``edgefleet`` subparsers."""
    p = sub.add_parser(
        "compress", help="prune, factorize, distill, quantize a registered version; register the result",
        description="Apply a compression recipe to NAME@V, measure every step in the artifacts each "
        "profile ships, and register NAME@N with the parent and recipe in its lineage (docs/compression.md).",
    )
    p.add_argument("ref", metavar="NAME@V")
    p.add_argument("--recipe", required=True, metavar="RECIPE",
                   help="steps separated by ',': prune:RATIO[:magnitude|taylor][:layer|global], finetune:EPOCHS, "
                   "lowrank:ENERGY|rank=R, sparsify:AMOUNT, distill[:WIDTHS|:front][:alpha=A][:epochs=N], "
                   "quantize:int8|fp32|dynamic[:per-channel|per-tensor] (last)")
    p.add_argument("--profile", action="append", metavar="NAME", help="firmware profile; repeatable")
    p.add_argument("--profiles-dir", action="append", default=[], metavar="DIR",
                   help="look for profiles here before the built-in ones; repeatable")
    p.add_argument("--data", action="append", metavar="CSV",
                   help="rows to fine-tune, calibrate and judge on; repeatable (default: the files NAME@V "
                   "was trained on, found by name in this folder)")
    p.add_argument("--labels", metavar="LABELS.json",
                   help="anomaly windows (NAB format): judge quality by NAB score; without, by injected anomalies")
    p.add_argument("--max-quality-drop", type=_drop, metavar="X",
                   help="refuse (exit 2, nothing registered) a step whose quality falls more than X below "
                   "the parent's (a step followed by finetune or distill is judged after it)")
    p.add_argument("--seed", type=int, default=0, help="seed of fine-tuning and of the injected anomalies")
    registry_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    json_arg(p)
    p.set_defaults(func=cmd_compress)
