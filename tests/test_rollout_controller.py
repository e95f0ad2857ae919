"""The rollout state machine step by step, with an injected clock: a real Mosquitto, a real
registry and TUF repository on disk, and agents played by a client that publishes the
messages agents publish (state, deployment reports, health), so that each step's input is
exactly known. No sleeping: the soak's end is a clock reading, and every wait is on the
controller's observer receiving a message.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.drift import DriftReport
from shared.deployment import decode_deployment
from shared.messages import (
    ActiveModel,
    AgentHealth,
    AgentState,
    DeploymentStatus,
    encode_agent_health,
    encode_agent_state,
    encode_deployment_status,
    encode_drift_event,
)
from shared.topics import Topics
from trainer.fleet.deploy import DeployError, deploy, init_repository, open_repository
from trainer.fleet.rollout import (
    FleetObserver,
    RolloutController,
    RolloutStore,
    check_request,
    create_rollout,
    parse_gates,
)
from trainer.fleet.rollout.controller import _shuffled
from trainer.fleet.rollout.gates import Counts
from trainer.fleet.status import read_fleet
from trainer.registry import NewArtifact, Registry

TOPICS = Topics()


def _now() -> str:
    return datetime.now(UTC).isoformat()

AGENTS = ("a1", "a2", "a3")
SOAK = 60.0


class Clock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class PlayedAgents:
    """Publishes, retained and acknowledged, what the agents of group ``lab`` would."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.counts = {a: [0, 0] for a in AGENTS}  # inferences, anomalies
        self.started = {a: "2026-01-01T00:00:00.000+00:00" for a in AGENTS}

    def restart(self, agent: str, started_at: str) -> None:
        """The agent process starts again: its counters from zero, a new start time."""
        self.counts[agent] = [0, 0]
        self.started[agent] = started_at

    def _put(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def state(self, agent: str, version: int, profile: str = "x86-64-v3") -> None:
        active = (ActiveModel("default", "host", version, "onnx", "int8", "0" * 64),)
        self._put(TOPICS.agent_state(agent), encode_agent_state(AgentState(
            agent=agent, status="online", bdseq=1, group="lab", profile=profile,
            arch="x86_64", runtimes=("onnxruntime",), active=active, emulated=False,
            ts=_now(), health_period_s=1.0,
        )))

    def offline(self, agent: str) -> None:
        """What the broker publishes for an agent that went away (its will)."""
        self._put(TOPICS.agent_state(agent), encode_agent_state(AgentState(
            agent=agent, status="offline", bdseq=1, group="lab", profile="x86-64-v3",
            arch="x86_64", runtimes=("onnxruntime",), active=(), emulated=False,
            ts=_now(), health_period_s=1.0,
        )))

    def report(self, agent: str, version: int, state: str, serial: int, reason: str | None = None,
               role: str = "active") -> None:
        self._put(TOPICS.agent_deployments(agent), encode_deployment_status(DeploymentStatus(
            agent=agent, slot="default", model="host", version=version, state=state,
            reason=reason, serial=serial, ts=_now(), role=role,
        )))

    def health(self, agent: str, inferences: int = 0, anomalies: int = 0, p99: float = 1.0,
               shadow: dict[str, Any] | None = None) -> None:
        self.counts[agent][0] += inferences
        self.counts[agent][1] += anomalies
        n, k = self.counts[agent]
        self._put(TOPICS.agent_health(agent), encode_agent_health(AgentHealth(
            agent=agent, ts=_now(), inferences=n, anomalies=k, errors=0,
            latency_ms={"p50": p99 / 2, "p99": p99}, outbox_depth=0, outbox_dropped=0,
            rss_mb=50.0, cpu_percent=5.0, started_at=self.started.get(agent),
            shadow=None if shadow is None else {"default": shadow},
        )))

    def drift(self, agent: str, version: int, seq: int, slot: str = "default") -> None:
        """A ``drift`` event, as the agent's outbox delivers it (not retained)."""
        figures = {"psi": 0.6, "ks": 0.4, "ks_pvalue": 0.0, "drifted": True}
        report = DriftReport(slot=slot, model="host", model_version=version, window=1000, fill=1000,
                             timestamp=_now(), drifted=True, raised=True, features={"cpu": figures},
                             score={**figures, "drifted": False}, psi_threshold=0.25, ks_alpha=0.05)
        info = self.client.publish(TOPICS.agent_events(agent), encode_drift_event(report, agent, seq), qos=1)
        info.wait_for_publish(10)


def _register(registry: Path) -> None:
    with Registry.open(registry, create=True) as reg:
        for v in (1, 2):
            art = NewArtifact("onnx", "int8", f"bundle of host@{v}".encode(), 16, ["x86-64-v3"], {})
            reg.register("host", metrics={}, params={}, lineage={}, architecture={}, artifacts=[art])


def _until(observer: FleetObserver, predicate: Callable[[Any], bool], what: str) -> None:
    for _ in range(200):
        if predicate(observer.snapshot()):
            return
        observer.wait(0.5)
    raise AssertionError(f"the observer never saw {what}")


@pytest.fixture
def world(tmp_path: Path, clients) -> Any:
    registry = tmp_path / "registry"
    _register(registry)
    init_repository(registry)
    trainer = clients()
    deploy(registry, "host@1", group="lab", client=trainer, topics=TOPICS)
    played = PlayedAgents(clients())
    for agent in AGENTS:
        played.state(agent, 1)
        played.health(agent, inferences=1000, anomalies=10)
    views = read_fleet(trainer, TOPICS)
    assert [v.agent for v in views] == list(AGENTS)

    def start(gates: str = "latency-p99=2ms",
              stages: tuple[str, ...] = ("1", "100%"), shadow: bool = False) -> tuple[str, FleetObserver]:
        request = check_request(registry, "host@2", "lab", "default", stages, SOAK,
                                parse_gates(gates), shadow=shadow)
        record, skipped = create_rollout(registry, request, views)
        assert skipped == {} and record.agents == AGENTS
        observer = FleetObserver(clients(), TOPICS)
        observer.start()
        _until(observer, lambda s: all(a in s.health for a in AGENTS), "every agent's health")
        return record.id, observer

    return registry, trainer, played, start


def _controller(world: Any, rid: str, observer: FleetObserver, clock: Clock) -> RolloutController:
    registry, trainer, _, _ = world
    return RolloutController(registry, rid, client=trainer, topics=TOPICS, observer=observer,
                             clock=clock, activation_timeout=120.0)


def _documents(registry: Path) -> dict[str, Any]:
    repo = open_repository(registry)
    return {t: decode_deployment(repo.target_bytes(t)).slots["default"].version
            for t in repo.targets() if t.startswith("deployments/")}


def _activate(played: PlayedAgents, observer: FleetObserver, agent: str, serial: int) -> None:
    played.report(agent, 2, "active", serial)
    played.state(agent, 2)
    played.health(agent)  # the first report after the activation: the soak counts from it
    _until(observer, lambda s: s.health_after_report(agent, "host", 2, "active")
           and s.runs(agent, "default", "host", 2), f"{agent} running host@2")


def _roles(rollout_id: str) -> tuple[str, str, str]:
    """The agents of a rollout by role: its first canary, then the other two in id order
    (the controller shuffles the agents by the rollout's id)."""
    first = _shuffled(list(AGENTS), rollout_id)[0]
    rest = sorted(a for a in AGENTS if a != first)
    return first, rest[0], rest[1]


def _back(played: PlayedAgents, observer: FleetObserver, agent: str) -> None:
    played.report(agent, 1, "rolled_back", 99)
    played.state(agent, 1)
    _until(observer, lambda s: s.runs(agent, "default", "host", 1), f"{agent} back on host@1")


def test_a_restarted_controller_keeps_the_soak_it_was_in_and_promotes(world: Any) -> None:
    registry, _, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    clock = Clock()
    ctrl = _controller(world, rid, observer, clock)

    record = ctrl.step()  # stage 1: the first agent gets its own document
    assert record.progress["phase"] == "activating" and record.progress["new"] == [A1]
    assert _documents(registry) == {"deployments/groups/lab.json": 1, f"deployments/agents/{A1}.json": 2}
    assert ctrl.step().progress["phase"] == "activating"  # nothing reported yet

    _activate(played, observer, A1, record.progress["serial"])
    record = ctrl.step()
    assert record.progress["phase"] == "soaking" and record.progress["soak_started_at"] == clock.t

    played.health(A1, inferences=200, anomalies=1)  # 0.5 %: well under 3 x the 1 % it had
    for agent in (A2, A3):
        played.health(agent, inferences=200, anomalies=2)
    _until(observer, lambda s: s.health[A1].inferences == 1200, "a1's soak counters")
    clock.t += SOAK - 1
    assert ctrl.step().progress["phase"] == "soaking"  # one second of soak left

    # The controller dies; a new one (another process, later) resumes from the registry.
    clock.t += 0.5
    again = _controller(world, rid, observer, clock)
    assert again.view(again.step()).soak_left_s == pytest.approx(0.5)
    clock.t += 1
    record = again.step()
    assert (record.stage, record.progress["phase"]) == (1, "deploy")

    targets_before = open_repository(registry).versions()["targets"]
    record = again.step()  # the last stage: the group's document, no override left
    assert _documents(registry) == {"deployments/groups/lab.json": 2}
    # written and a1's document removed in one signed targets version
    assert open_repository(registry).versions()["targets"] == targets_before + 1
    assert record.progress["expect"] == [A2, A3]
    for agent in (A2, A3):
        _activate(played, observer, agent, record.progress["serial"])
    assert again.step().progress["phase"] == "soaking"
    for agent in AGENTS:
        played.health(agent, inferences=100)
    _until(observer, lambda s: s.health[A3].inferences == 1300, "the last counters")
    clock.t += SOAK
    record = again.step()
    assert record.state == "completed"
    with Registry.open(registry) as reg:
        kinds = [e["kind"] for e in RolloutStore(reg).events(rid)]
    assert kinds == ["started", "deploying", "deployed", "soak-started", "promoted", "deploying",
                     "deployed", "soak-started", "completed"]


@pytest.mark.parametrize(("gates", "act", "gate"), [
    ("latency-p99=2ms", lambda p, a: p.health(a, inferences=100, anomalies=40), "anomaly-rate"),
    ("latency-p99=2ms", lambda p, a: p.health(a, inferences=100, p99=7.5), "latency-p99"),
    ("latency-p99=2ms", lambda p, a: p.report(a, 2, "failed", 3, "smoke test: output 0 differs"),
     "failures"),
])
def test_a_breach_rolls_the_canary_back_with_a_new_metadata_version(
    world: Any, gates: str, act: Callable[[PlayedAgents, str], None], gate: str
) -> None:
    registry, _, played, start = world
    rid, observer = start(gates)
    A1, A2, A3 = _roles(rid)
    clock = Clock()
    ctrl = _controller(world, rid, observer, clock)
    record = ctrl.step()
    _activate(played, observer, A1, record.progress["serial"])
    assert ctrl.step().progress["phase"] == "soaking"
    targets_before = open_repository(registry).versions()["targets"]

    mark = observer.snapshot()
    act(played, A1)
    _until(observer, lambda s: s != mark, "the canary's report")
    record = ctrl.step()  # rolled back, waiting for a1 to say it is back on host@1
    assert record.state == "running"
    assert record.progress["rolling_back"]["message"].startswith(f"{gate} on {A1}")
    assert _documents(registry) == {"deployments/groups/lab.json": 1}
    assert open_repository(registry).versions()["targets"] > targets_before
    _back(played, observer, A1)
    record = ctrl.step()
    assert record.state == "rolled_back" and record.message.startswith(f"{gate} on {A1}")


def test_only_the_candidates_drift_event_rolls_the_canary_back(world: Any) -> None:
    registry, _, played, start = world
    rid, observer = start()
    A1 = _roles(rid)[0]
    clock = Clock()
    ctrl = _controller(world, rid, observer, clock)
    record = ctrl.step()
    _activate(played, observer, A1, record.progress["serial"])
    assert ctrl.step().progress["phase"] == "soaking"

    # The previous version's drift event (raised around the swap, delivered late from the
    # outbox) and one of another slot say nothing of the candidate.
    played.drift(A1, 1, seq=7)
    played.drift(A1, 2, seq=8, slot="other")
    _until(observer, lambda s: s.drift_count(A1, "other", "host", 2) == 1, "the late drift events")
    assert observer.snapshot().drift_count(A1, "default", "host", 1) == 1
    record = ctrl.step()
    assert (record.state, record.progress["phase"]) == ("running", "soaking")

    played.drift(A1, 2, seq=9)  # the candidate's own
    _until(observer, lambda s: s.drift_count(A1, "default", "host", 2) == 1, "the candidate's drift event")
    record = ctrl.step()
    assert record.progress["rolling_back"]["message"].startswith(f"drift on {A1}")
    assert _documents(registry) == {"deployments/groups/lab.json": 1}
    _back(played, observer, A1)
    record = ctrl.step()
    assert record.state == "rolled_back" and record.message.startswith(f"drift on {A1}")


def test_abort_before_anything_was_deployed_changes_no_document(world: Any) -> None:
    registry, _, _, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    with Registry.open(registry) as reg:
        RolloutStore(reg).update(rid, abort_requested=True)
    record = _controller(world, rid, observer, Clock()).step()
    assert record.state == "aborted"
    assert _documents(registry) == {"deployments/groups/lab.json": 1}


def test_a_breach_in_the_last_stage_points_the_group_back_at_the_previous_version(world: Any) -> None:
    registry, _, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    clock = Clock()
    ctrl = _controller(world, rid, observer, clock)
    record = ctrl.step()
    _activate(played, observer, A1, record.progress["serial"])
    ctrl.step()
    played.health(A1, inferences=100)
    _until(observer, lambda s: s.health[A1].inferences == 1100, "a1's soak counters")
    clock.t += SOAK
    assert ctrl.step().stage == 1
    record = ctrl.step()
    assert _documents(registry) == {"deployments/groups/lab.json": 2}
    for agent in (A2, A3):
        _activate(played, observer, agent, record.progress["serial"])
    assert ctrl.step().progress["phase"] == "soaking"

    played.health(A3, inferences=100, anomalies=90)
    _until(observer, lambda s: s.health[A3].anomalies == 100, "a3 flooding")
    record = ctrl.step()
    assert record.state == "running" and record.progress["rolling_back"] is not None
    for agent in (A1, A2):
        _back(played, observer, agent)
    assert ctrl.step().state == "running"  # a3 is online and has not confirmed yet
    clock.t += 121.0
    record = ctrl.step()
    assert record.state == "rolled_back" and record.message.startswith(f"anomaly-rate on {A3}")
    with Registry.open(registry) as reg:
        assert RolloutStore(reg).events(rid)[-1]["detail"]["unconfirmed"] == [A3]
    repo = open_repository(registry)
    group = decode_deployment(repo.target_bytes("deployments/groups/lab.json"))
    assert (group.slots["default"].version, group.serial) == (1, 4)  # newer serial, older artifact
    assert _documents(registry) == {"deployments/groups/lab.json": 1}


def _soak_first_stage(world: Any, ctrl: RolloutController, observer: FleetObserver,
                      clock: Clock, A1: str) -> None:
    """Stage 1 (its canary ``A1``) activates, soaks cleanly and is promoted."""
    _, _, played, _ = world
    record = ctrl.step()
    _activate(played, observer, A1, record.progress["serial"])
    assert ctrl.step().progress["phase"] == "soaking"
    played.health(A1, inferences=100)
    _until(observer, lambda s: s.health[A1].inferences == 1100, "a1's soak counters")
    clock.t += SOAK
    assert ctrl.step().stage == 1


def test_an_agent_offline_in_the_last_stage_is_not_judged_and_the_group_completes(world: Any) -> None:
    registry, _, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    clock = Clock()
    ctrl = _controller(world, rid, observer, clock)
    _soak_first_stage(world, ctrl, observer, clock, A1)
    played.offline(A3)
    _until(observer, lambda s: not s.online(A3), "a3 offline")

    record = ctrl.step()  # the group's document: a3 gets it when it is back
    assert _documents(registry) == {"deployments/groups/lab.json": 2}
    assert record.progress["expect"] == [A2] and record.progress["not_judged"] == [A3]
    _activate(played, observer, A2, record.progress["serial"])
    assert ctrl.step().progress["phase"] == "soaking"
    for agent in (A1, A2):
        played.health(agent, inferences=100)
    _until(observer, lambda s: s.health[A2].inferences == 1100, "a2's soak counters")
    clock.t += SOAK + 120.0 + 1  # past the soak and the data wait: a3 would be judged "data"
    record = ctrl.step()
    assert record.state == "completed", record.message
    with Registry.open(registry) as reg:
        events = RolloutStore(reg).events(rid)
    completed = events[-1]["detail"]
    assert sorted(completed["agents"]) == sorted([A1, A2]) and completed["not_judged"] == [A3]


class _Crash(Exception):
    pass


class _CrashAfterPublishing(RolloutController):
    """A controller that dies right after publishing, before recording it."""

    def _retrying(self, what: str, action: Callable[[], Any]) -> Any:
        action()
        raise _Crash(what)


def test_a_crash_after_publishing_resumes_the_same_canaries(world: Any) -> None:
    registry, trainer, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    clock = Clock()
    crashing = _CrashAfterPublishing(registry, rid, client=trainer, topics=TOPICS,
                                     observer=observer, clock=clock, activation_timeout=120.0)
    with pytest.raises(_Crash):
        crashing.step()
    assert _documents(registry) == {"deployments/groups/lab.json": 1, f"deployments/agents/{A1}.json": 2}
    # a1 restarts onto the candidate (its counters are the candidate's now) and is briefly away
    played.offline(A1)
    _until(observer, lambda s: not s.online(A1), "a1 offline")

    ctrl = _controller(world, rid, observer, clock)
    record = ctrl.step()  # the recorded stage is published again, not a new choice
    assert record.progress["phase"] == "activating" and record.progress["new"] == [A1]
    assert record.progress["baselines"][A1] == {"inferences": 1000, "anomalies": 10, "errors": 0}
    assert _documents(registry) == {"deployments/groups/lab.json": 1, f"deployments/agents/{A1}.json": 2}
    with Registry.open(registry) as reg:
        RolloutStore(reg).update(rid, abort_requested=True)
    assert ctrl.step().state == "aborted"
    assert _documents(registry) == {"deployments/groups/lab.json": 1}


def test_a_rollback_keeps_an_agent_document_someone_else_wrote_since(world: Any) -> None:
    registry, trainer, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    ctrl = _controller(world, rid, observer, Clock())
    ctrl.step()
    deploy(registry, "host@1", agent=A1, client=trainer, topics=TOPICS)  # an operator's pin
    with Registry.open(registry) as reg:
        RolloutStore(reg).update(rid, abort_requested=True)
    assert ctrl.step().state == "aborted"
    assert _documents(registry) == {"deployments/groups/lab.json": 1, f"deployments/agents/{A1}.json": 1}


def test_a_retry_is_not_failed_by_the_retained_report_of_the_attempt_before(world: Any) -> None:
    registry, _, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    ctrl = _controller(world, rid, observer, Clock())
    first = ctrl.step()
    played.report(A1, 2, "failed", first.progress["serial"], "smoke test: output 0 differs")
    _until(observer, lambda s: any(d.state == "failed" for d in s.deployments.get(A1, ())),
           "a1's failure")
    assert ctrl.step().state == "rolled_back"

    # The same version again; A1's `failed` is still retained, and A1 is the only agent
    # online, so it is the canary again.
    for agent in (A2, A3):
        played.offline(agent)
    rid2, observer2 = start()
    _until(observer2, lambda s: not s.online(A2) and not s.online(A3), "the others offline")
    again = _controller(world, rid2, observer2, Clock())
    record = again.step()
    assert record.progress["new"] == [A1] and record.progress["serial"] > first.progress["serial"]
    assert observer2.snapshot().deployments[A1][-1].state == "failed"
    record = again.step()
    assert record.state == "running" and record.progress["phase"] == "activating"


def test_a_group_with_an_agent_the_version_was_not_built_for_is_refused_unless_forced(
    world: Any,
) -> None:
    registry, trainer, played, _ = world
    played.state("pi", 1, profile="rpi4-arm64")
    views = read_fleet(trainer, TOPICS)
    request = check_request(registry, "host@2", "lab", "default", ("100%",), SOAK, parse_gates(""
                            "latency-p99=2ms"))
    with pytest.raises(DeployError, match="no artifact for profile.*rpi4-arm64 of pi in group 'lab'"):
        create_rollout(registry, request, views)
    with Registry.open(registry) as reg:
        assert RolloutStore(reg).all() == []
    record, skipped = create_rollout(registry, request, views, force=True)
    assert skipped == {"pi": "profile rpi4-arm64 not built"}
    assert record.progress["members"] == 4

    observer = FleetObserver(trainer, TOPICS)
    observer.start()
    _until(observer, lambda s: all(a in s.health for a in AGENTS), "every agent's health")
    first = _controller(world, record.id, observer, Clock()).step()
    # "100%" alone still begins with one canary of its own document
    A1 = _roles(record.id)[0]
    assert first.progress["new"] == [A1]
    assert _documents(registry) == {"deployments/groups/lab.json": 1, f"deployments/agents/{A1}.json": 2}


def test_a_canary_that_restarted_counts_its_window_from_the_restart(world: Any) -> None:
    _, _, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    ctrl = _controller(world, rid, observer, Clock())
    record = ctrl.step()
    _activate(played, observer, A1, record.progress["serial"])
    record = ctrl.step()
    assert record.progress["start"][A1]["inferences"] == 1000
    # Restarted, it has already counted more than at the soak's start: its counters did not
    # go down, yet all of them are the new process's.
    played.restart(A1, "2026-01-02T00:00:00.000+00:00")
    played.health(A1, inferences=1100, anomalies=11)
    _until(observer, lambda s: s.health[A1].started_at.startswith("2026-01-02"), "the restart")
    window = ctrl.evidence(record, observer.snapshot()).canaries[0].window
    assert window == Counts(1100, 11, 0)


def test_a_rollback_the_broker_cannot_take_is_retried_until_it_is_back(world: Any, broker) -> None:
    registry, trainer, played, start = world
    rid, observer = start()
    A1, A2, A3 = _roles(rid)
    retries: list[str] = []

    def broker_back(_delay: float) -> None:  # the controller's wait between two attempts
        if broker.proc is None:
            broker.start()
        for _ in range(200):
            if trainer.is_connected():
                return
            observer.wait(0.1)

    ctrl = RolloutController(registry, rid, client=trainer, topics=TOPICS, observer=observer,
                             clock=Clock(), activation_timeout=120.0, publish_timeout=5.0,
                             on_retry=retries.append, sleep=broker_back)
    record = ctrl.step()
    assert _documents(registry) == {"deployments/groups/lab.json": 1, f"deployments/agents/{A1}.json": 2}
    with Registry.open(registry) as reg:
        RolloutStore(reg).update(rid, abort_requested=True)
    broker.stop()
    record = ctrl.step()
    assert record.state == "aborted"
    assert retries and retries[0].startswith("cannot roll back (attempt 1)")
    assert _documents(registry) == {"deployments/groups/lab.json": 1}


def test_abort_and_resume_with_a_live_controller_answer_in_json(world: Any, broker) -> None:
    import json
    import subprocess
    import sys

    from trainer.cli_rollout import _controller_lock

    registry, _, _, start = world
    rid, _ = start()
    with _controller_lock(str(registry), rid) as mine:  # this process is the live controller
        assert mine
        for command in ("resume", "abort"):
            proc = subprocess.run(
                [sys.executable, "-m", "trainer.cli", "rollout", command, rid, "--registry",
                 str(registry), "--broker", broker.url, "--json"],
                capture_output=True, text=True, timeout=120,
            )
            assert proc.returncode == 0, proc.stderr
            shown = json.loads(proc.stdout)
            assert shown["id"] == rid and shown["state"] == "running"
    assert shown["abort_requested"] is True


def test_stages_that_shrink_for_this_group_are_refused_before_anything_is_recorded(world: Any) -> None:
    registry, trainer, _, _ = world
    request = check_request(registry, "host@2", "lab", "default", ("3", "34%", "100%"), SOAK,
                            parse_gates("latency-p99=2ms"))
    with pytest.raises(DeployError, match="--stages must grow: 34% is 2 of 3 agent"):
        create_rollout(registry, request, read_fleet(trainer, TOPICS))
    with Registry.open(registry) as reg:
        assert RolloutStore(reg).all() == []


def test_a_stage_without_an_online_agent_to_add_pauses_after_the_activation_timeout(
    world: Any,
) -> None:
    registry, _, played, start = world
    rid, observer = start(stages=("1", "2", "100%"))
    A1, A2, A3 = _roles(rid)
    clock = Clock()
    ctrl = _controller(world, rid, observer, clock)
    _soak_first_stage(world, ctrl, observer, clock, A1)
    for agent in (A2, A3):
        played.offline(agent)
    _until(observer, lambda s: not s.online(A2) and not s.online(A3), "a2 and a3 offline")
    assert ctrl.step().progress["phase"] == "deploy"  # waiting for one to come back
    clock.t += 120.0
    assert not ctrl.step().paused
    clock.t += 1.0
    record = ctrl.step()
    assert record.paused and record.state == "running"
    assert record.message == "stage 2: no online agent to add for 120s; paused"
    assert _documents(registry) == {"deployments/groups/lab.json": 1, f"deployments/agents/{A1}.json": 2}


def test_canaries_are_chosen_in_an_order_shuffled_by_the_rollout_id() -> None:
    agents = [f"a{i:02d}" for i in range(20)]
    assert _shuffled(agents, "ro-0000abcd") == _shuffled(list(reversed(agents)), "ro-0000abcd")
    firsts = {_shuffled(agents, f"ro-{i:08x}")[0] for i in range(20)}
    assert len(firsts) > 1  # not always the first id


# -- the shadow stage (rollout start --shadow) -------------------------------------------------


def _shadow_figures(samples: int, state: str = "active", serial: int = 0) -> dict[str, Any]:
    if state == "failed":
        return {"model": "host", "version": 2, "state": "failed", "reason": "smoke test: output 0 differs",
                "serial": serial}
    return {"model": "host", "version": 2, "state": "active", "samples": samples, "agreement": 0.97,
            "active_only": samples // 50, "shadow_only": samples // 100, "correlation": 0.91,
            "errors": 0, "latency_ms": {"p50": 0.3, "p99": 0.8}}


def _slot_of(registry: Path, target: str) -> Any:
    return decode_deployment(open_repository(registry).target_bytes(target)).slots["default"]


def _shadow_results_ready(world: Any, rid: str, observer: FleetObserver, clock: Clock) -> tuple[RolloutController, str]:
    """Drive a ``--shadow`` rollout through its shadow stage to the pause; returns the
    controller and the canary."""
    registry, _, played, _ = world
    A1 = _roles(rid)[0]
    ctrl = _controller(world, rid, observer, clock)
    record = ctrl.step()
    assert record.progress["phase"] == "shadow-activating" and record.progress["shadow_agents"] == [A1]
    shadowed = _slot_of(registry, f"deployments/agents/{A1}.json")
    assert (shadowed.version, shadowed.shadow.version) == (1, 2)  # the model stays, the candidate beside it
    assert _slot_of(registry, "deployments/groups/lab.json").shadow is None
    assert ctrl.step().progress["phase"] == "shadow-activating"  # nothing reported yet

    played.health(A1, inferences=100, shadow=_shadow_figures(10))
    _until(observer, lambda s: s.health[A1].shadow is not None, "the canary's shadow figures")
    record = ctrl.step()
    assert record.progress["phase"] == "shadow-soaking" and record.progress["soak_started_at"] == clock.t
    clock.t += SOAK - 1
    soaking = ctrl.step()
    assert soaking.progress["phase"] == "shadow-soaking"
    assert ctrl.view(soaking).describe() == "stage 1/2 (1 agent(s)): shadow-soaking, 1s left"
    played.health(A1, inferences=500, shadow=_shadow_figures(600))
    _until(observer, lambda s: s.health[A1].shadow["default"]["samples"] == 600, "the soak's figures")
    clock.t += 1
    record = ctrl.step()
    assert record.paused and record.message == "shadow results ready" and record.state == "running"
    assert record.progress["phase"] == "deploy" and record.stage == 0
    result = record.progress["shadow_results"][A1]
    assert (result["samples"], result["agreement"], result["correlation"], result["latency_p99_ms"]) == (
        600, 0.97, 0.91, 0.8)
    assert ctrl.step().progress["phase"] == "deploy"  # paused: the first stage waits for the operator
    return ctrl, A1


def test_a_shadow_stage_pauses_with_the_comparison_and_resume_switches_the_same_canary(
    world: Any, clients
) -> None:
    registry, _, played, start = world
    rid, observer = start(shadow=True)
    clock = Clock()
    ctrl, A1 = _shadow_results_ready(world, rid, observer, clock)
    status = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "rollout", "status", rid, "--registry", str(registry)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert status.returncode == 0, status.stderr
    assert "shadow results ready" in status.stdout
    assert f"shadow on {A1}: host@2 agree 97.0% r 0.91 (600 samples, 12 active-only, 6 shadow-only, p99 0.80 ms)" \
        in status.stdout

    with Registry.open(registry) as reg:
        RolloutStore(reg).request(rid, "resume")
    record = ctrl.step()  # the first real stage: the same canary, its document without the shadow
    assert record.progress["phase"] == "activating" and record.progress["new"] == [A1]
    switched = _slot_of(registry, f"deployments/agents/{A1}.json")
    assert (switched.version, switched.shadow) == (2, None)
    with Registry.open(registry) as reg:
        kinds = [e["kind"] for e in RolloutStore(reg).events(rid)]
    assert kinds == ["started", "shadow-deploying", "shadow-deployed", "shadow-soak-started",
                     "shadow-results", "resumed", "deploying", "deployed"]


def test_abort_after_the_shadow_stage_removes_the_shadow_documents(world: Any) -> None:
    registry, _, _, start = world
    rid, observer = start(shadow=True)
    ctrl, A1 = _shadow_results_ready(world, rid, observer, Clock())
    with Registry.open(registry) as reg:
        RolloutStore(reg).request(rid, "abort")
    record = ctrl.step()
    assert record.state == "aborted"
    assert _documents(registry) == {"deployments/groups/lab.json": 1}


def test_a_shadows_reports_do_not_say_what_serves(world: Any) -> None:
    """Shadow statuses of the candidate neither restart the wait for a health report after
    the activation nor hide a canary's ``rolled_back`` report."""
    _, _, played, start = world
    rid, observer = start()
    A1 = _roles(rid)[0]
    ctrl = _controller(world, rid, observer, Clock())
    record = ctrl.step()
    _activate(played, observer, A1, record.progress["serial"])
    played.report(A1, 2, "active", record.progress["serial"], role="shadow")
    _until(observer, lambda s: s.deployments[A1][-1].role == "shadow", "the shadow's report")
    assert observer.snapshot().health_after_report(A1, "host", 2, "active")

    played.report(A1, 1, "rolled_back", 99)
    played.report(A1, 2, "removed", 99, role="shadow")
    _until(observer, lambda s: s.deployments[A1][-1].state == "removed", "the shadow's removal")
    assert RolloutController._back(record, observer.snapshot(), A1)


def test_a_failed_shadow_of_an_older_document_is_not_this_rollouts(world: Any) -> None:
    """The canary still shows the same candidate failing under an earlier document (it has
    not read the rollout's yet): that is no breach; the stage keeps waiting."""
    _, _, played, start = world
    rid, observer = start(shadow=True)
    A1 = _roles(rid)[0]
    ctrl = _controller(world, rid, observer, Clock())
    progress = ctrl.step().progress
    assert progress["phase"] == "shadow-activating"
    played.health(A1, inferences=100, shadow=_shadow_figures(0, "failed", progress["serial"] - 1))
    _until(observer, lambda s: s.health[A1].shadow is not None, "the old failed shadow")
    record = ctrl.step()
    assert (record.state, record.progress["phase"]) == ("running", "shadow-activating")


def test_a_shadow_that_fails_on_a_canary_rolls_the_rollout_back(world: Any) -> None:
    registry, _, played, start = world
    rid, observer = start(shadow=True)
    A1 = _roles(rid)[0]
    ctrl = _controller(world, rid, observer, Clock())
    progress = ctrl.step().progress
    assert progress["phase"] == "shadow-activating"
    played.health(A1, inferences=100, shadow=_shadow_figures(0, "failed", progress["serial"]))
    _until(observer, lambda s: s.health[A1].shadow is not None, "the failed shadow")
    record = ctrl.step()
    assert record.state == "rolled_back"
    assert record.message == f"failures on {A1}: shadow: smoke test: output 0 differs"
    assert _documents(registry) == {"deployments/groups/lab.json": 1}
