"""Starting a rollout: check the request against the registry and the TUF repository (no
broker needed, nothing written), then choose the eligible agents from the fleet view and
record the rollout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.deployment import DeploymentError, Scope
from trainer.fleet.deploy import DeployError, open_repository
from trainer.fleet.rollout.documents import agent_documents, group_document
from trainer.fleet.rollout.gates import Gates
from trainer.fleet.rollout.plan import PlanError, check_stage_counts
from trainer.fleet.rollout.store import RolloutRecord, RolloutStore, new_rollout_id
from trainer.fleet.status import AgentView
from trainer.registry import Registry, RegistryError, parse_model_ref

__all__ = ["RolloutRequest", "check_request", "create_rollout", "eligible_agents"]


@dataclass(frozen=True)
class RolloutRequest:
    """A checked ``rollout start``: the candidate, the version it replaces, the plan."""

    model: str
    version: int
    previous_version: int
    profiles: frozenset[str]
    group: str
    slot: str
    stages: tuple[str, ...]
    soak_s: float
    gates: Gates
    #: a shadow stage first: the candidate runs beside the first stage's canaries' model for
    #: the soak, then the rollout pauses with the comparison (``rollout resume`` switches)
    shadow: bool = False


def check_request(
    registry_dir: str | os.PathLike[str],
    ref: str,
    group: str,
    slot: str,
    stages: Sequence[str],
    soak_s: float,
    gates: Gates,
    *,
    shadow: bool = False,
) -> RolloutRequest:
    """Check a rollout against the registry and the repository, changing nothing.

    Raises:
        RegistryError: no registry, unknown model or version, ``MODEL`` without ``@VERSION``.
        DeployError: no TUF repository; a group with no deployment of ``slot`` yet (a rollout
            needs a previous version to roll back to: deploy the first with ``edgefleet
            deploy``); the group already runs the candidate.
    """
    name, version = parse_model_ref(ref)
    if version is None:
        raise RegistryError(f"name the version to roll out: {name}@N")
    try:
        Scope("group", group)
    except DeploymentError as e:
        raise DeployError(str(e)) from e
    with Registry.open(Path(registry_dir)) as registry:
        record = registry.get(name, version)
    if not record.artifacts:
        raise DeployError(f"{record.ref} has no artifacts to roll out")
    repo = open_repository(registry_dir)
    current = group_document(repo, group)
    if current is None:
        raise DeployError(
            f"unknown group {group!r}: it has no deployment document; deploy its first version "
            f"with `edgefleet deploy MODEL@N --group {group}`"
        )
    if slot not in current.slots:
        raise DeployError(f"group {group!r} runs nothing in slot {slot!r} yet: deploy it first")
    previous = current.slots[slot]
    if previous.model != name:
        raise DeployError(f"slot {slot!r} of group {group!r} runs model {previous.model}, not {name}")
    if previous.version == version:
        raise DeployError(f"group {group!r} already runs {record.ref}")
    profiles = frozenset(p for a in record.artifacts for p in a.profiles)
    return RolloutRequest(name, version, previous.version, profiles, group, slot,
                          tuple(stages), soak_s, gates, shadow)


def eligible_agents(
    views: Sequence[AgentView], request: RolloutRequest, pinned: set[str]
) -> tuple[list[str], dict[str, str]]:
    """The agents that take part (sorted ids) and why the group's others do not.

    An agent takes part when it is in the group, online (and not stale), its profile is one
    the candidate was built for, and it has no deployment document of its own (an agent
    pinned by ``edgefleet deploy --agent`` stays pinned).
    """
    eligible, skipped = [], {}
    for view in views:
        if view.group != request.group:
            continue
        if view.status != "online" or view.stale:
            skipped[view.agent] = "stale" if view.stale else view.status
        elif view.profile not in request.profiles:
            skipped[view.agent] = f"profile {view.profile} not built"
        elif view.agent in pinned:
            skipped[view.agent] = "pinned by its own deployment document"
        else:
            eligible.append(view.agent)
    return sorted(eligible), skipped


def create_rollout(
    registry_dir: str | os.PathLike[str],
    request: RolloutRequest,
    views: Sequence[AgentView],
    *,
    force: bool = False,
) -> tuple[RolloutRecord, dict[str, str]]:
    """Record a new rollout of ``request`` over the eligible agents of ``views``.

    The last stage writes the group's document, which every agent of the group follows: one
    whose profile the candidate was not built for would be sent a version it cannot run, so
    such a group is refused unless ``force``. Offline agents are no obstacle: they take no
    part in the stages and get the group's document when they are back.

    Raises:
        DeployError: no agent of the group is eligible; an agent of the group has a profile
            the candidate has no artifact for (and not ``force``).
        RegistryError: another rollout of the group is still running.
    """
    group_agents = [v.agent for v in views if v.group == request.group]
    pinned = agent_documents(open_repository(registry_dir), group_agents)
    agents, skipped = eligible_agents(views, request, pinned)
    unbuilt = sorted(v.agent for v in views
                     if v.group == request.group and v.profile not in request.profiles
                     and v.agent not in pinned)
    if unbuilt and not force:
        profiles = sorted({v.profile for v in views if v.agent in unbuilt})
        raise DeployError(
            f"{request.model}@{request.version} has no artifact for profile(s) "
            f"{', '.join(profiles)} of {', '.join(unbuilt)} in group {request.group!r}: they "
            f"would get a version they cannot run (build it for them, or --force)"
        )
    if not agents:
        why = ", ".join(f"{a}: {w}" for a, w in sorted(skipped.items())) or "no agent reports it"
        raise DeployError(f"no agent of group {request.group!r} can take part ({why})")
    try:
        check_stage_counts(request.stages, len(agents))
    except PlanError as e:
        raise DeployError(str(e)) from e
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    record = RolloutRecord(
        id=new_rollout_id(), created_at=now, updated_at=now, model=request.model,
        version=request.version, previous_version=request.previous_version, group=request.group,
        slot=request.slot, stages=request.stages, soak_s=request.soak_s, gates=request.gates,
        agents=tuple(agents), state="running", stage=0, paused=False, abort_requested=False,
        progress={"phase": "shadow-deploy" if request.shadow else "deploy", "skipped": skipped,
                  "members": len(group_agents), **({"shadow": True} if request.shadow else {})},
    )
    with Registry.open(Path(registry_dir)) as registry:
        RolloutStore(registry).create(record)
    return record, skipped
