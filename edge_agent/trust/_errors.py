"""What a refresh or a fetch from the TUF repository can fail with (no python-tuf import here).

Kept apart from :mod:`edge_agent.trust.updater` so that the agent process, whose TUF client runs
in a child process (:mod:`edge_agent.trust.isolated`), can raise and catch these without
loading python-tuf.
"""

from __future__ import annotations

__all__ = ["TRUST_ERROR_KINDS", "TargetNotFoundError", "TrustError"]

TRUST_ERROR_KINDS = (
    "tampered",
    "untrusted-signature",
    "rollback",
    "expired",
    "mix-and-match",
    "endless-data",
    "unavailable",
)


class TrustError(Exception):
    """Refreshing or fetching from the repository failed; ``kind`` says why.

    ``kind`` is one of :data:`TRUST_ERROR_KINDS`. The python-tuf exception is the ``__cause__``.
    """

    def __init__(self, kind: str, message: str) -> None:
        if kind not in TRUST_ERROR_KINDS:
            raise ValueError(f"unknown TrustError kind {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class TargetNotFoundError(TrustError):
    """The trusted targets metadata does not list the requested path (kind ``unavailable``)."""

    def __init__(self, path: str) -> None:
        super().__init__("unavailable", f"no target {path!r} in the trusted targets metadata")
        self.path = path
