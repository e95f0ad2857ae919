"""What the agents say while a rollout runs: a subscriber to their state, health, deployment
reports and events that keeps the latest of each per agent.

Subscribes to ``…/agents/+/state``, ``…/agents/+/health``, ``…/agents/+/deployments`` and
``…/agents/+/events`` (retained messages arrive first, so a restarted controller knows the
fleet at once). Messages that do not decode are logged and skipped. Thread safe: paho's
network thread writes, the controller reads :meth:`FleetObserver.snapshot` and waits with
:meth:`FleetObserver.wait` (a condition, woken by every message).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from shared.messages import (
    SCHEMA_DRIFT_EVENT,
    AgentHealth,
    AgentState,
    DeploymentStatus,
    MessageError,
    decode_agent_health,
    decode_agent_state,
    decode_deployment_status,
    decode_drift_event,
)
from shared.topics import Topics

__all__ = ["FleetObserver", "FleetSnapshot"]

logger = logging.getLogger(__name__)

_KINDS = ("state", "health", "deployments", "events")


@dataclass(frozen=True)
class FleetSnapshot:
    """A consistent copy of what the observer has seen."""

    states: dict[str, AgentState] = field(default_factory=dict)
    health: dict[str, AgentHealth] = field(default_factory=dict)
    deployments: dict[str, tuple[DeploymentStatus, ...]] = field(default_factory=dict)
    #: ``drift`` events received, per ``(agent, slot, model, model_version)`` they were raised for
    drift_events: dict[tuple[str, str, str, int], int] = field(default_factory=dict)
    #: arrival numbers: of each agent's latest health report, and of each deployment report
    health_seq: dict[str, int] = field(default_factory=dict)
    deployment_seqs: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def online(self, agent: str) -> bool:
        state = self.states.get(agent)
        return state is not None and state.status == "online"

    def health_after_report(self, agent: str, model: str, version: int, state: str) -> bool:
        """Whether a health report of ``agent`` arrived after its last ``state`` report of
        ``model@version`` as its serving model (its counters then include only inferences of
        that version; a shadow's reports do not count); true when no such report was seen (an
        agent found already running it)."""
        seqs = [
            seq for seq, d in zip(self.deployment_seqs.get(agent, ()),
                                  self.deployments.get(agent, ()), strict=True)
            if (d.model, d.version, d.state, d.role) == (model, version, state, "active")
        ]
        return not seqs or self.health_seq.get(agent, 0) > seqs[-1]

    def drift_count(self, agent: str, slot: str, model: str, version: int) -> int:
        """How many ``drift`` events ``agent`` raised for ``model@version`` in ``slot`` (events
        of another slot or version, e.g. the previous model's around a swap or delivered late
        from the agent's outbox, do not count)."""
        return self.drift_events.get((agent, slot, model, version), 0)

    def runs(self, agent: str, slot: str, model: str, version: int) -> bool:
        """Whether the agent's latest state says it runs ``model@version`` in ``slot``."""
        state = self.states.get(agent)
        return state is not None and any(
            a.slot == slot and a.model == model and a.version == version for a in state.active
        )


class FleetObserver:
    """Subscribe ``client`` (connected, network thread running) to the agents' topics."""

    def __init__(self, client: mqtt.Client, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self._cond = threading.Condition()
        self._seq = 0
        self._states: dict[str, AgentState] = {}
        self._health: dict[str, AgentHealth] = {}
        self._deployments: dict[str, list[DeploymentStatus]] = {}
        self._drift: dict[tuple[str, str, str, int], int] = {}
        self._health_seq: dict[str, int] = {}
        self._deployment_seqs: dict[str, list[int]] = {}
        self._subscribed = threading.Event()

    def start(self, timeout: float = 10.0) -> None:
        """Subscribe (and resubscribe on every reconnect); returns once the broker granted it.

        Raises:
            TimeoutError: no SUBACK within ``timeout``.
        """
        previous = self.client.on_connect

        def on_connect(client: mqtt.Client, *args: Any) -> None:
            if previous is not None:
                previous(client, *args)
            self._subscribe()

        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_connect = on_connect
        self._subscribe()
        if not self._subscribed.wait(timeout):
            raise TimeoutError("the broker did not acknowledge the rollout's subscription")

    def _subscribe(self) -> None:
        root = f"{self.topics.root}/agents/+"
        self.client.subscribe([(f"{root}/{kind}", 1) for kind in _KINDS])

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = self.topics.parse_agent_topic(msg.topic)
        if parsed is None or not msg.payload:
            return
        agent, kind = parsed
        try:
            self._record(agent, kind, bytes(msg.payload))
        except MessageError as e:
            logger.warning("ignoring a malformed %s message of %s: %s", kind, agent, e)

    def _record(self, agent: str, kind: str, payload: bytes) -> None:
        with self._cond:
            seq = self._seq + 1
            if kind == "state":
                self._states[agent] = decode_agent_state(payload)
            elif kind == "health":
                self._health[agent] = decode_agent_health(payload)
                self._health_seq[agent] = seq
            elif kind == "deployments":
                self._deployments.setdefault(agent, []).append(decode_deployment_status(payload))
                self._deployment_seqs.setdefault(agent, []).append(seq)
            elif kind == "events" and _is_drift_event(payload):
                event = decode_drift_event(payload)
                key = (agent, event["slot"], event["model"], event["model_version"])
                self._drift[key] = self._drift.get(key, 0) + 1
            self._seq = seq
            self._cond.notify_all()

    def snapshot(self) -> FleetSnapshot:
        with self._cond:
            return FleetSnapshot(
                dict(self._states),
                dict(self._health),
                {a: tuple(d) for a, d in self._deployments.items()},
                dict(self._drift),
                dict(self._health_seq),
                {a: tuple(s) for a, s in self._deployment_seqs.items()},
            )

    def wait(self, timeout: float) -> bool:
        """Block until a new message arrives or ``timeout`` seconds pass; True if one came."""
        with self._cond:
            seq = self._seq
            return self._cond.wait_for(lambda: self._seq != seq, timeout)


def _is_drift_event(payload: bytes) -> bool:
    """Whether an events-topic message is a drift event (:data:`SCHEMA_DRIFT_EVENT`); anomaly
    events (``edgefleet.event/1``) share the topic and its ``seq``."""
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("schema") == SCHEMA_DRIFT_EVENT
