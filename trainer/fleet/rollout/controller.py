"""The rollout controller: a state machine whose whole state lives in the registry.

A rollout of ``MODEL@V`` to group ``G`` walks its stages; each stage goes through phases::

    deploy ──► deploying ──► activating ──► soaking ──► (next stage: deploy) … ──► completed
                                  │              │
                                  └── breach ────┴──► rolled_back   (abort: aborted)

- **deploy**: choose the stage's new canaries (eligible agents that are online, in an order
  shuffled by the rollout's id),
  read their counters (the baseline under the previous version) and choose the documents'
  serial; record all of it.
- **deploying**: write their per-agent documents (the last stage: the group's document) and
  publish; a controller that died here publishes the same documents again.
- **activating**: wait until every new canary reports the candidate active (a ``failed``
  report, or no activation within ``activation_timeout``, is a breach).
- **soaking**: for ``soak`` seconds, judge the canaries' reports with the gates
  (:func:`~trainer.fleet.rollout.gates.evaluate_gates`) at every new message; any breach rolls
  back at once. After the soak, a stage whose canaries have enough data passes.

Every transition is written to the registry before the controller acts on the next one, so a
controller killed at any point resumes where it was: in the same phase, with the soak's
original start (the remaining soak is what is left of it) and the counters it read. Writing
documents is idempotent, so a step interrupted between publishing and recording is redone
with the same agents and serial.

A paused rollout keeps watching (a breach still rolls back) but does not start a new stage.

A rollout started with ``--shadow`` begins with a shadow stage, before the first stage::

    shadow-deploy ──► shadow-deploying ──► shadow-activating ──► shadow-soaking ──► deploy (paused)

The first stage's canaries get their own documents with the candidate as the slot's shadow
(their model unchanged); once each reports the shadow running (health ``shadow``) the soak
runs; after it, the per-canary comparison is recorded (``shadow_results``, and a
``shadow-results`` log entry) and the rollout pauses with "shadow results ready". ``rollout
resume`` starts the first stage, whose documents replace the shadow ones (on the same
canaries while they are online); ``rollout abort`` removes them. A shadow that fails on a
canary is a ``failures`` breach.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from shared.messages import AgentHealth
from shared.profiles import FirmwareProfile, ProfileError, load_profile
from shared.topics import Topics
from trainer.fleet.deploy import open_repository
from trainer.fleet.publisher import PublishError
from trainer.fleet.rollout.documents import (
    DocumentChange,
    next_serial,
    promote_group,
    restore_previous,
    write_canaries,
)
from trainer.fleet.rollout.gates import (
    Breach,
    CanaryEvidence,
    Counts,
    StageEvidence,
    Verdict,
    drift_flag,
    evaluate_gates,
)
from trainer.fleet.rollout.observer import FleetObserver, FleetSnapshot
from trainer.fleet.rollout.plan import stage_sizes
from trainer.fleet.rollout.shadow import shadow_entry, shadow_failure
from trainer.fleet.rollout.store import RolloutRecord, RolloutStore
from trainer.registry import Registry

__all__ = ["DEFAULT_ACTIVATION_TIMEOUT_S", "RolloutController", "StageView"]

logger = logging.getLogger(__name__)

#: How long new canaries may take to download, verify, smoke-test and activate the candidate,
#: and how long after the soak a canary without enough inferences is waited for.
DEFAULT_ACTIVATION_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class StageView:
    """Where a running rollout is, for progress output."""

    stage: int
    stages: int
    phase: str
    canaries: int
    soak_left_s: float | None
    paused: bool

    def describe(self) -> str:
        text = f"stage {self.stage + 1}/{self.stages} ({self.canaries} agent(s)): {self.phase}"
        if self.phase in ("soaking", "shadow-soaking") and self.soak_left_s is not None:
            text += f", {self.soak_left_s:.0f}s left"
        return text + (" [paused]" if self.paused else "")


class RolloutController:
    """Drives one stored rollout to its end.

    ``client`` must be connected (network thread running) and ``observer`` started on it.
    ``clock`` (wall-clock seconds, default :func:`time.time`) is injectable: the soak's start
    is stored as a clock reading so that another process can resume it. ``on_progress`` is
    called with a :class:`StageView` after every step. Not thread safe: one controller per
    rollout (the CLI holds a lock file for it).
    """

    def __init__(
        self,
        registry_dir: str | os.PathLike[str],
        rollout_id: str,
        *,
        client: mqtt.Client,
        topics: Topics,
        observer: FleetObserver,
        clock: Callable[[], float] = time.time,
        activation_timeout: float = DEFAULT_ACTIVATION_TIMEOUT_S,
        publish_timeout: float = 30.0,
        on_progress: Callable[[StageView], None] | None = None,
        profile_loader: Callable[[str], FirmwareProfile] = load_profile,
        on_retry: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.registry_dir = registry_dir
        self.rollout_id = rollout_id
        self.client = client
        self.topics = topics
        self.observer = observer
        self.clock = clock
        self.activation_timeout = activation_timeout
        self.publish_timeout = publish_timeout
        self.on_progress = on_progress
        self._profile_loader = profile_loader
        self.on_retry = on_retry
        self._sleep = sleep
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._budgets: dict[str, float | None] = {}
        self._fleet = FleetSnapshot()

    # -- the loop --------------------------------------------------------------------------

    def run(self, poll_s: float = 1.0, settle_s: float = 5.0) -> RolloutRecord:
        """Step until the rollout is finished; returns its final record.

        Wakes at every agent message, and at least every ``poll_s`` seconds to see the
        operator's pause/abort requests and the soak's end. Before the first step it gives
        the agents' retained states ``settle_s`` seconds to arrive.
        """
        self._settle(settle_s)
        while True:
            record = self.step()
            if record.finished:
                return record
            self.observer.wait(poll_s)

    def _settle(self, timeout: float) -> None:
        with Registry.open(Path(self.registry_dir)) as registry:
            agents = RolloutStore(registry).get(self.rollout_id).agents
        deadline = time.monotonic() + timeout
        while not all(a in self.observer.snapshot().states for a in agents):
            left = deadline - time.monotonic()
            if left <= 0 or not self.observer.wait(left):
                return

    def step(self) -> RolloutRecord:
        """One transition (or none) from the stored state and what the agents said so far."""
        with Registry.open(Path(self.registry_dir)) as registry:
            store = RolloutStore(registry)
            record = store.get(self.rollout_id)
            if record.finished:
                return record
            fleet = self._fleet = self.observer.snapshot()
            progress = dict(record.progress)
            if progress.get("rolling_back") is not None or record.abort_requested:
                reason = progress.get("rolling_back") or {"state": "aborted",
                                                          "message": "aborted by the operator"}
                record = self._rollback(store, record, reason["state"], reason["message"],
                                        reason.get("breaches", []))
            else:
                phase = progress.get("phase", "deploy")
                if phase == "deploy":
                    if not record.paused:
                        record = self._deploy(store, record, fleet)
                    if record.progress.get("phase") == "deploying":
                        record = self._deploying(store, record)
                elif phase == "deploying":
                    record = self._deploying(store, record)
                elif phase == "activating":
                    record = self._activating(store, record, fleet)
                elif phase == "soaking":
                    record = self._soaking(store, record, fleet)
                elif phase == "shadow-deploy":
                    if not record.paused:
                        record = self._shadow_deploy(store, record, fleet)
                    if record.progress.get("phase") == "shadow-deploying":
                        record = self._shadow_deploying(store, record)
                elif phase == "shadow-deploying":
                    record = self._shadow_deploying(store, record)
                elif phase == "shadow-activating":
                    record = self._shadow_activating(store, record, fleet)
                elif phase == "shadow-soaking":
                    record = self._shadow_soaking(store, record, fleet)
            if self.on_progress is not None and not record.finished:
                self.on_progress(self.view(record))
            return record

    def view(self, record: RolloutRecord) -> StageView:
        p = record.progress
        started = p.get("soak_started_at")
        left = None if started is None else max(0.0, started + record.soak_s - self.clock())
        return StageView(
            stage=record.stage,
            stages=len(self._sizes(record)),
            phase=p.get("phase", "deploy"),
            canaries=(len(p.get("shadow_agents", [])) if str(p.get("phase", "")).startswith("shadow")
                      else len(p.get("participants", [])) + len(p.get("new", []))),
            soak_left_s=left,
            paused=record.paused,
        )

    # -- phases ----------------------------------------------------------------------------

    def _deploy(self, store: RolloutStore, r: RolloutRecord, fleet: FleetSnapshot) -> RolloutRecord:
        """Choose the stage's agents and record them (phase ``deploying``) before publishing."""
        sizes = self._sizes(r)
        final = r.stage == len(sizes) - 1
        p = dict(r.progress)
        participants: list[str] = list(p.get("participants", []))
        others = [a for a in r.agents if a not in participants]
        if final:
            new = others
        else:
            order = _shuffled(others, r.id)
            shadowed = [a for a in p.get("shadow_agents", []) if a in order]  # compared first
            order = shadowed + [a for a in order if a not in shadowed]
            new = [a for a in order if fleet.online(a)][: sizes[r.stage] - len(participants)]
            if not new:
                return self._no_agent_to_add(store, r)
        baselines = dict(p.get("baselines", {}))
        for agent in new:
            counts = _counts(fleet, agent)
            if counts is not None:
                baselines[agent] = counts.to_json()
        # Offline agents of the last stage get the group's document when they come back;
        # only those online now are waited for and judged.
        expect = [a for a in new if fleet.online(a)] if final else new
        serial = self._next_serial(store, r)
        documents = list(p.get("documents", []))
        if not final:
            documents += [a for a in new if a not in documents]
        p.pop("waiting_since", None)
        p.update(
            phase="deploying", participants=participants, new=new, expect=expect,
            serial=serial, baselines=baselines, documents=documents,
            soak_started_at=None, start={}, drift_start={},
        )
        detail: dict[str, Any] = {"agents": new, "serial": serial, "group": final}
        absent = [a for a in new if a not in expect]
        if absent:
            p["not_judged"] = absent
            detail["not_judged"] = absent
        return store.update(r.id, progress=p, event=("deploying", detail))

    def _no_agent_to_add(self, store: RolloutStore, r: RolloutRecord) -> RolloutRecord:
        """A stage whose remaining agents are all offline waits for one to come back, for
        ``activation_timeout`` at most; then the rollout is paused with the reason (nothing
        says the candidate is bad, so it is not rolled back): ``rollout resume`` waits again."""
        p = dict(r.progress)
        since = p.get("waiting_since")
        if since is None:
            logger.info("stage %d: no online agent to add; waiting", r.stage + 1)
            return store.update(r.id, progress={**p, "waiting_since": self.clock()})
        if self.clock() - since <= self.activation_timeout:
            return r
        reason = (f"stage {r.stage + 1}: no online agent to add for "
                  f"{self.activation_timeout:g}s; paused")
        logger.warning("rollout %s: %s", r.id, reason)
        p.pop("waiting_since")
        return store.update(r.id, paused=True, message=reason, progress=p,
                            event=("paused", {"message": reason}))

    def _deploying(self, store: RolloutStore, r: RolloutRecord) -> RolloutRecord:
        """Publish exactly what ``_deploy`` recorded (again, after a crash: idempotent)."""
        p = dict(r.progress)
        final = r.stage == len(self._sizes(r)) - 1
        new, serial = list(p["new"]), int(p["serial"])
        if final:
            change = self._retrying("publish the group document", lambda: promote_group(
                self.registry_dir, r.ref, r.group, r.slot, p.get("documents", []),
                client=self.client, topics=self.topics, timeout=self.publish_timeout,
                serial=serial,
            ))
        else:
            change = self._retrying("publish the canaries' documents", lambda: write_canaries(
                self.registry_dir, r.ref, r.group, r.slot, new,
                client=self.client, topics=self.topics, timeout=self.publish_timeout,
                serial=serial,
            ))
        p.update(phase="activating", deployed_at=self.clock())
        return store.update(r.id, progress=p, event=("deployed", {
            "agents": new, "documents": list(change.written), "removed": list(change.removed),
            "serial": change.serial, "group": final,
        }))

    # -- the shadow stage ---------------------------------------------------------------------

    def _shadow_deploy(self, store: RolloutStore, r: RolloutRecord, fleet: FleetSnapshot) -> RolloutRecord:
        """Choose the first stage's canaries and record them (phase ``shadow-deploying``)."""
        p = dict(r.progress)
        new = [a for a in _shuffled(list(r.agents), r.id) if fleet.online(a)][: self._sizes(r)[0]]
        if not new:
            return self._no_agent_to_add(store, r)
        serial = self._next_serial(store, r)
        p.pop("waiting_since", None)
        p.update(phase="shadow-deploying", shadow_agents=new, serial=serial,
                 documents=list(dict.fromkeys(p.get("documents", []) + new)))
        return store.update(r.id, progress=p, event=("shadow-deploying", {"agents": new, "serial": serial}))

    def _shadow_deploying(self, store: RolloutStore, r: RolloutRecord) -> RolloutRecord:
        """Publish the shadow documents ``_shadow_deploy`` recorded (idempotent)."""
        p = dict(r.progress)
        agents, serial = list(p["shadow_agents"]), int(p["serial"])
        change = self._retrying("publish the canaries' shadow documents", lambda: write_canaries(
            self.registry_dir, r.ref, r.group, r.slot, agents, client=self.client,
            topics=self.topics, timeout=self.publish_timeout, serial=serial, shadow=True,
        ))
        p.update(phase="shadow-activating", deployed_at=self.clock())
        return store.update(r.id, progress=p, event=("shadow-deployed", {
            "agents": agents, "documents": list(change.written), "serial": change.serial,
        }))

    def _shadow_failures(self, r: RolloutRecord, fleet: FleetSnapshot, p: dict[str, Any]) -> list[Breach]:
        out = []
        for agent in p.get("shadow_agents", []):
            why = shadow_failure(fleet.health.get(agent), fleet.deployments.get(agent, ()),
                                 r.slot, r.model, r.version, int(p.get("serial", 0)))
            if why is not None:
                out.append(Breach("failures", agent, why))
        return out

    def _shadow_activating(self, store: RolloutStore, r: RolloutRecord, fleet: FleetSnapshot) -> RolloutRecord:
        p = dict(r.progress)
        failures = self._shadow_failures(r, fleet, p)
        if failures and r.gates.failures:
            return self._breach(store, r, failures)
        pending = [a for a in p["shadow_agents"]
                   if (shadow_entry(fleet.health.get(a), r.slot, r.model, r.version) or {}).get("state") != "active"]
        if pending:
            if self.clock() - p["deployed_at"] > self.activation_timeout:
                return self._breach(store, r, [
                    Breach("activation", a, f"shadow not running within {self.activation_timeout:g}s")
                    for a in pending
                ])
            return r
        p.update(phase="shadow-soaking", soak_started_at=self.clock())
        return store.update(r.id, progress=p, event=("shadow-soak-started", {
            "agents": p["shadow_agents"], "soak_s": r.soak_s,
        }))

    def _shadow_soaking(self, store: RolloutStore, r: RolloutRecord, fleet: FleetSnapshot) -> RolloutRecord:
        """After the soak: record each canary's comparison and pause for the operator."""
        p = dict(r.progress)
        failures = self._shadow_failures(r, fleet, p)
        if failures and r.gates.failures:
            return self._breach(store, r, failures)
        if self.clock() < p["soak_started_at"] + r.soak_s:
            return r
        results = {a: shadow_entry(fleet.health.get(a), r.slot, r.model, r.version)
                   for a in p["shadow_agents"]}
        message = "shadow results ready"
        p.update(phase="deploy", soak_started_at=None, shadow_results=results)
        logger.info("rollout %s: %s; `edgefleet rollout resume %s` switches, `abort` ends it",
                    r.id, message, r.id)
        return store.update(r.id, paused=True, message=message, progress=p,
                            event=("shadow-results", {"message": message, "shadow": results}))

    def _next_serial(self, store: RolloutStore, r: RolloutRecord) -> int:
        used = [int(x.progress["serial"]) for x in store.all()
                if x.group == r.group and isinstance(x.progress.get("serial"), int)]
        return next_serial(open_repository(self.registry_dir), r.group, used)

    def _sizes(self, r: RolloutRecord) -> list[int]:
        return stage_sizes(r.stages, len(r.agents), r.progress.get("members", len(r.agents)))

    def _activating(self, store: RolloutStore, r: RolloutRecord, fleet: FleetSnapshot) -> RolloutRecord:
        p = dict(r.progress)
        failures = self._failures(r, fleet, p)
        if failures and r.gates.failures:
            return self._breach(store, r, failures)
        pending = [a for a in p["expect"] if not fleet.runs(a, r.slot, r.model, r.version)
                   and not self._reported_active(r, fleet, a, p["serial"])]
        # The soak's counters start at a health report sent after the activation, so that
        # the window holds only the candidate's inferences.
        pending += [a for a in p["expect"] if a not in pending
                    and not fleet.health_after_report(a, r.model, r.version, "active")]
        if pending:
            if self.clock() - p["deployed_at"] > self.activation_timeout:
                return self._breach(store, r, [
                    Breach("activation", a, f"not active within {self.activation_timeout:g}s")
                    for a in pending
                ])
            return r
        judged = _judged(p)
        start = {}
        for agent in r.agents:  # canaries and the agents still on the previous version
            counts = _counts(fleet, agent)
            if counts is not None:
                start[agent] = {**counts.to_json(), "started_at": fleet.health[agent].started_at}
        p.update(phase="soaking", soak_started_at=self.clock(), start=start,
                 drift_start={a: fleet.drift_count(a, r.slot, r.model, r.version) for a in r.agents})
        return store.update(r.id, progress=p, event=("soak-started", {
            "agents": judged, "soak_s": r.soak_s,
        }))

    def _soaking(self, store: RolloutStore, r: RolloutRecord, fleet: FleetSnapshot) -> RolloutRecord:
        p = dict(r.progress)
        verdict = self.evaluate(r, fleet)
        if verdict.breached:
            return self._breach(store, r, list(verdict.breaches))
        now = self.clock()
        soak_end = p["soak_started_at"] + r.soak_s
        if now < soak_end:
            return r
        if not verdict.judged:
            if now - soak_end > self.activation_timeout:
                return self._breach(store, r, [
                    Breach("data", a, f"fewer than {r.gates.min_inferences} inferences reported")
                    for a in verdict.waiting
                ])
            return r
        if r.paused:
            return r
        sizes = self._sizes(r)
        summary = self._summary(r, fleet)
        if r.stage == len(sizes) - 1:
            return store.update(
                r.id, state="completed", finished_at=_iso_now(),
                message=f"{r.ref} runs on group {r.group}",
                progress={**p, "phase": "done"},
                event=("completed", {"agents": summary, "not_judged": p.get("not_judged", [])}),
            )
        p.update(phase="deploy", participants=p["participants"] + p["new"], new=[], expect=[])
        return store.update(r.id, stage=r.stage + 1, progress=p, event=("promoted", {
            "from_stage": r.stage, "agents": summary,
        }))

    # -- gates -----------------------------------------------------------------------------

    def evidence(self, r: RolloutRecord, fleet: FleetSnapshot) -> StageEvidence:
        """The soaking stage's evidence from the stored counters and the latest reports."""
        p = r.progress
        judged = _judged(p)
        stored = p.get("start", {})
        start = {a: Counts.from_json(c) for a, c in stored.items()}
        baselines = {a: Counts.from_json(c) for a, c in p.get("baselines", {}).items()}
        failures = {b.agent: b.detail for b in self._failures(r, fleet, p)}
        canaries = []
        for agent in judged:
            now = _counts(fleet, agent)
            health = fleet.health.get(agent)
            window = (Counts() if now is None or agent not in start
                      else now.since(start[agent], restarted=_restarted(health, stored[agent])))
            p99 = None if health is None else health.latency_ms.get("p99")
            drifted = drift_flag(None if health is None else health.to_json(), r.slot, r.version)
            # A drift event counts only if raised for the candidate in the rolled-out slot: the
            # previous version's (raised around the swap, or delivered late) says nothing of it.
            if fleet.drift_count(agent, r.slot, r.model, r.version) > p.get("drift_start", {}).get(agent, 0):
                drifted = True
            canaries.append(CanaryEvidence(
                agent=agent,
                window=window,
                baseline=baselines.get(agent),
                p99_ms=None if p99 is None else float(p99),
                latency_budget_ms=self._budget(fleet, agent),
                drifted=drifted,
                failure=failures.get(agent),
            ))
        peers: Counts | None = None
        for agent in r.agents:
            if agent in judged or agent not in start:
                continue
            now = _counts(fleet, agent)
            if now is not None:
                restarted = _restarted(fleet.health.get(agent), stored[agent])
                peers = (peers or Counts()) + now.since(start[agent], restarted=restarted)
        return StageEvidence(tuple(canaries), peers)

    def evaluate(self, r: RolloutRecord, fleet: FleetSnapshot) -> Verdict:
        return evaluate_gates(r.gates, self.evidence(r, fleet))

    def _failures(self, r: RolloutRecord, fleet: FleetSnapshot, p: dict[str, Any]) -> list[Breach]:
        serial = p.get("serial", 0)
        out = []
        for agent in _judged(p):
            for status in fleet.deployments.get(agent, ()):
                if (status.state == "failed" and status.role == "active" and status.model == r.model
                        and status.version == r.version and status.serial >= serial):
                    out.append(Breach("failures", agent, status.reason or "failed"))
                    break
        return out

    @staticmethod
    def _reported_active(r: RolloutRecord, fleet: FleetSnapshot, agent: str, serial: int) -> bool:
        return any(
            s.state == "active" and s.role == "active" and s.model == r.model
            and s.version == r.version and s.slot == r.slot and s.serial >= serial
            for s in fleet.deployments.get(agent, ())
        )

    def _budget(self, fleet: FleetSnapshot, agent: str) -> float | None:
        state = fleet.states.get(agent)
        if state is None:
            return None
        if state.profile not in self._budgets:
            try:
                self._budgets[state.profile] = self._profile_loader(state.profile).budget.latency_p99_ms
            except ProfileError:
                self._budgets[state.profile] = None  # a profile this trainer does not know
        return self._budgets[state.profile]

    def _summary(self, r: RolloutRecord, fleet: FleetSnapshot) -> dict[str, Any]:
        ev = self.evidence(r, fleet)
        return {
            c.agent: {**c.window.to_json(), "rate": round(c.window.rate, 4), "p99_ms": c.p99_ms}
            for c in ev.canaries
        }

    def _retrying(self, what: str, action: Callable[[], DocumentChange]) -> DocumentChange:
        """Run a write-and-publish until the broker acknowledges it, waiting twice as long after
        each failure (from ``retry_initial_s`` up to ``retry_max_s``): a rollout must not end
        with its canaries on a candidate the broker never heard was rolled back. Each retry is
        reported to ``on_retry`` (one line). The writes are idempotent, so a retry that finds
        the repository already changed only publishes."""
        delay = self.retry_initial_s
        attempt = 1
        while True:
            try:
                return action()
            except PublishError as e:
                line = f"cannot {what} (attempt {attempt}): {e}; retrying in {delay:g}s"
                logger.warning("rollout %s: %s", self.rollout_id, line)
                if self.on_retry is not None:
                    self.on_retry(line)
                self._sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                attempt += 1

    # -- the outcome -------------------------------------------------------------------------

    def _breach(self, store: RolloutStore, r: RolloutRecord, breaches: list[Breach]) -> RolloutRecord:
        message = "; ".join(str(b) for b in breaches)
        logger.warning("rollout %s: gate breached: %s", r.id, message)
        return self._rollback(store, r, "rolled_back", message, [b.to_json() for b in breaches])

    def _rollback(
        self, store: RolloutStore, r: RolloutRecord, state: str, message: str,
        breaches: list[dict[str, str]],
    ) -> RolloutRecord:
        p = dict(r.progress)
        if p.get("rolling_back") is None:  # recorded first: a crash mid-rollback redoes it
            p["rolling_back"] = {"state": state, "message": message, "breaches": breaches}
            r = store.update(r.id, progress=p, event=("breach" if state == "rolled_back" else "abort",
                                                      {"message": message, "breaches": breaches}))
        canaries = list(dict.fromkeys(p.get("participants", []) + p.get("new", [])))
        if p.get("restored") is None:
            # Every agent document this rollout wrote (recorded before it was published), not
            # only the current stage's: those still naming the candidate are removed.
            documents = list(dict.fromkeys(p.get("documents", []) + canaries))
            serial = self._next_serial(store, r)
            change = self._retrying("roll back", lambda: restore_previous(
                self.registry_dir, f"{r.model}@{r.previous_version}", r.group, r.slot, r.version,
                documents, client=self.client, topics=self.topics, timeout=self.publish_timeout,
                new_serial=serial,
            ))
            p["restored"] = {"at": self.clock(), "removed": list(change.removed),
                             "documents": list(change.written)}
            r = store.update(r.id, progress=p)
        # Wait (at most activation_timeout) until the online canaries say they run the
        # previous version again; those that do not are named in the log.
        fleet = self._fleet
        unconfirmed = [a for a in canaries if not self._back(r, fleet, a)]
        waiting = [a for a in unconfirmed if fleet.online(a)]
        if waiting and self.clock() - p["restored"]["at"] <= self.activation_timeout:
            return r
        if unconfirmed:
            logger.warning("rollout %s: not confirmed back on version %d: %s", r.id,
                           r.previous_version, ", ".join(unconfirmed))
        return store.update(r.id, state=state, message=message, finished_at=_iso_now(),
                            progress={**p, "phase": "done"}, event=("rolled-back", {
                                "to": f"{r.model}@{r.previous_version}", "agents": canaries,
                                "removed": p["restored"]["removed"],
                                "documents": p["restored"]["documents"],
                                "unconfirmed": unconfirmed,
                            }))

    @staticmethod
    def _back(r: RolloutRecord, fleet: FleetSnapshot, agent: str) -> bool:
        """Whether ``agent`` says it runs the previous version: its latest state, or a
        ``rolled_back`` report to it after its last report of the candidate (serving-model
        reports only: a shadow's do not say what serves)."""
        if fleet.runs(agent, r.slot, r.model, r.previous_version):
            return True
        reports = tuple(d for d in fleet.deployments.get(agent, ()) if d.role == "active")
        last_candidate = max((i for i, d in enumerate(reports)
                              if (d.model, d.version) == (r.model, r.version)), default=-1)
        return any(d.state == "rolled_back" and (d.model, d.version) == (r.model, r.previous_version)
                   for d in reports[last_candidate + 1:])


def _judged(p: dict[str, Any]) -> list[str]:
    """The agents a stage judges: the earlier stages' and those expected to activate now (an
    agent offline when the last stage began follows the group's document when it is back,
    but is not judged: see ``not_judged``)."""
    return list(dict.fromkeys(p.get("participants", []) + p.get("expect", p.get("new", []))))


def _restarted(health: AgentHealth | None, start: dict[str, Any]) -> bool:
    """Whether the agent process started again since ``start`` was read (both reports carry
    ``started_at``: agents that do not send it are judged by their counters going down)."""
    before = start.get("started_at")
    now = None if health is None else health.started_at
    return before is not None and now is not None and now != before


def _shuffled(agents: list[str], seed: str) -> list[str]:
    """The order canaries are chosen in: shuffled, so that the same few agents (the first
    ids) are not the canaries of every rollout, and seeded by the rollout's id, so that a
    resumed controller walks the same order. Not a security measure: :mod:`random` is fine."""
    order = sorted(agents)
    random.Random(seed).shuffle(order)
    return order


def _counts(fleet: FleetSnapshot, agent: str) -> Counts | None:
    health = fleet.health.get(agent)
    if health is None:
        return None
    return Counts(health.inferences, health.anomalies, health.errors)


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
