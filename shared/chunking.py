"""Wire format of chunked repository targets and of the retained repository index.

A target file of ``N`` bytes travels as one JSON *index* message plus ``K`` binary chunk
messages (see ``shared.topics.Topics.repo_target_index`` / ``repo_target_chunk``)::

    {"schema": "edgefleet.chunk-index/1", "length": N, "chunk_size": C, "count": K,
     "sha256": "<hex>"}

Chunk ``i`` holds bytes ``[i*C, min((i+1)*C, N))``; ``K == ceil(N / C)`` (an empty file has no
chunk, because an empty retained payload means "delete" in MQTT). The index is *not* trusted:
TUF metadata is; the index only lets a reader detect missing or mis-sized chunks early and key
its resume cache.

The repository index (one retained message) lists the files that exist, so that a reader can
answer "not found" at once (MQTT has no such answer)::

    {"schema": "edgefleet.repo-index/1", "metadata": [filenames], "targets": [url paths]}

Readers keep unknown fields (``extra``) and writers write them back. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHUNK_INDEX_SCHEMA",
    "DEFAULT_CHUNK_SIZE",
    "REPO_INDEX_SCHEMA",
    "ChunkError",
    "ChunkIndex",
    "RepoIndex",
    "join",
    "split",
]

CHUNK_INDEX_SCHEMA = "edgefleet.chunk-index/1"
REPO_INDEX_SCHEMA = "edgefleet.repo-index/1"
#: Default chunk size; must stay below the broker's ``message_size_limit``.
DEFAULT_CHUNK_SIZE = 256 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")


class ChunkError(ValueError):
    """A malformed chunk index, repository index, or chunk list."""


def _nonneg_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ChunkError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _load_object(data: bytes, schema: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ChunkError(f"not a JSON document: {e}") from e
    if not isinstance(obj, dict):
        raise ChunkError("expected a JSON object")
    if obj.get("schema") != schema:
        raise ChunkError(f"expected schema {schema!r}, got {obj.get('schema')!r}")
    return obj


@dataclass(frozen=True)
class ChunkIndex:
    """The index message of one chunked target.

    Construction validates consistency (``count == ceil(length / chunk_size)``, ``sha256`` is
    64 lowercase hex digits) and raises :class:`ChunkError` otherwise.
    """

    length: int
    chunk_size: int
    count: int
    sha256: str
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _nonneg_int(self.length, "length")
        _nonneg_int(self.count, "count")
        if _nonneg_int(self.chunk_size, "chunk_size") == 0:
            raise ChunkError("chunk_size must be positive")
        expected = -(-self.length // self.chunk_size)
        if self.count != expected:
            raise ChunkError(
                f"count {self.count} inconsistent with length {self.length} and "
                f"chunk_size {self.chunk_size} (expected {expected})"
            )
        if not isinstance(self.sha256, str) or _HEX64.fullmatch(self.sha256) is None:
            raise ChunkError("sha256 must be 64 lowercase hex digits")

    def chunk_length(self, i: int) -> int:
        """Exact byte length chunk ``i`` must have.

        Raises:
            ChunkError: ``i`` is out of range.
        """
        if not 0 <= i < self.count:
            raise ChunkError(f"chunk {i} out of range 0..{self.count - 1}")
        return min(self.chunk_size, self.length - i * self.chunk_size)

    def to_bytes(self) -> bytes:
        """Serialize (compact JSON, sorted keys; unknown fields written back)."""
        obj = dict(self.extra)
        obj.update(
            schema=CHUNK_INDEX_SCHEMA,
            length=self.length,
            chunk_size=self.chunk_size,
            count=self.count,
            sha256=self.sha256,
        )
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkIndex:
        """Parse an index message, keeping unknown fields in ``extra``.

        Raises:
            ChunkError: not a valid ``edgefleet.chunk-index/1`` document.
        """
        obj = _load_object(data, CHUNK_INDEX_SCHEMA)
        known = ("schema", "length", "chunk_size", "count", "sha256")
        missing = [k for k in known if k not in obj]
        if missing:
            raise ChunkError(f"chunk index lacks {', '.join(missing)}")
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(obj["length"], obj["chunk_size"], obj["count"], obj["sha256"], extra)


def split(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[ChunkIndex, list[bytes]]:
    """Split ``data`` into its index and chunks (``b"".join(chunks) == data``).

    Raises:
        ChunkError: ``chunk_size`` is not a positive integer.
    """
    if _nonneg_int(chunk_size, "chunk_size") == 0:
        raise ChunkError("chunk_size must be positive")
    view = memoryview(data)
    chunks = [bytes(view[i : i + chunk_size]) for i in range(0, len(data), chunk_size)]
    index = ChunkIndex(len(data), chunk_size, len(chunks), hashlib.sha256(data).hexdigest())
    return index, chunks


def join(index: ChunkIndex, chunks: Iterable[bytes]) -> bytes:
    """Reassemble chunks, checking count, every chunk length and the sha256 of the whole.

    Raises:
        ChunkError: a chunk is missing, extra, mis-sized, or the hash differs.
    """
    parts: list[bytes] = []
    for i, chunk in enumerate(chunks):
        if i >= index.count:
            raise ChunkError(f"more than {index.count} chunks")
        if len(chunk) != index.chunk_length(i):
            raise ChunkError(f"chunk {i} has {len(chunk)} bytes, expected {index.chunk_length(i)}")
        parts.append(chunk)
    if len(parts) != index.count:
        raise ChunkError(f"got {len(parts)} chunks, expected {index.count}")
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != index.sha256:
        raise ChunkError("sha256 of the reassembled data differs from the index")
    return data


def _str_list(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ChunkError(f"{name} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class RepoIndex:
    """The retained list of repository files that exist.

    ``metadata`` holds metadata file names (``1.root.json``, ``timestamp.json`` …), ``targets``
    target url paths as clients request them (hash-prefixed under consistent snapshots).
    """

    metadata: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_bytes(self) -> bytes:
        """Serialize (sorted lists, compact JSON; unknown fields written back)."""
        obj = dict(self.extra)
        obj.update(
            schema=REPO_INDEX_SCHEMA,
            metadata=sorted(set(self.metadata)),
            targets=sorted(set(self.targets)),
        )
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> RepoIndex:
        """Parse a repo index message, keeping unknown fields in ``extra``.

        Raises:
            ChunkError: not a valid ``edgefleet.repo-index/1`` document.
        """
        obj = _load_object(data, REPO_INDEX_SCHEMA)
        metadata = _str_list(obj.get("metadata", []), "metadata")
        targets = _str_list(obj.get("targets", []), "targets")
        extra = {k: v for k, v in obj.items() if k not in ("schema", "metadata", "targets")}
        return cls(metadata, targets, extra)
