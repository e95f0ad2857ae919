"""The fleet view: what every agent says about itself, read from retained MQTT messages.

Per agent the view combines three retained topics:

- ``…/agents/{id}/state`` (birth / Last Will / clean stop): status, profile, running models;
- ``…/agents/{id}/deployments``: the agent publishes each deployment state change (QoS 1)
  and keeps its *last* one retained, which is what is shown here;
- ``…/agents/{id}/health``: the agent publishes health periodically (QoS 0) and keeps its
  latest report retained.

An agent appears once it has a retained state. Malformed payloads are logged and left out (an
agent with a malformed state is not shown; a malformed health or deployment status shows as
``None``). Status and deployment-state strings a newer agent may add are shown as they are.

Retained messages outlive their agent: a broker that stops abruptly never sends the Last Will,
so a dead agent can stay ``online``. The view therefore ages the health report and marks an
agent that claims to be up *stale* when its last sign of life (health report or birth) is
older than :data:`STALE_AFTER_PERIODS` health periods (the period its birth announces, else
:data:`DEFAULT_HEALTH_PERIOD_S`). Ages use the trainer's clock against the agent's
timestamps; an agent clock ahead of the trainer's gives age 0, never a negative one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.mqtt import RetainedReader
from shared.messages import (
    AgentHealth,
    AgentState,
    DeploymentStatus,
    MessageError,
    decode_agent_health,
    decode_agent_state,
    decode_deployment_status,
)
from shared.topics import Topics

__all__ = ["DEFAULT_HEALTH_PERIOD_S", "STALE_AFTER_PERIODS", "AgentView", "drift_summary", "read_fleet",
           "shadow_summary"]

logger = logging.getLogger(__name__)

#: The health period assumed for an agent whose birth does not announce one (the agent's
#: default ``[health] period_seconds``).
DEFAULT_HEALTH_PERIOD_S = 10.0
#: An agent is stale once its last sign of life is older than this many health periods.
STALE_AFTER_PERIODS = 3
#: Statuses that say the agent is not running: they are never stale.
_DOWN = ("offline", "stopped")


@dataclass(frozen=True)
class AgentView:
    """One agent as the fleet view shows it."""

    agent: str
    status: str
    group: str | None
    profile: str
    arch: str
    runtimes: tuple[str, ...]
    emulated: bool
    ts: str
    bdseq: int
    active: tuple[dict[str, Any], ...]
    last_deployment: dict[str, Any] | None
    health: dict[str, Any] | None
    health_period_s: float | None = None
    health_age_s: float | None = None
    stale: bool = False
    drift: dict[str, dict[str, Any]] | None = None
    #: Per slot, the shadow candidate it runs and how it compares (health ``shadow``).
    shadow: dict[str, dict[str, Any]] | None = None

    @classmethod
    def build(
        cls,
        state: AgentState,
        status: DeploymentStatus | None,
        health: AgentHealth | None,
        now: datetime | None = None,
    ) -> AgentView:
        """Combine an agent's decoded state, last deployment status and latest health.

        ``now`` (default: the current time) is what ages are measured against.
        """
        now = datetime.now(UTC) if now is None else now
        health_age = None if health is None else _age(health.ts, now)
        seen = [a for a in (health_age, _age(state.ts, now)) if a is not None]
        period = state.health_period_s or DEFAULT_HEALTH_PERIOD_S
        stale = (
            state.status not in _DOWN
            and bool(seen)
            and min(seen) > STALE_AFTER_PERIODS * period
        )
        return cls(
            agent=state.agent,
            status=state.status,
            group=state.group,
            profile=state.profile,
            arch=state.arch,
            runtimes=state.runtimes,
            emulated=state.emulated,
            ts=state.ts,
            bdseq=state.bdseq,
            active=tuple(
                {
                    "slot": a.slot,
                    "model": a.model,
                    "version": a.version,
                    "format": a.format,
                    "quantization": a.quantization,
                    "sha256": a.sha256,
                }
                for a in state.active
            ),
            last_deployment=None
            if status is None
            else {
                "state": status.state,
                "reason": status.reason,
                "model": status.model,
                "version": status.version,
                "slot": status.slot,
                "serial": status.serial,
                "ts": status.ts,
            },
            health=None if health is None else health.to_json(),
            health_period_s=state.health_period_s,
            health_age_s=None if health_age is None else round(health_age, 1),
            stale=stale,
            drift=None if health is None or health.drift is None else drift_summary(health.drift),
            shadow=None if health is None or not health.shadow else shadow_summary(health.shadow),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able object (what ``edgefleet fleet status --json`` prints per agent)."""
        return {
            "agent": self.agent,
            "status": self.status,
            "group": self.group,
            "profile": self.profile,
            "arch": self.arch,
            "runtimes": list(self.runtimes),
            "emulated": self.emulated,
            "ts": self.ts,
            "bdseq": self.bdseq,
            "active": [dict(a) for a in self.active],
            "last_deployment": self.last_deployment,
            "health": self.health,
            "health_period_s": self.health_period_s,
            "health_age_s": self.health_age_s,
            "stale": self.stale,
            "drift": self.drift,
            "shadow": self.shadow,
        }


