"""Deploy a registered model version to a group or an agent: TUF targets + desired state.

A deployment adds every artifact bundle of ``MODEL@VERSION`` as a TUF target
(``artifacts/{name}-{version}-{format}-{quant}.zip``, custom metadata: format, quantization,
profiles, model, version), writes the scope's new deployment document
(``deployments/groups/{g}.json`` or ``deployments/agents/{id}.json``, serial + 1, the other
slots of the previous document kept), signs one new targets/snapshot/timestamp version for
both, and publishes the repository to the broker's retained ``repo/`` topics.

A rollback is the same operation with an older version: a newer document (higher serial)
pointing at older artifacts.

Shadow mode: ``shadow=True`` writes ``MODEL@VERSION`` as the slot's ``shadow`` entry instead
of its model (the slot must serve a model already); agents run it beside the slot's model on
the same samples, emit nothing from it, and report how the two compare.
:func:`clear_shadow` removes the entry. A plain deployment of the slot replaces the whole slot
and so ends its shadow too.

The TUF repository lives in ``{registry}/tuf`` (``edgefleet repo init``). Writers of the
repository (deploy, publish, refresh, prune, rotate-root) take an exclusive lock on
``{registry}/tuf/.lock`` so that two concurrent commands never sign conflicting versions.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from shared.bundle import bundle_target_name, sha256_hex
from shared.chunking import DEFAULT_CHUNK_SIZE
from shared.deployment import (
    Deployment,
    DeploymentError,
    Scope,
    Slot,
    Variant,
    decode_deployment,
    encode_deployment,
    scope_target,
)
from shared.topics import Topics
from trainer.fleet.publisher import PublishReport, publish_repository
from trainer.fleet.tuf_repository import RepositoryError, TufRepository
from trainer.registry import Registry, parse_model_ref

__all__ = [
    "DeployError",
    "DeployReport",
    "DeploymentPlan",
    "clear_shadow",
    "deploy",
    "init_repository",
    "open_repository",
    "plan_deployment",
    "plan_shadow_removal",
    "repository_lock",
    "repository_path",
]

logger = logging.getLogger(__name__)

TUF_DIR = "tuf"


class DeployError(Exception):
    """A deployment cannot be made: bad scope, no TUF repository, no artifacts, bad document."""


@dataclass(frozen=True)
class DeployReport:
    """What one :func:`deploy` call did."""

    model: str
    version: int
    scope: Scope
    slot: str
    serial: int
    document_target: str
    bundle_targets: tuple[str, ...]
    document: Deployment
    publish: PublishReport
    #: ``active`` (the slot's model), ``shadow`` (its shadow candidate was set) or
    #: ``shadow-cleared`` (its shadow candidate, ``model@version``, was removed).
    role: str = "active"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (what ``edgefleet deploy --json`` prints)."""
        return {
            "role": self.role,
            "model": self.model,
            "version": self.version,
            "scope": self.scope.to_json(),
            "slot": self.slot,
            "serial": self.serial,
            "document": self.document_target,
            "bundles": list(self.bundle_targets),
            "published_messages": self.publish.messages,
            "published_bytes": self.publish.bytes,
        }


# -- the repository beside the registry -------------------------------------------------------


def repository_path(registry_dir: str | os.PathLike[str]) -> Path:
    """Where the TUF repository of a registry lives: ``{registry}/tuf``."""
    return Path(registry_dir) / TUF_DIR


def init_repository(
    registry_dir: str | os.PathLike[str], root_key_dir: str | os.PathLike[str] | None = None
) -> TufRepository:
    """Create the TUF repository of ``registry_dir`` (keys + version-1 metadata).

    Raises:
        DeployError: a repository (or any of its keys) already exists (nothing is changed),
            or the directory cannot be written.
    """
    path = repository_path(registry_dir)
    try:
        return TufRepository.init(path, root_key_dir)
    except RepositoryError as e:
        raise DeployError(
            f"a TUF repository already exists at {path}; it is never overwritten"
        ) from e
    except OSError as e:
        raise DeployError(f"cannot create a TUF repository at {path}: {e}") from e


def open_repository(
    registry_dir: str | os.PathLike[str], root_key_dir: str | os.PathLike[str] | None = None
) -> TufRepository:
    """Open the TUF repository of ``registry_dir`` (``root_key_dir``: where its root key is,
    default ``{registry}/tuf/keys``; only a root rotation needs it).

    Raises:
        DeployError: there is none (with the ``edgefleet repo init`` command to run), or it
            cannot be read.
    """
    path = repository_path(registry_dir)
    if not (path / "metadata" / "root.json").exists():
        raise DeployError(
            f"no TUF repository at {path}: run `edgefleet repo init --registry {registry_dir}` first"
        )
    try:
        return TufRepository.open(path, root_key_dir)
    except RepositoryError as e:
        raise DeployError(str(e)) from e


