"""TUF-verified delivery of the trainer's repository over MQTT (agent side).

:class:`TrustedRepository` wraps python-tuf's ``Updater``; :class:`MqttFetcher` is its
``FetcherInterface`` reading retained topics. The agent itself uses
:class:`IsolatedRepository`, which runs them in a short-lived child process during each
reconcile pass, so python-tuf and what it loads (securesystemslib, cryptography, urllib3:
about 13 MiB resident) are never mapped into the long-running agent process.

Importing this package does not import python-tuf: the names that need it are loaded on
first access. No torch, optuna, onnx or trainer imports here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from edge_agent.trust._errors import TRUST_ERROR_KINDS, TargetNotFoundError, TrustError
from edge_agent.trust.isolated import IsolatedRepository

if TYPE_CHECKING:
    from edge_agent.trust.fetcher import (
        METADATA_BASE_URL,
        TARGET_BASE_URL,
        ChunkCorruptError,
        ChunkMissingError,
        MqttFetcher,
    )
    from edge_agent.trust.updater import TrustedRepository, check_trust_anchor, classify

__all__ = [
    "METADATA_BASE_URL",
    "TARGET_BASE_URL",
    "TRUST_ERROR_KINDS",
    "ChunkCorruptError",
    "ChunkMissingError",
    "IsolatedRepository",
    "MqttFetcher",
    "TargetNotFoundError",
    "TrustError",
    "TrustedRepository",
    "check_trust_anchor",
    "classify",
]

# name -> the submodule that defines it (and imports python-tuf)
_LAZY = {
    "METADATA_BASE_URL": "fetcher",
    "TARGET_BASE_URL": "fetcher",
    "ChunkCorruptError": "fetcher",
    "ChunkMissingError": "fetcher",
    "MqttFetcher": "fetcher",
    "TrustedRepository": "updater",
    "check_trust_anchor": "updater",
    "classify": "updater",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
