"""Publish a :class:`~trainer.fleet.tuf_repository.TufRepository` to retained MQTT topics.

Order of a publish (every message QoS 1, retained; each phase waits for all its PUBACKs):

1. targets not yet on the broker: chunks, then their index;
2. metadata files that changed (every root version, current targets and snapshot);
3. the repo index (the list of files that exist);
4. ``timestamp.json`` last: it is the agents' signal to refresh;
5. garbage collection: an empty retained payload on every retained metadata file and every
   target (its chunks, then its index) that the current files do not reference, and on the
   chunks a re-chunked target no longer has.

What is on the broker is learnt from the small retained messages only: the repo index, the
metadata files and each target's chunk index (:meth:`shared.topics.Topics.repo_target_indexes`),
read with :class:`edge_agent.mqtt.RetainedReader` (a marker message proves all of them
arrived). No chunk is ever received: a chunk index names its chunks, and it is only published
once they were all acknowledged. So a publish costs a few messages per target, not the whole
repository, and stays within the broker's per-client queue limits (Mosquitto's default
``max_queued_messages`` is 1000). A second publish of the same repository publishes nothing:
targets whose retained chunk index is identical are skipped, metadata with identical bytes too.

The broker is untrusted storage: nothing here needs to be secret or authentic on the wire,
agents verify everything with TUF.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.mqtt import BrokerError, RetainedReader
from shared.chunking import DEFAULT_CHUNK_SIZE, ChunkError, ChunkIndex, RepoIndex, split
from shared.topics import Topics
from trainer.fleet.tuf_repository import RepoFiles, TufRepository

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
    #: Retained messages read to learn what the broker holds (no chunk among them).
    read_messages: int = 0
    messages: int = 0
    bytes: int = 0


class _Batch:
    """Publishes QoS 1 retained messages and waits for all their PUBACKs.

    Hooks the client's ``on_publish`` (the PUBACK reason code of each mid) and
    ``on_disconnect`` (a connection lost under a batch fails it: paho would re-send on the
    next connection, but a broker that drops the connection over a message, e.g. one over
    its size limit, drops it again at every re-send) until :meth:`close`; callbacks already
    set keep being called.
    """

    def __init__(self, client: mqtt.Client, timeout: float, report: PublishReport) -> None:
        self._client = client
        self._timeout = timeout
        self._report = report
        self._pending: list[tuple[str, mqtt.MQTTMessageInfo, int]] = []
        self._done = threading.Condition()
        self._codes: dict[int, Any] = {}  # mid → PUBACK reason code (under _done)
        self._lost: Any = None  # the disconnect reason while a batch waited (under _done)
        self._saved = (client.on_publish, client.on_disconnect)
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect

    def close(self) -> None:
        """Give the client its own callbacks back."""
        self._client.on_publish, self._client.on_disconnect = self._saved

    def _on_publish(self, *args: Any) -> None:
        _client, _userdata, mid, reason, _props = args
        with self._done:
            self._codes[mid] = reason
            self._done.notify_all()
        if self._saved[0] is not None:
            self._saved[0](*args)

    def _on_disconnect(self, *args: Any) -> None:
        with self._done:
            self._lost = args[3]
            self._done.notify_all()
        if self._saved[1] is not None:
            self._saved[1](*args)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise PublishError(f"paho's outgoing queue is full publishing {topic}")
        self._pending.append((topic, info, len(payload)))
        self._report.messages += 1
        self._report.bytes += len(payload)

    def wait(self) -> None:
        """Every PUBACK of the batch, each with a success reason code.

        Raises:
            PublishError: a PUBACK with a failure reason code (named with its topic), the
                connection lost meanwhile, or no PUBACK within the timeout.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        mids = {info.mid for _t, info, _n in pending}
        with self._done:
            self._done.wait_for(lambda: self._lost is not None or mids <= self._codes.keys(),
                                self._timeout)
            codes = {mid: self._codes.pop(mid) for mid in mids if mid in self._codes}
            lost, self._lost = self._lost, None
        for topic, info, _n in pending:
            code = codes.get(info.mid)
            if code is not None and getattr(code, "is_failure", False):
                raise PublishError(f"the broker refused the publish to {topic}: {code} "
                                   f"(reason code 0x{int(code.value):02X})")
        missing = [(topic, n) for topic, info, n in pending if info.mid not in codes]
        if not missing:
            return
        topic, _n = missing[0]
        if lost is not None:
            largest = max(n for _t, n in missing)
            raise PublishError(
                f"the connection to the broker was lost ({lost}) before the PUBACK of {topic} "
                f"and {len(missing) - 1} more; if it happens again, a message may exceed the "
                f"broker's message size limit (max_packet_size, message_size_limit; the largest "
                f"unacknowledged one here is {largest} bytes)")
        raise PublishError(f"no PUBACK for {topic} within {self._timeout:g} s")


@dataclass
class _Retained:
    """What the broker holds under ``{root}/repo/``, as far as its small messages tell."""

    metadata: dict[str, bytes] = field(default_factory=dict)  # file name → payload
    index: bytes | None = None  # the repo index
    targets: dict[str, ChunkIndex | None] = field(default_factory=dict)  # url path → index

    def chunk_topics(self, topics: Topics, upath: str, start: int = 0) -> list[str]:
        """The chunk topics ``start…`` that the retained index of ``upath`` names."""
        index = self.targets.get(upath)
        if index is None:
            return []
        return [topics.repo_target_chunk(upath, i) for i in range(start, index.count)]


