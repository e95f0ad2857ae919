"""Drift detection on the device: live inputs and scores against the bundle's training reference.

A :class:`DriftMonitor` per slot keeps the last ``window`` scored samples (every feature value
and the raw score) in a preallocated ring. :meth:`DriftMonitor.observe`, on the serving path,
only stores the sample there: one list store and a counter bump, no lock, no numpy, no binning.
:meth:`DriftMonitor.assess` (when health is built, not per sample) bins and sorts the whole
window with numpy and computes per series

* the population stability index, ``PSI = sum((a - e) * ln(a / e))`` over the reference's
  decile bins (``e``: reference share, ``a``: window share, both floored at
  :data:`PSI_FLOOR` so an empty bin counts as a large, finite shift);
* the two-sample Kolmogorov-Smirnov statistic ``D`` between the window and the reference's
  quantile sample, and its asymptotic p-value at the window's *effective* sample size.

An assessment is recomputed once at least a tenth of a window of new samples arrived since the
last one (:data:`ASSESS_EVERY_FRACTION`); in between, the last report is returned again, so a
health period shorter than that costs nothing.

Thresholds follow the published conventions. PSI: below 0.1 no significant change, 0.1-0.25
a moderate shift, above 0.25 a significant one (N. Siddiqi, *Credit Risk Scorecards*, Wiley
2006, ch. 8; B. Yurdakul, *Statistical Properties of Population Stability Index*, 2018).
KS: reject "same distribution" at level ``alpha`` (0.05 by convention) from the asymptotic
Kolmogorov distribution with Stephens' small-sample correction (M. A. Stephens, JRSS B 32,
1970; as in Press et al., *Numerical Recipes*, 3rd ed., §14.3.3).

Both statistics' textbook noise figures assume independent samples; host metrics are
autocorrelated (a busy minute is followed by a busy minute), which makes a window carry less
information than its length. The KS p-value therefore uses the window's effective size
``n_eff = n (1 - r1) / (1 + r1)`` (``r1``: the window's lag-1 autocorrelation, per series;
``n_eff`` clipped to ``[1, n]``), the variance-inflation factor of an AR(1) process (H. E.
Bayley and J. M. Hammersley, JRSS Suppl. 8, 1946; D. S. Wilks, *Statistical Methods in the
Atmospheric Sciences*, 3rd ed., 2011, §5.2.4). The reference side counts as the reference's row
count when the bundle ships it (``rows``; its quantile sample is a grid standing for all those
rows, not a sample of independent draws), else as the grid's size. The PSI is not corrected:
its noise grows by about the same factor ``n / n_eff``, which is why the raise bound is the
"significant" 0.25, not the "moderate" 0.1.

A series drifts when both agree: ``PSI >= psi_threshold`` (a significant shift) *and* the KS
test rejects at ``ks_alpha``. The slot's ``drifted`` state has hysteresis: it is raised when a
series drifts over a full window, and clears only once every series' PSI is back below
``psi_clear`` (the "no significant change" bound), after which it can be raised again. Each
raise is reported once (:attr:`DriftReport.raised`), for a ``drift`` event.

The window is rounded up to a whole number of seasons when the bundle's model has one (its
architecture's or score pipeline's ``season``, in samples): a window of 3.47 days would
otherwise weigh some hours of the day more than others (:func:`window_for`). Drift state lives
in memory only: a restart or a new model starts from an empty window.

Hand-written rather than scipy (``scipy.stats.ks_2samp``) or river: the agent installs
neither (scipy alone is ~100 MB; river ~130 MB), and both statistics are a few lines of numpy.
Tests check them against scipy.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from shared.bundle import BundleSpec
from shared.drift import DriftReference, DriftReferenceError

__all__ = [
    "ASSESS_EVERY_FRACTION",
    "DEFAULT_WINDOW",
    "KS_ALPHA",
    "PSI_FLOOR",
    "PSI_MODERATE",
    "PSI_SIGNIFICANT",
    "DriftMonitor",
    "DriftReport",
    "DriftSettings",
    "DriftUnavailable",
    "effective_sizes",
    "ks_critical_value",
    "ks_pvalue",
    "ks_statistic",
    "monitor_for",
    "psi",
    "season_of",
    "window_for",
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
#: chi2(B - 1) / N over B bins (Yurdakul 2018): for 10 bins and 1000 *independent* samples,
#: 0.009 on average and 0.022 at the 99th percentile, well below :data:`PSI_MODERATE`. For an
#: autocorrelated series read N as the effective size (see the module docstring): with a lag-1
#: autocorrelation of 0.8, 1000 samples count as about 110, and the 99th percentile is near 0.2.
DEFAULT_WINDOW = 1000
#: Fewest samples a window may be configured with (about 10 per decile bin).
MIN_WINDOW = 100
#: Most samples a window may be configured with (the ring and each assessment grow with it).
MAX_WINDOW = 100_000
#: An assessment is recomputed after ``window // ASSESS_EVERY_FRACTION`` new samples.
ASSESS_EVERY_FRACTION = 10


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


def ks_pvalue(d: float, n: float, m: float) -> float:
    """Asymptotic two-sided p-value of a two-sample KS statistic ``d`` for samples of ``n`` and
    ``m`` values (effective sizes may be fractional): the Kolmogorov survival function at ``(sqrt(en) + 0.12 + 0.11 / sqrt(en)) d``
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


