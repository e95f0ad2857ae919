"""Export trained models to ONNX and TFLite (fp32, int8), check parity, wrap in bundles."""

from trainer.export.bundles import (
    SCHEMES,
    BuiltArtifact,
    ExportInputs,
    artifact_scores,
    build_artifact,
)
from trainer.export.parity import TOLERANCES, ParityReport, Tolerance, check_parity

__all__ = [
    "SCHEMES",
    "TOLERANCES",
    "BuiltArtifact",
    "ExportInputs",
    "ParityReport",
    "Tolerance",
    "artifact_scores",
    "build_artifact",
    "check_parity",
]