def _read_retained(client: mqtt.Client, topics: Topics, timeout: float) -> _Retained:
    reader = RetainedReader(client, topics, timeout=timeout)
    filters = [topics.repo_index(), topics.repo_metadata_all(), *topics.repo_target_indexes()]
    try:
        got = reader.read(filters)
    except BrokerError as e:
        raise PublishError(f"cannot read the retained repository: {e}") from e
    there = _Retained()
    for topic, payload in got.items():
        parsed = topics.parse_repo_topic(topic)
        if parsed is None or payload is None:
            continue
        if parsed.kind == "index":
            there.index = payload
        elif parsed.kind == "metadata":
            there.metadata[parsed.name] = payload
        elif parsed.kind == "target-index":
            try:
                there.targets[parsed.name] = ChunkIndex.from_bytes(payload)
            except ChunkError:
                # Not ours or damaged: republished if current, cleared (index only) if not.
                logger.warning("unreadable chunk index on the broker: %s", topic)
                there.targets[parsed.name] = None
    return there


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
    and must not itself subscribe to ``{root}/repo/``; its ``on_publish`` and
    ``on_disconnect`` are chained during the call. ``chunk_size`` must stay below the broker's
    ``max_packet_size`` / ``message_size_limit``: over MQTT 5 Mosquitto closes the connection
    over a larger publish (``max_packet_size``), or answers it with PUBACK 0x95 (packet too
    large), a code MQTT 5 does not allow in a PUBACK, which paho takes for a malformed packet
    and drops the connection (``message_size_limit``); either way the call fails with a
    :class:`PublishError` saying the connection was lost and that a message may be too large.
    With ``collect=False`` the broker is not read: everything is republished and nothing is
    garbage-collected.

    Guarantees: ``timestamp.json`` is published only after every other message was
    acknowledged; no chunk payload is received; a failed call can simply be repeated. A
    target is cleared chunks first, so an interrupted collection leaves an index that still
    names what is left.

    Raises:
        PublishError: a PUBACK did not arrive within ``timeout`` or carried a failure reason
            code (e.g. 0x87 not authorized by the broker's ACL), the connection was lost
            during a phase, or the broker read failed. Nothing after the failed phase is
            published: never ``timestamp.json`` over missing chunks.
    """
    report = PublishReport()
    files = repo.current_files()
    there = _Retained()
    if collect:
        there = _read_retained(client, topics, timeout)
        report.read_messages = (
            len(there.metadata) + len(there.targets) + (there.index is not None)
        )

    batch = _Batch(client, timeout, report)
    try:
        _publish_phases(repo, files, there, batch, topics, chunk_size, report)
    finally:
        batch.close()

    logger.info(
        "published %d target(s) (%d skipped), %d metadata file(s), cleared %d topic(s); "
        "read %d retained message(s)",
        len(report.published_targets),
        len(report.skipped_targets),
        len(report.published_metadata),
        len(report.cleared_topics),
        report.read_messages,
    )
    return report


def _publish_phases(repo: TufRepository, files: RepoFiles, there: _Retained, batch: _Batch, topics: Topics,
                    chunk_size: int, report: PublishReport) -> None:
    """Phases 1 to 5 of the module docstring, each waiting for its PUBACKs."""
    stale_chunks: list[str] = []  # chunks a re-chunked target no longer has

    # 1. targets: chunks before their index, so an index always names chunks that exist.
    for upath, target_path in sorted(files.targets.items()):
        data = repo.target_bytes(target_path)
        index, chunks = split(data, chunk_size)
        if upath in there.targets and there.targets[upath] == index:
            report.skipped_targets.append(upath)
            continue
        for i, chunk in enumerate(chunks):
            batch.publish(topics.repo_target_chunk(upath, i), chunk)
        batch.publish(topics.repo_target_index(upath), index.to_bytes())
        stale_chunks += there.chunk_topics(topics, upath, start=index.count)
        report.published_targets.append(upath)
    batch.wait()

    # 2. metadata except the timestamp.
    for name in files.metadata:
        if name == "timestamp.json":
            continue
        payload = repo.metadata_bytes(name)
        if there.metadata.get(name) == payload:
            report.skipped_metadata.append(name)
            continue
        batch.publish(topics.repo_metadata(name), payload)
        report.published_metadata.append(name)
    batch.wait()

    # 3. the index of files that exist.
    repo_index = RepoIndex(metadata=tuple(files.metadata), targets=tuple(files.targets))
    payload = repo_index.to_bytes()
    if there.index != payload:
        batch.publish(topics.repo_index(), payload)
        report.index_published = True
        batch.wait()

    # 4. timestamp last: the agents' signal.
    ts = repo.metadata_bytes("timestamp.json")
    if there.metadata.get("timestamp.json") != ts:
        batch.publish(topics.repo_metadata("timestamp.json"), ts)
        report.published_metadata.append("timestamp.json")
        batch.wait()
    else:
        report.skipped_metadata.append("timestamp.json")

    # 5. garbage: what no current file references. Chunks first, then their index.
    gone = sorted(set(there.targets) - set(files.targets))
    for topic in stale_chunks + [t for u in gone for t in there.chunk_topics(topics, u)]:
        batch.publish(topic, b"")
        report.cleared_topics.append(topic)
    batch.wait()
    garbage = [topics.repo_target_index(u) for u in gone]
    garbage += [topics.repo_metadata(n) for n in sorted(set(there.metadata) - set(files.metadata))]
    for topic in garbage:
        batch.publish(topic, b"")
        report.cleared_topics.append(topic)
    batch.wait()
