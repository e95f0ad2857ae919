"""The streaming score pipeline: raw model error → adaptive tail probability → decision.

One implementation, numpy and the standard library only, runs wherever a decision is made: in
the agent (:class:`edge_agent.detector.Detector`), in ``edgefleet detect`` and ``evaluate``
(which push recorded series through that same detector) and in the trainer's search objective.

With kind :data:`LIKELIHOOD_RANGE` a step 0 comes first, on the sample's values rather than on
the model's error:

0. **Range** — a value beyond the range of every value seen so far, by more than
   ``range_tolerance`` (5%) of that range, is an anomaly whatever the error says: the
   *spatial anomaly* of Numenta's HTM detector in NAB, with its tolerance. A forecaster's
   error cannot tell a new extreme from the series' usual spikes when both are one row long
   and it predicts neither; the range can. The range starts from ``value_range``, each
   feature's low and high on the rows the model was trained on (so an agent checks from its
   first sample, and after a restart), and widens with every value the stream brings; a
   feature whose range is still a single value is not checked. The error still enters the
   history as in step 2, so a new level that persists is judged by the likelihood as before,
   and the widened range stops alarming on it at once.

Why it exists: a model's raw error is not the anomaly; a sudden change in the error's
distribution is. A fixed threshold on the raw error, calibrated once on the rows a model was
trained on, flags forever after any change of regime. Following the anomaly likelihood of
Ahmad et al. (Neurocomputing 2017), which is what lets NAB's best streaming detectors adapt:

1. **Smoothing** — the mean ``m_t`` of the last ``short_window`` raw errors.
2. **Streaming per-series normalization** — ``z_t = (m_t - mu_t) / sigma_t`` where ``mu_t`` and
   ``sigma_t`` are the mean and standard deviation of the previous ``long_window`` values of
   ``m``, so the error is measured in the units of this series' own recent history.
   With a **robust history** (kind :data:`LIKELIHOOD_ROBUST`), ``m_t`` enters that history
   clipped at the decision boundary ``mu_t + z_far * sigma_t`` (``z_far`` = the Gaussian
   quantile of ``false_alarm_rate``, 4.26 at 1e-5): winsorized. Otherwise one large spike
   inflates ``sigma`` for the whole ``long_window`` and hides every smaller incident after
   it, while errors that are normal here stay below the boundary and enter unchanged. A
   lasting rise of the error still becomes the new normal, one boundary value at a time.
   With kind :data:`LIKELIHOOD_ROBUST_EARLY` the clip applies from the history's first
   values, during the learning period too (``min_history``, before any decision): kind
   :data:`LIKELIHOOD_ROBUST` let the errors of that period in as they were, so a spike in a
   newly deployed model's first day widened the spread it is judged against for a month.
3. **Tail probability** — ``p_t = Q(z_t)``, the Gaussian upper tail: how unlikely an error this
   large is, given the recent past. After a level shift the larger errors enter the history and
   ``p`` recovers by itself: the new normal stops alarming.
4. **Recurrence** (kind :data:`LIKELIHOOD_RECURRENT`) — the Gaussian model of step 3 says
   nothing about errors the series really makes now and then: a nightly job, a daily spike, a
   square wave's edges. When ``p_t`` is at or below the false-alarm rate, the history is asked
   too: ``c`` is the number of separate excursions (runs) of the history at or above ``m_t``,
   and ``p_t`` becomes ``max(p_t, (c - recurrences + 1) / n)``: the rate at which errors this
   large really happened, not counting ``recurrences - 1`` of those excursions (they may have
   been anomalies themselves; with the default 2, the first repeat of an incident still alarms
   and the third does not). An error that has recurred more often than the stated false-alarm
   rate is not one of its rare events.
5. **Seasonal repeat** (kind :data:`LIKELIHOOD_SEASONAL`, ``season`` rows, e.g. one day) — a
   daily job, backup or cron spike makes the same error at the same time every day; a model
   trained on a few days cannot know all of them, but the score history can. When ``p_t`` is
   at or below the false-alarm rate and the smoothed error one season earlier (within
   ``season_halfwidth`` rows either side, the model's own seasonal tolerance) was at least
   ``mu_t + (m_t - mu_t) / sqrt(2)`` — at least half as surprising as now, measured as the
   log of the Gaussian tail (``log Q(z) ~ -z^2 / 2``), the units of ``anomaly_score``: at the
   decision boundary (0.5) that is yesterday's score reaching the re-arm level (0.25) — the
   excursion is a repeat of yesterday's, and ``p_t`` becomes ``max(p_t, 1 / season)``:
   an error that happens once a season (which does not re-arm the decision: an excursion
   that was reported is not reported again because part of it repeats). Only live samples count (not the prior: its rows
   are not one season before the live ones), so the step starts one season after the
   stream does. The first occurrence of a daily event still alarms; so does an incident at
   a time of day with nothing like it the day before.
6. **Decision** — an alarm when ``p_t <= false_alarm_rate`` while armed (``p_t = 0`` for a
   value out of range, step 0): one alarm per excursion, not one per sample. An alarm disarms
   the decision until ``p`` recovers above
   ``sqrt(false_alarm_rate)`` (``anomaly_score`` below 0.25): hysteresis, so an excursion that
   hovers around the boundary is still one event.

``anomaly_score`` is ``log(p) / (2 log(false_alarm_rate))`` clipped to ``[0, 1]``: exactly 0.5
at the decision boundary, monotone in ``p``. Samples that continue an alarm run already reported
are capped just below 0.5, so that ``anomaly_score >= 0.5`` if and only if ``is_anomaly``: a
threshold tuned on ``anomaly_score`` afterwards and the agent's own decisions agree at 0.5.

The pipeline's kind and parameters are part of a bundle's ``spec.json`` (``score.pipeline``);
:data:`PIPELINE_KINDS` lists the kinds this code can run, and :func:`pipeline_from_json` refuses
any other with :class:`ScorePipelineError`. Bundles without ``score.pipeline`` (older trainers)
use :data:`FIXED_THRESHOLD`: ``is_anomaly = score > threshold``.

Cost per sample is O(1) (step 0: O(features)): two ring buffers with running sums (recomputed
exactly once per ``long_window`` samples so float rounding cannot drift) and no allocation.
Step 4 is a vectorized pass over the history, step 5 a look at ``2 * season_halfwidth + 1`` values of
it, both only for samples that would otherwise alarm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FIXED_THRESHOLD",
    "LIKELIHOOD",
    "LIKELIHOOD_RANGE",
    "LIKELIHOOD_RECURRENT",
    "LIKELIHOOD_ROBUST",
    "LIKELIHOOD_ROBUST_EARLY",
    "LIKELIHOOD_SEASONAL",
    "MAX_PRIOR",
    "PIPELINE_KINDS",
    "RANGE_TOLERANCE",
    "FixedThresholdPipeline",
    "FixedThresholdScorer",
    "LikelihoodPipeline",
    "LikelihoodScorer",
    "ScorePipeline",
    "ScorePipelineError",
    "ScoreStep",
    "Scorer",
    "pipeline_from_json",
    "reference_steps",
]

FIXED_THRESHOLD = "edgefleet.fixed-threshold/1"
LIKELIHOOD = "edgefleet.likelihood/1"
LIKELIHOOD_RECURRENT = "edgefleet.likelihood/2"
LIKELIHOOD_SEASONAL = "edgefleet.likelihood/3"
LIKELIHOOD_ROBUST = "edgefleet.likelihood/4"
LIKELIHOOD_ROBUST_EARLY = "edgefleet.likelihood/5"
LIKELIHOOD_RANGE = "edgefleet.likelihood/6"
PIPELINE_KINDS = (FIXED_THRESHOLD, LIKELIHOOD, LIKELIHOOD_RECURRENT, LIKELIHOOD_SEASONAL, LIKELIHOOD_ROBUST,
                  LIKELIHOOD_ROBUST_EARLY, LIKELIHOOD_RANGE)
_LIKELIHOOD_KINDS = (LIKELIHOOD, LIKELIHOOD_RECURRENT, LIKELIHOOD_SEASONAL, LIKELIHOOD_ROBUST, LIKELIHOOD_ROBUST_EARLY,
                     LIKELIHOOD_RANGE)
_ROBUST_KINDS = (LIKELIHOOD_ROBUST, LIKELIHOOD_ROBUST_EARLY)
# Step 0's tolerance: the SPATIAL_TOLERANCE of Numenta's HTM detector in NAB (5% of the range).
RANGE_TOLERANCE = 0.05

_SQRT2 = math.sqrt(2.0)
# Below this, the history's spread is float noise (a constant error): treat it as this small
# fraction of the history's level instead, so a flat series does not divide by zero.
_REL_SIGMA_FLOOR = 1e-6
_ABS_SIGMA_FLOOR = 1e-12
# Continuing an alarm run: just below the 0.5 that marks a decision.
_RUN_CAP = 0.4999
# A spec.json stays small: 2048 smoothed errors are plenty to estimate a mean and a spread.
MAX_PRIOR = 2048


class ScorePipelineError(ValueError):
    """A score pipeline spec is unknown or malformed (a bundle that carries it is refused)."""


class ScoreStep(NamedTuple):
    """What the pipeline says about one raw score.

    ``tail_probability`` is how likely an error this large is given the series' recent past
    (1.0 while the history is warming up), ``anomaly_score`` its ``[0, 1]`` mapping (0.5 at the
    decision boundary), ``is_anomaly`` the decision.
    """

    tail_probability: float
    anomaly_score: float
    is_anomaly: bool


@dataclass(frozen=True)
class LikelihoodPipeline:
    """Parameters of :data:`LIKELIHOOD`, :data:`LIKELIHOOD_RECURRENT` and
    :data:`LIKELIHOOD_SEASONAL` (defaults: the published anomaly-likelihood ones, without the
    recurrence and seasonal-repeat steps).

    ``short_window`` raw errors are averaged (10 in Ahmad et al.); the tail probability is
    measured against the last ``long_window`` averages (8640, thirty days of 5-minute samples,
    as HTM's historic window); no decision is made before ``min_history`` averages are known
    (288, HTM's learning period: one day of 5-minute samples); ``false_alarm_rate`` is the tail
    probability at which a sample alarms — under the Gaussian model of step 3 the expected
    share of samples that alarm on a series with no change at all.

    ``prior`` (at most :data:`MAX_PRIOR` values) seeds the history: the smoothed errors of the
    model on its validation rows, which the trainer measures (:meth:`calibrated`). With it, an
    agent decides from its model's first full window instead of after ``min_history`` live
    samples — after an activation and after every restart — and the live stream then replaces
    the prior as it fills the history.

    ``recurrences`` (kind :data:`LIKELIHOOD_RECURRENT`, step 4 of the module's description):
    how many separate excursions of the history at least as large make an error recurrent
    rather than rare; 0 (the default) is kind :data:`LIKELIHOOD`, which does not ask the
    history. The step is not on by default because it cannot tell a recurring normal burst
    from a recurring incident: on a host where similar incidents come every day or two it
    reports the first two and hides the rest (docs/model-choice.md has both measurements).

    ``season`` and ``season_halfwidth`` (kind :data:`LIKELIHOOD_SEASONAL`, step 5): rows per
    season (one day; the trainer sets the model's seasonal lag) and the tolerance in rows
    either side; 0 (the default) leaves the step out.

    ``robust_history`` (kind :data:`LIKELIHOOD_ROBUST`, which may also carry ``recurrences``
    and ``season``): smoothed errors enter the history clipped at the decision boundary
    (step 2). Steps 4 and 5 still compare with the errors as they were.

    ``robust_early`` (kind :data:`LIKELIHOOD_ROBUST_EARLY`, with ``robust_history``): the clip
    applies during the learning period as well, from the history's second value on.

    ``range_tolerance`` (kind :data:`LIKELIHOOD_RANGE`, which may carry every option above):
    step 0, a value beyond the range seen so far by more than this fraction of the range is an
    anomaly (:data:`RANGE_TOLERANCE`; 0, the default, leaves the step out). ``value_range``
    holds ``(low, high)`` per feature of the rows the model was trained on
    (:meth:`with_value_range`), the range the check starts from; without it the range is
    learned from the stream's own first values.
    """

    short_window: int = 10
    long_window: int = 8640
    min_history: int = 288
    false_alarm_rate: float = 1e-5
    prior: tuple[float, ...] = ()
    recurrences: int = 0
    season: int = 0
    season_halfwidth: int = 8
    robust_history: bool = False
    robust_early: bool = False
    range_tolerance: float = 0.0
    value_range: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.robust_early and not self.robust_history:
            raise ScorePipelineError("score pipeline robust_early needs robust_history")
        if not (1 <= self.short_window <= self.long_window and 2 <= self.min_history <= self.long_window):
            raise ScorePipelineError(
                "score pipeline needs 1 <= short_window <= long_window and 2 <= min_history <= long_window"
            )
        if not 0 < self.false_alarm_rate < 0.5:
            raise ScorePipelineError("score pipeline false_alarm_rate must be in (0, 0.5)")
        if not 0 <= self.recurrences <= 1000:
            raise ScorePipelineError("score pipeline recurrences must be in [0, 1000]")
        if self.season < 0:
            raise ScorePipelineError("score pipeline season must be >= 0")
        if self.season and not (
            0 <= self.season_halfwidth < self.season and self.season + self.season_halfwidth < self.long_window
        ):
            raise ScorePipelineError(
                "score pipeline needs 0 <= season_halfwidth < season and season + season_halfwidth < long_window"
            )
        if not (math.isfinite(self.range_tolerance) and 0 <= self.range_tolerance <= 100):
            raise ScorePipelineError("score pipeline range_tolerance must be in [0, 100]")
        if self.value_range and not self.range_tolerance:
            raise ScorePipelineError("score pipeline value_range needs range_tolerance > 0")
        for bounds in self.value_range:
            if not (len(bounds) == 2 and all(map(math.isfinite, bounds)) and bounds[0] <= bounds[1]):
                raise ScorePipelineError("score pipeline value_range holds one finite [low, high] "
                                         "with low <= high per feature")
        if len(self.prior) > min(MAX_PRIOR, self.long_window) or not all(map(math.isfinite, self.prior)):
            raise ScorePipelineError(
                f"score pipeline prior must hold at most {MAX_PRIOR} (and long_window) finite values"
            )

    def calibrated(self, errors: Sequence[float] | np.ndarray) -> LikelihoodPipeline:
        """This pipeline with ``prior`` = the smoothed ``errors`` (validation errors in stream
        order, the last :data:`MAX_PRIOR` of them, rounded to 6 significant digits)."""
        x = np.asarray(errors, np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return dataclasses.replace(self, prior=())
        sums = np.cumsum(x)
        k = self.short_window
        means = np.empty_like(x)
        means[:k] = sums[:k] / np.arange(1, min(k, x.size) + 1)
        if x.size > k:
            means[k:] = (sums[k:] - sums[:-k]) / k
        keep = means[-min(MAX_PRIOR, self.long_window):]
        return dataclasses.replace(self, prior=tuple(float(f"{v:.6g}") for v in keep))

    def with_value_range(self, rows: np.ndarray) -> LikelihoodPipeline:
        """This pipeline with ``value_range`` = each feature's lowest and highest finite value of
        ``rows`` (``(n, features)``, the rows the model was trained on); unchanged without
        step 0. Raises :class:`ScorePipelineError` when a feature has no finite value."""
        if not self.range_tolerance:
            return self
        x = np.asarray(rows, np.float64)
        if x.ndim != 2 or not np.isfinite(x).any(axis=0).all():
            raise ScorePipelineError("value_range needs (rows, features) with a finite value per feature")
        return dataclasses.replace(self, value_range=tuple(
            (float(lo), float(hi)) for lo, hi in zip(np.nanmin(x, axis=0), np.nanmax(x, axis=0), strict=True)))

    @property
    def kind(self) -> str:
        if self.range_tolerance:
            return LIKELIHOOD_RANGE
        if self.robust_history:
            return LIKELIHOOD_ROBUST_EARLY if self.robust_early else LIKELIHOOD_ROBUST
        if self.season:
            return LIKELIHOOD_SEASONAL
        return LIKELIHOOD_RECURRENT if self.recurrences else LIKELIHOOD

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "short_window": self.short_window,
            "long_window": self.long_window,
            "min_history": self.min_history,
            "false_alarm_rate": self.false_alarm_rate,
            **({"recurrences": self.recurrences} if self.recurrences else {}),
            **({"season": self.season, "season_halfwidth": self.season_halfwidth} if self.season else {}),
            **({"robust_history": True} if self.robust_history else {}),
            **({"robust_early": True} if self.robust_early and self.range_tolerance else {}),
            **({"range_tolerance": self.range_tolerance} if self.range_tolerance else {}),
            **({"value_range": [list(b) for b in self.value_range]} if self.value_range else {}),
            **({"prior": list(self.prior)} if self.prior else {}),
        }

    def scorer(self, threshold: float, center: float, width: float) -> LikelihoodScorer:
        """A fresh streaming scorer (one per series); the raw-score scale is not used."""
        return LikelihoodScorer(self)


@dataclass(frozen=True)
class FixedThresholdPipeline:
    """:data:`FIXED_THRESHOLD`: the decision is ``score > threshold`` (bundles of older trainers)."""

    kind = FIXED_THRESHOLD

    def to_json(self) -> dict[str, Any]:
        return {"kind": FIXED_THRESHOLD}

    def scorer(self, threshold: float, center: float, width: float) -> FixedThresholdScorer:
        """A scorer deciding ``score > threshold``, scaled by the bundle's logistic."""
        return FixedThresholdScorer(threshold, center, width)




def pipeline_from_json(obj: Mapping[str, Any] | None) -> ScorePipeline:
    """Parse ``score.pipeline`` of a bundle spec; ``None`` (absent) is :data:`FIXED_THRESHOLD`.

    Raises :class:`ScorePipelineError` for an unknown kind (naming the kinds this code runs)
    or bad parameters. Unknown parameters of a known kind are an error too: a pipeline that
    silently ignored one would decide differently from the trainer that declared it.
    """
    if obj is None:
        return FixedThresholdPipeline()
    if not isinstance(obj, Mapping):
        raise ScorePipelineError("score.pipeline must be an object")
    kind = obj.get("kind")
    if kind == FIXED_THRESHOLD:
        extra = set(obj) - {"kind"}
        if extra:
            raise ScorePipelineError(f"score pipeline {kind} has unknown parameter(s) {sorted(extra)}")
        return FixedThresholdPipeline()
    if kind not in _LIKELIHOOD_KINDS:
        raise ScorePipelineError(
            f"unknown score pipeline kind {kind!r}; this version runs {', '.join(PIPELINE_KINDS)}"
        )
    params = {k: v for k, v in obj.items() if k != "kind"}
    known = {"short_window", "long_window", "min_history", "false_alarm_rate", "prior"}
    if kind in (LIKELIHOOD_RECURRENT, LIKELIHOOD_SEASONAL, *_ROBUST_KINDS):
        known.add("recurrences")
    if kind in _ROBUST_KINDS:
        known.add("robust_history")
        if params.get("robust_history") is not True:
            raise ScorePipelineError(f"score pipeline {kind} needs robust_history: true")
    if kind == LIKELIHOOD_RANGE:
        known |= {"recurrences", "robust_history", "robust_early", "range_tolerance", "value_range"}
        for name in ("robust_history", "robust_early"):
            if not isinstance(params.get(name, False), bool):
                raise ScorePipelineError(f"score pipeline {kind} needs {name} true or false")
        tolerance = params.get("range_tolerance")
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance > 0:
            raise ScorePipelineError(f"score pipeline {kind} needs a range_tolerance > 0")
        bounds = params.get("value_range", [])
        if not isinstance(bounds, list) or not all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                        for v in b) for b in bounds):
            raise ScorePipelineError(f"score pipeline {kind} needs value_range as [[low, high], ...]")
    if kind == LIKELIHOOD_SEASONAL or (kind in (*_ROBUST_KINDS, LIKELIHOOD_RANGE) and "season" in params):
        known |= {"season", "season_halfwidth"}
        for name in ("season", "season_halfwidth"):
            value = params.get(name, 8 if name == "season_halfwidth" else None)
            least = 1 if name == "season" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ScorePipelineError(f"score pipeline {kind} needs an integer {name} >= {least}")
    if set(params) - known:
        raise ScorePipelineError(f"score pipeline {kind} has unknown parameter(s) {sorted(set(params) - known)}")
    try:
        return LikelihoodPipeline(
            short_window=int(params.get("short_window", 10)),
            long_window=int(params.get("long_window", 8640)),
            min_history=int(params.get("min_history", 288)),
            false_alarm_rate=float(params.get("false_alarm_rate", 1e-5)),
            prior=tuple(float(v) for v in params.get("prior", ())),
            recurrences=(int(params.get("recurrences", 2)) if kind == LIKELIHOOD_RECURRENT
                         else int(params.get("recurrences", 0))),
            season=int(params.get("season", 0)),
            season_halfwidth=int(params.get("season_halfwidth", 8)),
            robust_history=kind in _ROBUST_KINDS or params.get("robust_history", False) is True,
            robust_early=kind == LIKELIHOOD_ROBUST_EARLY or params.get("robust_early", False) is True,
            range_tolerance=float(params.get("range_tolerance", 0.0)),
            value_range=tuple((float(lo), float(hi)) for lo, hi in params.get("value_range", ())),
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise ScorePipelineError(f"bad score pipeline parameters: {e}") from e


ScorePipeline = LikelihoodPipeline | FixedThresholdPipeline


class FixedThresholdScorer:
    """``is_anomaly = score > threshold``; ``anomaly_score = sigmoid((ln score - center) / width)``.

    Stateless; ``tail_probability`` is reported as ``1 - anomaly_score`` (there is no history
    to measure a tail against).
    """

    def __init__(self, threshold: float, center: float, width: float) -> None:
        self._threshold = float(threshold)
        self._center = float(center)
        self._width = float(width)

    def push(self, score: float, values: Sequence[float] | None = None) -> ScoreStep:
        """Judge one raw score (``values`` are not used: there is no step 0 here)."""
        if not score > 0:  # also NaN
            return ScoreStep(1.0, 0.0, False)
        z = (math.log(score) - self._center) / self._width
        if z >= 0:
            a = 1.0 / (1.0 + math.exp(-z))
        else:
            e = math.exp(z)
            a = e / (1.0 + e)
        return ScoreStep(1.0 - a, a, score > self._threshold)


class LikelihoodScorer:
    """Streaming state of :data:`LIKELIHOOD` for one series. Not thread safe.

    ``push`` takes each raw score in stream order, with the newest row's values (one per
    feature) for step 0. A non-finite score (a failed or degenerate inference) changes no
    state and yields ``ScoreStep(1.0, 0.0, False)``.
    """

    def __init__(self, params: LikelihoodPipeline) -> None:
        self._p = params
        # Plain lists, not numpy arrays: indexing a list with a Python float is several times
        # cheaper than a numpy scalar access, and this runs once per sample on the hot path.
        self._short = [0.0] * params.short_window
        self._short_n = self._short_i = 0
        self._short_sum = 0.0
        self._long = [0.0] * params.long_window
        k = len(params.prior)
        self._long[:k] = params.prior
        # Step 2's robust history clips what enters _long; steps 4 and 5 read the errors as
        # they were, kept in _raw (the same list when nothing is clipped).
        self._clip_z = NormalDist().inv_cdf(1.0 - params.false_alarm_rate) if params.robust_history else 0.0
        # the history's mean and spread are needed once decisions start, or for kind 5's clip
        # from the history's second value on (the learning period too)
        self._stats_from = 2 if params.robust_early else params.min_history
        self._raw = list(self._long) if params.robust_history else self._long
        # The same history as an array, for step 4's vectorized count (only when asked).
        self._recurrences = params.recurrences
        self._ring = np.zeros(params.long_window) if params.recurrences else None
        if self._ring is not None:
            self._ring[:k] = params.prior
        self._long_n = k
        self._long_i = k % params.long_window
        self._long_sum = math.fsum(params.prior)
        self._long_sq = math.fsum(v * v for v in params.prior)
        self._since_exact = 0
        self._log_far2 = 2.0 * math.log(params.false_alarm_rate)
        self._far = params.false_alarm_rate
        self._short_cap = params.short_window
        self._long_cap = params.long_window
        self._min_history = params.min_history
        self._armed = True
        self._rearm = math.sqrt(params.false_alarm_rate)
        self._season = params.season
        self._season_hw = params.season_halfwidth
        self._live = 0  # values pushed into the history by this stream (not the prior)
        # Step 0: each feature's range so far (seeded by the training rows' range, or by the
        # first values pushed when the pipeline has none).
        self._range_tol = params.range_tolerance
        self._low = [b[0] for b in params.value_range]
        self._high = [b[1] for b in params.value_range]

    def push(self, score: float, values: Sequence[float] | None = None) -> ScoreStep:
        """Judge one raw score. ``values`` (the sample's feature values, in the bundle's
        feature order) feed step 0; without them, or without step 0, it is skipped.

        Raises ``ValueError`` when ``values`` does not hold one value per feature of the
        pipeline's ``value_range``.
        """
        if not math.isfinite(score):
            return ScoreStep(1.0, 0.0, False)
        out_of_range = self._out_of_range(values) if self._range_tol and values is not None else False
        # 1. short mean
        short, i = self._short, self._short_i
        if self._short_n == self._short_cap:
            self._short_sum -= short[i]
        else:
            self._short_n += 1
        short[i] = score
        self._short_sum += score
        self._short_i = i + 1 if i + 1 < self._short_cap else 0
        m = self._short_sum / self._short_n
        # 2-3. against the history before this sample
        n = self._long_n
        # a mean of fewer than short_window errors is not comparable with the history's
        tail = excursion = 1.0
        kept = m
        if n >= self._stats_from and self._short_n == self._short_cap:
            mu = self._long_sum / n
            var = self._long_sq / n - mu * mu
            sigma = math.sqrt(var) if var > 0 else 0.0
            floor = _REL_SIGMA_FLOOR * abs(mu)
            if sigma < floor or sigma < _ABS_SIGMA_FLOOR:
                sigma = floor if floor > _ABS_SIGMA_FLOOR else _ABS_SIGMA_FLOOR
            if self._clip_z:
                bound = mu + self._clip_z * sigma
                if kept > bound:
                    kept = bound
            if n >= self._min_history:  # before it, the learning period: no decision yet
                tail = 0.5 * math.erfc((m - mu) / (sigma * _SQRT2))
                if tail <= self._far and self._recurrences:
                    tail = max(tail, self._recurrence_rate(m, n))
                excursion = tail  # before step 5: whether the error itself is still out of the ordinary
                if tail <= self._far and self._season and self._seasonal_repeat(m, mu):
                    tail = max(tail, 1.0 / self._season)
        if out_of_range:  # step 0: nothing like this value has been seen
            tail = excursion = 0.0
        # remember m (clipped, with a robust history) in the long history
        long, j, cap = self._long, self._long_i, self._long_cap
        if n == cap:
            old = long[j]
            self._long_sum -= old
            self._long_sq -= old * old
        else:
            self._long_n = n + 1
        self._raw[j] = m
        long[j] = kept
        if self._ring is not None:
            self._ring[j] = m
        self._long_sum += kept
        self._long_sq += kept * kept
        self._long_i = j + 1 if j + 1 < cap else 0
        self._live += 1
        self._since_exact += 1
        if self._since_exact >= cap:
            self._resum()
        # 4. decision: the first exceedance while armed; re-armed once the tail recovers
        hit = tail <= self._far
        alarm = hit and self._armed
        if alarm:
            self._armed = False
        elif tail > self._rearm and excursion > self._rearm:  # a seasonal repeat does not re-arm
            self._armed = True
        if tail > 0:
            a = math.log(tail) / self._log_far2
            a = 0.0 if a < 0.0 else (1.0 if a > 1.0 else a)
        else:
            a = 1.0
        if hit and not alarm and a > _RUN_CAP:
            a = _RUN_CAP
        return ScoreStep(tail, a, alarm)

    def _out_of_range(self, values: Sequence[float]) -> bool:
        """Step 0: is any value beyond its feature's range so far by more than the tolerance
        of that range? Then widen the ranges to take the values in."""
        low, high, tol = self._low, self._high, self._range_tol
        if not low:  # no training range: the stream's first finite values start it
            if all(map(math.isfinite, values)):
                low.extend(values)
                high.extend(values)
            return False
        if len(values) != len(low):
            raise ValueError(f"score pipeline range holds {len(low)} feature(s), got {len(values)} value(s)")
        out = False
        for k, v in enumerate(values):
            lo, hi = low[k], high[k]
            if not lo <= v <= hi and math.isfinite(v):  # NaN and ±inf change nothing
                if _past(lo, hi, tol, v):
                    out = True
                if v > hi:
                    high[k] = v
                else:
                    low[k] = v
        return out

    def _recurrence_rate(self, m: float, n: int) -> float:
        """Step 4: ``max(0, c - recurrences + 1) / n`` for the ``c`` separate excursions of
        the history (``n`` values, in time order) at or above ``m``."""
        ring = self._ring
        assert ring is not None
        if n < self._long_cap:
            hist = ring[:n]
        else:
            j = self._long_i  # the oldest value: the history runs from here round to j - 1
            hist = np.concatenate((ring[j:], ring[:j]))
        above = hist >= m
        c = int(above[0]) + int(np.count_nonzero(above[1:] & ~above[:-1]))
        return max(0, c - self._recurrences + 1) / n

    def _seasonal_repeat(self, m: float, mu: float) -> bool:
        """Step 5: was the smoothed error one season ago (± the half-width) at least
        ``mu + (m - mu) / sqrt(2)``: half as surprising as ``m``, in log tail probability?"""
        season, hw = self._season, self._season_hw
        if self._live < season + hw:
            return False
        raw, j, cap = self._raw, self._long_i, self._long_cap
        floor = mu + (m - mu) / _SQRT2
        for back in range(season - hw, season + hw + 1):  # pushed `back` samples ago
            if raw[(j - back) % cap] >= floor:
                return True
        return False

    def _resum(self) -> None:
        """Recompute the running sums exactly: bounds float drift, O(1) amortized."""
        live = np.asarray(self._long[: self._long_n], np.float64)
        self._long_sum = float(live.sum())
        self._long_sq = float(np.dot(live, live))
        self._since_exact = 0


Scorer = LikelihoodScorer | FixedThresholdScorer


def _beyond(bounds: Sequence[tuple[float, float]], tolerance: float, row: Sequence[float]) -> bool:
    """Is a value of ``row`` beyond its feature's ``(low, high)`` by more than ``tolerance`` of
    the range (step 0 against a fixed range)?"""
    if len(row) != len(bounds):
        raise ValueError(f"score pipeline range holds {len(bounds)} feature(s), got {len(row)} value(s)")
    return any(_past(lo, hi, tolerance, v) for (lo, hi), v in zip(bounds, row, strict=True))


def _past(lo: float, hi: float, tolerance: float, v: float) -> bool:
    """Is ``v`` beyond ``[lo, hi]`` by more than ``tolerance`` of its span? Never for a range
    of one value, up to float noise (:data:`_REL_SIGMA_FLOOR` of its magnitude, as for the
    history's spread): a constant feature has no range to be beyond."""
    span = hi - lo
    if span <= _REL_SIGMA_FLOOR * max(abs(lo), abs(hi)) or span <= _ABS_SIGMA_FLOOR:
        return False
    return v > hi + tolerance * span or v < lo - tolerance * span


def reference_steps(
    pipeline: ScorePipeline, scores: Sequence[float], *, threshold: float, center: float, width: float,
    rows: Sequence[Sequence[float]] | None = None,
) -> tuple[str, list[ScoreStep]]:
    """Judge raw scores one by one, each on its own, against the bundle's calibrated reference:
    no stream, no state, nothing remembered between scores (the agent's local predict API).

    Returns ``(reference, steps)``. With a likelihood pipeline whose ``prior`` holds at least
    ``min_history`` values, ``reference`` is ``"prior"``: steps 2, 3 and 6 of the module's
    description with the prior as the whole history and the score itself as ``m`` — the tail
    probability of this error given the model's validation errors, an alarm at or below
    ``false_alarm_rate``, ``anomaly_score`` mapped as in the stream. There is no smoothing (one
    score is its own mean; a single error spreads wider than the prior's smoothed ones, so it
    alarms more readily than the stream would), no hysteresis, no recurrence and no seasonal
    repeat: they describe a stream. Otherwise ``reference`` is ``"threshold"``: the
    :data:`FIXED_THRESHOLD` decision ``score > threshold`` and its logistic, which is also
    what a fixed-threshold bundle's stream decides.

    With step 0 and a ``value_range``, under either reference, ``rows`` (each score's newest
    row, one value per feature) is checked against that training range alone, widened by
    nothing: a row beyond it by more than the tolerance has ``tail_probability`` 0 and alarms.
    """
    beyond = [False] * len(scores)
    if isinstance(pipeline, LikelihoodPipeline) and pipeline.value_range and rows is not None:
        if len(rows) != len(scores):
            raise ValueError(f"{len(scores)} scores but {len(rows)} rows")
        beyond = [_beyond(pipeline.value_range, pipeline.range_tolerance, row) for row in rows]
    if isinstance(pipeline, LikelihoodPipeline) and len(pipeline.prior) >= pipeline.min_history:
        prior = np.asarray(pipeline.prior, np.float64)
        mu = float(prior.mean())
        sigma = float(prior.std())
        floor = _REL_SIGMA_FLOOR * abs(mu)
        if sigma < floor or sigma < _ABS_SIGMA_FLOOR:
            sigma = floor if floor > _ABS_SIGMA_FLOOR else _ABS_SIGMA_FLOOR
        far = pipeline.false_alarm_rate
        log_far2 = 2.0 * math.log(far)
        steps = []
        for score, out in zip(scores, beyond, strict=True):
            if not math.isfinite(score):
                steps.append(ScoreStep(1.0, 0.0, False))
                continue
            tail = 0.0 if out else 0.5 * math.erfc((score - mu) / (sigma * _SQRT2))
            a = 1.0 if tail <= 0 else min(1.0, max(0.0, math.log(tail) / log_far2))
            steps.append(ScoreStep(tail, a, tail <= far))
        return "prior", steps
    fixed = FixedThresholdScorer(threshold, center, width)
    return "threshold", [ScoreStep(0.0, 1.0, True) if out and math.isfinite(s) else fixed.push(float(s))
                         for s, out in zip(scores, beyond, strict=True)]
