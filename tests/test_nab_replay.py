"""A real agent replays a real NAB series; its decisions equal ``detect``'s and ``evaluate``'s.

The model is trained on the first 15% of ``ec2_cpu_utilization_24ae8d.csv`` (NAB's probation)
and reaches the agent (a subprocess) through a TUF deployment over a private Mosquitto; the
agent replays the whole file from a ``csv:`` source. Three paths must then agree exactly on
which rows are anomalous, because users compare them: the events a subscriber receives from
the agent, the ``is_anomaly`` column of ``edgefleet detect`` on the same version and profile,
and the decisions of ``edgefleet evaluate``'s harness (``--model``). Detection quality itself
is measured by ``edgefleet evaluate`` and ``benchmarks/bench_detection.py``, not asserted here;
the test only requires at least one of the file's two labelled windows to be detected.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from trainer.evaluation.harness import EvaluateRequest, evaluate

pytestmark = [pytest.mark.slow, pytest.mark.nab]

SERIES = "realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv"


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_agent_detect_and_evaluate_make_identical_decisions(nab_dir: Path, broker, tmp_path: Path) -> None:
    data = nab_dir / "data" / SERIES
    registry = tmp_path / "registry"
    run("-m", "trainer.cli", "train", "--data", str(data), "--profile", "x86-64-v3", "--name", "cpu",
        "--registry", str(registry), "--train-fraction", "0.15", "-q")
    root = json.loads(run("-m", "trainer.cli", "repo", "init", "--registry", str(registry), "--json"))["root"]
    run("-m", "trainer.cli", "deploy", "cpu@1", "--group", "nab", "--registry", str(registry), "--broker", broker.url)

    events: dict[int, dict] = {}
    stopped: list[bool] = []
    done = threading.Condition()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2)

    def on_message(_c, _u, msg) -> None:
        with done:
            if msg.topic.endswith("/events"):
                e = json.loads(msg.payload)
                events[e["seq"]] = e
            elif msg.topic.endswith("/state") and json.loads(msg.payload)["status"] == "stopped":
                stopped.append(True)
            done.notify_all()

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("edgefleet/v1/agents/nab-1/#", qos=1)
    sub.loop_start()
    try:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(run("-m", "edge_agent.cli", "init-config", "--agent-id", "nab-1", "--group", "nab",
                           "--profile", "x86-64-v3", "--broker", broker.url, "--trust", root,
                           "--state-dir", str(tmp_path / "state"), "--source", f"csv:{data}"))
        agent = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg), "--exit-at-end"],
                               capture_output=True, text=True, timeout=300)
        assert agent.returncode == 0, agent.stderr[-3000:]
        with done:  # the agent's `stopped` comes after its events on the same ordered session
            assert done.wait_for(lambda: stopped, timeout=30), "no `stopped` state from the agent"
    finally:
        sub.loop_stop()
        sub.disconnect()

    assert sorted(events) == list(range(1, len(events) + 1)), "events lost or out of sequence"
    agent_alarms = sorted(e["timestamp"] for e in events.values())

    scored = tmp_path / "scored.csv"
    run("-m", "trainer.cli", "detect", "cpu@1", "--data", str(data), "--out", str(scored),
        "--profile", "x86-64-v3", "--registry", str(registry))
    detect_alarms = sorted(line.split(",")[0] for line in scored.read_text().splitlines()[1:]
                           if line.endswith(",1"))

    labels = nab_dir / "labels" / "combined_windows.json"
    [result] = evaluate(EvaluateRequest(data, labels, model="cpu@1", registry=registry, profile="x86-64-v3"))
    stamps = [line.split(",")[0] for line in data.read_text().splitlines()[1:]]
    evaluate_alarms = sorted(stamps[i] for i in result.is_anomaly.nonzero()[0])

    print(f"{len(agent_alarms)} alarms from the agent, {len(detect_alarms)} from detect, "
          f"{len(evaluate_alarms)} from evaluate")
    assert agent_alarms, "the agent raised no alarm at all"
    assert [t[:19] for t in agent_alarms] == detect_alarms == evaluate_alarms

    windows = json.loads(labels.read_text())[SERIES]
    spans = [(datetime.fromisoformat(a[:19]), datetime.fromisoformat(b[:19])) for a, b in windows]
    hits = [any(s <= datetime.fromisoformat(t[:19]) <= e for t in agent_alarms) for s, e in spans]
    assert any(hits), f"no labelled window of {SERIES} detected"
