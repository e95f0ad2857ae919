"""``benchmarks/bench_fleet.py`` refuses a part it does not know: exit 2, one line on stderr,
no traceback, and docs/benchmarks.md untouched (nothing runs before the arguments parse)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "benchmarks.md"


def _digest() -> str:
    return hashlib.sha256(DOC.read_bytes()).hexdigest()


@pytest.mark.parametrize(("args", "needle"), [
    (["--parts", "rollout,nope"], "unknown part(s) nope"),
    (["--parts", ""], "unknown part(s)"),
    (["--count", "many"], "invalid int value"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], needle: str) -> None:
    before = _digest()
    proc = subprocess.run([sys.executable, "benchmarks/bench_fleet.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _digest() == before


def test_help_names_the_parts() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/bench_fleet.py", "--help"], cwd=REPO_ROOT,
                          env={**os.environ, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for part in ("rollout", "rollback", "api", "fleet-rollback", "fleet-api"):
        assert part in proc.stdout
