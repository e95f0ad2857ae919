"""The parity check that decides whether an exported artifact may be registered."""

from __future__ import annotations

import numpy as np

from trainer.export.parity import TOLERANCES, check_parity


def test_fp32_rounding_on_near_ties_passes() -> None:
    rng = np.random.default_rng(0)
    reference = np.concatenate([np.full(400, 0.01), rng.gamma(2, 0.5, 100)])
    candidate = reference + rng.normal(0, 1e-7, reference.size)  # summation-order noise
    report = check_parity(reference, candidate, threshold=2.0, tolerance=TOLERANCES["fp32"])
    assert report.passed and report.rank_correlation == 1.0


def test_a_broken_artifact_fails_with_reasons() -> None:
    rng = np.random.default_rng(1)
    reference = rng.gamma(2, 0.5, 500)
    report = check_parity(reference, rng.permutation(reference), 2.0, TOLERANCES["int8"])
    assert not report.passed
    assert any("rank correlation" in f for f in report.failures)
    assert any("decision agreement" in f for f in report.failures)


def test_non_finite_scores_fail() -> None:
    reference = np.linspace(0, 3, 50)
    candidate = reference.copy()
    candidate[3] = np.nan
    report = check_parity(reference, candidate, 2.0, TOLERANCES["int8"])
    assert not report.passed and "non-finite" in report.failures[0]


def test_int8_sized_errors_pass_when_decisions_hold() -> None:
    rng = np.random.default_rng(2)
    reference = rng.gamma(2, 0.5, 500)
    candidate = reference + rng.normal(0, 0.02, 500)
    candidate[np.abs(reference - 2.0) < 0.1] = reference[np.abs(reference - 2.0) < 0.1]
    assert check_parity(reference, candidate, 2.0, TOLERANCES["int8"]).passed
