"""The TUF side of a rollout: per-agent documents for canaries, the group document at the end,
and the rollback. Each operation is one new signed targets version, published at once.

- A stage gives each canary its own ``deployments/agents/{agent}.json``: the group's document
  with the rolled-out slot replaced by the candidate (an agent document replaces its group's
  whole document, so the other slots are copied).
- Promotion to the whole group writes ``deployments/groups/{group}.json`` with the candidate
  and removes the canaries' own documents in the same publish: they now follow the group again.
- A rollback removes the canaries' own documents (and, if the group's document already named
  the candidate, writes it again pointing at the previous version): a new metadata version
  after which every agent's document points at the older artifact.

All writers hold the repository lock (:func:`trainer.fleet.deploy.repository_lock`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from shared.deployment import (
    Deployment,
    DeploymentError,
    Scope,
    decode_deployment,
    encode_deployment,
)
from shared.topics import Topics
from trainer.fleet.deploy import DeployError, open_repository, plan_deployment, repository_lock
from trainer.fleet.publisher import publish_repository
from trainer.fleet.tuf_repository import RepositoryError, TufRepository
from trainer.registry import Registry

__all__ = [
    "DocumentChange",
    "agent_documents",
    "group_document",
    "promote_group",
    "restore_previous",
    "write_canaries",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DocumentChange:
    """What one rollout write did: the serial of the documents written, the targets removed."""

    serial: int
    written: tuple[str, ...]
    removed: tuple[str, ...]


def group_document(repo: TufRepository, group: str) -> Deployment | None:
    """The group's current deployment document (``None`` if it has none).

    Raises:
        DeployError: the document is unreadable.
    """
    scope = Scope("group", group)
    if scope.target not in repo.targets():
        return None
    try:
        return decode_deployment(repo.target_bytes(scope.target))
    except (RepositoryError, DeploymentError) as e:
        raise DeployError(f"the current {scope.target} is unreadable: {e}") from e


def agent_documents(repo: TufRepository, agents: Iterable[str]) -> set[str]:
    """Those of ``agents`` that have a document of their own (an override of the group's)."""
    targets = repo.targets()
    return {a for a in agents if Scope("agent", a).target in targets}


def write_canaries(
    registry_dir: str | os.PathLike[str],
    ref: str,
    group: str,
    slot: str,
    agents: Iterable[str],
    *,
    client: mqtt.Client,
    topics: Topics,
    timeout: float,
) -> DocumentChange:
    """Give each of ``agents`` its own document running ``ref`` in ``slot`` (the group's other
    slots kept), in one targets version; publish it.

    Raises:
        DeployError, RegistryError, PublishError: as :func:`trainer.fleet.deploy.deploy`.
    """
    agents = sorted(agents)
    with Registry.open(Path(registry_dir)) as registry, repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        plan = plan_deployment(registry, repo, ref, Scope("group", group), slot)
        files = {t: b for t, b in plan.files.items() if t in plan.custom}  # the bundles
        for agent in agents:
            doc = Deployment(Scope("agent", agent), plan.document.serial, plan.document.slots,
                             plan.document.extra)
            files[doc.target] = encode_deployment(doc)
        _commit(repo, files, plan.custom, removed=())
        publish_repository(repo, client, topics, timeout=timeout)
    logger.info("%s in slot %s for %d canar(ies) of %s (serial %d)", ref, slot, len(agents), group,
                plan.document.serial)
    return DocumentChange(plan.document.serial, tuple(Scope("agent", a).target for a in agents), ())


def promote_group(
    registry_dir: str | os.PathLike[str],
    ref: str,
    group: str,
    slot: str,
    canaries: Iterable[str],
    *,
    client: mqtt.Client,
    topics: Topics,
    timeout: float,
) -> DocumentChange:
    """Write the group's document with ``ref`` in ``slot`` and remove the canaries' own
    documents; one publish. Raises as :func:`write_canaries`."""
    with Registry.open(Path(registry_dir)) as registry, repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        plan = plan_deployment(registry, repo, ref, Scope("group", group), slot)
        removed = tuple(sorted(Scope("agent", a).target for a in agent_documents(repo, canaries)))
        _commit(repo, plan.files, plan.custom, removed=removed)
        publish_repository(repo, client, topics, timeout=timeout)
    return DocumentChange(plan.document.serial, (plan.document.target,), removed)


def restore_previous(
    registry_dir: str | os.PathLike[str],
    previous_ref: str,
    group: str,
    slot: str,
    candidate_version: int,
    canaries: Iterable[str],
    *,
    client: mqtt.Client,
    topics: Topics,
    timeout: float,
) -> DocumentChange:
    """Roll back: remove the canaries' own documents and, if the group's document names the
    candidate (the last stage had begun), point it at ``previous_ref`` again; one publish.

    Idempotent: a second call after a crash finds nothing left to change and only publishes.
    """
    with Registry.open(Path(registry_dir)) as registry, repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        removed = tuple(sorted(Scope("agent", a).target for a in agent_documents(repo, canaries)))
        current = group_document(repo, group)
        files: dict[str, bytes] = {}
        custom: dict[str, dict] = {}
        serial = current.serial if current is not None else 0
        if current is not None and slot in current.slots and current.slots[slot].version == candidate_version:
            plan = plan_deployment(registry, repo, previous_ref, Scope("group", group), slot)
            files, custom, serial = plan.files, plan.custom, plan.document.serial
        if files or removed:
            _commit(repo, files, custom, removed=removed)
        publish_repository(repo, client, topics, timeout=timeout)
    return DocumentChange(serial, tuple(t for t in files if t.startswith("deployments/")), removed)


def _commit(
    repo: TufRepository,
    files: dict[str, bytes],
    custom: dict[str, dict],
    *,
    removed: tuple[str, ...],
) -> None:
    # Two signed versions at most (add, then remove); agents only ever see the published end
    # state, since the publisher sends timestamp.json last.
    try:
        if files:
            repo.add_targets(files, custom=custom)
        if removed:
            repo.remove_targets(removed)
    except RepositoryError as e:
        raise DeployError(f"cannot write the rollout's documents: {e}") from e
