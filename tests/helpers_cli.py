"""Running the real ``edgefleet`` CLI from tests, in a child process of this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """This environment with the repository on ``PYTHONPATH`` (a fresh clone is not installed)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def edgefleet(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``edgefleet ARGS…``; with ``check``, an AssertionError carrying stderr's tail if it fails."""
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    return proc
