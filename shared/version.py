"""The edgefleet version, read from the installed package's metadata (``--version``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["VersionAction", "edgefleet_version"]


def edgefleet_version() -> str:
    """``X.Y.Z`` of the installed ``edgefleet`` distribution, or a note that it is not installed."""
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "(unknown: not installed; run `pip install -e .`)"


class VersionAction(argparse.Action):
    """argparse ``--version``: print ``edgefleet X.Y.Z`` on stdout and exit 0.

    Unlike argparse's own ``version`` action, the metadata is read only when the option is
    given, not every time a parser is built.
    """

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sys.stdout.write(f"edgefleet {edgefleet_version()}\n")
        parser.exit(0)
