"""Drift detection on the device: live inputs and scores against the bundle's training reference.

A :class:`DriftMonitor` per slot keeps the last ``window`` scored samples (every feature and
the raw score) in a preallocated ring, and the count of them in each reference bin, updated as
a sample enters and the oldest leaves: :meth:`DriftMonitor.observe` is O(features) with no
allocation beyond the ring write. :meth:`DriftMonitor.assess` (when health is built, not per
sample) computes per series

* the population stability index, ``PSI = sum((a - e) * ln(a / e))`` over the reference's
  decile bins (``e``: reference share, ``a``: window share, both floored at
  :data:`PSI_FLOOR` so an empty bin counts as a large, finite shift);
* the two-sample Kolmogorov-Smirnov statistic ``D`` between the window and the reference's
  quantile sample, and its asymptotic p-value.

Thresholds follow the published conventions. PSI: below 0.1 no significant change, 0.1-0.25
a moderate shift, above 0.25 a significant one (N. Siddiqi, *Credit Risk Scorecards*, Wiley
2006, ch. 8; B. Yurdakul, *Statistical Properties of Population Stability Index*, 2018).
KS: reject "same distribution" at level ``alpha`` (0.05 by convention) from the asymptotic
Kolmogorov distribution with Stephens' small-sample correction (M. A. Stephens, JRSS B 32,
1970; as in Press et al., *Numerical Recipes*, 3rd ed., §14.3.3).

A series drifts when both agree: ``PSI >= psi_threshold`` (a significant shift) *and* the KS
test rejects at ``ks_alpha``. The slot's ``drifted`` state has hysteresis: it is raised when a
series drifts over a full window, and clears only once every series' PSI is back below
``psi_clear`` (the "no significant change" bound), after which it can be raised again. Each
raise is reported once (:attr:`DriftReport.raised`), for a ``drift`` event.

Hand-written rather than scipy (``scipy.stats.ks_2samp``) or river: the agent installs
neither (scipy alone is ~100 MB; river ~130 MB), and both statistics are a few lines of numpy.
Tests check them against scipy.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.bundle import BundleSpec
from shared.drift import DriftReference, DriftReferenceError

__all__ = [
    "DEFAULT_WINDOW",
    "KS_ALPHA",
    "PSI_FLOOR",
    "PSI_MODERATE",
    "PSI_SIGNIFICANT",
    "DriftMonitor",
    "DriftReport",
    "DriftSettings",
    "DriftUnavailable",
    "ks_critical_value",
    "ks_pvalue",
    "ks_statistic",
    "monitor_for",
    "psi",
]

#: PSI bound of a moderate shift: below it, no significant change (Siddiqi 2006).
PSI_MODERATE = 0.1
#: PSI bound of a significant shift (Siddiqi 2006).
PSI_SIGNIFICANT = 0.25
#: Conventional significance level of the KS test.
KS_ALPHA = 0.05
#: Floor on a bin's share in the PSI, so an empty bin gives a large but finite term.
PSI_FLOOR = 1e-4
#: Samples in the rolling window. Two samples of one distribution give a PSI of about
#: chi2(B - 1) / N over B bins (Yurdakul 2018): for 10 bins and 1000 samples, 0.009 on
#: average and 0.022 at the 99th percentile, well below :data:`PSI_MODERATE`.
DEFAULT_WINDOW = 1000
#: Fewest samples a window may be configured with (about 10 per decile bin).
MIN_WINDOW = 100


@dataclass(frozen=True)
class DriftSettings:
    """``[drift]`` of the agent config: see the module docstring for what each bound means."""

    enabled: bool = True
    window: int = DEFAULT_WINDOW
    psi_threshold: float = PSI_SIGNIFICANT
    psi_clear: float = PSI_MODERATE
    ks_alpha: float = KS_ALPHA


def psi(expected: np.ndarray, actual: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """Population stability index of shares ``actual`` against reference shares ``expected``
    (same bins; each sums to 1). Shares below ``floor`` count as ``floor``."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    a = np.maximum(np.asarray(actual, dtype=np.float64), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest distance between the empirical
    CDFs of the sorted, non-empty samples ``a`` and ``b`` (what ``scipy.stats.ks_2samp``
    returns as its statistic)."""
    both = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, both, side="right") / len(a)
    cdf_b = np.searchsorted(b, both, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic two-sided p-value of a two-sample KS statistic ``d`` for samples of ``n`` and
    ``m`` values: the Kolmogorov survival function at ``(sqrt(en) + 0.12 + 0.11 / sqrt(en)) d``
    with ``en = n m / (n + m)`` (Stephens 1970)."""
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam <= 0:
        return 1.0
    if lam < 1.0:  # the series below converges slowly here; this form converges fast
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * lam * lam)) for k in range(1, 8))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / lam * s))
    total = sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2.0 * total))


