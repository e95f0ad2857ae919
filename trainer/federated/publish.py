"""The global model of a federated run → a registered version, by the path ``train`` takes.

The trainer never sees the hosts' windows, so the global model's threshold, its int8
calibration ranges, its parity windows and its drift reference come from reference data on
the trainer: the CSVs given to ``edgefleet fl start --data`` (by default the files the parent
version was trained on, found by name in the current folder, as ``compress`` does). The score
pipeline and threshold policy are the starting point's (:mod:`trainer.federated.origin`). Export, parity in the agent's runtimes and the
flash budgets are :func:`trainer.export.build_artifact` and the profiles', as for ``train``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.profiles import FirmwareProfile
from shared.score_pipeline import LikelihoodPipeline
from trainer.export import ExportInputs, build_artifact
from trainer.federated.origin import Origin
from trainer.models import ArchitectureSpec, load_weights, parameter_count, score_windows
from trainer.registry import Registry, VersionRecord
from trainer.scoring import calibrate

__all__ = ["PublishError", "register_global_model"]

CALIBRATION_WINDOWS = 256
HOLDOUT_WINDOWS = 512


class PublishError(RuntimeError):
    """The global model could not be exported (no artifact passed parity)."""


def _evenly(windows: np.ndarray, count: int) -> np.ndarray:
    if len(windows) <= count:
        return windows
    return np.ascontiguousarray(windows[np.linspace(0, len(windows) - 1, count).round().astype(int)])


def register_global_model(
    registry_dir: Path,
    origin: Origin,
    weights: bytes,
    profiles: Sequence[FirmwareProfile],
    series: Sequence[np.ndarray],
    federated: dict[str, Any],
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> VersionRecord:
    """Export ``weights`` (of ``origin``'s architecture) and register them as
    ``origin.model@N`` with ``federated`` in the lineage (and ``parent_version`` ``None`` for
    a run started from a spec). Raises :class:`PublishError`."""
    from trainer.pipeline import (
        _drift_reference,
        _variants,
        _versions,
        admit_artifact,
        training_windows,
    )

    notify = progress or (lambda stage, info: None)
    spec = ArchitectureSpec.from_json(origin.architecture)
    model = load_weights(spec, weights)
    features = origin.features
    train_w, val_w, rows = training_windows(spec, list(series))
    val_scores = score_windows(model, val_w)
    pipeline = origin.pipeline
    if isinstance(pipeline, LikelihoodPipeline):
        # calibrated on the reference rows, as the prior is: the rows the trainer knows
        pipeline = pipeline.calibrated(val_scores).with_value_range(np.concatenate(list(series)))
    score = calibrate(val_scores, spec.score_kind, origin.threshold, pipeline)
    holdout = _evenly(val_w, HOLDOUT_WINDOWS)
    lineage = {**origin.lineage, "parent_version": origin.version, "federated": federated, "software": _versions()}
    if origin.version is None:  # a version inherits its parent's; a spec has none to inherit
        lineage["score_pipeline"] = {k: v for k, v in pipeline.to_json().items() if k not in ("prior", "value_range")}
    inputs = ExportInputs(
        name=origin.model, module=model, window=spec.input_rows, features=features, score=score,
        calibration=_evenly(np.concatenate([train_w, val_w]), CALIBRATION_WINDOWS), holdout=holdout,
        reference_scores=score_windows(model, holdout), drift_reference=_drift_reference(rows, features, val_scores),
        lineage=lineage, architecture=spec.to_json(),
    )
    new = []
    for fmt, quant in _variants(profiles, spec.family):
        notify("export", {"format": fmt, "quantization": quant})
        admitted = admit_artifact(fmt, quant, build_artifact(fmt, quant, inputs), profiles, notify)
        if admitted is not None:
            new.append(admitted)
    if not new:
        raise PublishError("no artifact of the global model passed its parity check; nothing was registered")
    metrics = {
        "threshold": score.threshold,
        "validation_alarm_rate": float(np.mean(val_scores > score.threshold)),
        "validation_score_p50": float(np.median(val_scores)),
        "validation_score_p99": float(np.quantile(val_scores, 0.99)),
        "parameters": parameter_count(model),
        "federated_rounds": federated.get("rounds_done"),
        "epsilon": federated.get("epsilon"),
    }
    with Registry.open(registry_dir) as reg:
        return reg.register(
            origin.model, metrics=metrics,
            params={**origin.params, "federated_run": federated["run"], "federated_from": origin.ref,
                    "profiles": [p.name for p in profiles]},
            lineage=dataclasses.replace(inputs).lineage, architecture=spec.to_json(), artifacts=new, weights=weights)
