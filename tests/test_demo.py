"""`edgefleet demo`: the whole system on one machine, and nothing left running."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO_ROOT

from trainer.demo import MARKER

pytestmark = pytest.mark.slow

DEFAULT_WORKDIR = REPO_ROOT / ".edgefleet-demo"  # `edgefleet demo` with no --workdir, from the root


def _ours(workdir: Path) -> list[psutil.Process]:
    """Processes whose command line names ``workdir`` (the demo passes it absolute)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in part for part in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _table(stdout: str) -> dict[str, dict[str, str]]:
    """The final table of the demo's text output, one dict per agent keyed by column."""
    lines = stdout[stdout.index("\nagent ") + 1:].strip().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    return {row["agent"]: row for row in (dict(zip(header, re.split(r"\s{2,}", line.strip()))) for line in lines[1:])}


@pytest.fixture
def default_workdir() -> Iterator[Path]:
    """The repository's own `.edgefleet-demo`, removed afterwards (only if the demo made it)."""
    yield DEFAULT_WORKDIR
    if (DEFAULT_WORKDIR / MARKER).exists():
        shutil.rmtree(DEFAULT_WORKDIR)


def test_make_demo_runs_the_fleet_and_cleans_up(default_workdir: Path) -> None:
    # Exactly what `make demo` runs: `edgefleet demo`, no flags, from the repository root, so
    # the work directory is the relative default and every path the demo writes into agent
    # configs starts out relative to the root, not to the folder the configs live in.
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "demo"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert set(rows) == {"edge-1", "edge-2", "edge-3"}
    assert rows["edge-2"]["model"] == "host@2"  # the canary
    assert rows["edge-1"]["model"] == rows["edge-3"]["model"] == "host@1"
    assert rows["edge-1"]["runtime"] == rows["edge-2"]["runtime"] == "onnxruntime"
    assert rows["edge-3"]["runtime"] == "LiteRT" and rows["edge-3"]["profile"] == "rpi4-arm64 (emulated)"
    for r in rows.values():
        found, injected = (int(n) for n in r["found/injected"].split("/"))
        assert 0 < found <= injected and int(r["events"]) > 0 and int(r["inferences"]) > 1000
    assert "everything it started is stopped" in proc.stdout
    assert (default_workdir / "edge-1.toml").is_file()  # it ran where `make demo` runs it
    assert _ours(default_workdir) == []  # no agent or broker left behind


def test_demo_refuses_a_foreign_workdir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--fast", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not made by the demo" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# Started through exec with SIGINT ignored: a process inherits that disposition from a
# background job of a non-interactive shell or a CI runner, and Python then installs no
# KeyboardInterrupt handler of its own. The demo must stop on SIGINT however it was started.
_START_WITH_SIGINT_IGNORED = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-c", _START_WITH_SIGINT_IGNORED,
                             "-m", "trainer.cli", "demo", "--fast", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the agents run
            if line.startswith("[5/6]"):
                break
        else:
            pytest.fail("the demo ended before starting its agents")
        assert len(_ours(workdir)) >= 4  # three agents and the private broker
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest[-3000:]
    assert "edgefleet: interrupted" in rest and "finished in" not in rest
    assert _ours(workdir) == []
