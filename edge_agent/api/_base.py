"""What the local API reads from the agent: a narrow view, so the HTTP side holds no agent."""

from __future__ import annotations

from typing import Protocol

from edge_agent.activation import ActiveRecord
from edge_agent.detector import Detector
from shared.messages import AgentHealth, DeploymentStatus

__all__ = ["AgentView"]


class AgentView(Protocol):
    """The agent as the API sees it. Every method is safe to call from any thread."""

    def health(self, *, cpu_share: bool = True) -> AgentHealth:
        """The counters and gauges of the MQTT health report, computed now; the API passes
        ``cpu_share=False``: the CPU share is measured between health reports only."""
        ...

    def serving(self) -> dict[str, tuple[Detector, ActiveRecord]]:
        """The detector and active record of every slot that serves a model."""
        ...

    def deployments(self) -> list[DeploymentStatus]:
        """The last deployment status reported for each slot."""
        ...

    def last_sample_age(self) -> float | None:
        """Seconds since the source's last sample reached detection; ``None`` before the first."""
        ...
