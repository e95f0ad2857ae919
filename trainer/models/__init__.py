"""Model families built from a JSON-able :class:`ArchitectureSpec`, and their training."""

from trainer.models._networks import build_network
from trainer.models._trees import TreeModel
from trainer.models.checkpoint import (
    CheckpointError,
    compressed_layers,
    load_weights,
    parameter_count,
    weights_bytes,
)
from trainer.models.fit import FitResult, Recipe, fit, initial_network, score_windows
from trainer.models.spec import FAMILIES, TREE_FAMILIES, ArchitectureSpec, SpecError

__all__ = [
    "FAMILIES",
    "TREE_FAMILIES",
    "ArchitectureSpec",
    "CheckpointError",
    "FitResult",
    "Recipe",
    "SpecError",
    "TreeModel",
    "build_network",
    "compressed_layers",
    "fit",
    "initial_network",
    "load_weights",
    "parameter_count",
    "score_windows",
    "weights_bytes",
]
