"""Staged rollouts end to end: real Mosquitto, real agent processes, the real ``edgefleet
rollout`` CLI as a subprocess, the registry and TUF repository on disk.

1. a good candidate goes to one canary, soaks, then to the whole group (group document
   written, per-agent documents removed);
2. a candidate that floods false alarms is rolled back at the canary stage by the anomaly-rate
   gate; the other agents never download or activate it (their reports and their disk say so);
3. a controller killed with SIGKILL mid-soak is resumed by ``edgefleet rollout resume`` and
   completes the rollout from the stage and soak it was in;
4. ``rollout pause`` holds a running rollout and ``rollout abort`` makes its controller roll
   the canary back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers_delivery import REPO_ROOT, Agents, Watch, cli, poll_until

from shared.bundle import ScoreSpec, read_bundle, write_bundle
from shared.deployment import decode_deployment
from shared.score_pipeline import FixedThresholdPipeline
from trainer.fleet.deploy import open_repository, repository_path
from trainer.registry import NewArtifact, Registry

pytestmark = pytest.mark.slow

AGENTS = ("edge-a", "edge-b", "edge-c")
#: How many rows per second each agent scores (csv source): enough inferences for the gates'
#: minimum within a short soak.
RATE = 60
#: The p99 a shared, loaded test host measures says nothing about the profile's hardware (its
#: budget is 5 ms): the latency gate is judged in tests/test_rollout_gates.py on recorded samples.
GATES = ("--gates", "latency-p99=off")
#: Every window of the flooding candidate alarms: its raw-score threshold is far below any score.
FLOOD_THRESHOLD = 1e-9


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """host@1 and host@2 (two trainings) and host@3: host@1's network with a threshold that
    alarms on every window, a real bundle that passes the agent's smoke test."""
    base = tmp_path_factory.mktemp("rollout")
    csv = base / "host.csv"
    cli("data", "synth", "--out", str(csv), "--rows", "6000", "--seed", "3")
    registry = base / "registry"
    for seed in (0, 1):
        cli("train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host",
            "--registry", str(registry), "--epochs", "3", "--train-fraction", "0.2",
            "--seed", str(seed), "--json", "-q")
    with Registry.open(registry) as reg:
        base_version = reg.get("host", 1)
        artifacts = []
        for art in base_version.artifacts:
            spec, model = read_bundle(reg.bundle(art.sha256))
            score = ScoreSpec(spec.score.kind, FLOOD_THRESHOLD, math.log(FLOOD_THRESHOLD),
                              spec.score.width, FixedThresholdPipeline())
            bundle = write_bundle(replace(spec, score=score), model)
            artifacts.append(NewArtifact(art.format, art.quantization, bundle, art.model_bytes,
                                         art.profiles, art.parity))
        flood = reg.register(
            "host", metrics=base_version.metrics, params=base_version.params,
            lineage={**base_version.lineage, "parent_version": 1,
                     "note": f"host@1 with score threshold {FLOOD_THRESHOLD:g}"},
            architecture=base_version.architecture, artifacts=artifacts,
        )
        assert flood.version == 3
    cli("repo", "init", "--registry", str(registry), "--json")
    return csv, registry


@dataclass
class Fleet:
    """One test's world: its own broker, registry copy, three agents on host@1, a subscriber."""

    registry: Path
    broker_url: str
    agents: Agents
    watch: Watch
    state_dirs: dict[str, Path]

    def rollout(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "trainer.cli", "rollout", *args,
                "--registry", str(self.registry), "--broker", self.broker_url]

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.rollout(*args), cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def status(self, rollout_id: str) -> dict[str, Any]:
        return json.loads(cli("rollout", "status", rollout_id, "--registry", str(self.registry),
                              "--json").stdout)

    def documents(self) -> dict[str, Any]:
        repo = open_repository(self.registry)
        return {t: decode_deployment(repo.target_bytes(t)) for t in repo.targets()
                if t.startswith("deployments/")}

    def reported(self, agent: str, version: int, state: str | None = None) -> list[Any]:
        return [d for d in self.watch.of("deployments") if d.agent == agent
                and (d.model, d.version) == ("host", version) and state in (None, d.state)]


