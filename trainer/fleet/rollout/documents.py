"""The TUF side of a rollout: per-agent documents for canaries, the group document at the end,
and the rollback. Each operation is one new signed targets version, published at once.

- A stage gives each canary its own ``deployments/agents/{agent}.json``: the group's document
  with the rolled-out slot replaced by the candidate (an agent document replaces its group's
  whole document, so the other slots are copied).
- Promotion to the whole group writes ``deployments/groups/{group}.json`` with the candidate
  and removes the canaries' own documents in the same publish: they now follow the group again.
- A shadow stage (``rollout start --shadow``) gives each canary its own document with the
  candidate as the slot's *shadow* (the slot's model unchanged): it runs beside the model and
  emits nothing. The first real stage's documents replace those (a plain slot: no shadow).
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
    "next_serial",
    "promote_group",
    "restore_previous",
    "rollout_documents",
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


def rollout_documents(
    repo: TufRepository, agents: Iterable[str], model: str, version: int, slot: str
) -> set[str]:
    """Those of ``agents`` whose own document runs ``model@version`` in ``slot``, or runs it as
    the slot's shadow (a document a rollout wrote; one naming another version was written
    since by someone else and is kept).

    Raises:
        DeployError: such a document is unreadable.
    """
    out = set()
    for agent in agent_documents(repo, agents):
        target = Scope("agent", agent).target
        try:
            doc = decode_deployment(repo.target_bytes(target))
        except (RepositoryError, DeploymentError) as e:
            raise DeployError(f"the current {target} is unreadable: {e}") from e
        s = doc.slots.get(slot)
        if s is None:
            continue
        if (s.model, s.version) == (model, version) or (
                s.shadow is not None and (s.shadow.model, s.shadow.version) == (model, version)):
            out.add(agent)
    return out


def next_serial(repo: TufRepository, group: str, used: Iterable[int] = ()) -> int:
    """A serial for a rollout's next documents: above the group document's and above every
    serial in ``used`` (those of earlier stages and attempts), so that an agent's report of
    the new documents can never be mistaken for a retained report of older ones."""
    current = group_document(repo, group)
    return max([current.serial if current is not None else 0, *used]) + 1


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
    serial: int | None = None,
    shadow: bool = False,
) -> DocumentChange:
    """Give each of ``agents`` its own document running ``ref`` in ``slot`` (the group's other
    slots kept), in one targets version; publish it. ``serial``: the documents' serial
    (default: the group's + 1). With ``shadow``, ``ref`` is the slot's shadow candidate and
    the group's model of the slot stays. Writing the same documents again is harmless
    (idempotent).

    Raises:
        DeployError, RegistryError, PublishError: as :func:`trainer.fleet.deploy.deploy`.
    """
    agents = sorted(agents)
    with Registry.open(Path(registry_dir)) as registry, repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        plan = plan_deployment(registry, repo, ref, Scope("group", group), slot, shadow=shadow)
        serial = plan.document.serial if serial is None else serial
        files = {t: b for t, b in plan.files.items() if t in plan.custom}  # the bundles
        for agent in agents:
            doc = Deployment(Scope("agent", agent), serial, plan.document.slots,
                             plan.document.extra)
            files[doc.target] = encode_deployment(doc)
        _commit(repo, files, plan.custom, removed=())
        publish_repository(repo, client, topics, timeout=timeout)
    logger.info("%s in slot %s%s for %d canar(ies) of %s (serial %d)", ref, slot,
                " as shadow" if shadow else "", len(agents), group, serial)
    return DocumentChange(serial, tuple(Scope("agent", a).target for a in agents), ())


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
    serial: int | None = None,
) -> DocumentChange:
    """Write the group's document with ``ref`` in ``slot`` and remove the own documents of
    ``canaries`` that still run ``ref`` in ``slot`` (those the rollout wrote); one publish.
    ``serial``: the group document's serial (default: its current + 1). Raises as
    :func:`write_canaries`."""
    with Registry.open(Path(registry_dir)) as registry, repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        plan = plan_deployment(registry, repo, ref, Scope("group", group), slot)
        files = dict(plan.files)
        document = plan.document
        if serial is not None:
            document = Deployment(document.scope, serial, document.slots, document.extra)
            files[document.target] = encode_deployment(document)
        model, version = document.slots[slot].model, document.slots[slot].version
        removed = tuple(sorted(Scope("agent", a).target
                               for a in rollout_documents(repo, canaries, model, version, slot)))
        _commit(repo, files, plan.custom, removed=removed)
        publish_repository(repo, client, topics, timeout=timeout)
    return DocumentChange(document.serial, (document.target,), removed)


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
    new_serial: int | None = None,
) -> DocumentChange:
    """Roll back: remove the own documents of ``canaries`` that still run the candidate in
    ``slot`` (those the rollout wrote: a pin another deploy made since is kept) and, if the
    group's document names the candidate (the last stage had begun), point it at
    ``previous_ref`` again; one publish. ``serial``: the group document's new serial.

    Idempotent: a second call after a crash finds nothing left to change and only publishes.
    """
    model = previous_ref.partition("@")[0]
    with Registry.open(Path(registry_dir)) as registry, repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        removed = tuple(sorted(
            Scope("agent", a).target
            for a in rollout_documents(repo, canaries, model, candidate_version, slot)
        ))
        current = group_document(repo, group)
        files: dict[str, bytes] = {}
        custom: dict[str, dict] = {}
        serial = current.serial if current is not None else 0
        if current is not None and slot in current.slots and current.slots[slot].version == candidate_version:
            plan = plan_deployment(registry, repo, previous_ref, Scope("group", group), slot)
            files, custom, serial = dict(plan.files), plan.custom, plan.document.serial
            if new_serial is not None and new_serial > serial:
                doc = plan.document
                serial = new_serial
                files[doc.target] = encode_deployment(Deployment(doc.scope, serial, doc.slots,
                                                                 doc.extra))
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
    # One signed targets version for the additions and the removals together.
    try:
        repo.add_targets(files, custom=custom, remove=removed)
    except RepositoryError as e:
        raise DeployError(f"cannot write the rollout's documents: {e}") from e
