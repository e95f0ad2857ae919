"""The agent's view of the trainer's TUF repository: python-tuf's ``Updater`` over MQTT.

:class:`TrustedRepository` runs the TUF client workflow (root → timestamp → snapshot →
targets) with an :class:`~edge_agent.trust.fetcher.MqttFetcher`, persists trusted metadata in
``metadata_dir`` (rollback protection survives restarts) and verified targets in
``targets_dir`` by sha256. Every python-tuf failure becomes a :class:`TrustError` whose
``kind`` says which attack or failure was detected.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from edge_agent.trust._errors import TRUST_ERROR_KINDS, TargetNotFoundError, TrustError
from edge_agent.trust.fetcher import METADATA_BASE_URL, TARGET_BASE_URL, MqttFetcher

__all__ = [
    "TRUST_ERROR_KINDS",
    "TargetNotFoundError",
    "TrustError",
    "TrustedRepository",
    "check_trust_anchor",
    "classify",
]

logger = logging.getLogger(__name__)

# python-tuf raises BadVersionNumberError both for a rollback (a version lower than one
# already trusted) and for a version that differs from what the referencing metadata names
# (snapshot vs timestamp, targets vs snapshot): the latter is mix-and-match. Only the
# messages tell them apart (tuf/ngclient/_internal/trusted_metadata_set.py, tuf 7.0).
_MIX_AND_MATCH = (
    re.compile(r"^Expected snapshot version \d+, got \d+"),  # _check_final_snapshot
    re.compile(r"^Expected \S+ v\d+, got v\d+"),  # update_delegated_targets
)


def classify(exc: BaseException) -> str:
    """Map a python-tuf (or fetcher) exception to a :class:`TrustError` kind."""
    if isinstance(exc, exceptions.DownloadLengthMismatchError):
        return "endless-data"
    if isinstance(exc, exceptions.DownloadError):
        return "unavailable"
    if isinstance(exc, exceptions.ExpiredMetadataError):
        return "expired"
    if isinstance(exc, exceptions.UnsignedMetadataError):
        return "untrusted-signature"
    if isinstance(exc, exceptions.BadVersionNumberError):
        if any(p.search(str(exc)) for p in _MIX_AND_MATCH):
            return "mix-and-match"
        return "rollback"
    if isinstance(exc, exceptions.RepositoryError):
        if str(exc).startswith("New snapshot is missing info for"):
            return "rollback"
        return "tampered"  # LengthOrHashMismatchError, DeserializationError, wrong type …
    return "unavailable"


def _open_updater(
    metadata_dir: Path,
    targets_dir: Path | None,
    fetcher: MqttFetcher | None,
    config: UpdaterConfig | None,
    bootstrap: bytes | None,
) -> Updater:
    try:
        return Updater(
            metadata_dir=str(metadata_dir),
            metadata_base_url=METADATA_BASE_URL,
            target_dir=None if targets_dir is None else str(targets_dir),
            target_base_url=TARGET_BASE_URL,
            fetcher=fetcher,
            config=config,
            bootstrap=bootstrap,
        )
    except FileNotFoundError as e:
        raise TrustError("unavailable", f"no trusted root.json in {metadata_dir}") from e
    except (exceptions.RepositoryError, ValueError) as e:
        raise TrustError(classify(e), f"trusted root is invalid: {e}") from e


def check_trust_anchor(
    metadata_dir: str | os.PathLike[str], trusted_root_bytes: bytes | None = None
) -> None:
    """Check the trust anchor the way :class:`TrustedRepository` does when it is created.

    python-tuf loads ``trusted_root_bytes`` (or ``metadata_dir/root.json``) as the trusted
    root and caches it in ``metadata_dir``, as a ``TrustedRepository`` would; nothing is
    fetched (no broker needed).

    Raises:
        TrustError: the anchor is missing (``unavailable``) or not a valid TUF root.
    """
    path = Path(metadata_dir)
    path.mkdir(parents=True, exist_ok=True)
    _open_updater(path, None, None, None, trusted_root_bytes)


class TrustedRepository:
    """TUF-verified access to the repository published over MQTT.

    Args:
        metadata_dir: trusted metadata cache (``root.json`` + ``root_history/``, timestamp …).
        targets_dir: verified targets, one file per sha256.
        fetcher: the MQTT fetcher (owned by the caller).
        trusted_root_bytes: the trust anchor. If ``None``, ``metadata_dir/root.json`` (copied
            there at provisioning, then kept current by TUF's root rotation) is used.
        config: python-tuf limits (metadata byte caps, max root rotations).

    Raises:
        TrustError: the trust anchor is missing (``unavailable``) or invalid.

    Not thread safe; use from one thread (never from a paho callback).
    """

    def __init__(
        self,
        metadata_dir: str | os.PathLike[str],
        targets_dir: str | os.PathLike[str],
        fetcher: MqttFetcher,
        trusted_root_bytes: bytes | None = None,
        *,
        config: UpdaterConfig | None = None,
    ) -> None:
        self._metadata_dir = Path(metadata_dir)
        self._targets_dir = Path(targets_dir)
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        self._targets_dir.mkdir(parents=True, exist_ok=True)
        self._fetcher = fetcher
        self._config = config or UpdaterConfig()
        self._bootstrap = trusted_root_bytes
        self._updater: Updater | None = None
        self._new_updater()  # validates the trust anchor now, not at the first refresh

    def _new_updater(self) -> Updater:
        return _open_updater(
            self._metadata_dir, self._targets_dir, self._fetcher, self._config, self._bootstrap
        )

    def refresh(self) -> None:
        """Download and verify the newest top-level metadata (root → timestamp → snapshot →
        targets). On success the new trusted state is persisted in ``metadata_dir``.

        Raises:
            TrustError: kind ``rollback``, ``expired``, ``mix-and-match``, ``tampered``,
                ``untrusted-signature``, ``endless-data`` or ``unavailable``. The previously
                trusted state on disk stays valid.
        """
        self._fetcher.begin_session()
        updater = self._new_updater()  # python-tuf allows one refresh per Updater
        try:
            updater.refresh()
        except (exceptions.RepositoryError, exceptions.DownloadError, OSError) as e:
            kind = classify(e)
            logger.warning("TUF refresh refused (%s): %s", kind, e)
            raise TrustError(kind, f"refresh failed: {e}") from e
        self._updater = updater

    def _targetinfo(self, path: str) -> TargetFile:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        try:
            info = self._updater.get_targetinfo(path)
        except (exceptions.RepositoryError, exceptions.DownloadError) as e:
            raise TrustError(classify(e), f"lookup of {path!r} failed: {e}") from e
        if info is None:
            raise TargetNotFoundError(path)
        return info

    def fetch_target(self, path: str) -> bytes:
        """Return the verified bytes of target ``path`` (from the local cache if it matches).

        Refreshes first if :meth:`refresh` was never called successfully.

        Raises:
            TargetNotFoundError: not a current target.
            TrustError: ``tampered`` (hash/length mismatch), ``endless-data``,
                ``unavailable`` (broker, missing chunks, no room for the verified copy), or any
                refresh failure.
        """
        info = self._targetinfo(path)
        assert self._updater is not None
        local = str(self._targets_dir / info.hashes["sha256"])
        cached = self._updater.find_cached_target(info, local)
        if cached is None:
            try:
                cached = self._updater.download_target(info, local)
            except (exceptions.RepositoryError, exceptions.DownloadError) as e:
                kind = classify(e)
                logger.warning("target %s refused (%s): %s", path, kind, e)
                # never leave unverified bytes where a later lookup could find them
                Path(local).unlink(missing_ok=True)
                raise TrustError(kind, f"download of {path!r} failed: {e}") from e
            except OSError as e:  # writing the verified copy (a full disk): nothing half-kept
                Path(local).unlink(missing_ok=True)
                logger.warning("target %s not stored: %s", path, e)
                raise TrustError("unavailable", f"download of {path!r} failed: {e}") from e
        with open(cached, "rb") as f:
            data = f.read()
        info.verify_length_and_hashes(data)  # the file could have changed since
        return data

    def close(self) -> None:
        """Forget the refreshed view (the next lookup refreshes first); the on-disk trusted
        state stays. The fetcher is the caller's: it is left open."""
        self._updater = None

    def list_targets(self, prefix: str) -> list[str]:
        """Paths of the current targets that start with ``prefix``, sorted.

        python-tuf's ``Updater`` looks targets up by path but has no listing: the candidates
        come from the top-level targets metadata it persisted in ``metadata_dir`` when it
        verified it, and each is confirmed through ``get_targetinfo`` (the trusted view), so
        only verified targets are named. Delegated roles are not walked (the repository has
        none). Refreshes first if :meth:`refresh` was never called successfully.

        Raises:
            TrustError: as :meth:`refresh`, or ``tampered`` if the persisted metadata is not
                readable.
        """
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        try:
            persisted = Metadata[Targets].from_file(str(self._metadata_dir / "targets.json"))
        except Exception as e:  # OSError, DeserializationError
            raise TrustError("tampered", f"trusted targets metadata unreadable: {e}") from e
        names = sorted(p for p in persisted.signed.targets if p.startswith(prefix))
        try:
            return [p for p in names if self._updater.get_targetinfo(p) is not None]
        except (exceptions.RepositoryError, exceptions.DownloadError) as e:
            raise TrustError(classify(e), f"listing of {prefix!r} failed: {e}") from e

    def target_custom(self, path: str) -> dict[str, Any]:
        """The ``custom`` object that targets metadata stores for ``path`` (``{}`` if none).

        Raises:
            TargetNotFoundError, TrustError: as :meth:`fetch_target`.
        """
        custom = self._targetinfo(path).custom
        return dict(custom) if isinstance(custom, dict) else {}
