"""Publish a :class:`~trainer.fleet.tuf_repository.TufRepository` to retained MQTT topics.

Order of a publish (every message QoS 1, retained; each phase waits for all its PUBACKs):

1. targets not yet on the broker: chunks, then their index;
2. metadata files that changed (every root version, current targets and snapshot);
3. the repo index (the list of files that exist);
4. ``timestamp.json`` last: it is the agents' signal to refresh;
5. garbage collection: an empty retained payload on every ``{root}/repo/`` topic that the
   current files do not reference.

What is on the broker is found by reading the retained messages under ``{root}/repo/#`` with
:class:`edge_agent.mqtt.RetainedReader` (a marker message proves all of them arrived), so a
second publish of the same repository publishes nothing: targets whose retained index and
chunks are already there are skipped, metadata with identical bytes is skipped.

The broker is untrusted storage: nothing here needs to be secret or authentic on the wire,
agents verify everything with TUF.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from edge_agent.mqtt import BrokerError, RetainedReader
from shared.chunking import DEFAULT_CHUNK_SIZE, ChunkError, ChunkIndex, RepoIndex, split
from shared.topics import Topics
from trainer.fleet.tuf_repository import TufRepository

__all__ = ["PublishError", "PublishReport", "publish_repository"]

logger = logging.getLogger(__name__)


class PublishError(Exception):
    """A publish was not acknowledged in time, failed, or the broker could not be read."""


@dataclass
class PublishReport:
    """What one :func:`publish_repository` call did."""

    published_targets: list[str] = field(default_factory=list)
    skipped_targets: list[str] = field(default_factory=list)
    published_metadata: list[str] = field(default_factory=list)
    skipped_metadata: list[str] = field(default_factory=list)
    index_published: bool = False
    cleared_topics: list[str] = field(default_factory=list)
    messages: int = 0
    bytes: int = 0


class _Batch:
    """Publishes QoS 1 retained messages and waits for all their PUBACKs."""

    def __init__(self, client: mqtt.Client, timeout: float, report: PublishReport) -> None:
        self._client = client
        self._timeout = timeout
        self._report = report
        self._pending: list[tuple[str, mqtt.MQTTMessageInfo]] = []

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise PublishError(f"paho's outgoing queue is full publishing {topic}")
        self._pending.append((topic, info))
        self._report.messages += 1
        self._report.bytes += len(payload)

    def wait(self) -> None:
        for topic, info in self._pending:
            try:
                info.wait_for_publish(self._timeout)
            except (RuntimeError, ValueError) as e:
                raise PublishError(f"publish to {topic} failed: {e}") from e
            if not info.is_published():
                raise PublishError(f"no PUBACK for {topic} within {self._timeout:g} s")
        self._pending.clear()


def publish_repository(
    repo: TufRepository,
    client: mqtt.Client,
    topics: Topics,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float = 30.0,
    collect: bool = True,
) -> PublishReport:
    """Make the broker's retained ``{root}/repo/`` topics mirror ``repo``'s current files.

    ``client`` must be connected with its network thread running (``edge_agent.mqtt.connect``)
    and must not itself subscribe to ``{root}/repo/#``. ``chunk_size`` must stay below the
    broker's ``message_size_limit`` (Mosquitto drops larger publishes silently). With
    ``collect=False`` the broker is not read: everything is republished and nothing is
    garbage-collected.

    Guarantees: ``timestamp.json`` is published only after every other message was
    acknowledged; a failed call can simply be repeated.

    Raises:
        PublishError: a PUBACK did not arrive within ``timeout`` or the broker read failed.
    """
    report = PublishReport()
    files = repo.current_files()
    existing: dict[str, bytes | None] = {}
    if collect:
        reader = RetainedReader(client, topics, timeout=timeout)

        def keep(topic: str) -> bool:
            parsed = topics.parse_repo_topic(topic)
            return parsed is None or parsed.kind != "target-chunk"

        try:
            existing = reader.read([topics.repo_all()], keep_payload=keep)
        except BrokerError as e:
            raise PublishError(f"cannot read the retained repository: {e}") from e

    batch = _Batch(client, timeout, report)
    wanted: set[str] = set()

    # 1. targets: chunks before their index, so an index always names chunks that exist.
    for upath, target_path in sorted(files.targets.items()):
        data = repo.target_bytes(target_path)
        index, chunks = split(data, chunk_size)
        index_topic = topics.repo_target_index(upath)
        chunk_topics = [topics.repo_target_chunk(upath, i) for i in range(index.count)]
        wanted.add(index_topic)
        wanted.update(chunk_topics)
        if _already_there(existing, index_topic, chunk_topics, index):
            report.skipped_targets.append(upath)
            continue
        for topic, chunk in zip(chunk_topics, chunks, strict=True):
            batch.publish(topic, chunk)
        batch.publish(index_topic, index.to_bytes())
        report.published_targets.append(upath)
    batch.wait()

    # 2. metadata except the timestamp.
    for name in files.metadata:
        topic = topics.repo_metadata(name)
        wanted.add(topic)
        if name == "timestamp.json":
            continue
        payload = repo.metadata_bytes(name)
        if existing.get(topic) == payload:
            report.skipped_metadata.append(name)
            continue
        batch.publish(topic, payload)
        report.published_metadata.append(name)
    batch.wait()

    # 3. the index of files that exist.
    index_topic = topics.repo_index()
    wanted.add(index_topic)
    repo_index = RepoIndex(metadata=tuple(files.metadata), targets=tuple(files.targets))
    payload = repo_index.to_bytes()
    if existing.get(index_topic) != payload:
        batch.publish(index_topic, payload)
        report.index_published = True
        batch.wait()

    # 4. timestamp last: the agents' signal.
    ts_topic = topics.repo_metadata("timestamp.json")
    ts = repo.metadata_bytes("timestamp.json")
    if existing.get(ts_topic) != ts:
        batch.publish(ts_topic, ts)
        report.published_metadata.append("timestamp.json")
        batch.wait()
    else:
        report.skipped_metadata.append("timestamp.json")

    # 5. garbage: retained repo objects no current file references.
    for topic in sorted(set(existing) - wanted):
        batch.publish(topic, b"")
        report.cleared_topics.append(topic)
    batch.wait()

    logger.info(
        "published %d target(s) (%d skipped), %d metadata file(s), cleared %d topic(s)",
        len(report.published_targets),
        len(report.skipped_targets),
        len(report.published_metadata),
        len(report.cleared_topics),
    )
    return report


def _already_there(
    existing: dict[str, bytes | None], index_topic: str, chunk_topics: list[str], index: ChunkIndex
) -> bool:
    raw = existing.get(index_topic)
    if not raw:
        return False
    try:
        there = ChunkIndex.from_bytes(raw)
    except ChunkError:
        return False
    return there == index and all(t in existing for t in chunk_topics)
