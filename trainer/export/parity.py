"""Parity of an exported artifact against the torch model it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import spearmanr

__all__ = ["ParityReport", "Tolerance", "TOLERANCES", "check_parity"]


@dataclass(frozen=True)
class Tolerance:
    """Limits an artifact must meet to be registered.

    ``max_rel_error`` bounds ``max |artifact - torch| / threshold``: errors matter in units of
    the decision threshold, not of the raw score. Ranks are compared at a resolution of
    ``rank_resolution × threshold``: closer scores count as ties.
    """

    max_rel_error: float
    min_rank_correlation: float
    min_decision_agreement: float
    rank_resolution: float = 1e-3


TOLERANCES = {
    "fp32": Tolerance(max_rel_error=1e-3, min_rank_correlation=0.999, min_decision_agreement=0.999),
    # int8: scores move, decisions must hold. Rank correlation is taken over mostly normal
    # windows whose scores are nearly equal (far below the threshold), where int8 rounding
    # noise reorders neighbours; 0.8 still catches a broken artifact (near 0).
    # Ranks are compared at 2% of the threshold: int8 may move any score by up to half the
    # threshold, so reorderings among scores closer than that are rounding, not a broken model.
    "int8": Tolerance(max_rel_error=0.5, min_rank_correlation=0.8, min_decision_agreement=0.98,
                      rank_resolution=0.02),
}


@dataclass(frozen=True)
class ParityReport:
    """How an artifact's scores compare with torch's on held-out windows."""

    windows: int
    max_abs_error: float
    max_rel_error: float
    rank_correlation: float
    decision_agreement: float
    passed: bool
    failures: tuple[str, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["failures"] = list(self.failures)
        return d


def _rank_correlation(reference: np.ndarray, candidate: np.ndarray, step: float) -> float:
    """Spearman correlation of the scores, compared at a resolution of ``step``.

    On flat stretches of data many windows score the same up to float rounding; ranking
    those differences would measure summation order, not the model. Scores closer than the
    resolution are ties (average ranks) in both vectors.
    """
    ref, cand = np.round(reference / step), np.round(candidate / step)
    if np.ptp(ref) == 0 or np.ptp(cand) == 0:
        return 1.0 if np.array_equal(ref, cand) else 0.0
    return float(spearmanr(ref, cand).statistic)


def check_parity(
    reference: np.ndarray, candidate: np.ndarray, threshold: float, tolerance: Tolerance
) -> ParityReport:
    """Compare ``candidate`` scores with ``reference`` (torch) scores on the same windows."""
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape or reference.size == 0:
        raise ValueError("parity needs two score vectors of the same, non-zero length")
    finite = bool(np.all(np.isfinite(candidate)))
    abs_err = float(np.max(np.abs(candidate - reference))) if finite else float("inf")
    rel_err = abs_err / threshold
    rank = _rank_correlation(reference, candidate, tolerance.rank_resolution * threshold) if finite else 0.0
    agreement = float(np.mean((reference > threshold) == (candidate > threshold)))
    failures = []
    if not finite:
        failures.append("artifact produced non-finite scores")
    if rel_err > tolerance.max_rel_error:
        failures.append(
            f"max error {rel_err:.3g}×threshold exceeds {tolerance.max_rel_error:g}×threshold"
        )
    if rank < tolerance.min_rank_correlation:
        failures.append(
            f"score rank correlation {rank:.4f} below {tolerance.min_rank_correlation}"
        )
    if agreement < tolerance.min_decision_agreement:
        failures.append(
            f"decision agreement {agreement:.4f} below {tolerance.min_decision_agreement}"
        )
    return ParityReport(
        windows=int(reference.size),
        max_abs_error=abs_err,
        max_rel_error=rel_err,
        rank_correlation=rank,
        decision_agreement=agreement,
        passed=not failures,
        failures=tuple(failures),
    )
