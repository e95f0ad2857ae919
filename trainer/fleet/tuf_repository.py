"""The trainer's TUF repository on disk (python-tuf Metadata API, consistent snapshots).

Layout under the repository directory::

    metadata/1.root.json … N.root.json   every root version (clients walk them)
    metadata/root.json                   latest root: what agents bootstrap from
    metadata/N.targets.json              targets versions
    metadata/N.snapshot.json             snapshot versions
    metadata/timestamp.json              current timestamp
    targets/{dir}/{sha256}.{basename}    target files at their consistent-snapshot url path
    keys/{targets,snapshot,timestamp}.pem   online private keys (PKCS#8 PEM, mode 0600)
    {root_key_dir}/root.pem              root private key (default: keys/; keep it offline)

Every write is atomic (temp file in the same directory, fsync, ``os.replace``) and files are
written in dependency order (targets files → targets → snapshot → timestamp), so a crash leaves
the previous consistent state visible. A root rotation writes new private keys as
``{role}.pem.next`` first, then the new root, then moves the keys into place; :meth:`open`
finishes (or drops) a rotation that a crash interrupted. One writer at a time: the class is not
safe for concurrent use from several threads or processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from shared.files import write_atomically
from shared.topics import MAX_TARGET_DEPTH, TopicError, validate_path

__all__ = ["ROLES", "ExpiryPolicy", "RepoFiles", "RepositoryError", "TufRepository"]

logger = logging.getLogger(__name__)

_ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
#: Every top-level role, in the order their keys are listed and rotated.
ROLES = (Root.type, *_ONLINE_ROLES)
_SERIALIZER = JSONSerializer(compact=False)


class RepositoryError(Exception):
    """The repository directory is missing, corrupt, already exists, or an input is invalid."""


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each newly signed role stays valid (negative periods are allowed in tests)."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)


@dataclass(frozen=True)
class RepoFiles:
    """What an up-to-date client may fetch: metadata file names and target url paths.

    ``targets`` maps each target url path (``dir/{sha256}.{basename}``) to its target path.
    """

    metadata: tuple[str, ...]
    targets: Mapping[str, str]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def url_path(target_path: str, sha256: str) -> str:
    """The consistent-snapshot url path of a target: ``dir/{sha256}.{basename}``."""
    dirname, sep, basename = target_path.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


class TufRepository:
    """A TUF repository (root, targets, snapshot, timestamp; ed25519 keys) in a directory.

    Create one with :meth:`init`, reopen it with :meth:`open`. The root key is only needed
    by :meth:`init`; the three online keys sign every change.
    """

    def __init__(
        self,
        path: Path,
        root_key_dir: Path,
        *,
        expiry: ExpiryPolicy,
        clock: Callable[[], datetime],
    ) -> None:
        """Use :meth:`init` or :meth:`open`; this constructor loads nothing by itself."""
        self.path = path
        self.root_key_dir = root_key_dir
        self.expiry = expiry
        self._clock = clock
        self._root: Metadata[Root] | None = None
        self._targets: Metadata[Targets] | None = None
        self._snapshot: Metadata[Snapshot] | None = None
        self._timestamp: Metadata[Timestamp] | None = None
        self._signers: dict[str, Signer] = {}

    # -- paths ---------------------------------------------------------------------------

    @property
    def metadata_dir(self) -> Path:
        """Directory of the metadata files."""
        return self.path / "metadata"

    @property
    def targets_dir(self) -> Path:
        """Directory of the target files (consistent-snapshot names)."""
        return self.path / "targets"

    @property
    def keys_dir(self) -> Path:
        """Directory of the online private keys."""
        return self.path / "keys"

    @property
    def root_json_path(self) -> Path:
        """The latest ``root.json``: copy it to agents as their trust anchor."""
        return self.metadata_dir / "root.json"

    # -- creation ------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        root_key_dir: str | os.PathLike[str] | None = None,
        *,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> TufRepository:
        """Create keys and version-1 metadata in ``path`` and return the open repository.

        Raises:
            RepositoryError: ``path`` already holds a repository or keys (never overwritten).
        """
        base = Path(path)
        rkd = Path(root_key_dir) if root_key_dir is not None else base / "keys"
        repo = cls(base, rkd, expiry=expiry or ExpiryPolicy(), clock=clock)
        existing = [
            p
            for p in (
                repo.metadata_dir / "root.json",
                repo.metadata_dir / "1.root.json",
                repo.metadata_dir / "timestamp.json",
                rkd / "root.pem",
                *(repo.keys_dir / f"{r}.pem" for r in _ONLINE_ROLES),
            )
            if p.exists()
        ]
        if existing:
            raise RepositoryError(
                f"refusing to overwrite the existing TUF repository at {base} "
                f"(found {existing[0]}); use TufRepository.open()"
            )
        for d in (repo.metadata_dir, repo.targets_dir, repo.keys_dir):
            d.mkdir(parents=True, exist_ok=True)
        rkd.mkdir(parents=True, exist_ok=True, mode=0o700)

        now = clock()
        signers = {role: CryptoSigner.generate_ed25519() for role in (Root.type, *_ONLINE_ROLES)}
        root = Root(version=1, expires=now + repo.expiry.root, consistent_snapshot=True)
        for role, signer in signers.items():
            root.add_key(signer.public_key, role)
        # Keys first: metadata without its keys would be a repository nobody can sign.
        for role, signer in signers.items():
            key_dir = rkd if role == Root.type else repo.keys_dir
            write_atomically(key_dir / f"{role}.pem", signer.private_bytes, mode=0o600)
        repo._signers = {r: s for r, s in signers.items() if r != Root.type}

        root_md = Metadata(root)
        root_md.sign(signers[Root.type])
        repo._root = root_md
        repo._write_metadata("1.root.json", root_md)
        repo._write_metadata("root.json", root_md)

        targets = Targets(version=1, expires=now + repo.expiry.targets)
        snapshot = Snapshot(
            version=1,
            expires=now + repo.expiry.snapshot,
            meta={"targets.json": MetaFile(version=1)},
        )
        timestamp = Timestamp(
            version=1, expires=now + repo.expiry.timestamp, snapshot_meta=MetaFile(version=1)
        )
        repo._targets = repo._sign(Metadata(targets))
        repo._snapshot = repo._sign(Metadata(snapshot))
        repo._timestamp = repo._sign(Metadata(timestamp))
        repo._write_metadata("1.targets.json", repo._targets)
        repo._write_metadata("1.snapshot.json", repo._snapshot)
        repo._write_metadata("timestamp.json", repo._timestamp)
        logger.info("initialized TUF repository at %s", base)
        return repo

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        root_key_dir: str | os.PathLike[str] | None = None,
        *,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> TufRepository:
        """Open an existing repository (the root key is not needed).

        Raises:
            RepositoryError: missing or unreadable metadata or online keys.
        """
        base = Path(path)
        rkd = Path(root_key_dir) if root_key_dir is not None else base / "keys"
        repo = cls(base, rkd, expiry=expiry or ExpiryPolicy(), clock=clock)
        try:
            repo._root = Metadata[Root].from_file(str(repo.root_json_path))
            repo._timestamp = Metadata[Timestamp].from_file(
                str(repo.metadata_dir / "timestamp.json")
            )
            sv = repo._timestamp.signed.snapshot_meta.version
            repo._snapshot = Metadata[Snapshot].from_file(
                str(repo.metadata_dir / f"{sv}.snapshot.json")
            )
            tv = repo._snapshot.signed.meta["targets.json"].version
            repo._targets = Metadata[Targets].from_file(
                str(repo.metadata_dir / f"{tv}.targets.json")
            )
            for role in _ONLINE_ROLES:
                repo._settle_pending_key(repo.keys_dir, role)
                repo._signers[role] = repo._load_signer(role)
        except RepositoryError:
            raise
        except Exception as e:  # OSError, KeyError, DeserializationError, crypto errors
            raise RepositoryError(f"cannot open TUF repository at {base}: {e}") from e
        return repo

    def _load_signer(self, role: str, key_dir: Path | None = None) -> Signer:
        key_dir = self.keys_dir if key_dir is None else key_dir
        signer = self._signer_from(key_dir / f"{role}.pem", role)
        if signer is None:
            raise RepositoryError(f"the {role} key in {key_dir} is not trusted by root.json")
        return signer

    def _signer_from(self, pem_path: Path, role: str) -> Signer | None:
        """A signer for ``role`` from ``pem_path`` if the current root trusts that key."""
        root = self._md_root.signed
        private_key = load_pem_private_key(pem_path.read_bytes(), None)
        for keyid in root.roles[role].keyids:
            try:
                return CryptoSigner(private_key, root.keys[keyid])  # type: ignore[arg-type]
            except Exception:  # noqa: S112 - try the next key id of the role
                continue
        return None

    def _settle_pending_key(self, key_dir: Path, role: str) -> None:
        """Finish or drop the ``{role}.pem.next`` that an interrupted rotation left.

        The new root is written between the key and its move into place: if the current root
        trusts the pending key, the rotation got that far and the key replaces the old one;
        otherwise the rotation never happened and the pending key is deleted.
        """
        pending = key_dir / f"{role}.pem.next"
        if not pending.exists():
            return
        if self._signer_from(pending, role) is not None:
            os.replace(pending, key_dir / f"{role}.pem")
            _fsync_dir(key_dir)
            logger.warning("finished the interrupted rotation of the %s key", role)
        else:
            pending.unlink()
            logger.warning("dropped the %s key of a root rotation that never happened", role)

    # -- internals -----------------------------------------------------------------------

    @property
    def _md_root(self) -> Metadata[Root]:
        assert self._root is not None
        return self._root

    @property
    def _md_targets(self) -> Metadata[Targets]:
        assert self._targets is not None
        return self._targets

    @property
    def _md_snapshot(self) -> Metadata[Snapshot]:
        assert self._snapshot is not None
        return self._snapshot

    @property
    def _md_timestamp(self) -> Metadata[Timestamp]:
        assert self._timestamp is not None
        return self._timestamp

    def _sign(self, md: Metadata[Any]) -> Metadata[Any]:
        md.sign(self._signers[md.signed.type])
        return md

    def _write_metadata(self, filename: str, md: Metadata[Any]) -> None:
        write_atomically(self.metadata_dir / filename, md.to_bytes(_SERIALIZER))

    def _bump_snapshot_and_timestamp(self, now: datetime, *, snapshot: bool) -> None:
        if snapshot:
            snap = self._md_snapshot.signed
            snap.version += 1
            snap.expires = now + self.expiry.snapshot
            snap.meta["targets.json"] = MetaFile(version=self._md_targets.signed.version)
            self._sign(self._md_snapshot)
            self._write_metadata(f"{snap.version}.snapshot.json", self._md_snapshot)
        self._new_timestamp(now + self.expiry.timestamp)

    def _new_timestamp(self, expires: datetime) -> None:
        ts = self._md_timestamp.signed
        ts.version += 1
        ts.expires = expires
        ts.snapshot_meta = MetaFile(version=self._md_snapshot.signed.version)
        self._sign(self._md_timestamp)
        self._write_metadata("timestamp.json", self._md_timestamp)

    # -- operations ----------------------------------------------------------------------

    def add_targets(
        self,
        files: Mapping[str, bytes],
        custom: Mapping[str, dict[str, Any]] | None = None,
        *,
        remove: Iterable[str] = (),
    ) -> dict[str, TargetFile]:
        """Add or replace targets, then sign new targets, snapshot and timestamp versions.

        ``files`` maps target paths (``deployments/groups/g.json``) to their bytes; ``custom``
        optionally maps some of them to the ``custom`` object stored in targets metadata.
        ``remove``: current targets to remove in the same signed version (as
        :meth:`remove_targets`; their files stay on disk until :meth:`collect_files`).

        Returns:
            The new ``TargetFile`` entries by target path.

        Raises:
            RepositoryError: an invalid target path, ``custom`` for a path not in ``files``,
                or a path to remove that is not a current target (or is also added).
        """
        custom = dict(custom or {})
        remove = list(remove)
        unknown = set(custom) - set(files)
        if unknown:
            raise RepositoryError(f"custom given for paths not added: {sorted(unknown)}")
        if not files and not remove:
            raise RepositoryError("add_targets() needs at least one file")
        missing = [p for p in remove if p not in self._md_targets.signed.targets or p in files]
        if missing:
            raise RepositoryError(f"not current targets (or also added): {missing}")
        added: dict[str, TargetFile] = {}
        for target_path, data in files.items():
            try:
                validate_path(target_path, what="target path")
            except TopicError as e:
                raise RepositoryError(str(e)) from e
            if target_path.count("/") >= MAX_TARGET_DEPTH:
                raise RepositoryError(
                    f"target path {target_path!r} has more than {MAX_TARGET_DEPTH} levels"
                )
            tf = TargetFile.from_data(target_path, data, ["sha256"])
            if target_path in custom:
                tf.unrecognized_fields["custom"] = dict(custom[target_path])
            write_atomically(self.targets_dir / url_path(target_path, tf.hashes["sha256"]), data)
            added[target_path] = tf
        now = self._clock()
        targets = self._md_targets.signed
        targets.targets.update(added)
        for p in remove:
            del targets.targets[p]
        self._commit_targets(now)
        logger.info("added %d target(s); targets v%d", len(added), targets.version)
        return added

    def remove_targets(self, paths: Iterable[str]) -> None:
        """Remove targets from targets metadata and sign new targets/snapshot/timestamp.

        The files stay on disk until :meth:`collect_files`.

        Raises:
            RepositoryError: a path that is not a current target.
        """
        paths = list(paths)
        targets = self._md_targets.signed
        missing = [p for p in paths if p not in targets.targets]
        if missing:
            raise RepositoryError(f"not current targets: {missing}")
        for p in paths:
            del targets.targets[p]
        self._commit_targets(self._clock())

    def _commit_targets(self, now: datetime) -> None:
        targets = self._md_targets.signed
        targets.version += 1
        targets.expires = now + self.expiry.targets
        self._sign(self._md_targets)
        self._write_metadata(f"{targets.version}.targets.json", self._md_targets)
        self._bump_snapshot_and_timestamp(now, snapshot=True)

    def refresh(self, *, timestamp_days: float = 1, snapshot_days: float = 7) -> list[str]:
        """Re-sign the timestamp so that it expires ``timestamp_days`` from now.

        Snapshot (and targets) are re-signed too, with ``snapshot_days`` of validity for the
        snapshot and the policy's targets period, when they would expire before the new
        timestamp does (a timestamp outliving its snapshot would be useless to clients), or
        when their signature is not by the key the current root names (a root rotation that
        was interrupted before it re-signed them). Negative periods produce already expired
        metadata (for freeze-attack tests).

        Returns:
            The roles that got a new version, e.g. ``["timestamp"]``.
        """
        now = self._clock()
        ts_expires = now + timedelta(days=timestamp_days)
        renewed: list[str] = []
        if self._md_targets.signed.expires < ts_expires or not self._trusted(self._md_targets):
            targets = self._md_targets.signed
            targets.version += 1
            targets.expires = max(now + self.expiry.targets, ts_expires)
            self._sign(self._md_targets)
            self._write_metadata(f"{targets.version}.targets.json", self._md_targets)
            renewed.append(Targets.type)
        if (
            renewed
            or self._md_snapshot.signed.expires < ts_expires
            or not self._trusted(self._md_snapshot)
        ):
            snap = self._md_snapshot.signed
            snap.version += 1
            snap.expires = max(now + timedelta(days=snapshot_days), ts_expires)
            snap.meta["targets.json"] = MetaFile(version=self._md_targets.signed.version)
            self._sign(self._md_snapshot)
            self._write_metadata(f"{snap.version}.snapshot.json", self._md_snapshot)
            renewed.append(Snapshot.type)
        self._new_timestamp(ts_expires)
        renewed.append(Timestamp.type)
        logger.info("refreshed %s", ", ".join(renewed))
        return renewed

    def _trusted(self, md: Metadata[Any]) -> bool:
        """Whether ``md`` carries the signature threshold of the keys the current root names."""
        try:
            self._md_root.signed.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
        except Exception:  # UnsignedMetadataError; anything else means "not trusted" too
            return False
        return True

    def rotate_root(
        self, *, new_keys: Iterable[str] = (), expires: timedelta | None = None
    ) -> list[str]:
        """Sign a new root version, with new keys for the roles in ``new_keys``.

        The new root is signed by the current root key and, if ``root`` is in ``new_keys``,
        by the new one too, so that clients holding the current root accept it (TUF's root
        chain: each version verified by its predecessor and by itself). It expires
        ``expires`` from now (default: the policy's root period), so a rotation without new
        keys renews an expiring root. Then the online roles whose key changed are re-signed
        with new versions, and a new timestamp is always signed: agents refresh when it
        arrives and walk to the new root. Needs the root private key in ``root_key_dir``.

        Guarantees: new private keys are written as ``{role}.pem.next`` before the new root
        and moved into place after it (see :meth:`open`); a crash leaves either the old root
        with the old keys or the new root with keys that :meth:`open` and :meth:`refresh`
        complete.

        Returns:
            The roles that got a new version, ``root`` first.

        Raises:
            RepositoryError: an unknown role in ``new_keys``, a non-positive ``expires``, or
                no trusted root key in ``root_key_dir``.
        """
        roles = set(new_keys)
        unknown = roles - set(ROLES)
        if unknown:
            raise RepositoryError(
                f"unknown role(s) {', '.join(sorted(unknown))}: expected some of {', '.join(ROLES)}"
            )
        if expires is not None and expires <= timedelta(0):
            raise RepositoryError("a new root must expire in the future")
        root_pem = self.root_key_dir / f"{Root.type}.pem"
        if not root_pem.exists() and not (self.root_key_dir / f"{Root.type}.pem.next").exists():
            raise RepositoryError(
                f"no root key at {root_pem}: pass the directory given to `repo init --root-key-dir`"
            )
        try:
            self._settle_pending_key(self.root_key_dir, Root.type)
            old_root_signer = self._load_signer(Root.type, self.root_key_dir)
        except RepositoryError:
            raise
        except Exception as e:  # OSError, a malformed PEM
            raise RepositoryError(f"cannot load the root key from {self.root_key_dir}: {e}") from e

        now = self._clock()
        new_root = Metadata[Root].from_bytes(self._md_root.to_bytes())
        root = new_root.signed
        new_signers = {role: CryptoSigner.generate_ed25519() for role in ROLES if role in roles}
        for role, signer in new_signers.items():
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(signer.public_key, role)
        root.version += 1
        root.expires = now + (self.expiry.root if expires is None else expires)
        new_root.signatures.clear()
        new_root.sign(old_root_signer, append=True)
        if Root.type in new_signers:
            new_root.sign(new_signers[Root.type], append=True)

        def key_dir(role: str) -> Path:
            return self.root_key_dir if role == Root.type else self.keys_dir

        for role, signer in new_signers.items():
            write_atomically(key_dir(role) / f"{role}.pem.next", signer.private_bytes, mode=0o600)
        self._write_metadata(f"{root.version}.root.json", new_root)
        self._write_metadata("root.json", new_root)
        self._root = new_root
        for role in new_signers:
            os.replace(key_dir(role) / f"{role}.pem.next", key_dir(role) / f"{role}.pem")
        for d in {key_dir(role) for role in new_signers}:
            _fsync_dir(d)
        for role in _ONLINE_ROLES:
            self._signers[role] = self._load_signer(role)
        logger.info(
            "signed root v%d (new keys: %s)", root.version, ", ".join(new_signers) or "none"
        )
        return [Root.type, *self.refresh()]

    # -- reading -------------------------------------------------------------------------

    def targets(self) -> dict[str, TargetFile]:
        """The current targets by target path (a copy)."""
        return dict(self._md_targets.signed.targets)

    def versions(self) -> dict[str, int]:
        """Current version of each top-level role."""
        return {
            Root.type: self._md_root.signed.version,
            Targets.type: self._md_targets.signed.version,
            Snapshot.type: self._md_snapshot.signed.version,
            Timestamp.type: self._md_timestamp.signed.version,
        }

    def target_bytes(self, path: str) -> bytes:
        """The bytes of current target ``path`` (read from ``targets/``).

        Raises:
            RepositoryError: unknown target, or the stored file does not match its metadata.
        """
        tf = self._md_targets.signed.targets.get(path)
        if tf is None:
            raise RepositoryError(f"no such target: {path!r}")
        data = (self.targets_dir / url_path(path, tf.hashes["sha256"])).read_bytes()
        try:
            tf.verify_length_and_hashes(data)
        except Exception as e:
            raise RepositoryError(f"stored target {path!r} is corrupt: {e}") from e
        return data

    def metadata_bytes(self, filename: str) -> bytes:
        """The bytes of metadata file ``filename`` (e.g. ``3.snapshot.json``).

        Raises:
            RepositoryError: no such file.
        """
        if "/" in filename or filename.startswith("."):
            raise RepositoryError(f"invalid metadata filename {filename!r}")
        try:
            return (self.metadata_dir / filename).read_bytes()
        except FileNotFoundError as e:
            raise RepositoryError(f"no metadata file {filename!r}") from e

    def current_files(self) -> RepoFiles:
        """Metadata file names and target url paths an up-to-date client may request."""
        root_v = self._md_root.signed.version
        metadata = (
            *(f"{v}.root.json" for v in range(1, root_v + 1)),
            f"{self._md_targets.signed.version}.targets.json",
            f"{self._md_snapshot.signed.version}.snapshot.json",
            "timestamp.json",
        )
        targets = {
            url_path(p, tf.hashes["sha256"]): p for p, tf in self._md_targets.signed.targets.items()
        }
        return RepoFiles(metadata=metadata, targets=targets)

    def collect_files(self) -> list[Path]:
        """Delete what no current metadata names: target files of removed targets and
        superseded targets/snapshot versions (every root version stays: clients walk them).

        Returns:
            The deleted files.
        """
        current = self.current_files()
        keep_targets = {self.targets_dir / u for u in current.targets}
        keep_metadata = {self.metadata_dir / n for n in current.metadata} | {self.root_json_path}
        deleted: list[Path] = []
        for p in sorted(self.targets_dir.rglob("*")):
            if p.is_file() and p not in keep_targets:
                p.unlink()
                deleted.append(p)
        for role in (Targets.type, Snapshot.type):
            for p in sorted(self.metadata_dir.glob(f"*.{role}.json")):
                if p not in keep_metadata:
                    p.unlink()
                    deleted.append(p)
        for d in sorted((p for p in self.targets_dir.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):  # not empty
                d.rmdir()
        logger.info("deleted %d file(s) no current metadata names", len(deleted))
        return deleted

    def expiries(self) -> dict[str, datetime]:
        """When each top-level role's current version expires."""
        return {
            Root.type: self._md_root.signed.expires,
            Targets.type: self._md_targets.signed.expires,
            Snapshot.type: self._md_snapshot.signed.expires,
            Timestamp.type: self._md_timestamp.signed.expires,
        }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
