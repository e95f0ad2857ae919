"""`edgefleet demo --fast`: the whole system on one machine, and nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow


def _ours(workdir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in part for part in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_fast_demo_runs_the_fleet_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--fast", "--workdir", str(workdir), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table_start = proc.stdout.index("[\n")
    rows = {r["agent"]: r for r in json.loads(proc.stdout[table_start:])}
    assert set(rows) == {"edge-1", "edge-2", "edge-3"}
    assert rows["edge-2"]["model"] == "host@2"  # the canary
    assert rows["edge-1"]["model"] == rows["edge-3"]["model"] == "host@1"
    assert rows["edge-1"]["runtime"] == rows["edge-2"]["runtime"] == "onnxruntime"
    assert rows["edge-3"]["runtime"] == "LiteRT" and rows["edge-3"]["emulated"]
    for r in rows.values():
        assert r["recall"] > 0 and r["events"] > 0 and r["inferences"] > 1000
    text = proc.stdout[:table_start]
    assert "found/injected" in text and "everything it started is stopped" in text
    assert _ours(workdir) == []  # no agent or broker left behind


def test_demo_refuses_a_foreign_workdir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--fast", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not made by the demo" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    import signal

    workdir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "demo", "--fast", "--workdir", str(workdir)],
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
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert _ours(workdir) == []
