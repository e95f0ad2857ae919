"""The drift reference a bundle ships: what "normal" inputs and scores looked like at training.

Written by the trainer into ``spec.json`` (``drift_reference``) and read by the agent's drift
monitor (:mod:`edge_agent.drift`). Per feature, and for the model's raw score, an entry holds
summary statistics (``mean``, ``std``, ``min``, ``max``, ``quantiles``; bundles of every
version have them) and, from this version on, what the agent compares live data with::

    "edges":       [e1, ..., ek]      # inner bin edges: the reference deciles, deduplicated
    "proportions": [p0, ..., pk]      # share of reference values in each of the k + 1 bins
    "sample":      [q1, ..., qm]      # sorted quantile sample, m <= 256 (for the KS statistic)
    "rows":        n                  # reference values the above summarise (newer bundles)

Binning rule, the same on both sides: a value ``x`` falls in bin ``bisect_right(edges, x)``
(``numpy.searchsorted(edges, x, side="right")``): bin 0 is ``x < e1``, bin ``k`` is
``x >= ek``. Outer bins are open, so a live value beyond the training range still lands in a
bin. A column with ties (a stuck or discrete metric) has fewer distinct deciles, hence fewer
bins.

The sample is the column's quantile function at ``(i + 0.5) / m``: deterministic (a bundle
build stays byte-reproducible) and, for a given size, a closer stand-in for the reference
distribution than a random draw. A column with at most ``m`` values ships them all, sorted.
Numbers are rounded to 7 significant digits (the agent's values are float32) before the
proportions are counted, so edges and proportions agree exactly.

The sample is a quantile grid of the reference, not a draw of ``m`` independent values: the
agent's KS test counts the reference as ``rows`` values (the grid's size when ``rows`` is absent,
as in bundles built before it was added).

The feature references pool the training rows of every training file, so they describe the
fleet's level: a host whose normal level differs from the fleet's shows as drifted. The score
reference of each artifact comes from that artifact's own scores (an int8 model's scores differ
slightly from the fp32 model's), on the validation windows its parity was checked on.

A bundle whose reference lacks these keys (an older trainer) has no drift monitoring: the
agent reports it as unavailable. numpy and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "REFERENCE_BINS",
    "REFERENCE_SAMPLE",
    "DriftReference",
    "DriftReferenceError",
    "ReferenceDistribution",
    "reference_distribution",
    "score_reference",
]

#: Quantile bins per series: deciles, the usual choice for a population stability index.
REFERENCE_BINS = 10
#: Most values of the sorted sample kept per series for the two-sample KS statistic.
REFERENCE_SAMPLE = 256


class DriftReferenceError(ValueError):
    """A bundle's drift reference is present but malformed."""


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{float(v):.7g}") for v in values]


@dataclass(frozen=True)
class ReferenceDistribution:
    """One series' reference: inner bin ``edges`` (strictly increasing), the reference
    ``proportions`` of its ``len(edges) + 1`` bins (summing to 1), a sorted ``sample`` and the
    number of reference values ``rows`` (``None`` in bundles built before it was shipped)."""

    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    sample: tuple[float, ...]
    rows: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The keys this adds to a series' entry of ``drift_reference``."""
        return {"edges": list(self.edges), "proportions": list(self.proportions),
                "sample": list(self.sample), **({"rows": self.rows} if self.rows is not None else {})}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], what: str) -> ReferenceDistribution | None:
        """Parse the entry of series ``what``; ``None`` when it has no bins (older bundles).

        Raises:
            DriftReferenceError: the keys are there but inconsistent.
        """
        if not isinstance(obj, Mapping) or "edges" not in obj:
            return None
        try:
            edges = tuple(float(v) for v in obj["edges"])
            proportions = tuple(float(v) for v in obj["proportions"])
            sample = tuple(float(v) for v in obj["sample"])
        except (KeyError, TypeError, ValueError) as e:
            raise DriftReferenceError(f"drift reference of {what}: {e}") from e
        finite = all(math.isfinite(v) for v in (*edges, *proportions, *sample))
        if not finite:
            raise DriftReferenceError(f"drift reference of {what}: a number is not finite")
        if len(proportions) != len(edges) + 1 or not sample:
            raise DriftReferenceError(
                f"drift reference of {what}: {len(edges)} edges need {len(edges) + 1} proportions "
                f"(got {len(proportions)}) and a non-empty sample")
        if any(b <= a for a, b in zip(edges, edges[1:])) or any(b < a for a, b in zip(sample, sample[1:])):
            raise DriftReferenceError(f"drift reference of {what}: edges or sample not sorted")
        if any(p < 0 for p in proportions) or abs(sum(proportions) - 1.0) > 1e-6:
            raise DriftReferenceError(f"drift reference of {what}: proportions must sum to 1")
        rows = obj.get("rows")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise DriftReferenceError(f"drift reference of {what}: rows must be a positive integer")
        return cls(edges, proportions, sample, rows)


