"""A python-tuf ``FetcherInterface`` that reads the repository from retained MQTT topics.

The :class:`~tuf.ngclient.Updater` is created with :data:`METADATA_BASE_URL` and
:data:`TARGET_BASE_URL`; it then asks for pseudo-URLs such as ``mqtt-repo:/metadata/2.root.json``
or ``mqtt-repo:/targets/artifacts/{sha256}.cpu-3-onnx-int8.zip``, which this fetcher maps to
topics with :class:`shared.topics.Topics`:

- a metadata file is one retained message under ``repo_metadata(name)``;
- a target is an index message plus numbered chunks (``shared.chunking``), streamed in order
  and cached one file per chunk under ``{cache_dir}/{index sha256}-{chunk size}/{i}``, so a
  download interrupted by a crash or a disconnect resumes from what it already has;
- a file that the retained repo index does not list answers ``DownloadHTTPError(…, 404)`` at
  once: that is how TUF's probe for the next root version ends, since MQTT has no "not found".

Nothing here is trusted: TUF verifies every byte afterwards. The fetcher only enforces the
limits TUF gives it (``max_length``: endless-data defence) and detects missing chunks, which
Mosquitto may drop silently when they exceed its message size limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import paho.mqtt.client as mqtt
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from edge_agent.mqtt import BrokerError, RetainedReader
from shared.chunking import ChunkError, ChunkIndex, RepoIndex
from shared.files import write_atomically
from shared.topics import TopicError, Topics

__all__ = [
    "METADATA_BASE_URL",
    "TARGET_BASE_URL",
    "ChunkCorruptError",
    "ChunkMissingError",
    "MqttFetcher",
]

logger = logging.getLogger(__name__)

METADATA_BASE_URL = "mqtt-repo:/metadata/"
TARGET_BASE_URL = "mqtt-repo:/targets/"


class ChunkMissingError(exceptions.DownloadError):
    """The index names chunks that the broker does not hold (e.g. dropped as over-size)."""


class ChunkCorruptError(exceptions.DownloadError):
    """A chunk index is malformed or a chunk is shorter than its index says."""


class MqttFetcher(FetcherInterface):
    """Fetches TUF metadata and chunked targets from retained MQTT messages.

    Args:
        client: a connected paho client with its network thread running. The fetcher
            subscribes and unsubscribes under ``{root}/repo/`` and ``{root}/probe/``: give it
            a client that does not subscribe to those topics for other purposes.
        topics: topic names (root prefix).
        cache_dir: chunk cache for resumable downloads (created if missing).
        timeout: seconds to wait for one batch of retained messages.
        chunk_window: chunks requested from the broker at once (memory: window × chunk size).
        max_chunk_size: refuse an index announcing bigger chunks (memory bound).
        max_length: cap for a ``fetch()`` without a TUF-supplied length.

    Not thread safe: one Updater at a time, never from a paho callback.
    """

    def __init__(
        self,
        client: mqtt.Client,
        topics: Topics,
        cache_dir: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        chunk_window: int = 8,
        max_chunk_size: int = 16 * 1024 * 1024,
        max_length: int = 1024 * 1024 * 1024,
    ) -> None:
        if chunk_window < 1:
            raise ValueError("chunk_window must be >= 1")
        self._topics = topics
        self._reader = RetainedReader(client, topics, timeout=timeout)
        self._cache = Path(cache_dir)
        self._window = chunk_window
        self._max_chunk_size = max_chunk_size
        self._max_length = max_length
        self._index: RepoIndex | None = None
        self._lock = threading.Lock()
        #: Chunks read from the broker / from the local chunk cache since creation.
        self.chunks_from_broker = 0
        self.chunks_from_cache = 0

    # -- session -------------------------------------------------------------------------

    def begin_session(self) -> None:
        """Forget the cached repo index: the next request re-reads it from the broker.

        ``TrustedRepository.refresh()`` calls this before every TUF refresh.
        """
        self._index = None

    def _repo_index(self, *, reload: bool = False) -> RepoIndex:
        if self._index is None or reload:
            topic = self._topics.repo_index()
            got = self._read([topic])
            raw = got.get(topic)
            if raw is None:
                raise exceptions.DownloadError("the broker holds no repository index")
            try:
                self._index = RepoIndex.from_bytes(raw)
            except ChunkError as e:
                raise exceptions.DownloadError(f"bad repository index: {e}") from e
        return self._index

    def _listed(self, kind: str, name: str) -> bool:
        fresh = self._index is None
        index = self._repo_index()
        names = index.metadata if kind == "metadata" else index.targets
        if name in names:
            return True
        if not fresh:  # published after we read the index? look once more
            index = self._repo_index(reload=True)
            names = index.metadata if kind == "metadata" else index.targets
        return name in names

    def _read(self, topics: list[str]) -> dict[str, bytes | None]:
        try:
            return self._reader.read(topics)
        except BrokerError as e:
            raise exceptions.DownloadError(f"broker read failed: {e}") from e

    # -- FetcherInterface ----------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Stream ``url`` (no TUF length limit known: ``max_length`` of the constructor)."""
        return self._stream(url, self._max_length)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` into a temporary file, refusing more than ``max_length`` bytes.

        Unlike the base class, a target whose chunk index announces more than ``max_length``
        bytes is refused before any chunk is read.

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: more data than ``max_length``.
            tuf.api.exceptions.DownloadHTTPError: (404) the file is not in the repo index.
            tuf.api.exceptions.DownloadError: broker unreachable, missing or corrupt chunks.
        """
        with self._lock, tempfile.TemporaryFile() as temp_file:
            received = 0
            for chunk in self._stream(url, max_length):
                received += len(chunk)
                if received > max_length:
                    raise exceptions.DownloadLengthMismatchError(
                        f"downloaded {received} bytes exceeding the maximum of {max_length}"
                    )
                temp_file.write(chunk)
            temp_file.seek(0)
            yield temp_file

    def _stream(self, url: str, max_length: int) -> Iterator[bytes]:
        try:
            if url.startswith(METADATA_BASE_URL):
                yield from self._stream_metadata(url[len(METADATA_BASE_URL) :], max_length)
            elif url.startswith(TARGET_BASE_URL):
                yield from self._stream_target(url[len(TARGET_BASE_URL) :], max_length)
            else:
                raise exceptions.DownloadHTTPError(f"not a repository URL: {url}", 404)
        except exceptions.DownloadError:
            raise
        except (TopicError, OSError) as e:
            raise exceptions.DownloadError(f"cannot fetch {url}: {e}") from e

    def _stream_metadata(self, name: str, max_length: int) -> Iterator[bytes]:
        topic = self._topics.repo_metadata(name)
        if not self._listed("metadata", name):
            raise exceptions.DownloadHTTPError(f"metadata {name} does not exist", 404)
        payload = self._read([topic]).get(topic)
        if payload is None:
            raise exceptions.DownloadError(f"metadata {name} is listed but not on the broker")
        if len(payload) > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"metadata {name} has {len(payload)} bytes, more than the maximum {max_length}"
            )
        yield payload

    def _stream_target(self, upath: str, max_length: int) -> Iterator[bytes]:
        index_topic = self._topics.repo_target_index(upath)
        if not self._listed("target", upath):
            raise exceptions.DownloadHTTPError(f"target {upath} does not exist", 404)
        raw = self._read([index_topic]).get(index_topic)
        if raw is None:
            raise ChunkMissingError(f"target {upath} is listed but has no chunk index")
        try:
            index = ChunkIndex.from_bytes(raw)
        except ChunkError as e:
            raise ChunkCorruptError(f"target {upath}: {e}") from e
        if index.length > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"target {upath} announces {index.length} bytes, more than the {max_length} "
                "its metadata allows"
            )
        if index.chunk_size > self._max_chunk_size:
            raise ChunkCorruptError(
                f"target {upath}: chunk size {index.chunk_size} exceeds {self._max_chunk_size}"
            )
        cache = self._cache / f"{index.sha256}-{index.chunk_size}"
        digest = hashlib.sha256()
        i = 0
        while i < index.count:
            cached = self._cached_chunk(cache, index, i)
            if cached is not None:
                self.chunks_from_cache += 1
                digest.update(cached)
                yield cached
                i += 1
                continue
            for chunk in self._fetch_window(upath, index, cache, i):
                digest.update(chunk)
                yield chunk
                i += 1
        if digest.hexdigest() != index.sha256:
            # Tampered chunk or index: TUF will refuse the bytes; don't resume from them.
            logger.warning("target %s does not match its chunk index; dropping its cache", upath)
        else:
            logger.debug("target %s streamed (%d chunks)", upath, index.count)
        shutil.rmtree(cache, ignore_errors=True)

    def _fetch_window(self, upath: str, index: ChunkIndex, cache: Path, start: int) -> list[bytes]:
        """Read chunks ``start…`` up to the window or the next cached chunk; cache each."""
        numbers = [start]
        for j in range(start + 1, min(start + self._window, index.count)):
            if self._cached_chunk(cache, index, j) is not None:
                break
            numbers.append(j)
        wanted = {self._topics.repo_target_chunk(upath, j): j for j in numbers}
        got = self._read(list(wanted))
        missing = [j for t, j in wanted.items() if got.get(t) is None]
        if missing:
            raise ChunkMissingError(
                f"target {upath}: chunk(s) {missing} of {index.count} are not on the broker "
                "(over the broker's message size limit?)"
            )
        chunks = []
        for topic, j in wanted.items():
            chunk = got[topic]
            assert chunk is not None
            expected = index.chunk_length(j)
            if len(chunk) > expected:
                raise exceptions.DownloadLengthMismatchError(
                    f"target {upath}: chunk {j} has {len(chunk)} bytes, more than {expected}"
                )
            if len(chunk) < expected:
                raise ChunkCorruptError(
                    f"target {upath}: chunk {j} has {len(chunk)} bytes, expected {expected}"
                )
            self._store_chunk(cache, j, chunk)
            self.chunks_from_broker += 1
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _cached_chunk(cache: Path, index: ChunkIndex, i: int) -> bytes | None:
        try:
            data = (cache / str(i)).read_bytes()
        except FileNotFoundError:
            return None
        return data if len(data) == index.chunk_length(i) else None

    @staticmethod
    def _store_chunk(cache: Path, i: int, data: bytes) -> None:
        # No directory fsync per chunk: a chunk lost to a power cut is simply fetched again.
        write_atomically(cache / str(i), data, sync_dir=False)
