"""From a trained model (torch, or scikit-learn for the tree families) to verified artifact bundles,
one per (format, quantization)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_agent.runtime import open_runtime
from shared.bundle import (
    MODEL_FILES,
    BundleSpec,
    GoldenVectors,
    ScoreSpec,
    TensorSpec,
    read_bundle,
    write_bundle,
)
from shared.drift import score_reference
from trainer.export._onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx_fp32,
    quantize_onnx_dynamic,
    quantize_onnx_int8,
)
from trainer.export._quiet import quiet_fds
from trainer.export._tflite import export_tflite_fp32, export_tflite_int8
from trainer.export._trees import export_tree_onnx
from trainer.export.parity import TOLERANCES, ParityReport, check_parity
from trainer.export.targets import TREE_EXPORT_REASON, TREE_EXPORTS
from trainer.models import TreeModel

__all__ = ["SCHEMES", "BuiltArtifact", "ExportInputs", "build_artifact", "artifact_scores"]

log = logging.getLogger(__name__)

GOLDEN_COUNT = 4
# Tolerances for the on-device smoke test, relative to the decision threshold: fp32 kernels
# differ in summation order across CPUs; int8 kernels may also round differently.
GOLDEN_TOLERANCE = {"fp32": (1e-3, 1e-3), "int8": (0.05, 0.05)}
# How an int8 artifact is quantized. "static": each format's default (ONNX QDQ with int8
# per-channel weights and 16-bit activations, TFLite full int8 with per-tensor weights), both
# calibrated on ExportInputs.calibration; "per-channel" / "per-tensor": static with that weight
# granularity in either format; "dynamic": int8 weights, activations quantized at run time
# (onnxruntime quantize_dynamic, LiteRT dynamic-range), no calibration set.
SCHEMES = ("static", "per-channel", "per-tensor", "dynamic")


@dataclass(frozen=True)
class ExportInputs:
    """What every artifact of one trained model shares."""

    name: str
    module: torch.nn.Module | TreeModel  # a tree family's model exports to ONNX fp32 only
    window: int
    features: tuple[str, ...]
    score: ScoreSpec
    calibration: np.ndarray  # training windows for int8 calibration
    holdout: np.ndarray  # validation windows for parity and golden vectors
    reference_scores: np.ndarray  # the trained model's scores on ``holdout``
    drift_reference: dict[str, Any]
    lineage: dict[str, Any]
    architecture: dict[str, Any]


@dataclass(frozen=True)
class BuiltArtifact:
    """One bundle: its bytes, spec and parity report (registered only if parity passed)."""

    format: str
    quantization: str
    bundle: bytes
    spec: BundleSpec | None
    parity: ParityReport
    model_size: int


def artifact_scores(spec: BundleSpec, model_bytes: bytes, windows: np.ndarray) -> np.ndarray:
    """Scores of an artifact on ``(n, window, features)`` windows, through the agent's runtime.

    The trainer checks artifacts with the very code an agent runs
    (:func:`edge_agent.runtime.open_runtime`), so parity covers the serving path too.
    """
    with quiet_fds():  # LiteRT announces its XNNPACK delegate on stderr
        runtime = open_runtime(spec, model_bytes, threads=1)
    try:
        return runtime.score(windows)
    finally:
        runtime.close()


def _with_score_reference(drift_reference: dict[str, Any], scores: np.ndarray) -> dict[str, Any]:
    """``drift_reference`` with its ``score`` entry rebuilt from an artifact's ``scores``
    (unchanged when it has no score entry or no score is finite)."""
    if not isinstance(drift_reference.get("score"), dict) or not np.isfinite(scores).any():
        return drift_reference
    return {**drift_reference, "score": score_reference(scores)}


def _golden_indices(reference: np.ndarray) -> list[int]:
    # Low, typical and high-scoring windows, so the smoke test exercises the whole range.
    order = np.argsort(reference, kind="stable")
    picks = [order[0], order[len(order) // 2], order[(3 * len(order)) // 4], order[-1]]
    return sorted({int(i) for i in picks})[:GOLDEN_COUNT]


def _export(fmt: str, quantization: str, inputs: ExportInputs, scheme: str) -> bytes:
    if isinstance(inputs.module, TreeModel):
        if (fmt, quantization) not in TREE_EXPORTS:
            raise ValueError(f"no {fmt}/{quantization} artifact of the {inputs.module.spec.family} family: "
                             f"it exports to {TREE_EXPORT_REASON}")
        return export_tree_onnx(inputs.module)
    example = inputs.holdout[:1]
    if fmt == "onnx":
        fp32 = export_onnx_fp32(inputs.module, example)
        if quantization == "fp32":
            return fp32
        if scheme == "dynamic":
            return quantize_onnx_dynamic(fp32)
        return quantize_onnx_int8(fp32, inputs.calibration, per_channel=scheme != "per-tensor")
    if quantization == "fp32":
        return export_tflite_fp32(inputs.module, example)
    return export_tflite_int8(inputs.module, inputs.calibration, per_channel=scheme == "per-channel",
                              dynamic=scheme == "dynamic")


def build_artifact(fmt: str, quantization: str, inputs: ExportInputs, scheme: str = "static") -> BuiltArtifact:
    """Export one artifact, check parity against the trained model, and wrap it in a bundle.

    ``scheme`` chooses how an int8 artifact is quantized (:data:`SCHEMES`); a scheme other
    than ``static`` is recorded in the bundle's ``extra.quantization_scheme``.
    When parity fails, ``spec`` is ``None`` and ``bundle`` is empty: the caller must not
    register it (the report says why). Raises ``ValueError`` for an artifact the model's family
    cannot be exported to (:func:`trainer.export.targets.exportable`).
    """
    if fmt not in MODEL_FILES or quantization not in TOLERANCES or scheme not in SCHEMES:
        raise ValueError(f"unsupported artifact {fmt}/{quantization} ({scheme})")
    if quantization == "fp32":
        scheme = "static"
    model = _export(fmt, quantization, inputs, scheme)
    batch: int | None = None if fmt == "onnx" else 1
    shape_in = (batch, inputs.window, len(inputs.features))
    atol_rel, rtol = GOLDEN_TOLERANCE[quantization]
    spec = BundleSpec(
        name=inputs.name,
        format=fmt,
        quantization=quantization,
        model_file=MODEL_FILES[fmt],
        inputs=(TensorSpec(INPUT_NAME, "float32", shape_in),),
        outputs=(TensorSpec(OUTPUT_NAME, "float32", (batch,)),),
        window=inputs.window,
        features=inputs.features,
        score=inputs.score,
        # Provisional: the golden outputs are the artifact's own scores, known only below.
        golden=GoldenVectors([inputs.holdout[0].tolist()], [0.0], 0.0, 0.0),
        drift_reference=inputs.drift_reference,
        lineage=inputs.lineage,
        architecture=inputs.architecture,
    )
    scores = artifact_scores(spec, model, inputs.holdout)
    parity = check_parity(
        inputs.reference_scores, scores, inputs.score.threshold, TOLERANCES[quantization]
    )
    if not parity.passed:
        return BuiltArtifact(fmt, quantization, b"", None, parity, len(model))
    golden_idx = _golden_indices(inputs.reference_scores)
    spec = dataclasses.replace(
        spec,
        # The agent compares live scores of *this* artifact with its reference: an int8 model's
        # scores differ from the trained model's (parity allows it), so the score reference is
        # built from the artifact's own scores on the holdout validation windows.
        drift_reference=_with_score_reference(inputs.drift_reference, scores),
        golden=GoldenVectors(
            inputs=[inputs.holdout[i].tolist() for i in golden_idx],
            outputs=[float(scores[i]) for i in golden_idx],
            atol=atol_rel * inputs.score.threshold,
            rtol=rtol,
        ),
        extra={"parity": parity.to_json(),
               **({"quantization_scheme": scheme} if scheme != "static" else {})},
    )
    bundle = write_bundle(spec, model)
    read_bundle(bundle)  # the bundle we register must be one an agent can read
    return BuiltArtifact(fmt, quantization, bundle, spec, parity, len(model))
