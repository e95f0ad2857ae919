"""The shadow stage's evidence (``rollout start --shadow``): what each canary's health says
of the candidate running as its slot's shadow. Pure functions of the observed reports; no I/O.
"""

from __future__ import annotations

from typing import Any

from shared.messages import AgentHealth, DeploymentStatus
from trainer.fleet.status import shadow_summary

__all__ = ["shadow_entry", "shadow_failure"]


def shadow_entry(health: AgentHealth | None, slot: str, model: str, version: int) -> dict[str, Any] | None:
    """The canary's health ``shadow`` figures for ``model@version`` in ``slot``
    (:func:`~trainer.fleet.status.shadow_summary` form), or ``None`` if it does not report
    that candidate as its shadow (yet)."""
    if health is None or not health.shadow:
        return None
    entry = shadow_summary(health.shadow).get(slot)
    if entry is None or (entry.get("model"), entry.get("version")) != (model, version):
        return None
    return entry


def shadow_failure(
    health: AgentHealth | None,
    reports: tuple[DeploymentStatus, ...],
    slot: str,
    model: str,
    version: int,
    serial: int,
) -> str | None:
    """Why the canary could not run ``model@version`` as its shadow (its health says
    ``failed`` for a document at least ``serial``, or it reported a ``failed`` shadow status
    for one), or ``None``. A failure of an older document (or one whose serial the agent does
    not report) is not this rollout's: the agent may not have read the new document yet."""
    entry = shadow_entry(health, slot, model, version)
    failed_serial = entry.get("serial") if entry is not None else None
    if (entry is not None and entry["state"] == "failed" and isinstance(failed_serial, int)
            and not isinstance(failed_serial, bool) and failed_serial >= serial):
        return f"shadow: {entry.get('reason') or 'failed'}"
    for status in reports:
        if (status.role == "shadow" and status.state == "failed" and status.slot == slot
                and (status.model, status.version) == (model, version) and status.serial >= serial):
            return f"shadow: {status.reason or 'failed'}"
    return None
