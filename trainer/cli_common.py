"""What every ``edgefleet`` subcommand module shares: exit codes, the usage error, output.

A module of its own (not ``trainer.cli``) because ``python -m trainer.cli`` runs that module
as ``__main__``: importing it again from a subcommand module would create a second
``UsageError`` class that ``main()`` never catches.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "UsageError",
    "at_least",
    "positive_float",
    "positive_int",
    "print_json",
]

# trainer.models.FAMILIES, spelled out so that parsing arguments does not import torch
# (tests/test_model_families.py checks that the two agree).
FAMILY_CHOICES = ("autoencoder", "forecaster", "linear", "conv", "attention", "trees", "isolation_forest")
ACTIVATION_CHOICES = ("relu", "gelu", "tanh")  # trainer.models.spec.ACTIVATIONS, without importing torch
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def print_json(obj: Any) -> None:
    """One JSON document on stdout (sorted keys, indented)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


positive_int = at_least(1)
"""argparse type: an integer ≥ 1."""


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (seconds, for instance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _season(text: str) -> int | None:
    """``--season``: ``auto`` (None), ``off`` (0) or a positive number of rows."""
    if text == "auto":
        return None
    if text == "off":
        return 0
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 1:
        raise argparse.ArgumentTypeError(f"expected auto, off or a positive number of rows, got {text!r}")
    return rows


def model_args(p: argparse.ArgumentParser) -> None:
    """The model options ``train`` and ``evaluate`` share (defaults: ``train``'s)."""
    p.add_argument("--window", type=positive_int, help="window length in samples")
    p.add_argument("--activation", choices=ACTIVATION_CHOICES,
                   help="hidden-layer activation of the MLP families, forecaster and autoencoder "
                   "(default relu)")
    p.add_argument("--family", choices=FAMILY_CHOICES,
                   help="model family (docs/model-choice.md; conv, linear and attention take their "
                   "default widths, kernel 3 and dilations 1,2,4,8, two attention blocks of "
                   "width 32 with 4 heads; trees: a random forest of 100 trees of depth 8, "
                   "isolation_forest: 100 trees of 256 windows, both ONNX fp32 only)")
    p.add_argument("--season", type=_season, default=None, metavar="ROWS|auto|off",
                   help="seasonal context of a forecaster: the rows one day back (auto, the "
                   "default, when timestamps and rows allow), none (off) or ROWS rows back")
    p.add_argument("--recurrences", type=at_least(0), default=0, metavar="N",
                   help="score pipeline: an error the recent history reached in N separate "
                   "excursions is not reported (0, the default: off; see docs/model-choice.md)")
    p.add_argument("--no-robust-history", dest="robust_history", action="store_false",
                   help="score pipeline: let every error enter the history it is judged against "
                   "as it is (by default errors past the decision boundary enter clipped to it, so one "
                   "large spike does not hide later incidents; see docs/model-choice.md)")
    p.add_argument("--no-range-check", dest="range_check", action="store_false",
                   help="score pipeline: do not report values beyond the range seen so far (by "
                   "default a value past the training rows' range and every later value's, by more "
                   "than 5%% of it, is an anomaly; see docs/model-choice.md)")
    p.add_argument("--no-seasonal-repeats", dest="seasonal_repeats", action="store_false",
                   help="score pipeline: report an error even when one as large came at the same time "
                   "the day before (by default such daily repeats raise no event; see docs/model-choice.md)")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``TrainRequest`` keyword arguments from :func:`model_args`' options."""
    from shared.score_pipeline import RANGE_TOLERANCE, LikelihoodPipeline

    return {
        **({"window": args.window} if args.window else {}),
        **({"family": args.family} if args.family else {}),
        **({"activation": args.activation} if args.activation else {}),
        "season": args.season,
        "score_pipeline": LikelihoodPipeline(recurrences=args.recurrences, robust_history=args.robust_history,
                                             robust_early=args.robust_history,
                                             range_tolerance=RANGE_TOLERANCE if args.range_check else 0.0),
        "seasonal_repeats": args.seasonal_repeats,
    }