@contextmanager
def repository_lock(registry_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on the registry's TUF repository (blocks until free).

    Raises:
        DeployError: there is no repository directory (``edgefleet repo init`` first).
    """
    path = repository_path(registry_dir)
    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise DeployError(
            f"no TUF repository at {path}: run `edgefleet repo init --registry {registry_dir}` first"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- planning (no I/O beyond the registry and the repository) ---------------------------------


@dataclass(frozen=True)
class DeploymentPlan:
    """The target files (with custom metadata) and the new document of one deployment."""

    document: Deployment
    files: dict[str, bytes]
    custom: dict[str, dict[str, Any]]
    bundle_targets: tuple[str, ...]


def plan_deployment(
    registry: Registry,
    repo: TufRepository,
    model_ref: str,
    scope: Scope,
    slot: str = "default",
    *,
    shadow: bool = False,
) -> DeploymentPlan:
    """Work out the target files and the new document of a deployment, without writing.

    ``model_ref`` is ``MODEL@VERSION`` (``MODEL`` alone means its latest version). With
    ``shadow`` it becomes the slot's shadow candidate; the slot's model stays.

    Raises:
        RegistryError: unknown model or version, or a malformed reference.
        DeployError: the version has no artifacts, a bundle does not match its recorded hash,
            the scope's current document is unreadable, or (``shadow``) the scope's document
            has no such slot to shadow.
    """
    name, version = parse_model_ref(model_ref)
    record = registry.get(name, version)
    if not record.artifacts:
        raise DeployError(f"{record.ref} has no artifacts to deploy")

    files: dict[str, bytes] = {}
    custom: dict[str, dict[str, Any]] = {}
    variants: list[Variant] = []
    for art in record.artifacts:
        target = bundle_target_name(record.model, record.version, art.format, art.quantization)
        data = registry.bundle(art.sha256)
        if sha256_hex(data) != art.sha256:
            raise DeployError(f"the stored bundle of {target} does not match its sha256")
        files[target] = data
        custom[target] = {
            "format": art.format,
            "quantization": art.quantization,
            "profiles": sorted(art.profiles),
            "model": record.model,
            "version": record.version,
        }
        variants.append(
            Variant(
                target=target,
                format=art.format,
                quantization=art.quantization,
                profiles=tuple(sorted(art.profiles)),
                sha256=art.sha256,
                size_bytes=len(data),
            )
        )

    previous = _current_document(repo, scope)
    slots = dict(previous.slots) if previous else {}
    entry = Slot(model=record.model, version=record.version, variants=tuple(variants))
    if shadow:
        if slot not in slots:
            raise DeployError(
                f"{scope.kind} {scope.name} has no model in slot {slot!r} to shadow: "
                f"deploy one first"
            )
        slots[slot] = replace(slots[slot], shadow=entry)
    else:
        slots[slot] = entry
    return _plan(scope, previous, slots, files, custom)


def plan_shadow_removal(repo: TufRepository, scope: Scope, slot: str = "default") -> DeploymentPlan:
    """The new document of the scope without the slot's shadow candidate, without writing.

    Raises:
        DeployError: the scope's document is unreadable or its slot has no shadow.
    """
    previous = _current_document(repo, scope)
    current = previous.slots.get(slot) if previous else None
    if previous is None or current is None or current.shadow is None:
        raise DeployError(f"{scope.kind} {scope.name} has no shadow in slot {slot!r} to clear")
    slots = {**previous.slots, slot: replace(current, shadow=None)}
    return _plan(scope, previous, slots, {}, {})


def _plan(
    scope: Scope,
    previous: Deployment | None,
    slots: dict[str, Slot],
    files: dict[str, bytes],
    custom: dict[str, dict[str, Any]],
) -> DeploymentPlan:
    try:
        document = Deployment(
            scope=scope,
            serial=(previous.serial + 1) if previous else 1,
            slots=dict(sorted(slots.items())),
            extra=dict(previous.extra) if previous else {},
        )
        files[scope.target] = encode_deployment(document)
    except DeploymentError as e:
        raise DeployError(f"cannot write the deployment document: {e}") from e
    return DeploymentPlan(document, files, custom, tuple(sorted(custom)))


def _current_document(repo: TufRepository, scope: Scope) -> Deployment | None:
    if scope.target not in repo.targets():
        return None
    try:
        previous = decode_deployment(repo.target_bytes(scope.target))
    except (RepositoryError, DeploymentError) as e:
        raise DeployError(f"the current {scope.target} is unreadable: {e}") from e
    if previous.scope.kind != scope.kind or previous.scope.name != scope.name:
        raise DeployError(f"the current {scope.target} names another scope: {previous.scope}")
    return previous


# -- the operation ----------------------------------------------------------------------------


def deploy(
    registry_dir: str | os.PathLike[str],
    model_ref: str,
    *,
    group: str | None = None,
    agent: str | None = None,
    slot: str = "default",
    client: mqtt.Client,
    topics: Topics,
    shadow: bool = False,
    root_key_dir: str | os.PathLike[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float = 30.0,
) -> DeployReport:
    """Deploy ``model_ref`` (``MODEL@VERSION``) to exactly one of ``group`` / ``agent``.

    With ``shadow`` the version becomes the slot's shadow candidate instead of its model.

    ``client`` must be connected (``edge_agent.mqtt.connect``). ``root_key_dir`` is accepted
    for symmetry with ``repo init``; the online keys in ``{registry}/tuf/keys`` sign deployments.

    Guarantees: the bundles and the document are added in one signed targets version, and
    the publisher sends ``timestamp.json`` only after everything else was acknowledged, so an
    agent never sees a document whose bundles are not on the broker yet. If publishing fails
    the repository on disk is already updated: ``edgefleet repo publish`` completes it.

    Raises:
        DeployError: bad scope or slot, no TUF repository, no artifacts, unreadable document.
        RegistryError: no registry, unknown model or version.
        trainer.fleet.publisher.PublishError: the broker did not acknowledge in time.
    """
    del root_key_dir  # the root key is only needed to (re)sign root.json
    scope = _scope(group, agent)
    with Registry.open(Path(registry_dir)) as registry:
        open_repository(registry_dir)  # a clear error before taking the lock
        with repository_lock(registry_dir):
            repo = open_repository(registry_dir)  # re-read under the lock: another writer may have run
            plan = plan_deployment(registry, repo, model_ref, scope, slot, shadow=shadow)
            doc_slot = plan.document.slots[slot]
            entry = doc_slot.shadow if shadow else doc_slot
            assert entry is not None
            logger.info(
                "deploying %s@%d to %s %s (slot %s%s, serial %d)", entry.model, entry.version,
                scope.kind, scope.name, slot, ", shadow" if shadow else "", plan.document.serial,
            )
            report = _publish_locked(repo, plan, client, topics, chunk_size, timeout)
    return _report(plan, scope, slot, entry, "shadow" if shadow else "active", report)


def clear_shadow(
    registry_dir: str | os.PathLike[str],
    *,
    group: str | None = None,
    agent: str | None = None,
    slot: str = "default",
    client: mqtt.Client,
    topics: Topics,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float = 30.0,
) -> DeployReport:
    """Remove the shadow candidate of ``slot`` from one scope's document and publish it;
    agents unload it. The report names the removed candidate (role ``shadow-cleared``).

    Same guarantees as :func:`deploy`.

    Raises:
        DeployError: bad scope, no TUF repository, no shadow in that slot.
        trainer.fleet.publisher.PublishError: the broker did not acknowledge in time.
    """
    scope = _scope(group, agent)
    open_repository(registry_dir)
    with repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        previous = _current_document(repo, scope)
        removed = previous.slots[slot].shadow if previous and slot in previous.slots else None
        plan = plan_shadow_removal(repo, scope, slot)
        assert removed is not None
        logger.info("clearing the shadow %s@%d of %s %s (slot %s, serial %d)", removed.model,
                    removed.version, scope.kind, scope.name, slot, plan.document.serial)
        report = _publish_locked(repo, plan, client, topics, chunk_size, timeout)
    return _report(plan, scope, slot, removed, "shadow-cleared", report)


def _scope(group: str | None, agent: str | None) -> Scope:
    try:
        return scope_target(group=group, agent=agent)
    except DeploymentError as e:
        raise DeployError(str(e)) from e


def _report(plan: DeploymentPlan, scope: Scope, slot: str, entry: Slot, role: str,
            report: PublishReport) -> DeployReport:
    return DeployReport(
        model=entry.model,
        version=entry.version,
        scope=scope,
        slot=slot,
        serial=plan.document.serial,
        document_target=scope.target,
        bundle_targets=plan.bundle_targets,
        document=plan.document,
        publish=report,
        role=role,
    )


def _publish_locked(
    repo: TufRepository,
    plan: DeploymentPlan,
    client: mqtt.Client,
    topics: Topics,
    chunk_size: int,
    timeout: float,
) -> PublishReport:
    """Add the plan's files in one signed targets version and publish (the lock is held)."""
    try:
        repo.add_targets(plan.files, custom=plan.custom)
    except RepositoryError as e:
        raise DeployError(f"cannot add targets: {e}") from e
    return publish_repository(repo, client, topics, chunk_size=chunk_size, timeout=timeout)
