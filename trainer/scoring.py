"""Threshold calibration: from validation scores to a :class:`shared.bundle.ScoreSpec`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.bundle import ScoreSpec
from shared.score_pipeline import ScorePipeline

__all__ = ["ThresholdPolicy", "calibrate"]


@dataclass(frozen=True)
class ThresholdPolicy:
    """The threshold is ``margin`` × the ``quantile`` of validation scores.

    Validation windows come right after the training rows and are assumed mostly normal, so
    the quantile bounds the false-positive rate on normal data; the margin leaves room for the
    drift a deployed model meets later.
    """

    quantile: float = 0.995
    margin: float = 1.5

    def to_json(self) -> dict[str, float]:
        return {"quantile": self.quantile, "margin": self.margin}


def calibrate(
    validation_scores: np.ndarray, kind: str, policy: ThresholdPolicy, pipeline: ScorePipeline
) -> ScoreSpec:
    """Build the score spec: the streaming ``pipeline`` that decides, the calibrated raw
    threshold (what parity and smoke tests measure errors against, and the decision itself
    for the fixed-threshold pipeline), and a logistic scale in log-score space.

    The width of the logistic is the spread (std) of log validation scores, so one width up
    from the threshold reads ~0.73 and one down ~0.27 whatever the score's units.
    """
    scores = np.asarray(validation_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no finite validation scores to calibrate on")
    floor = max(float(np.median(scores)) * 1e-3, 1e-9)
    threshold = max(float(np.quantile(scores, policy.quantile)) * policy.margin, floor)
    logs = np.log(np.maximum(scores, floor))
    width = max(float(np.std(logs)), 0.05)
    return ScoreSpec(kind=kind, threshold=threshold, center=math.log(threshold), width=width, pipeline=pipeline)