@pytest.fixture
def fleet(trained, broker, tmp_path: Path) -> Iterator[Fleet]:
    csv, registry = trained
    copy = Path(shutil.copytree(registry, tmp_path / "registry"))
    agents = Agents(tmp_path / "agents", broker.url)
    watch = Watch(broker.url, agents.tail)
    try:
        cli("deploy", "host@1", "--group", "lab", "--registry", str(copy), "--broker", broker.url)
        root = repository_path(copy) / "metadata" / "root.json"
        state_dirs = {}
        for agent in AGENTS:
            config = agents.config(agent, trust=root, source=f"csv:{csv}?rate={RATE}")
            state_dirs[agent] = agents.start(config).state_dir
        watch.wait_for(lambda: all(fleet_runs(watch, a, 1) for a in AGENTS), 90,
                       "every agent running host@1")
        watch.wait_for(lambda: all(any(h.agent == a and h.inferences > 100
                                       for h in watch.of("health")) for a in AGENTS), 60,
                       "every agent scoring under host@1")
        yield Fleet(copy, broker.url, agents, watch, state_dirs)
    finally:
        agents.close()
        watch.close()


def fleet_runs(watch: Watch, agent: str, version: int) -> bool:
    states = [s for s in watch.of("state") if s.agent == agent]
    return bool(states) and any(a.version == version for a in states[-1].active)


def rollout_id(stderr: str) -> str:
    return next(w.rstrip(":") for line in stderr.splitlines() for w in line.split()
                if w.startswith("ro-"))


def on_disk(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / "state.json").read_text())


def canary_of(status: dict[str, Any]) -> str:
    """The first stage's one canary, from a rollout's log."""
    deployed = next(e for e in status["events"] if e["kind"] == "deployed")["detail"]["agents"]
    assert len(deployed) == 1, deployed
    return str(deployed[0])


def stored_phase(registry: Path) -> Any:
    """A function reading (id, stage, phase) of the registry's rollout, as another process would."""
    db = registry / "registry.sqlite"

    def phase() -> tuple[str, int, str] | None:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute("SELECT id, stage, progress FROM rollouts").fetchone()
        except sqlite3.OperationalError:
            return None
        finally:
            conn.close()
        return None if row is None else (row[0], row[1], json.loads(row[2]).get("phase"))

    return phase


# -- 1. promoted -----------------------------------------------------------------------------


def test_a_good_candidate_is_promoted_to_the_whole_group(fleet: Fleet) -> None:
    proc = fleet.run("start", "host@2", "--group", "lab", "--stages", "1,100%", "--soak", "5s",
                     *GATES, "--json")
    assert proc.returncode == 0, proc.stderr + fleet.agents.tail()
    result = json.loads(proc.stdout)
    assert result["state"] == "completed" and result["agents"] == list(AGENTS)

    status = fleet.status(result["id"])
    kinds = [e["kind"] for e in status["events"]]
    assert kinds == ["started", "deploying", "deployed", "soak-started", "promoted", "deploying",
                     "deployed", "soak-started", "completed"], kinds
    first_stage = status["events"][2]["detail"]
    canary = canary_of(status)  # one agent, chosen in an order shuffled by the rollout's id
    assert first_stage["agents"] == [canary] and first_stage["group"] is False
    assert first_stage["documents"] == [f"deployments/agents/{canary}.json"]

    # Everyone reports host@2 active; the group's document names it; no override is left.
    fleet.watch.wait_for(lambda: all(fleet.reported(a, 2, "active") for a in AGENTS), 30,
                         "host@2 active on every agent")
    docs = fleet.documents()
    assert set(docs) == {"deployments/groups/lab.json"}
    assert docs["deployments/groups/lab.json"].slots["default"].version == 2
    for agent, state_dir in fleet.state_dirs.items():
        assert on_disk(state_dir)["slots"]["default"]["current"]["version"] == 2, agent


# -- 2. rolled back ---------------------------------------------------------------------------


