"""The model registry: SQLite (via sqlite-utils) plus a content-addressed blob directory.

Layout of a registry directory::

    registry.sqlite        models, versions, artifacts (WAL mode)
    blobs/ab/abcd…         artifact bundles by sha256

Concurrency: any number of processes may read and write at once. A new version is
allocated and recorded in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock), so two
``edgefleet train`` runs get distinct version numbers and never leave a half-written version.
Blobs are written before the transaction that references them (atomically, by content), so a
crash leaves at worst an unreferenced blob, never a reference to a missing one.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from trainer.registry._schema import SCHEMA_VERSION, current_version, migrate
from trainer.registry._schema import create as create_schema
from trainer.registry.blobs import BlobStore

__all__ = [
    "ArtifactRecord",
    "Registry",
    "RegistryError",
    "VersionRecord",
    "parse_model_ref",
]

DB_FILE = "registry.sqlite"
# How long a registry operation waits for another process's write lock.
_LOCK_TIMEOUT_S = 60.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RegistryError(Exception):
    """The registry is missing, unreadable, not writable, corrupt, from a newer edgefleet, or
    asked for something it lacks."""


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """Split ``MODEL[@VERSION]``; raises :class:`RegistryError` on a malformed reference."""
    name, sep, version = ref.partition("@")
    if not _NAME.match(name):
        raise RegistryError(f"bad model name {name!r}: use letters, digits, '.', '_' or '-'")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(f"bad version in {ref!r}: expected MODEL@N with N >= 1")
    return name, int(version)


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`RegistryError`."""
    if not _NAME.match(name):
        raise RegistryError(f"bad model name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class ArtifactRecord:
    """One registered artifact of a version."""

    format: str
    quantization: str
    size_bytes: int
    model_bytes: int
    sha256: str
    profiles: list[str]
    parity: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class VersionRecord:
    """One registered model version with its artifacts."""

    model: str
    version: int
    created_at: str
    metrics: dict[str, Any]
    params: dict[str, Any]
    lineage: dict[str, Any]
    architecture: dict[str, Any]
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    # sha256 of the torch weights blob (trainer.models.checkpoint); None for versions
    # registered before the registry kept them.
    weights: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "ref": self.ref,
            "created_at": self.created_at,
            "metrics": self.metrics,
            "params": self.params,
            "lineage": self.lineage,
            "architecture": self.architecture,
            "artifacts": [a.to_json() for a in self.artifacts],
            "weights": self.weights,
        }


@dataclass(frozen=True)
class NewArtifact:
    """An artifact to register: the bundle bytes and what to record about it."""

    format: str
    quantization: str
    bundle: bytes
    model_bytes: int
    profiles: Sequence[str]
    parity: dict[str, Any]


