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


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (seconds, for instance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
