"""Retire old artifacts from the TUF repository: keep what deployments use, plus rollbacks.

Every deployment adds the bundles of one model version as targets; nothing else removes them,
so without pruning every bundle ever deployed stays signed, on disk and retained on the
broker. The keep rule, per model:

- every version that a current deployment document (``deployments/…``) names in a slot is
  *in use* and kept, and so is every target a document names as a variant;
- of the model's other versions, the ``keep`` newest (highest version numbers) are kept for a
  quick rollback;
- the bundles of all older versions are removed from targets metadata (one new targets,
  snapshot and timestamp version), their files deleted, and their retained topics cleared
  when the repository is published.

Deployment documents themselves, and targets that are not bundles (no ``model``/``version``
in their custom metadata), are always kept. A pruned version can still be deployed again:
``edgefleet deploy`` adds its bundles back from the registry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from tuf.api.metadata import TargetFile

from shared.chunking import DEFAULT_CHUNK_SIZE
from shared.deployment import Deployment, DeploymentError, decode_deployment
from shared.topics import Topics
from trainer.fleet.deploy import DeployError, open_repository, repository_lock
from trainer.fleet.publisher import PublishReport, publish_repository
from trainer.fleet.tuf_repository import RepositoryError, TufRepository

__all__ = ["DEFAULT_KEEP", "PrunePlan", "PruneReport", "plan_prune", "prune"]

logger = logging.getLogger(__name__)

#: Rollback versions kept per model besides those in use.
DEFAULT_KEEP = 2
# Where deployment documents live (shared.deployment.group_target / agent_target).
_DOCUMENTS_PREFIX = "deployments/"


@dataclass(frozen=True)
class PrunePlan:
    """Which targets go and why: versions by model, each list newest first."""

    remove: tuple[str, ...]
    in_use: Mapping[str, tuple[int, ...]]
    rollback: Mapping[str, tuple[int, ...]]
    removed_versions: Mapping[str, tuple[int, ...]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {
            "removed_targets": list(self.remove),
            "in_use": {m: list(v) for m, v in self.in_use.items()},
            "rollback": {m: list(v) for m, v in self.rollback.items()},
            "removed_versions": {m: list(v) for m, v in self.removed_versions.items()},
        }


def _bundle_of(tf: TargetFile) -> tuple[str, int] | None:
    """``(model, version)`` of a bundle target (custom metadata written by deploy), else None."""
    custom = tf.custom
    if not isinstance(custom, dict):
        return None
    model, version = custom.get("model"), custom.get("version")
    if not isinstance(model, str) or not isinstance(version, int) or isinstance(version, bool):
        return None
    return model, version


def plan_prune(
    targets: Mapping[str, TargetFile], documents: Iterable[Deployment], keep: int
) -> PrunePlan:
    """Apply the keep rule (module docstring) to ``targets``; no I/O.

    Raises:
        ValueError: ``keep`` is negative.
    """
    if keep < 0:
        raise ValueError(f"keep must be 0 or more, got {keep}")
    used_versions: set[tuple[str, int]] = set()
    used_targets: set[str] = set()
    for doc in documents:
        for slot in doc.slots.values():
            for entry in (slot, slot.shadow):  # a shadow candidate is in use too
                if entry is not None:
                    used_versions.add((entry.model, entry.version))
                    used_targets.update(v.target for v in entry.variants)

    versions: dict[str, set[int]] = {}
    for tf in targets.values():
        bundle = _bundle_of(tf)
        if bundle is not None:
            versions.setdefault(bundle[0], set()).add(bundle[1])

    in_use: dict[str, tuple[int, ...]] = {}
    rollback: dict[str, tuple[int, ...]] = {}
    removed_versions: dict[str, tuple[int, ...]] = {}
    for model in sorted(versions):
        newest_first = sorted(versions[model], reverse=True)
        used = tuple(v for v in newest_first if (model, v) in used_versions)
        others = [v for v in newest_first if (model, v) not in used_versions]
        in_use[model] = used
        rollback[model] = tuple(others[:keep])
        if others[keep:]:
            removed_versions[model] = tuple(others[keep:])

    remove = tuple(
        sorted(
            path
            for path, tf in targets.items()
            if path not in used_targets
            and (b := _bundle_of(tf)) is not None
            and b[1] in removed_versions.get(b[0], ())
        )
    )
    return PrunePlan(remove, in_use, rollback, removed_versions)


def _documents(repo: TufRepository) -> list[Deployment]:
    """Every current deployment document; one unreadable document stops the prune."""
    docs = []
    for path in sorted(repo.targets()):
        if not path.startswith(_DOCUMENTS_PREFIX):
            continue
        try:
            docs.append(decode_deployment(repo.target_bytes(path)))
        except (RepositoryError, DeploymentError) as e:
            raise DeployError(f"cannot read {path}, so nothing is pruned: {e}") from e
    return docs


@dataclass(frozen=True)
class PruneReport:
    """What one :func:`prune` call did (or, with ``dry_run``, would do)."""

    plan: PrunePlan
    dry_run: bool
    versions: Mapping[str, int]
    deleted_files: int
    publish: PublishReport | None


def prune(
    registry_dir: str | os.PathLike[str],
    *,
    keep: int = DEFAULT_KEEP,
    dry_run: bool = False,
    client: mqtt.Client | None = None,
    topics: Topics | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float = 30.0,
) -> PruneReport:
    """Prune the registry's TUF repository (keep rule: module docstring), then publish it.

    With ``dry_run`` nothing is changed and nothing is published. Otherwise the removed
    targets leave targets metadata in one new signed version, files no current metadata
    names are deleted, and, with a connected ``client``, the broker is made to mirror the
    result (the pruned targets' retained topics are cleared). Without a client, ``edgefleet
    repo publish`` does that later.

    Raises:
        DeployError: no TUF repository, or a deployment document that cannot be read.
        ValueError: ``keep`` is negative.
        trainer.fleet.publisher.PublishError: the broker did not acknowledge in time.
    """
    open_repository(registry_dir)  # a clear error before taking the lock
    with repository_lock(registry_dir):
        repo = open_repository(registry_dir)  # re-read under the lock
        plan = plan_prune(repo.targets(), _documents(repo), keep)
        if dry_run:
            return PruneReport(plan, True, repo.versions(), 0, None)
        if plan.remove:
            repo.remove_targets(plan.remove)
            logger.info("pruned %d target(s): %s", len(plan.remove), ", ".join(plan.remove))
        deleted = repo.collect_files()
        report = None
        if client is not None:
            report = publish_repository(
                repo, client, topics or Topics(), chunk_size=chunk_size, timeout=timeout
            )
        return PruneReport(plan, False, repo.versions(), len(deleted), report)