def reference_distribution(values: np.ndarray, *, bins: int = REFERENCE_BINS,
                           sample: int = REFERENCE_SAMPLE) -> ReferenceDistribution:
    """The reference of one series of finite values (deterministic: same values, same result).

    Raises:
        ValueError: ``values`` is empty or holds a non-finite number.
    """
    col = np.asarray(values, dtype=np.float64).ravel()
    if col.size == 0 or not np.isfinite(col).all():
        raise ValueError("a drift reference needs at least one value, all finite")
    inner = np.quantile(col, np.arange(1, bins) / bins)
    edges = sorted(set(_rounded(inner)))
    counts = np.bincount(np.searchsorted(np.asarray(edges), col, side="right"),
                         minlength=len(edges) + 1)
    proportions = [float(c) / col.size for c in counts]
    if col.size <= sample:
        points = np.sort(col)
    else:
        points = np.quantile(col, (np.arange(sample) + 0.5) / sample)
    return ReferenceDistribution(tuple(edges), tuple(proportions), tuple(_rounded(points)), int(col.size))


def score_reference(scores: np.ndarray) -> dict[str, Any]:
    """The ``score`` entry of ``drift_reference`` for a model's raw ``scores`` on validation
    windows (non-finite ones dropped): quantiles and the binned reference. Deterministic.

    Raises:
        ValueError: no score is finite.
    """
    col = np.asarray(scores, dtype=np.float64).ravel()
    col = col[np.isfinite(col)]
    if col.size == 0:
        raise ValueError("a score reference needs at least one finite score")
    quantiles = np.quantile(col, [0.01, 0.5, 0.99])
    return {**dict(zip(("p01", "p50", "p99"), map(float, quantiles))),
            **reference_distribution(col).to_json()}


@dataclass(frozen=True)
class DriftReference:
    """The references a drift monitor compares with: one per feature (in the bundle's feature
    order) and one for the raw score."""

    features: tuple[tuple[str, ReferenceDistribution], ...]
    score: ReferenceDistribution

    @classmethod
    def from_spec(cls, drift_reference: Mapping[str, Any], features: Sequence[str]) -> DriftReference | None:
        """The reference of a bundle's ``drift_reference`` for its ``features``; ``None`` when
        the bundle has none with bins (an older trainer's).

        Raises:
            DriftReferenceError: bins are there but malformed, or missing for some series.
        """
        entries = drift_reference.get("features") if isinstance(drift_reference, Mapping) else None
        score_entry = drift_reference.get("score") if isinstance(drift_reference, Mapping) else None
        if not isinstance(entries, Mapping) or not isinstance(score_entry, Mapping):
            return None
        score = ReferenceDistribution.from_json(score_entry, "the score")
        per_feature = [(f, ReferenceDistribution.from_json(entries.get(f, {}), f"feature {f!r}"))
                       for f in features]
        found = [f for f, r in per_feature if r is not None]
        if score is None and not found:
            return None
        if score is None or len(found) != len(per_feature):
            missing = [f for f, r in per_feature if r is None] + ([] if score else ["the score"])
            raise DriftReferenceError(f"drift reference has no bins for {', '.join(missing)}")
        return cls(tuple((f, r) for f, r in per_feature if r is not None), score)