class Registry:
    """A registry directory. Open with :meth:`open` (existing) or :meth:`create`."""

    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        self.root = root
        self._conn = conn
        self.db = sqlite_utils.Database(conn)
        self.blobs = BlobStore(root / "blobs")

    # -- opening -----------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=_LOCK_TIMEOUT_S, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(_LOCK_TIMEOUT_S * 1000)}")
        # Two processes switching a new file to WAL at once can deadlock on the lock upgrade;
        # SQLite then answers one of them "database is locked" at once, without waiting in the
        # busy handler. The switch is idempotent, so that one retries until the other is done.
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        delay = 0.01
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() + delay > deadline:
                    conn.close()
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @classmethod
    def open(cls, root: str | Path, *, create: bool = False) -> Registry:
        """Open the registry in ``root``.

        With ``create``, a missing registry is created at the current schema version.
        Raises :class:`RegistryError` if it is missing (without ``create``), cannot be opened
        or created (permissions, not a directory, not an SQLite file), needs
        ``edgefleet registry migrate``, or was written by a newer edgefleet.
        """
        root = Path(root)
        db_path = root / DB_FILE
        if not db_path.exists() and not create:
            raise RegistryError(f"no registry at {root} (train a model to create one)")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"cannot create registry {root}: {e.strerror or e}") from e
        conn = None
        try:
            conn = cls._connect(db_path)
            version = current_version(conn)
            if version == 0 and create:
                # A new (or still empty) registry. Another process may be creating it right
                # now: create() takes the write lock, re-checks and writes the whole schema in
                # one transaction, so no process sees a version between 0 and the current one.
                create_schema(conn)
                version = current_version(conn)
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise RegistryError(f"cannot open registry {db_path}: {e}") from e
        if version > SCHEMA_VERSION:
            conn.close()
            raise RegistryError(
                f"registry at {root} has schema v{version}, newer than this edgefleet "
                f"(v{SCHEMA_VERSION}): upgrade edgefleet"
            )
        if version < SCHEMA_VERSION:
            conn.close()
            raise RegistryError(
                f"registry at {root} has schema v{version}; run "
                f"`edgefleet registry migrate --registry {root}` to bring it to v{SCHEMA_VERSION}"
            )
        return cls(root, conn)

    @classmethod
    def check_writable(cls, root: str | Path) -> None:
        """Check, without creating or changing anything, that a version could be registered.

        An existing registry must open (current schema, a real SQLite file) and grant SQLite's
        write lock; its directories must be writable. A missing one needs its nearest existing
        parent to be a writable directory. Meant to run before minutes of training.
        Raises :class:`RegistryError` saying what is wrong.
        """
        root = Path(root)
        if (root / DB_FILE).exists():
            with cls.open(root) as reg:
                try:
                    reg._conn.execute("BEGIN IMMEDIATE")
                    reg._conn.execute("ROLLBACK")
                except sqlite3.Error as e:
                    raise RegistryError(f"registry {root} is not writable: {e}") from e
            for path in (root / DB_FILE, root, root / "blobs"):
                if path.exists() and not os.access(path, os.W_OK):
                    raise RegistryError(f"registry {root} is not writable: {path}: permission denied")
            return
        existing = root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise RegistryError(f"cannot create registry {root}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RegistryError(f"cannot create registry {root}: {existing}: permission denied")

    @classmethod
    def migrate(cls, root: str | Path) -> tuple[int, list[int]]:
        """Bring the registry in ``root`` to the current schema; returns (before, applied).

        Raises :class:`RegistryError` if there is none, it cannot be opened or written, or it
        is newer than this edgefleet.
        """
        db_path = Path(root) / DB_FILE
        if not db_path.exists():
            raise RegistryError(f"no registry at {root}")
        try:
            conn = cls._connect(db_path)
        except sqlite3.Error as e:
            raise RegistryError(f"cannot open registry {db_path}: {e}") from e
        try:
            before = current_version(conn)
            if before > SCHEMA_VERSION:
                raise RegistryError(f"registry schema v{before} is newer than this edgefleet")
            return before, migrate(conn)
        except sqlite3.Error as e:
            raise RegistryError(f"cannot migrate registry {db_path}: {e}") from e
        finally:
            conn.close()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: SQLite's write lock) on the registry's
        connection: committed when the block ends, rolled back when it raises. For the
        registry's other tables (the federated runs' privacy ledger, :mod:`trainer.federated`)."""
        with self._write():
            yield self._conn

    @contextmanager
    def _write(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- writing -----------------------------------------------------------------------------

    def register(
        self,
        model: str,
        *,
        metrics: dict[str, Any],
        params: dict[str, Any],
        lineage: dict[str, Any],
        architecture: dict[str, Any],
        artifacts: Sequence[NewArtifact],
        weights: bytes | None = None,
    ) -> VersionRecord:
        """Record a new version ``model@N`` (N = previous + 1) with its artifacts and, when
        given, the torch ``weights`` it was exported from (:mod:`trainer.models.checkpoint`).

        Atomic: either the version and all its artifacts are recorded, or nothing is. The
        lineage gets ``parent_version`` (the previous latest version, if any) unless it names
        one itself (a compressed version names the version it was compressed from).
        """
        check_model_name(model)
        shas = [self.blobs.put(a.bundle) for a in artifacts]
        weights_sha = self.blobs.put(weights) if weights is not None else None
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._write():
            row = self._conn.execute(
                "SELECT MAX(version) FROM versions WHERE model = ?", (model,)
            ).fetchone()
            parent = row[0]
            version = (parent or 0) + 1
            self.db.table("models").insert({"name": model, "created_at": now}, ignore=True)
            lineage = {"parent_version": parent, **lineage}
            self.db.table("versions").insert(
                {
                    "model": model,
                    "version": version,
                    "created_at": now,
                    "metrics": json.dumps(metrics, sort_keys=True),
                    "params": json.dumps(params, sort_keys=True),
                    "lineage": json.dumps(lineage, sort_keys=True),
                    "architecture": json.dumps(architecture, sort_keys=True),
                    "weights": weights_sha,
                }
            )
            self.db.table("artifacts").insert_all(
                {
                    "model": model,
                    "version": version,
                    "format": a.format,
                    "quantization": a.quantization,
                    "size_bytes": len(a.bundle),
                    "model_bytes": a.model_bytes,
                    "sha256": sha,
                    "profiles": json.dumps(sorted(a.profiles)),
                    "parity": json.dumps(a.parity, sort_keys=True),
                }
                for a, sha in zip(artifacts, shas)
            )
        return self.get(model, version)

    # -- reading -----------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """Every model with its latest version and version count, by name."""
        rows = self.db.query(
            "SELECT m.name, m.created_at, MAX(v.version) AS latest, COUNT(v.version) AS versions "
            "FROM models m LEFT JOIN versions v ON v.model = m.name "
            "GROUP BY m.name ORDER BY m.name"
        )
        return [dict(r) for r in rows]

    def versions(self, model: str) -> list[VersionRecord]:
        """Every version of ``model``, oldest first. Raises if the model is unknown."""
        rows = list(self.db.table("versions").rows_where("model = ?", [model], order_by="version"))
        if not rows:
            raise RegistryError(f"no model {model!r} in registry {self.root}")
        return [self._version(r) for r in rows]

    def get(self, model: str, version: int | None = None) -> VersionRecord:
        """``model@version`` (the latest when ``version`` is None)."""
        if version is None:
            return self.versions(model)[-1]
        rows = list(
            self.db.table("versions").rows_where("model = ? AND version = ?", [model, version])
        )
        if not rows:
            known = [v.version for v in self.versions(model)]
            raise RegistryError(f"no version {model}@{version}; known versions: {known}")
        return self._version(rows[0])

    def bundle(self, sha256: str) -> bytes:
        """The bundle bytes of an artifact.

        Raises :class:`RegistryError` if its blob is missing, unreadable or corrupt.
        """
        try:
            return self.blobs.get(sha256)
        except KeyError:
            raise RegistryError(f"registry {self.root} lacks the blob of artifact {sha256}") from None
        except (OSError, ValueError) as e:
            raise RegistryError(f"registry {self.root}: artifact {sha256}: {e}") from e

    def weights(self, record: VersionRecord) -> bytes:
        """The torch weights ``record`` was exported from.

        Raises :class:`RegistryError` when the version was registered without them (before
        the registry kept weights) or their blob is missing or corrupt.
        """
        if record.weights is None:
            raise RegistryError(
                f"{record.ref} was registered without its model weights (by an older edgefleet): "
                "train it again to compress or fine-tune it"
            )
        return self.bundle(record.weights)

    def _version(self, row: dict[str, Any]) -> VersionRecord:
        arts = self.db.table("artifacts").rows_where(
            "model = ? AND version = ?",
            [row["model"], row["version"]],
            order_by="format, quantization",
        )
        return VersionRecord(
            model=row["model"],
            version=row["version"],
            created_at=row["created_at"],
            metrics=json.loads(row["metrics"]),
            params=json.loads(row["params"]),
            lineage=json.loads(row["lineage"]),
            architecture=json.loads(row["architecture"]),
            artifacts=[
                ArtifactRecord(
                    format=a["format"],
                    quantization=a["quantization"],
                    size_bytes=a["size_bytes"],
                    model_bytes=a["model_bytes"],
                    sha256=a["sha256"],
                    profiles=json.loads(a["profiles"]),
                    parity=json.loads(a["parity"]),
                )
                for a in arts
            ],
            weights=row.get("weights"),
        )
