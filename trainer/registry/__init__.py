"""The model registry: SQLite via sqlite-utils plus content-addressed blobs."""

from trainer.registry._schema import SCHEMA_VERSION
from trainer.registry.blobs import BlobStore
from trainer.registry.store import (
    ArtifactRecord,
    NewArtifact,
    Registry,
    RegistryError,
    VersionRecord,
    check_model_name,
    parse_model_ref,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactRecord",
    "BlobStore",
    "NewArtifact",
    "Registry",
    "RegistryError",
    "VersionRecord",
    "check_model_name",
    "parse_model_ref",
]