def test_a_candidate_that_floods_false_alarms_is_rolled_back_at_the_canary(fleet: Fleet) -> None:
    proc = fleet.run("start", "host@3", "--group", "lab", "--stages", "1,100%", "--soak", "60s", *GATES)
    assert proc.returncode == 1, proc.stderr + fleet.agents.tail()
    rid = rollout_id(proc.stderr)
    status = fleet.status(rid)
    assert status["state"] == "rolled_back", status
    canary = canary_of(status)
    breaches = next(e for e in status["events"] if e["kind"] == "breach")["detail"]["breaches"]
    assert {b["gate"] for b in breaches} == {"anomaly-rate"} and breaches[0]["agent"] == canary
    rolled = next(e for e in status["events"] if e["kind"] == "rolled-back")["detail"]
    assert rolled["removed"] == [f"deployments/agents/{canary}.json"] and rolled["to"] == "host@1"
    assert rolled["unconfirmed"] == []  # the controller waited for the canary to say so

    # The canary ran host@3 and is back on host@1 from the group's document.
    assert fleet.reported(canary, 3, "active")
    fleet.watch.wait_for(lambda: fleet.reported(canary, 1, "rolled_back"), 30,
                         "the canary rolled back to host@1")
    assert set(fleet.documents()) == {"deployments/groups/lab.json"}
    assert on_disk(fleet.state_dirs[canary])["slots"]["default"]["current"]["version"] == 1

    # The others never downloaded it, never activated it: not in their reports nor on disk.
    with Registry.open(fleet.registry) as reg:
        flood_shas = {a.sha256 for a in reg.get("host", 3).artifacts}
    for agent in sorted(set(AGENTS) - {canary}):
        assert fleet.reported(agent, 3) == [], agent
        state = on_disk(fleet.state_dirs[agent])["slots"]["default"]
        assert state["current"]["version"] == 1 and (state.get("previous") or {}).get("version") != 3
        bundles = {p.stem for p in (fleet.state_dirs[agent] / "bundles").iterdir()}
        assert not bundles & flood_shas, agent


# -- 3. killed and resumed ----------------------------------------------------------------------


def test_a_killed_controller_is_resumed_from_the_registry_and_completes(fleet: Fleet) -> None:
    phase = stored_phase(fleet.registry)
    controller = subprocess.Popen(
        fleet.rollout("start", "host@2", "--group", "lab", "--stages", "1,100%", "--soak", "8s", *GATES),
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        rid, stage, _ = poll_until(lambda: (p := phase()) and p[2] == "soaking" and p,
                                   120, "the first stage soaking", fleet.agents.tail)
        assert stage == 0
        os.kill(controller.pid, signal.SIGKILL)
        controller.wait(10)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(10)
    assert fleet.status(rid)["state"] == "running"

    proc = fleet.run("resume", rid)
    assert proc.returncode == 0, proc.stderr + fleet.agents.tail()
    status = fleet.status(rid)
    assert status["state"] == "completed"
    kinds = [e["kind"] for e in status["events"]]
    # The stage that was soaking was not deployed again: the soak went on where it was.
    assert kinds == ["started", "deploying", "deployed", "soak-started", "promoted", "deploying",
                     "deployed", "soak-started", "completed"], kinds
    fleet.watch.wait_for(lambda: all(fleet.reported(a, 2, "active") for a in AGENTS), 30,
                         "host@2 active on every agent")


# -- 4. paused and aborted --------------------------------------------------------------------


def test_pause_holds_a_rollout_and_abort_rolls_the_canary_back(fleet: Fleet) -> None:
    phase = stored_phase(fleet.registry)
    controller = subprocess.Popen(
        fleet.rollout("start", "host@2", "--group", "lab", "--stages", "1,100%", "--soak", "8s",
                      *GATES),
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        rid, _, _ = poll_until(lambda: (p := phase()) and p[2] == "soaking" and p,
                               120, "the first stage soaking", fleet.agents.tail)
        cli("rollout", "pause", rid, "--registry", str(fleet.registry))
        status = fleet.status(rid)
        assert status["paused"] is True and status["stage"] == 0
        # Held: the agents report past the soak's end, and the rollout is still at stage 1.
        soak_end = status["progress"]["soak_started_at"] + status["soak_s"]
        fleet.watch.wait_for(
            lambda: any(datetime.fromisoformat(h.ts).timestamp() > soak_end + 2
                        for h in fleet.watch.of("health")), 60, "health reports after the soak's end")
        assert phase()[1:] == (0, "soaking")
        abort = fleet.run("abort", rid)
        assert abort.returncode == 0, abort.stderr
        assert "abort requested" in abort.stdout  # the live controller does the rollback
        _, stderr = controller.communicate(timeout=120)
        assert controller.returncode == 1, stderr
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(10)
    status = fleet.status(rid)
    assert status["state"] == "aborted" and status["message"] == "aborted by the operator"
    kinds = [e["kind"] for e in status["events"]]
    # Paused, the rollout never went on to the group stage, although its soak was over.
    assert kinds == ["started", "deploying", "deployed", "soak-started", "paused", "abort-requested",
                     "abort", "rolled-back"], kinds
    canary = canary_of(status)
    fleet.watch.wait_for(lambda: fleet.reported(canary, 1, "rolled_back"), 30,
                         "the canary rolled back to host@1")
    assert set(fleet.documents()) == {"deployments/groups/lab.json"}
    for agent in sorted(set(AGENTS) - {canary}):
        assert fleet.reported(agent, 2) == [], agent
