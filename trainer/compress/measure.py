"""One row per (step, profile): the artifact that profile would ship, measured.

- **parameters**: weights and biases of the torch model exported (``nonzero_parameters``
  counts those an unstructured mask did not zero);
- **flops**: floating-point operations of one window through the torch model, as counted by
  ``torch.utils.flop_counter.FlopCounterMode`` — matrix products and convolutions only (2 per
  multiply-add), from the layers' shapes; element-wise operations (normalisation, ReLU, the
  error) are not counted, and masked zeros count as operations, as they run;
- **model_bytes** / **deflated_bytes**: the model file in the bundle, raw and after zlib
  (level 9), which is what zeros from ``sparsify`` shrink;
- **latency**: p50 / p99 of single-window inferences in the profile's runtime on this machine
  at one thread (:func:`trainer.search.hardware.measure_artifact`), divided by the profile's
  ``speed_factor`` as the search does;
- **quality**: the search objective's detection quality (:func:`trainer.search.objective.
  measure_quality`) of the *artifact's* own scores through the score pipeline it ships with:
  event F1 minus 0.1 × clean error on held-back rows with injected anomalies, or NAB's
  standard score with ``--labels``; ``agreement`` is the fraction of rows on which its
  decisions equal the parent's artifact's, and ``quality_change`` its quality minus the
  parent's.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.bundle import BundleSpec, read_bundle
from shared.profiles import FirmwareProfile
from trainer.search.objective import (
    ObjectiveData,
    TrainedCandidate,
    detection_decisions,
    measure_quality,
)

__all__ = ["ArtifactQuality", "StepRow", "count_flops", "judge_artifact", "measure_row"]


@dataclass(frozen=True)
class ArtifactQuality:
    """Detection quality of one artifact and its decisions (one array per judged series)."""

    quality: float
    details: dict[str, Any]
    decisions: list[np.ndarray]


@dataclass(frozen=True)
class StepRow:
    """One recipe step on one profile (``step`` is ``parent`` for the version compressed)."""

    step: str
    profile: str
    format: str
    quantization: str
    scheme: str
    parameters: int
    nonzero_parameters: int
    flops: int
    model_bytes: int
    deflated_bytes: int
    latency_p50_ms: float | None  # on the profile: measured here / speed_factor
    latency_p99_ms: float | None
    latency_changes: bool  # False: this step cannot change the latency (masks)
    quality: float | None
    quality_change: float | None
    agreement: float | None
    parity_passed: bool
    failures: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = list(self.failures)
        return d


def count_flops(model: nn.Module, window: np.ndarray) -> int:
    """FLOPs of one window through ``model`` (see the module docstring for what is counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.from_numpy(np.ascontiguousarray(window[None])))
    return int(counter.get_total_flops())


def _runtime_scores(spec: BundleSpec, model_bytes: bytes) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[], None]]:
    from edge_agent.runtime import open_runtime
    from trainer.export._quiet import quiet_fds

    with quiet_fds():
        runtime = open_runtime(spec, model_bytes, threads=1)
    return runtime.score, runtime.close


def judge_artifact(bundle: bytes, trained: TrainedCandidate, data: ObjectiveData) -> ArtifactQuality:
    """Quality of the artifact in ``bundle`` on ``data``: its scores from the agent's runtime,
    decided by the score pipeline in its bundle. ``trained`` gives the window length."""
    spec, model_bytes = read_bundle(bundle)
    score, close = _runtime_scores(spec, model_bytes)
    try:
        judged = TrainedCandidate(trained.candidate, None, trained.train_windows, trained.validation_windows,
                                  trained.rows, spec.score, 0, 0, 0.0)
        decisions = detection_decisions(judged, data, score)
        result = measure_quality(judged, data, score, decisions)
    finally:
        close()
    return ArtifactQuality(result.quality, result.details, decisions)


def agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Fraction of rows on which two sets of decisions agree."""
    return float(np.mean(np.concatenate([x == y for x, y in zip(a, b)])))


def measure_row(step: str, profile: FirmwareProfile, bundle: bytes, model: nn.Module, window: np.ndarray,
                quality: ArtifactQuality | None, parent: ArtifactQuality | None,
                latency_changes: bool = True, measure_latency: Callable[[bytes], dict[str, float]] | None = None
                ) -> StepRow:
    """Measure one artifact (``bundle``, parity passed) of ``model`` for ``profile``."""
    from trainer.models import parameter_count
    from trainer.search.hardware import measure_artifact

    spec, model_bytes = read_bundle(bundle)
    figures = (measure_latency or measure_artifact)(bundle)
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return StepRow(
        step=step, profile=profile.name, format=spec.format, quantization=spec.quantization,
        scheme=str(spec.extra.get("quantization_scheme", "static")),
        parameters=parameter_count(model), nonzero_parameters=nonzero, flops=count_flops(model, window),
        model_bytes=len(model_bytes), deflated_bytes=len(zlib.compress(model_bytes, 9)),
        latency_p50_ms=figures["p50"] / profile.speed_factor, latency_p99_ms=figures["p99"] / profile.speed_factor,
        latency_changes=latency_changes,
        quality=quality.quality if quality else None,
        quality_change=(quality.quality - parent.quality) if quality and parent else None,
        agreement=agreement(quality.decisions, parent.decisions) if quality and parent else None,
        parity_passed=True,
    )


def failed_row(step: str, profile: FirmwareProfile, fmt: str, quantization: str, scheme: str,
               model: nn.Module, window: np.ndarray, model_size: int, failures: Sequence[str]) -> StepRow:
    """The row of an artifact that failed its parity check (not measured further)."""
    from trainer.models import parameter_count

    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return StepRow(step, profile.name, fmt, quantization, scheme, parameter_count(model), nonzero,
                   count_flops(model, window), model_size, 0, None, None, True, None, None, None, False,
                   tuple(failures))
