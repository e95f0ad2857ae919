"""TUF-verified delivery of the trainer's repository over MQTT (agent side).

:class:`TrustedRepository` wraps python-tuf's ``Updater``; :class:`MqttFetcher` is its
``FetcherInterface`` reading retained topics. No torch, optuna, onnx or trainer imports here.
"""

from edge_agent.trust.fetcher import (
    METADATA_BASE_URL,
    TARGET_BASE_URL,
    ChunkCorruptError,
    ChunkMissingError,
    MqttFetcher,
)
from edge_agent.trust.updater import (
    TRUST_ERROR_KINDS,
    TargetNotFoundError,
    TrustedRepository,
    TrustError,
    classify,
)

__all__ = [
    "METADATA_BASE_URL",
    "TARGET_BASE_URL",
    "TRUST_ERROR_KINDS",
    "ChunkCorruptError",
    "ChunkMissingError",
    "MqttFetcher",
    "TargetNotFoundError",
    "TrustError",
    "TrustedRepository",
    "classify",
]