def effective_sizes(x: np.ndarray) -> np.ndarray:
    """Per column of ``x`` (rows in time order), the effective number of independent samples
    ``n (1 - r1) / (1 + r1)``, with ``r1`` the column's lag-1 autocorrelation, clipped to
    ``[1, n]`` (a constant column counts as ``n``)."""
    n = x.shape[0]
    if n < 3:
        return np.full(x.shape[1], float(n))
    xc = x - x.mean(axis=0)
    den = np.einsum("ij,ij->j", xc, xc)
    num = np.einsum("ij,ij->j", xc[:-1], xc[1:])
    # A constant column (a stuck metric) has no autocorrelation to speak of: its rounding
    # residue would otherwise read as a correlation of 1.
    varies = np.ptp(x, axis=0) > 0
    rho = np.divide(num, den, out=np.zeros_like(num), where=varies & (den > 0))
    rho = np.clip(rho, -0.999, 0.999)
    return np.clip(n * (1.0 - rho) / (1.0 + rho), 1.0, float(n))


def season_of(spec: BundleSpec) -> int:
    """Samples per season of a bundle's model (its architecture's ``season``, else its score
    pipeline's), 0 when it has none."""
    for season in (spec.architecture.get("season"), getattr(spec.score.pipeline, "season", 0)):
        if isinstance(season, int) and not isinstance(season, bool) and season > 1:
            return season
    return 0