def ks_critical_value(alpha: float, n: int, m: int) -> float:
    """The ``D`` above which the two-sample KS test rejects at level ``alpha`` (asymptotic):
    ``sqrt(-ln(alpha / 2) / 2) * sqrt((n + m) / (n m))``."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _figures(value: float | None, d: float | None, p: float | None, drifted: bool) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 6)

    return {"psi": r(value), "ks": r(d), "ks_pvalue": r(p), "drifted": drifted}


@dataclass(frozen=True)
class DriftReport:
    """One assessment of a slot. ``features`` and ``score`` map to ``{"psi", "ks",
    "ks_pvalue", "drifted"}`` (``None`` figures while the window is empty); ``drifted`` is the
    slot's state (with hysteresis); ``raised`` is true for the one assessment that raised it."""

    slot: str
    model: str
    model_version: int
    window: int
    fill: int
    timestamp: str | None
    drifted: bool
    raised: bool
    features: dict[str, dict[str, Any]]
    score: dict[str, Any]
    psi_threshold: float
    ks_alpha: float

    def to_json(self) -> dict[str, Any]:
        """The slot's entry in health ``drift``."""
        return {
            "available": True, "model": self.model, "version": self.model_version,
            "window": self.window, "fill": self.fill, "drifted": self.drifted,
            "features": self.features, "score": self.score,
        }


class DriftMonitor:
    """The rolling drift window of one slot (see the module docstring).

    Thread safe: one thread observes while another assesses; :meth:`assess` copies the window
    under a short lock and computes outside it.
    """

    def __init__(self, reference: DriftReference, settings: DriftSettings, *, slot: str, model: str,
                 model_version: int) -> None:
        self.settings = settings
        self.slot = slot
        self.model = model
        self.model_version = model_version
        self._names = tuple(name for name, _ in reference.features)
        refs = [r for _, r in reference.features] + [reference.score]
        self._k = k = len(refs)
        self._edges = [list(r.edges) for r in refs]
        self._expected = [np.asarray(r.proportions, dtype=np.float64) for r in refs]
        self._samples = [np.asarray(r.sample, dtype=np.float64) for r in refs]
        n = settings.window
        self._values = np.zeros((n, k), dtype=np.float64)
        self._bins = [[0] * k for _ in range(n)]  # bin of each ring value: leaves in O(1)
        self._counts = [[0] * (len(r.edges) + 1) for r in refs]
        self._pos = 0
        self._fill = 0
        self._timestamp: str | None = None
        self._lock = threading.Lock()
        self._drifted = False

    def observe(self, timestamp: str, values: Sequence[float], score: float) -> None:
        """Add one scored sample (its feature values, in the bundle's order, and raw score).
        A sample with a non-finite score is ignored."""
        if not math.isfinite(score):
            return
        last = self._k - 1
        with self._lock:
            pos, full = self._pos, self._fill == self.settings.window
            row, ring = self._bins[pos], self._values
            for j in range(self._k):
                x = score if j == last else values[j]
                counts = self._counts[j]
                if full:
                    counts[row[j]] -= 1
                b = bisect_right(self._edges[j], x)
                row[j] = b
                counts[b] += 1
                ring[pos, j] = x
            self._pos = pos + 1 if pos + 1 < self.settings.window else 0
            if not full:
                self._fill += 1
            self._timestamp = timestamp

    def assess(self) -> DriftReport:
        """PSI and KS of every series over the current window, and the slot's drift state."""
        s = self.settings
        with self._lock:
            fill, timestamp = self._fill, self._timestamp
            window = self._values[:fill].copy()
            counts = [list(c) for c in self._counts]
        full = fill == s.window
        figures, psis, drifting = [], [], False
        for j in range(self._k):
            if fill == 0:
                figures.append(_figures(None, None, None, False))
                continue
            value = psi(self._expected[j], np.asarray(counts[j], dtype=np.float64) / fill)
            ref = self._samples[j]
            d = ks_statistic(np.sort(window[:, j]), ref)
            p = ks_pvalue(d, fill, len(ref))
            drifted = full and value >= s.psi_threshold and p < s.ks_alpha
            drifting = drifting or drifted
            psis.append(value)
            figures.append(_figures(value, d, p, drifted))
        with self._lock:  # check-and-set: two concurrent assessments raise once
            raised = not self._drifted and drifting
            if raised:
                self._drifted = True
            elif self._drifted and full and max(psis) < s.psi_clear:
                self._drifted = False
            state = self._drifted
        return DriftReport(
            slot=self.slot, model=self.model, model_version=self.model_version, window=s.window,
            fill=fill, timestamp=timestamp, drifted=state, raised=raised,
            features=dict(zip(self._names, figures[:-1], strict=True)), score=figures[-1],
            psi_threshold=s.psi_threshold, ks_alpha=s.ks_alpha,
        )


@dataclass(frozen=True)
class DriftUnavailable:
    """A slot without drift monitoring, and why (an older bundle, or monitoring disabled)."""

    model: str
    model_version: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The slot's entry in health ``drift``."""
        return {"available": False, "model": self.model, "version": self.model_version,
                "reason": self.reason}


def monitor_for(spec: BundleSpec, settings: DriftSettings, *, slot: str, model: str,
                model_version: int) -> DriftMonitor | DriftUnavailable:
    """The drift monitor of a newly activated model, or why it has none: never raises (a
    bundle with a malformed reference still serves, without drift monitoring)."""
    if not settings.enabled:
        return DriftUnavailable(model, model_version, "drift monitoring is disabled ([drift] enabled = false)")
    try:
        reference = DriftReference.from_spec(spec.drift_reference, spec.features)
    except DriftReferenceError as e:
        return DriftUnavailable(model, model_version, f"bad drift reference: {e}")
    if reference is None:
        return DriftUnavailable(model, model_version,
                                "the bundle has no binned drift reference (trained by an older edgefleet)")
    return DriftMonitor(reference, settings, slot=slot, model=model, model_version=model_version)
