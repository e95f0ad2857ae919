"""What every ``edgefleet`` subcommand module shares: exit codes, the usage error, output.

A module of its own (not ``trainer.cli``) because ``python -m trainer.cli`` runs that module
as ``__main__``: importing it again from a subcommand module would create a second
``UsageError`` class that ``main()`` never catches.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "UsageError", "positive_int", "print_json"]

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def print_json(obj: Any) -> None:
    """One JSON document on stdout (sorted keys, indented)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value
