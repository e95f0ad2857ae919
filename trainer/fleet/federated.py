"""Tell a group's agents to join (or leave) a federated run: a signed TUF target.

The agents learn of a run only from ``federated/runs/{run}.json`` (:mod:`shared.federated`),
added to the registry's TUF repository like a deployment document and published to the
broker's retained ``repo/`` topics; a new ``timestamp.json`` makes every agent run a reconcile
pass, which reads it. No second signing scheme: the online targets key signs it.

``edgefleet fl start`` publishes the document with ``state = "active"`` once its SuperLink
listens; when the run ends it publishes it again with ``state = "finished"`` (agents stop
their SuperNode). Removing the target has the same effect on agents.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import paho.mqtt.client as mqtt

from shared.chunking import DEFAULT_CHUNK_SIZE
from shared.federated import FederatedRun, FederatedRunError, encode_run, run_target
from shared.topics import Topics
from trainer.fleet.deploy import DeployError, open_repository, repository_lock
from trainer.fleet.publisher import PublishReport, publish_repository
from trainer.fleet.tuf_repository import RepositoryError

__all__ = ["finish_federated_run", "publish_federated_run"]

logger = logging.getLogger(__name__)


def publish_federated_run(
    registry_dir: str | os.PathLike[str],
    run: FederatedRun,
    *,
    client: mqtt.Client,
    topics: Topics,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float = 30.0,
) -> PublishReport:
    """Sign ``run``'s document as target ``federated/runs/{run}.json`` and publish the repository.

    ``client`` must be connected (``edge_agent.mqtt.connect``). The same run published again
    (e.g. ``state="finished"``) replaces the document. Guarantees as
    :func:`trainer.fleet.deploy.deploy`: one new signed targets version, ``timestamp.json``
    published last; if publishing fails, ``edgefleet repo publish`` completes it.

    Raises:
        DeployError: no TUF repository, or the document is invalid.
        trainer.fleet.publisher.PublishError: the broker did not acknowledge in time.
    """
    try:
        data = encode_run(run)
        target = run_target(run.run)
    except FederatedRunError as e:
        raise DeployError(f"invalid federated run document: {e}") from e
    open_repository(registry_dir)  # a clear error before taking the lock
    with repository_lock(registry_dir):
        repo = open_repository(registry_dir)
        try:
            repo.add_targets({target: data}, custom={target: {"kind": "federated-run",
                                                              "state": run.state}})
        except RepositoryError as e:
            raise DeployError(f"cannot add target {target}: {e}") from e
        logger.info("federated run %s (%s) for group %s: %s", run.run, run.state, run.group, target)
        return publish_repository(repo, client, topics, chunk_size=chunk_size, timeout=timeout)


def finish_federated_run(
    registry_dir: str | os.PathLike[str],
    run: FederatedRun,
    *,
    client: mqtt.Client,
    topics: Topics,
    timeout: float = 30.0,
) -> PublishReport:
    """Publish ``run`` with ``state = "finished"``: its agents stop their SuperNodes."""
    return publish_federated_run(registry_dir, replace(run, state="finished"), client=client,
                                 topics=topics, timeout=timeout)
