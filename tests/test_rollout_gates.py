"""Rollout rules without a broker: gates on recorded health and deployment reports, the
``--gates`` and ``--stages`` syntax, the registry's v3 → v4 migration and the rollouts store.

``data/rollout_samples.json`` holds messages recorded from a real run of
``tests/test_rollout_e2e.py`` (three agents on host@1, then the flooding host@3 on the canary
edge-a): health reports and deployment reports as the agents published them.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.messages import decode_agent_health, encode_agent_health
from trainer.fleet.rollout.gates import (
    DEFAULT_GATES,
    CanaryEvidence,
    Counts,
    GateError,
    Gates,
    StageEvidence,
    drift_flag,
    evaluate_gates,
    parse_gates,
)
from trainer.fleet.rollout.plan import (
    PlanError,
    check_stage_counts,
    parse_duration,
    parse_stages,
    stage_sizes,
)
from trainer.fleet.rollout.store import RolloutRecord, RolloutStore
from trainer.registry import SCHEMA_VERSION, Registry, RegistryError

SAMPLES = json.loads((Path(__file__).parent / "data" / "rollout_samples.json").read_text())


def _health(agent: str, index: int):
    """The ``index``-th recorded health report of ``agent`` (negative: from the end)."""
    reports = [m for a, kind, m in SAMPLES["messages"] if a == agent and kind == "health"]
    return decode_agent_health(json.dumps(reports[index]).encode())


def _counts(health) -> Counts:
    return Counts(health.inferences, health.anomalies, health.errors)


def _activation_index(agent: str, version: int) -> int:
    """How many health reports the agent had sent when it reported ``version`` active."""
    n = 0
    for a, kind, m in SAMPLES["messages"]:
        if a != agent:
            continue
        if kind == "health":
            n += 1
        elif kind == "deployments" and m["version"] == version and m["state"] == "active":
            return n
    raise AssertionError(f"{agent} never activated version {version} in the samples")


# -- gates on recorded reports -------------------------------------------------------------------


def test_the_recorded_flood_breaches_the_anomaly_rate_gate_and_only_it() -> None:
    canary_on = _activation_index("edge-a", 3)
    before = _health("edge-a", canary_on - 1)  # the last report under host@1
    start = _health("edge-a", canary_on + 1)
    later = _health("edge-a", -1)
    peer_start, peer_end = _health("edge-b", canary_on), _health("edge-b", -1)
    evidence = StageEvidence(
        canaries=(CanaryEvidence(
            agent="edge-a",
            window=_counts(later).since(_counts(start)),
            baseline=_counts(before),
            p99_ms=later.latency_ms["p99"],
            latency_budget_ms=1000.0,
            drifted=drift_flag(later.to_json(), "main"),
        ),),
        peers=_counts(peer_end).since(_counts(peer_start)),
    )
    verdict = evaluate_gates(DEFAULT_GATES, evidence)
    assert [b.gate for b in verdict.breaches] == ["anomaly-rate"], verdict
    assert verdict.breaches[0].agent == "edge-a"
    assert "anomalies" in verdict.breaches[0].detail
    # Judged on the same evidence with the gate off, nothing else is wrong with it.
    assert evaluate_gates(parse_gates("anomaly-rate=off"), evidence).judged


def test_recorded_reports_under_the_previous_version_pass_every_gate() -> None:
    # edge-b stayed on host@1 throughout: as a "canary" against its own past it is fine.
    first, last = _health("edge-b", 2), _health("edge-b", -1)
    evidence = StageEvidence((CanaryEvidence(
        "edge-b", _counts(last).since(_counts(first)), baseline=_counts(first),
        p99_ms=last.latency_ms["p99"], latency_budget_ms=1000.0,
    ),))
    assert evaluate_gates(DEFAULT_GATES, evidence).judged


def test_too_few_inferences_wait_instead_of_judging() -> None:
    evidence = StageEvidence((CanaryEvidence("a", Counts(10, 10, 0), baseline=Counts(1000, 1, 0)),))
    verdict = evaluate_gates(DEFAULT_GATES, evidence)
    assert verdict.waiting == ("a",) and not verdict.breached and not verdict.judged


def test_references_are_the_previous_version_the_peers_and_a_floor() -> None:
    gates = Gates()  # 3x, floor 2 %
    noisy_past = StageEvidence((CanaryEvidence("a", Counts(100, 20, 0), baseline=Counts(1000, 100, 0)),))
    assert evaluate_gates(gates, noisy_past).judged  # 20 % <= 3 x 10 % of its own past
    noisy_peers = StageEvidence((CanaryEvidence("a", Counts(100, 20, 0), baseline=Counts(1000, 0, 0)),),
                                peers=Counts(400, 40, 0))
    assert evaluate_gates(gates, noisy_peers).judged  # the peers see 10 % too right now
    quiet = StageEvidence((CanaryEvidence("a", Counts(100, 7, 0), baseline=Counts(1000, 0, 0)),),
                          peers=Counts(400, 0, 0))
    [breach] = evaluate_gates(gates, quiet).breaches  # 7 % > 3 x the 2 % floor
    assert breach.gate == "anomaly-rate" and "floor" in breach.detail
    assert evaluate_gates(gates, replace_window(quiet, Counts(100, 6, 0))).judged


def replace_window(evidence: StageEvidence, window: Counts) -> StageEvidence:
    [c] = evidence.canaries
    return StageEvidence((CanaryEvidence(c.agent, window, c.baseline),), evidence.peers)


@pytest.mark.parametrize(("gates", "p99", "budget", "breached"), [
    ("latency-p99=budget", 5.1, 5.0, True),
    ("latency-p99=budget", 4.9, 5.0, False),
    ("latency-p99=2x", 9.0, 5.0, False),
    ("latency-p99=2x", 11.0, 5.0, True),
    ("latency-p99=3ms", 3.5, None, True),
    ("latency-p99=budget", 50.0, None, False),  # a profile this trainer does not know
    ("latency-p99=off", 500.0, 5.0, False),
])
def test_latency_against_the_profile_budget(gates: str, p99: float, budget: float | None,
                                             breached: bool) -> None:
    evidence = StageEvidence((CanaryEvidence("a", Counts(100, 0, 0), p99_ms=p99, latency_budget_ms=budget),))
    assert evaluate_gates(parse_gates(gates), evidence).breached is breached


def test_failures_errors_and_drift_breach_at_once() -> None:
    evidence = StageEvidence((
        CanaryEvidence("a", Counts(0, 0, 0), failure="smoke test: output 3 differs"),
        CanaryEvidence("b", Counts(3, 0, 2)),
        CanaryEvidence("c", Counts(3, 0, 0), drifted=True),
    ))
    verdict = evaluate_gates(DEFAULT_GATES, evidence)
    assert [(b.gate, b.agent) for b in verdict.breaches] == [
        ("failures", "a"), ("errors", "b"), ("drift", "c")
    ]
    off = parse_gates("failures=off,errors=off,drift=off")
    assert not evaluate_gates(off, evidence).breached
    assert not evaluate_gates(parse_gates("errors=2"), StageEvidence((evidence.canaries[1],))).breached


def test_drift_is_read_from_health_when_agents_report_it() -> None:
    health = _health("edge-a", -1).to_json()
    assert drift_flag(health, "main") is None  # these agents do not report drift
    measured = {"available": True, "model": "host", "version": 3, "window": 1000, "fill": 1000,
                "features": {}, "score": {}}
    assert drift_flag({**health, "drift": {"main": {**measured, "drifted": True}}}, "main") is True
    assert drift_flag({**health, "drift": {"main": {**measured, "drifted": False}}}, "main", 3) is False
    # Another slot, another version, or a bundle without a drift reference say nothing.
    assert drift_flag({**health, "drift": {"other": {**measured, "drifted": True}}}, "main") is None
    assert drift_flag({**health, "drift": {"main": {**measured, "drifted": True}}}, "main", 2) is None
    unavailable = {"main": {"available": False, "model": "host", "version": 3, "reason": "no reference"}}
    assert drift_flag({**health, "drift": unavailable}, "main") is None
    # A health report carrying drift still decodes (unknown fields are kept).
    again = decode_agent_health(encode_agent_health(decode_agent_health(
        json.dumps({**health, "drift": {"main": {**measured, "drifted": True}}}).encode())))
    assert drift_flag(again.to_json(), "main", 3) is True


def test_an_agent_that_restarted_counts_from_zero() -> None:
    assert Counts(50, 5, 0).since(Counts(1000, 3, 0)) == Counts(50, 5, 0)
    assert Counts(1050, 8, 1).since(Counts(1000, 3, 0)) == Counts(50, 5, 1)


# -- syntax ----------------------------------------------------------------------------------


def test_gates_syntax_round_trips_through_describe() -> None:
    gates = parse_gates("anomaly-rate=5x, latency-p99=1.5x ,errors=off,drift=off,min-inferences=20,"
                        "anomaly-floor=1%")
    assert gates == Gates(anomaly_factor=5.0, latency="1.5x", errors=None, drift=False,
                          min_inferences=20, anomaly_floor=0.01)
    assert parse_gates(gates.describe()) == gates
    assert Gates.from_json(gates.to_json()) == gates


@pytest.mark.parametrize(("text", "words"), [
    ("speed=on", "unknown gate 'speed'"),
    ("anomaly-rate=0.5x", "a factor of at least 1"),
    ("anomaly-rate", "is not NAME=VALUE"),
    ("errors=-1", "errors=-1"),
    ("drift=maybe", "on or off"),
    ("latency-p99=fast", "latency-p99=fast"),
    ("errors=0,errors=1", "twice"),
    ("errors=0,", "empty item"),
])
def test_bad_gates_are_refused(text: str, words: str) -> None:
    with pytest.raises(GateError, match=words):
        parse_gates(text)


@given(st.text(max_size=40))
def test_parse_gates_only_ever_raises_gate_error(text: str) -> None:
    try:
        parse_gates(text)
    except GateError:
        pass


@pytest.mark.parametrize(("stages", "eligible", "members", "sizes"), [
    ("1,10%,50%,100%", 4, 4, [1, 2, 4]),  # 10 % of 4 is 1 agent: that stage adds nobody
    ("1,10%,50%,100%", 40, 40, [1, 4, 20, 40]),
    ("1,100%", 1, 1, [1]),
    ("2,100%", 3, 3, [2, 3]),
    # a group of several agents always has a canary stage before its document is written
    ("100%", 7, 7, [1, 7]),
    ("5,100%", 3, 3, [1, 3]),
    ("1,100%", 1, 3, [1, 1]),  # one eligible agent, two offline: a canary, then the group
])
def test_stage_sizes(stages: str, eligible: int, members: int, sizes: list[int]) -> None:
    assert stage_sizes(parse_stages(stages), eligible, members) == sizes


@pytest.mark.parametrize(("stages", "eligible", "ok"), [
    ("10,5%,100%", 100, False),  # 10 agents, then 5
    ("10,5%,100%", 400, True),   # 10, then 20
    ("1,10%,50%,100%", 4, True),  # 1, 1 (rounding: left out), 2, 4
    ("5,50%,100%", 3, False),     # 5, then 2
])
def test_mixed_stages_must_grow_once_resolved(stages: str, eligible: int, ok: bool) -> None:
    if ok:
        check_stage_counts(parse_stages(stages), eligible)
    else:
        with pytest.raises(PlanError, match="--stages must grow"):
            check_stage_counts(parse_stages(stages), eligible)


@pytest.mark.parametrize(("text", "words"), [
    ("0,100%", "bad stage '0'"),
    ("1,x,100%", "bad stage 'x'"),
    ("50%,10%,100%", "must grow"),
    ("3,2,100%", "must grow"),
    ("1,50%", "must end with 100%"),
    ("1,150%", "in \\(0, 100\\]"),
])
def test_bad_stages_are_refused(text: str, words: str) -> None:
    with pytest.raises(PlanError, match=words):
        parse_stages(text)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("5s", 5), ("10m", 600), ("1.5h", 5400),
                                               ("500ms", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1s", "10d", "soon", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(PlanError):
        parse_duration(text)


# -- the registry ------------------------------------------------------------------------------


def _record(rid: str, group: str = "lab") -> RolloutRecord:
    return RolloutRecord(
        id=rid, created_at="2026-01-01T00:00:00+00:00", updated_at="2026-01-01T00:00:00+00:00",
        model="host", version=2, previous_version=1, group=group, slot="default",
        stages=("1", "100%"), soak_s=5.0, gates=DEFAULT_GATES, agents=("a", "b"),
        state="running", stage=0, paused=False, abort_requested=False,
        progress={"phase": "deploy"},
    )


def test_a_v3_registry_migrates_to_v4_with_the_rollouts_tables(tmp_path: Path) -> None:
    from trainer.registry._schema import migrate

    conn = sqlite3.connect(tmp_path / "registry.sqlite", isolation_level=None)
    assert migrate(conn, 3) == [1, 2, 3]
    conn.execute("INSERT INTO models VALUES ('host', '2026-01-01')")  # data from before survives
    conn.close()
    with pytest.raises(RegistryError, match="registry migrate"):
        Registry.open(tmp_path)
    assert Registry.migrate(tmp_path) == (3, [4])
    assert SCHEMA_VERSION == 4
    with Registry.open(tmp_path) as reg:
        assert [m["name"] for m in reg.models()] == ["host"]
        store = RolloutStore(reg)
        assert store.all() == []
        store.create(_record("ro-0000000a"))
        assert store.get("ro-0000000a") == _record("ro-0000000a")


def test_the_store_keeps_state_log_and_one_running_rollout_per_group(tmp_path: Path) -> None:
    with Registry.open(tmp_path, create=True) as reg:
        store = RolloutStore(reg)
        store.create(_record("ro-0000000a"))
        with pytest.raises(RegistryError, match="ro-0000000a of group lab is still running"):
            store.create(_record("ro-0000000b"))
        store.create(_record("ro-0000000c", group="other"))
        updated = store.update("ro-0000000a", stage=1, paused=True,
                               progress={"phase": "soaking", "soak_started_at": 12.5},
                               event=("promoted", {"from_stage": 0}))
        assert (updated.stage, updated.paused, updated.progress["soak_started_at"]) == (1, True, 12.5)
        store.update("ro-0000000a", state="rolled_back", message="anomaly-rate on a")
        store.create(_record("ro-0000000b"))  # the group is free again
    with Registry.open(tmp_path) as reg:  # another process's view
        store = RolloutStore(reg)
        assert [e["kind"] for e in store.events("ro-0000000a")] == ["started", "promoted"]
        assert store.events("ro-0000000a")[1]["stage"] == 1
        assert store.get("ro-0000000a").state == "rolled_back"
        assert [r.id for r in store.all()] == ["ro-0000000a", "ro-0000000b", "ro-0000000c"]