def window_for(window: int, season: int) -> int:
    """``window`` rounded up to a whole number of seasons (unchanged without a season), so that
    every phase of the season (every hour of the day) weighs the same in the window."""
    if season <= 1:
        return window
    return -(-window // season) * season


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


#: One observed sample in the ring: its timestamp, feature values and raw score.
_Sample = tuple[str, Sequence[float], float]


class DriftMonitor:
    """The rolling drift window of one slot (see the module docstring).

    Threading: one thread observes (the serve loop: a single writer) while others assess.
    :meth:`observe` takes no lock: it stores one tuple in a preallocated ring and then bumps a
    sample counter. :meth:`assess` reads the counter, then copies the ring (a list copy is atomic
    under the GIL). The race is benign: a sample the writer stored between those two reads
    replaces the oldest one of the copy (or lies beyond the fill, and is ignored), so the window
    assessed may hold a sample newer than the counter says, never a torn or missing one.
    Assessments are serialised by a lock of their own, so concurrent readers (health, a metrics
    endpoint) raise a drift once.
    """

    def __init__(self, reference: DriftReference, settings: DriftSettings, *, slot: str, model: str,
                 model_version: int, season: int = 0) -> None:
        self.settings = settings
        self.slot = slot
        self.model = model
        self.model_version = model_version
        self.window = window_for(settings.window, season)
        self._names = tuple(name for name, _ in reference.features)
        refs = [r for _, r in reference.features] + [reference.score]
        self._k = len(refs)
        self._edges = [np.asarray(r.edges, dtype=np.float64) for r in refs]
        sizes = [len(r.edges) + 1 for r in refs]
        self._offsets = np.cumsum([0, *sizes[:-1]])
        self._nbins = sum(sizes)
        self._expected = [np.asarray(r.proportions, dtype=np.float64) for r in refs]
        self._samples = [np.asarray(r.sample, dtype=np.float64) for r in refs]
        # The KS sample is a quantile grid standing for the whole reference: its size is the
        # reference's row count when the bundle ships it, else the grid's own size.
        self._reference_rows = [r.rows if r.rows else len(r.sample) for r in refs]
        self._ring: list[_Sample | None] = [None] * self.window
        self._count = 0  # samples observed; written by the observing thread only
        self._every = max(1, self.window // ASSESS_EVERY_FRACTION)
        self._assessing = threading.Lock()
        self._cached: DriftReport | None = None
        self._cached_at = -1
        self._drifted = False

    def observe(self, timestamp: str, values: Sequence[float], score: float) -> None:
        """Add one scored sample (its feature values, in the bundle's order, and raw score).
        A sample with a non-finite score is ignored. Call from one thread only (see the class
        docstring); O(1), no lock, no numpy. The ring keeps ``values`` itself, not a copy: pass
        an immutable sequence (:attr:`Detection.values` is a tuple)."""
        if not math.isfinite(score):
            return
        c = self._count
        self._ring[c % self.window] = (timestamp, values, score)
        self._count = c + 1

    def _snapshot(self) -> tuple[int, list[_Sample]]:
        """The samples of the window, oldest first, and the number observed."""
        count = self._count
        ring = self._ring.copy()  # after reading the count: every slot below it is written
        n = self.window
        start = count % n
        rows = ring[:count] if count < n else ring[start:] + ring[:start]
        return count, cast("list[_Sample]", rows)

    def assess(self) -> DriftReport:
        """PSI and KS of every series over the current window, and the slot's drift state.

        Recomputed on every new sample while the window fills (nothing is decided then, and
        health shows how full it is), then once at least ``window / 10`` samples arrived since
        the last computation; otherwise the last report is returned again (with ``raised``
        false: a raise is reported once). Thread safe."""
        with self._assessing:
            cached = self._cached
            new = self._count - self._cached_at
            if cached is not None and (new == 0 or (cached.fill == self.window and new < self._every)):
                return dataclasses.replace(cached, raised=False) if cached.raised else cached
            count, rows = self._snapshot()
            report = self._compute(rows)
            self._cached, self._cached_at = report, count
            return report

    def _compute(self, rows: list[_Sample]) -> DriftReport:
        s = self.settings
        fill = len(rows)
        full = fill == self.window
        timestamp = rows[-1][0] if rows else None
        if fill == 0:
            figures = [_figures(None, None, None, False)] * self._k
            return self._report(fill, timestamp, figures, drifting=False, psis=[], full=False)
        x = np.empty((fill, self._k), dtype=np.float64)
        x[:, :-1] = [r[1] for r in rows]
        x[:, -1] = [r[2] for r in rows]
        # All series' bins at once: each column's bin index, offset into one shared range.
        bins = np.concatenate([np.searchsorted(self._edges[j], x[:, j], side="right") + self._offsets[j]
                               for j in range(self._k)])
        counts = np.bincount(bins, minlength=self._nbins) / fill
        n_eff = effective_sizes(x)
        ordered = np.sort(x, axis=0)  # every column's sort in one call
        figures, psis, drifting = [], [], False
        for j in range(self._k):
            lo = self._offsets[j]
            value = psi(self._expected[j], counts[lo: lo + len(self._expected[j])])
            d = ks_statistic(ordered[:, j], self._samples[j])
            p = ks_pvalue(d, int(n_eff[j]), self._reference_rows[j])
            drifted = full and value >= s.psi_threshold and p < s.ks_alpha
            drifting = drifting or drifted
            psis.append(value)
            figures.append(_figures(value, d, p, drifted))
        return self._report(fill, timestamp, figures, drifting=drifting, psis=psis, full=full)

    def _report(self, fill: int, timestamp: str | None, figures: list[dict[str, Any]], *, drifting: bool,
                psis: list[float], full: bool) -> DriftReport:
        s = self.settings
        raised = not self._drifted and drifting  # under self._assessing: raised once
        if raised:
            self._drifted = True
        elif self._drifted and full and max(psis) < s.psi_clear:
            self._drifted = False
        return DriftReport(
            slot=self.slot, model=self.model, model_version=self.model_version, window=self.window,
            fill=fill, timestamp=timestamp, drifted=self._drifted, raised=raised,
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
    return DriftMonitor(reference, settings, slot=slot, model=model, model_version=model_version,
                        season=season_of(spec))
