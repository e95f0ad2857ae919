"""The fleet view: what every agent says about itself, read from retained MQTT messages.

Per agent the view combines three retained topics:

- ``…/agents/{id}/state`` (birth / Last Will / clean stop): status, profile, running models;
- ``…/agents/{id}/deployments``: the agent publishes each deployment state change (QoS 1)
  and keeps its *last* one retained, which is what is shown here;
- ``…/agents/{id}/health``: the agent publishes health periodically (QoS 0) and keeps its
  latest report retained.

An agent appears once it has a retained state. Malformed payloads are logged and left out (an
agent with a malformed state is not shown; a malformed health or deployment status shows as
``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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

__all__ = ["AgentView", "read_fleet"]

logger = logging.getLogger(__name__)


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

    @classmethod
    def build(
        cls, state: AgentState, status: DeploymentStatus | None, health: AgentHealth | None
    ) -> AgentView:
        """Combine an agent's decoded state, last deployment status and latest health."""
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
        }


def read_fleet(client: mqtt.Client, topics: Topics, timeout: float = 10.0) -> list[AgentView]:
    """Read every agent's retained state, last deployment status and health; sorted by id.

    ``client`` must be connected and must not itself subscribe to the agents' topics. Two
    retained reads: the states (``…/agents/+/state``), then the deployment and health topics
    of the agents found.

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
    views = []
    for agent in sorted(states):
        status = _decode(
            details.get(topics.agent_deployments(agent)), decode_deployment_status, agent
        )
        health = _decode(details.get(topics.agent_health(agent)), decode_agent_health, agent)
        views.append(AgentView.build(states[agent], status, health))
    return views


def _decode(payload: bytes | None, decode: Any, agent: str) -> Any:
    if payload is None:
        return None
    try:
        return decode(payload)
    except MessageError as e:
        logger.warning("ignoring a malformed message of agent %s: %s", agent, e)
        return None