def drift_summary(drift: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per slot, the gist of a health report's ``drift``: ``available``, ``drifted``, the
    window's ``fill`` and size, the largest PSI (``psi_max``), the features that drift
    (``drifted_features``) and whether the raw score does (``score_drifted``: a separate field,
    so that a feature named ``score`` is not mistaken for it), as in the ``drift`` event;
    ``reason`` when unavailable. Fields a newer agent leaves out come out as ``None``."""
    out: dict[str, dict[str, Any]] = {}
    for slot, d in sorted(drift.items()):
        if not isinstance(d, Mapping):
            continue
        base = {"available": bool(d.get("available")), "model": d.get("model"), "version": d.get("version")}
        if not base["available"]:
            out[slot] = {**base, "reason": d.get("reason")}
            continue
        features = d.get("features")
        features = features if isinstance(features, Mapping) else {}
        score = d.get("score")
        series = [*features.values(), score]
        psis = [v.get("psi") for v in series if isinstance(v, Mapping)]
        out[slot] = {
            **base,
            "drifted": d.get("drifted"),
            "fill": d.get("fill"),
            "window": d.get("window"),
            "psi_max": max((p for p in psis if isinstance(p, int | float)), default=None),
            "drifted_features": [k for k, v in features.items() if isinstance(v, Mapping) and v.get("drifted")],
            "score_drifted": bool(isinstance(score, Mapping) and score.get("drifted")),
        }
    return out


def shadow_summary(shadow: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per slot, a health report's ``shadow`` entry: ``model``, ``version``, ``state``
    (``active`` or ``failed``), ``reason``, ``serial`` (of a failure), ``samples``, ``agreement``, ``active_only``,
    ``shadow_only``, ``correlation`` and the shadow's ``latency_p50_ms`` / ``latency_p99_ms``
    (``None`` for what the agent did not report). Entries that are not objects are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for slot, d in sorted(shadow.items()):
        if not isinstance(d, Mapping):
            continue
        raw = d.get("latency_ms")
        latency: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        out[str(slot)] = {
            **{k: d.get(k) for k in ("model", "version", "reason", "serial", "samples", "agreement",
                                     "active_only", "shadow_only", "correlation")},
            "state": d.get("state", "active"),
            "latency_p50_ms": latency.get("p50"),
            "latency_p99_ms": latency.get("p99"),
        }
    return out


def _age(ts: str, now: datetime) -> float | None:
    """Seconds from the ISO 8601 ``ts`` (UTC if it names no zone) to ``now``; ``None`` if
    ``ts`` does not parse. Never negative: a clock ahead of ours gives 0."""
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (now - when).total_seconds())


def read_fleet(
    client: mqtt.Client, topics: Topics, timeout: float = 10.0, now: datetime | None = None
) -> list[AgentView]:
    """Read every agent's retained state, last deployment status and health; sorted by id.

    ``client`` must be connected and must not itself subscribe to the agents' topics. Two
    retained reads: the states (``…/agents/+/state``), then the deployment and health topics
    of the agents found. Ages are measured against ``now`` (default: when the reads are done).

    Raises:
        edge_agent.mqtt.BrokerError: the broker did not answer within ``timeout``.
    """
    reader = RetainedReader(client, topics, timeout=timeout)
    states: dict[str, AgentState] = {}
    for topic, payload in reader.read([topics.all_agent_states()]).items():
        parsed = topics.parse_agent_topic(topic)
        if parsed is None or payload is None:
            continue
        try:
            state = decode_agent_state(payload)
        except MessageError as e:
            logger.warning("ignoring the malformed state of agent %s: %s", parsed[0], e)
            continue
        if state.agent != parsed[0]:
            logger.warning("ignoring state on %s that names agent %r", topic, state.agent)
            continue
        states[state.agent] = state
    if not states:
        return []

    extra_topics = [
        t for a in sorted(states) for t in (topics.agent_deployments(a), topics.agent_health(a))
    ]
    details = reader.read(extra_topics)
    now = datetime.now(UTC) if now is None else now
    views = []
    for agent in sorted(states):
        status = _decode(
            details.get(topics.agent_deployments(agent)), decode_deployment_status, agent
        )
        health = _decode(details.get(topics.agent_health(agent)), decode_agent_health, agent)
        views.append(AgentView.build(states[agent], status, health, now))
    return views


def _decode(payload: bytes | None, decode: Any, agent: str) -> Any:
    if payload is None:
        return None
    try:
        return decode(payload)
    except MessageError as e:
        logger.warning("ignoring a malformed message of agent %s: %s", agent, e)
        return None
