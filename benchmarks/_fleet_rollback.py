"""The fleet benchmark's rollback part: how long the rollout controller, at its default
settings, takes to roll back a candidate that floods false alarms.

Each repeat starts a new simulated fleet (``edgefleet-agent simulate --count N``, one process,
each agent replaying the synthetic host-metrics CSV at ``RATE`` rows per second, health every
10 s: the agent's default) on a new group, deploys ``host@1`` to it and waits until every agent
reported ``inferences ≥ 100`` under it. Then ``edgefleet rollout start host@2 --group G``
runs as a subprocess with nothing but the required options: default stages (1, 10 %, 50 %,
100 %), default soak (10 min), default gates. The times come from three clocks on one machine,
all ``time.time()``: a subscriber's arrival times of the agents' messages, and the
controller's own event log in the registry (``edgefleet rollout status ID --json``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _broker import Broker
from _host_model import REPO, AgentLog, Message, cli
from _report import markdown_table, median, print_table

__all__ = ["COUNT", "RATE", "rollback_markdown", "rollback_repeat"]

COUNT = 20
#: Rows per second each simulated agent scores: the gates' 50 inferences within one health period.
RATE = 20
#: Every agent has this many inferences under host@1 before the rollout (the gates' references).
WARM_INFERENCES = 100


def _template(work: Path, broker: Broker, registry: Path, csv: Path, group: str, state: Path) -> Path:
    text = cli("edge_agent.cli", "init-config", "--agent-id", "sim", "--group", group,
               "--profile", "x86-64-v3", "--broker", broker.url,
               "--trust", str(registry / "tuf/metadata/root.json"), "--state-dir", str(state),
               "--source", f"csv:{csv}?rate={RATE}")
    path = work / f"{group}.toml"
    path.write_text(text)
    return path


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def rollback_repeat(work: Path, broker: Broker, registry: Path, csv: Path, repeat: int,
                    count: int = COUNT) -> dict[str, Any]:
    """One fleet, one flooding rollout, rolled back; the figures of the repeat."""
    group, prefix = f"rb{repeat}", f"rb{repeat}"
    config = _template(work, broker, registry, csv, group, work / f"rb-state{repeat}")
    log = AgentLog(broker.port)
    mine = lambda a: a.startswith(prefix + "-")  # noqa: E731
    sim_log = work / f"rb-simulate{repeat}.log"
    with open(sim_log, "wb") as err:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "simulate", "--count", str(count),
             "--config", str(config), "--prefix", prefix, "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert fleet.stdout is not None
        line = fleet.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise SystemExit(f"simulate did not get ready:\n{sim_log.read_text(errors='replace')[-3000:]}")
        cli("trainer.cli", "deploy", "host@1", "--group", group, "--registry", str(registry),
            "--broker", broker.url)

        def warm() -> bool:
            seen: dict[str, int] = {}
            for m in log.of("health", mine):
                seen[m.agent] = m.body.inferences
            return len(seen) == count and min(seen.values()) >= WARM_INFERENCES

        log.wait(warm, 300, f"{count} agents scoring under host@1")
        load = os.getloadavg()[0]
        t_start = time.time()
        controller = subprocess.run(
            [sys.executable, "-m", "trainer.cli", "rollout", "start", "host@2", "--group", group,
             "--registry", str(registry), "--broker", broker.url, "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=1800)
        if controller.returncode != 1 or not controller.stdout.strip():
            raise SystemExit(f"rollout start exited {controller.returncode} (expected 1: rolled "
                             f"back): {controller.stderr[-2000:]}")
        record = json.loads(controller.stdout)
        status = json.loads(cli("trainer.cli", "rollout", "status", record["id"], "--registry",
                                str(registry), "--json"))
        if status["state"] != "rolled_back":
            raise SystemExit(f"rollout {record['id']} ended {status['state']}: {status.get('message')}")
        events = {e["kind"]: e for e in status["events"]}
        canaries = events["rolled-back"]["detail"]["agents"]
        t_deployed = _ts(events["deployed"]["ts"])
        t_soak = _ts(events["soak-started"]["ts"]) if "soak-started" in events else None
        t_breach, t_rolled = _ts(events["breach"]["ts"]), _ts(events["rolled-back"]["ts"])

        def first(kind: str, agent: str, ok: Any, after: float = 0.0) -> Message | None:
            return next((m for m in log.of(kind, lambda a: a == agent) if m.at >= after and ok(m.body)), None)

        active2 = {a: first("deployments", a, lambda d: (d.version, d.state) == (2, "active")) for a in canaries}
        if not all(active2.values()):
            raise SystemExit(f"a canary never reported host@2 active: {active2}")

        def back() -> dict[str, float] | None:
            found = {a: first("deployments", a, lambda d: d.version == 1 and d.state in ("active", "rolled_back"),
                              active2[a].at) for a in canaries}  # type: ignore[union-attr]
            return {a: m.at for a, m in found.items() if m} if all(found.values()) else None

        t_back = log.wait(back, 300, "every canary back on host@1")
        flood = [m for a in canaries for m in log.of("events", lambda x, a=a: x == a)
                 if m.body["model_version"] == 2 and m.body["is_anomaly"]]
        if not flood:
            raise SystemExit("no canary sent an anomaly event under host@2")
        t_event = min(m.at for m in flood)
        others = [m for m in log.of("deployments", mine) if m.agent not in canaries and m.body.version == 2]
        fleet.send_signal(signal.SIGTERM)
        fleet.wait(120)
        return {
            "count": count, "canaries": len(canaries), "load": load,
            "stages": status["stages"], "soak_s": status["soak_s"], "gates": status["gates"],
            "start_to_deployed_s": t_deployed - t_start,
            "deployed_to_active_s": max(m.at for m in active2.values() if m) - t_deployed,  # type: ignore[union-attr]
            "event_to_soak_s": None if t_soak is None else t_soak - t_event,
            "event_to_breach_s": t_breach - t_event,
            "event_to_rolled_back_s": t_rolled - t_event,
            "event_to_all_back_s": max(t_back.values()) - t_event,
            "breach": events["breach"]["detail"]["message"],
            "anomaly_events_before_breach": sum(1 for m in flood if m.at <= t_breach),
            "others_with_v2": len(others),
        }
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait()
        log.close()


def rollback_markdown(runs: list[dict[str, Any]], machine: str) -> str:
    """The ``fleet-rollback`` section (also printed as a table)."""
    header = ["repeat", "agents", "canaries", "rollout start → canary active s", "first event → soak start s", "→ breach decided s",
              "→ rollback published s", "→ every canary on host@1 s", "anomaly events before breach",
              "gate breached", "load avg"]

    def s(v: float | None) -> str:
        return "–" if v is None else f"{v:.1f}"

    rows = [[str(i + 1), str(r["count"]), str(r["canaries"]),
             s(r["start_to_deployed_s"] + r["deployed_to_active_s"]), s(r["event_to_soak_s"]),
             s(r["event_to_breach_s"]), s(r["event_to_rolled_back_s"]), s(r["event_to_all_back_s"]),
             str(r["anomaly_events_before_breach"]), r["breach"].split(" on ")[0], f"{r['load']:.1f}"]
            for i, r in enumerate(runs)]
    rows.append(["**median**", "", "", "", "", f"**{median(r['event_to_breach_s'] for r in runs):.1f}**",
                 f"**{median(r['event_to_rolled_back_s'] for r in runs):.1f}**",
                 f"**{median(r['event_to_all_back_s'] for r in runs):.1f}**", "", "", ""])
    print_table(header, rows)
    r0 = runs[0]
    return (
        f"A candidate that floods false alarms (`host@2`: `host@1`'s network re-registered with "
        f"a raw-score threshold of 1e-9, so every window alarms) rolled out by `edgefleet rollout "
        f"start host@2 --group G` at its defaults: stages {','.join(r0['stages'])}, soak "
        f"{r0['soak_s']:g} s, gates `{r0['gates']}`. Fleet: {r0['count']} simulated agents "
        f"(`edgefleet-agent simulate`, one process) on `host@1` (a forecaster on a synthetic "
        f"host-metrics CSV, `edgefleet data synth`), each replaying the CSV at {RATE} rows/s, "
        f"health reports every 10 s (the agent's default); the rollout starts once every agent "
        f"has reported ≥ {WARM_INFERENCES} inferences. The first stage (1 agent) has one canary; "
        "*rollout start → canary active*: from starting the controller (it first waits up to "
        "5 s for the agents' retained states) to the canary's `active` report. The other times "
        "from the canary's first anomaly event under `host@2` as a subscriber receives it: to "
        "the controller's `soak-started`, `breach` and `rolled-back` log entries (the last one "
        "written after the restored documents were published), and to the canary's deployment "
        "report of `host@1` (`rolled_back`) received by the subscriber. The breach is decided "
        "at the first health report whose soak window holds ≥ min-inferences (50) inferences: "
        "the soak starts at the first health report after the activation, so the decision "
        "comes one to two health periods after the canary's first events whatever the soak's "
        "length; the 10-minute default soak only matters for a candidate that passes. No other "
        f"agent downloaded `host@2` in any repeat: {sum(r['others_with_v2'] for r in runs)} "
        f"deployment reports of it from non-canaries. Breach message of repeat 1: "
        f"`{r0['breach']}`. {len(runs)} repeats, each a new fleet on a new group; medians in "
        f"bold. Load avg: the machine's 1-minute load average before the rollout (the machine "
        f"is shared with other work). Machine: {machine}.\n\n"
        + markdown_table(header, rows) + "\n"
    )
