"""A scorer compatible with the Numenta Anomaly Benchmark (NAB), plus event-level metrics.

Written from NAB's published method (Lavin & Ahmad, ICMLA 2015) and the behaviour of its
reference scorer (``nab/sweeper.py``, ``nab/runner.py``); numpy only. The contract, rule by rule:

Labels
    :func:`load_windows` reads ``combined_windows.json``: ``{"<category>/<file>.csv":
    [[start, end], ...]}``. A window covers the rows whose timestamp lies in ``[start, end]``
    (both ends included), as NAB's ``Window`` does. Timestamps must be sorted; windows must not
    overlap (NAB's labeller guarantees both; we refuse instead of guessing).

Probation (:func:`probation_rows`)
    ``min(floor(0.15 * n), 0.15 * 5000)`` rows — 15% of the file, at most 750. Rows before that
    index are ignored entirely: their detections neither score nor cost, and a window lying
    wholly in probation is not scored at all (NAB's sweeper drops it too).

One file (:func:`score_detections`), weights ``(A_TP, A_FP, A_FN)`` from a :class:`CostProfile`
    - scaled sigmoid ``σ(y) = 2 / (1 + e^{5y}) − 1``, and ``σ(y) = −1`` for ``y ≥ 3``;
    - in a window of ``w`` rows ending at row ``r``, a detection at row ``i`` sits at
      ``y = −(r − i + 1) / w``; only the first detection counts and earns
      ``A_TP · σ(y) / σ(−1)``, so a detection on the window's first row earns exactly ``A_TP``;
    - a detection outside every window earns ``A_FP · σ(y)`` with ``y = (i − r) / (w − 1)``
      measured from the end ``r`` of the closest preceding window (width ``w``), and
      ``−A_FP`` before the first window;
    - a window with no detection costs ``−A_FN``; A_TN is carried for completeness and, as in
      NAB, never used.

File set (:func:`nab_score`, :func:`optimize_threshold`)
    Raw scores add up over the files. Normalized score ``100 · (S − S_null) / (S_perfect −
    S_null)`` with ``S_null = −A_FN · N`` (a detector that never fires) and ``S_perfect = A_TP
    · N`` (every window detected on its first row, no false positive), ``N`` the number of
    scored windows in the set. :func:`optimize_threshold` picks one threshold on
    ``anomaly_score`` for the whole set (detection = ``score >= threshold``), exhaustively over
    every distinct score after probation, exactly like NAB's ``Sweeper.calcScoreByThreshold``;
    among equal scores the highest threshold wins, as in NAB's stable sort. This is what
    reproduces NAB's published figures. NAB's older ``twiddle`` hill climb (from 0.5, step
    0.1) is available as ``search="twiddle"`` for comparison only: it stops on local maxima
    (on the team's 28 NAB files, 9.96 instead of the published 26.52 for the windowed
    Gaussian), although some of NAB's stored thresholds, such as HTM's 0.5421876907…, come
    from it.

Departures from NAB's code, none of which occurs on NAB's corpus:
    - a window containing no row is dropped (NAB's sweeper silently ignores it too, but its
      normalization still counts it in ``S_perfect``); ``N`` counts only scored windows;
    - after a one-row window, ``y = (i − r) / 1`` (NAB divides by zero);
    - a NaN anomaly score never detects (NAB's comparison is undefined for NaN).

Event-level metrics (:func:`event_metrics`), on boolean decisions after probation
    - a window is a true event, detected if at least one detection falls inside it;
    - a false event is a maximal run of consecutive detected rows outside every window (so an
      alarm that stays on for an hour is one false event, and an alarm that outlives the
      window it started in becomes a false event from the row after the window);
    - precision = detected / (detected + false events), recall = detected / windows,
      F1 their harmonic mean (each 0.0 when undefined);
    - time to detect: from a window's labelled first row to its first detection, in rows and
      in seconds, averaged over detected windows (``None`` when none is detected).

Pure functions over arrays; no I/O except :func:`load_windows`, no global state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "PROBATION_PERCENT",
    "PROFILES",
    "CostProfile",
    "EventMetrics",
    "FileScore",
    "LabelledSeries",
    "RowCounts",
    "ScoringError",
    "ThresholdResult",
    "event_metrics",
    "load_windows",
    "nab_score",
    "normalize",
    "optimize_threshold",
    "probation_rows",
    "scaled_sigmoid",
    "score_detections",
]

PROBATION_PERCENT = 0.15
# NAB caps the probationary period at 15% of a 5000-row file.
_PROBATION_CAP_ROWS = 5000


class ScoringError(ValueError):
    """Input the scorer cannot score: malformed labels, mismatched lengths, unknown profile."""


@dataclass(frozen=True)
class CostProfile:
    """NAB's cost matrix: weights of a true positive, false positive, false negative, true negative."""

    name: str
    tp: float
    fp: float
    fn: float
    tn: float = 1.0


# NAB's config/profiles.json.
PROFILES: dict[str, CostProfile] = {
    "standard": CostProfile("standard", tp=1.0, fp=0.11, fn=1.0, tn=1.0),
    "reward_low_FP_rate": CostProfile("reward_low_FP_rate", tp=1.0, fp=0.22, fn=1.0, tn=1.0),
    "reward_low_FN_rate": CostProfile("reward_low_FN_rate", tp=1.0, fp=0.11, fn=2.0, tn=1.0),
}


def probation_rows(n: int) -> int:
    """Rows at the start of an ``n``-row file whose detections NAB ignores.

    ``min(floor(0.15 n), 0.15 · 5000)``: 604 for 4032 rows, never more than 750.
    """
    if n < 0:
        raise ScoringError(f"a series cannot have {n} rows")
    return int(min(math.floor(PROBATION_PERCENT * n), PROBATION_PERCENT * _PROBATION_CAP_ROWS))


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray:
    """NAB's ``σ(y) = 2 / (1 + e^{5y}) − 1``, and −1 from ``y = 3`` on (far after a window)."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore"):  # e^{5y} overflows to inf for large y: σ → −1, correct
        s = 2.0 * (1.0 / (1.0 + np.exp(5.0 * y))) - 1.0
    return np.where(y >= 3.0, -1.0, s)


_MAX_TP = float(scaled_sigmoid(-1.0))


def load_windows(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Read NAB's ``combined_windows.json``: file key (``category/name.csv``) → ``[(start, end)]``.

    Raises :class:`ScoringError` (one line) when the file is missing, is not JSON, or is not a
    mapping of lists of ``[start, end]`` string pairs.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScoringError(f"cannot read labels {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ScoringError(f"labels {path} are not JSON: {e.msg} at line {e.lineno}") from e
    if not isinstance(raw, dict):
        raise ScoringError(f"labels {path}: expected an object of file -> windows")
    out: dict[str, list[tuple[str, str]]] = {}
    for key, windows in raw.items():
        if not isinstance(windows, list) or not all(
            isinstance(w, list | tuple) and len(w) == 2 and all(isinstance(t, str) for t in w)
            for w in windows
        ):
            raise ScoringError(f"labels {path}: {key!r} must be a list of [start, end] timestamps")
        out[key] = [(str(w[0]), str(w[1])) for w in windows]
    return out


def _to_datetime64(values: Sequence[str] | np.ndarray, what: str) -> np.ndarray:
    """ISO 8601 strings, epoch seconds or datetime64 → ``datetime64[us]``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ScoringError(f"{what}: expected a 1-D sequence of timestamps")
    if np.issubdtype(arr.dtype, np.datetime64):
        return arr.astype("datetime64[us]")
    if arr.size and arr.dtype.kind not in "iuf":
        try:
            return arr.astype("datetime64[us]")
        except ValueError:
            pass
    try:
        seconds = arr.astype(np.float64)
    except ValueError:
        raise ScoringError(f"{what}: timestamps are neither ISO 8601 nor epoch seconds") from None
    return np.round(seconds * 1e6).astype(np.int64).astype("datetime64[us]")


@dataclass(frozen=True)
class _Layout:
    """A series' windows resolved to rows, and each row's unit reward or cost."""

    n: int
    probation: int
    times: np.ndarray  # datetime64[us]
    starts: np.ndarray  # first row of each window (int64), sorted
    ends: np.ndarray  # last row of each window, inclusive
    scored: np.ndarray  # bool per window: has a row after probation
    window_of_row: np.ndarray  # window index, or -1 outside every window
    unit_tp: np.ndarray  # σ(y)/σ(−1) inside windows, 0 elsewhere
    unit_fp: np.ndarray  # σ(y) ≤ 0 outside windows, 0 inside

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())


def _layout(name: str, timestamps: Sequence[str] | np.ndarray, windows: Sequence[tuple[str, str]]) -> _Layout:
    times = _to_datetime64(timestamps, name)
    n = int(times.size)
    if n > 1 and not bool(np.all(times[1:] >= times[:-1])):
        raise ScoringError(f"{name}: timestamps are not in increasing order")
    probation = probation_rows(n)
    if windows:
        bounds = _to_datetime64([t for w in windows for t in w], f"{name} windows").reshape(-1, 2)
    else:
        bounds = np.empty((0, 2), dtype="datetime64[us]")
    if bool(np.any(bounds[:, 0] > bounds[:, 1])):
        raise ScoringError(f"{name}: a window ends before it starts")
    bounds = bounds[np.argsort(bounds[:, 0], kind="stable")]
    starts = np.searchsorted(times, bounds[:, 0], side="left").astype(np.int64)
    ends = np.searchsorted(times, bounds[:, 1], side="right").astype(np.int64) - 1
    keep = starts <= ends  # a window between two rows contains none: nothing to detect
    starts, ends = starts[keep], ends[keep]
    if bool(np.any(starts[1:] <= ends[:-1])):
        raise ScoringError(f"{name}: labelled windows overlap")

    rows = np.arange(n, dtype=np.int64)
    window_of_row = np.full(n, -1, dtype=np.int64)
    unit_tp = np.zeros(n, dtype=np.float64)
    for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        window_of_row[s : e + 1] = k
        width = e - s + 1
        unit_tp[s : e + 1] = scaled_sigmoid(-(e - rows[s : e + 1] + 1) / width) / _MAX_TP

    # Closest window ending before each row: its end and width set the FP discount.
    prev = np.searchsorted(ends, rows, side="left") - 1
    has_prev = prev >= 0
    prev_end = np.where(has_prev, ends[np.maximum(prev, 0)] if ends.size else 0, 0)
    prev_width = np.where(has_prev, (ends - starts + 1)[np.maximum(prev, 0)] if ends.size else 1, 1)
    y = np.where(has_prev, (rows - prev_end) / np.maximum(prev_width - 1, 1), 3.0)
    unit_fp = np.where(window_of_row < 0, scaled_sigmoid(y), 0.0)
    return _Layout(
        n=n,
        probation=probation,
        times=times,
        starts=starts,
        ends=ends,
        scored=ends >= probation,
        window_of_row=window_of_row,
        unit_tp=unit_tp,
        unit_fp=unit_fp,
    )


@dataclass(frozen=True, eq=False)
class LabelledSeries:
    """One series to score: its name, its row timestamps and its labelled anomaly windows.

    ``timestamps`` are ISO 8601 strings (``YYYY-MM-DD HH:MM:SS``), epoch seconds, or a
    ``datetime64`` array; ``windows`` are ``(start, end)`` timestamps as in
    ``combined_windows.json``. Windows are resolved to rows at construction, which raises
    :class:`ScoringError` for unsorted timestamps or overlapping windows. Compared by
    identity (its timestamps may be an array).
    """

    name: str
    timestamps: Sequence[str] | np.ndarray
    windows: list[tuple[str, str]]
    _layout: _Layout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layout", _layout(self.name, self.timestamps, self.windows))

    def __len__(self) -> int:
        return self._layout.n

    @property
    def probation(self) -> int:
        """Rows ignored at the start (:func:`probation_rows`)."""
        return self._layout.probation

    @property
    def window_rows(self) -> list[tuple[int, int]]:
        """Each window as ``(first row, last row)``, inclusive, sorted."""
        return list(zip(self._layout.starts.tolist(), self._layout.ends.tolist()))

    @property
    def scored_windows(self) -> int:
        """Windows with at least one row after probation: the ones NAB scores."""
        return self._layout.n_scored


@dataclass(frozen=True)
class RowCounts:
    """NAB's per-row counts after probation (the TP/TN/FP/FN columns of its ``*_scores.csv``)."""

    tp: int
    tn: int
    fp: int
    fn: int


@dataclass(frozen=True)
class FileScore:
    """One file's NAB score for fixed decisions.

    ``tp``/``fn`` count windows detected/missed, ``fp`` the detections outside every window
    (rows, after probation); ``rows`` are NAB's per-row counts. ``delays_rows`` and
    ``delays_seconds`` give, per detected window, the distance from its first row to its first
    detection.
    """

    name: str
    raw: float
    tp: int
    fp: int
    fn: int
    rows: RowCounts
    delays_rows: tuple[int, ...]
    delays_seconds: tuple[float, ...]


@dataclass(frozen=True)
class ThresholdResult:
    """The best threshold for a file set and profile, its normalized and raw scores."""

    threshold: float
    score: float
    raw: float
    null: float
    perfect: float


@dataclass(frozen=True)
class EventMetrics:
    """Event-level quality over a file set (rules in the module docstring)."""

    windows: int
    detected: int
    false_events: int
    precision: float
    recall: float
    f1: float
    mean_delay_rows: float | None
    mean_delay_seconds: float | None


def _profile(profile: CostProfile | str) -> CostProfile:
    if isinstance(profile, CostProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ScoringError(f"unknown NAB profile {profile!r} (known: {', '.join(PROFILES)})") from None


def _decisions(series: LabelledSeries, values: np.ndarray, kind: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (len(series),):
        raise ScoringError(f"{series.name}: {arr.shape[0] if arr.ndim == 1 else arr.shape} {kind} "
                           f"for {len(series)} rows")
    return arr


def score_detections(series: LabelledSeries, detections: np.ndarray, profile: CostProfile | str) -> FileScore:
    """NAB's raw score of one file for boolean ``detections`` (one per row), with its counts.

    Raises :class:`ScoringError` if ``detections`` does not have one value per row.
    """
    cost = _profile(profile)
    lay = series._layout
    det = _decisions(series, detections, "detections").astype(bool).copy()
    det[: lay.probation] = False
    outside = lay.window_of_row < 0
    after = np.arange(lay.n) >= lay.probation
    fp_rows = det & outside
    fp_score = cost.fp * float(lay.unit_fp[fp_rows].sum())

    tp_score, tp, fn = 0.0, 0, 0
    delays: list[int] = []
    delays_s: list[float] = []
    for s, e, scored in zip(lay.starts.tolist(), lay.ends.tolist(), lay.scored.tolist()):
        if not scored:
            continue
        lo = max(s, lay.probation)
        hits = np.flatnonzero(det[lo : e + 1])
        if hits.size == 0:
            fn += 1
            continue
        first = lo + int(hits[0])
        tp += 1
        tp_score += cost.tp * float(lay.unit_tp[first])
        delays.append(first - s)
        delays_s.append(float((lay.times[first] - lay.times[s]) / np.timedelta64(1, "s")))

    inside = ~outside & after
    rows = RowCounts(
        tp=int((det & inside).sum()),
        tn=int((~det & outside & after).sum()),
        fp=int(fp_rows.sum()),
        fn=int((~det & inside).sum()),
    )
    return FileScore(
        name=series.name,
        raw=tp_score + fp_score - cost.fn * fn,
        tp=tp,
        fp=rows.fp,
        fn=fn,
        rows=rows,
        delays_rows=tuple(delays),
        delays_seconds=tuple(delays_s),
    )


def normalize(raw: float, n_windows: int, profile: CostProfile | str) -> float:
    """``100 · (raw − S_null) / (S_perfect − S_null)`` for ``n_windows`` scored windows.

    Raises :class:`ScoringError` when there is no window: the score is then undefined.
    """
    cost = _profile(profile)
    null, perfect = -cost.fn * n_windows, cost.tp * n_windows
    if perfect - null <= 0:
        raise ScoringError("no labelled window after probation in the file set: the NAB score is undefined")
    return 100.0 * (raw - null) / (perfect - null)


def nab_score(files: Sequence[tuple[LabelledSeries, np.ndarray]], profile: CostProfile | str) -> float:
    """Normalized NAB score (null detector 0, perfect 100) of fixed boolean decisions.

    This scores the product's own decisions, with no threshold tuned afterwards.
    """
    raw = sum(score_detections(series, det, profile).raw for series, det in files)
    return normalize(raw, sum(series.scored_windows for series, _ in files), profile)


@dataclass(frozen=True)
class _Curve:
    """Raw score of a file set as a step function of the threshold."""

    thresholds: np.ndarray  # distinct event thresholds, descending
    scores: np.ndarray  # raw score when detecting ``score >= thresholds[k]``
    base: float  # raw score above every threshold: nothing detected
    n_windows: int


def _events(series: LabelledSeries, scores: np.ndarray, cost: CostProfile) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds at which the file's raw score changes, and by how much (as it decreases).

    A false positive row changes it once, at its own score. A window changes it whenever a row
    becomes its earliest detection: the rows whose score beats every earlier row's in the
    window (running-maximum records), each replacing the previous first detection's reward.
    """
    lay = series._layout
    s = _decisions(series, scores, "anomaly scores").astype(np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    rows = np.arange(lay.n)
    fp_mask = (lay.window_of_row < 0) & (rows >= lay.probation) & np.isfinite(s)
    thresholds = [s[fp_mask]]
    deltas = [cost.fp * lay.unit_fp[fp_mask]]
    for st, e, scored in zip(lay.starts.tolist(), lay.ends.tolist(), lay.scored.tolist()):
        if not scored:
            continue
        lo = max(st, lay.probation)
        seg = s[lo : e + 1]
        running = np.maximum.accumulate(seg)
        record = np.empty(seg.size, dtype=bool)
        record[0] = True
        record[1:] = seg[1:] > running[:-1]
        record &= np.isfinite(seg)
        idx = np.flatnonzero(record)
        if idx.size == 0:
            continue
        reward = cost.tp * lay.unit_tp[lo + idx]
        # Lowering the threshold past the highest record turns the miss into its reward; past
        # each lower (earlier) record, the reward moves to that earlier, better row.
        step = np.empty(idx.size)
        step[-1] = reward[-1] + cost.fn
        step[:-1] = reward[:-1] - reward[1:]
        thresholds.append(seg[idx])
        deltas.append(step)
    return np.concatenate(thresholds), np.concatenate(deltas)


def _curve(files: Sequence[tuple[LabelledSeries, np.ndarray]], cost: CostProfile) -> _Curve:
    parts = [_events(series, scores, cost) for series, scores in files]
    n_windows = sum(series.scored_windows for series, _ in files)
    base = -cost.fn * n_windows
    thr = np.concatenate([p[0] for p in parts]) if parts else np.empty(0)
    delta = np.concatenate([p[1] for p in parts]) if parts else np.empty(0)
    order = np.argsort(-thr, kind="stable")
    thr, cum = thr[order], base + np.cumsum(delta[order])
    last_of_group = np.ones(thr.size, dtype=bool)
    last_of_group[:-1] = thr[1:] != thr[:-1]
    return _Curve(thresholds=thr[last_of_group], scores=cum[last_of_group], base=base, n_windows=n_windows)


def _raw_at(curve: _Curve, threshold: float) -> float:
    """Raw score when detecting ``score >= threshold``."""
    k = int(np.searchsorted(-curve.thresholds, -threshold, side="right"))  # thresholds >= t
    return curve.base if k == 0 else float(curve.scores[k - 1])


def _twiddle(objective: Callable[[float], float], initial: float = 0.5, tolerance: float = 1e-7) -> tuple[float, float]:
    """NAB's former one-parameter hill climb (``nab/optimizer.py``), step by step.

    Starts at ``initial`` with step 0.1, doubles the step after a gain, halves it otherwise,
    stops when the step falls under ``tolerance``; returns the best point it evaluated.
    """
    past: dict[float, float] = {}
    x, delta = initial, 0.1
    best = past[x] = objective(x)
    while delta > tolerance:
        x += delta
        if x not in past:
            past[x] = objective(x)
        if past[x] > best:
            best = past[x]
            delta *= 2
            continue
        x -= 2 * delta
        if x not in past:
            past[x] = objective(x)
        if past[x] > best:
            best = past[x]
            delta *= 2
        else:
            x += delta
            delta *= 0.5
    best_x = max(past, key=lambda k: past[k])
    return best_x, past[best_x]


def optimize_threshold(
    files: Sequence[tuple[LabelledSeries, np.ndarray]],
    profile: CostProfile | str,
    search: Literal["sweep", "twiddle"] = "sweep",
) -> ThresholdResult:
    """The threshold on ``anomaly_score`` that maximizes the file set's NAB score.

    ``search="sweep"`` (default) tries every distinct score after probation, as NAB's sweeper
    does, and returns the highest threshold reaching the maximum; with nothing worth detecting
    it returns a threshold above every score (NAB reports 1.1). ``search="twiddle"`` runs NAB's
    older hill climb over ``[0, 1]`` instead. Cost: one sort of all rows, O(N log N).

    Raises :class:`ScoringError` for mismatched lengths or a file set without any window.
    """
    cost = _profile(profile)
    curve = _curve(files, cost)
    if search == "sweep":
        k = int(np.argmax(curve.scores)) if curve.scores.size else -1
        if k >= 0 and curve.scores[k] > curve.base:
            threshold, raw = float(curve.thresholds[k]), float(curve.scores[k])
        else:
            top = float(curve.thresholds[0]) if curve.thresholds.size else 0.0
            threshold, raw = max(1.1, float(np.nextafter(top, np.inf))), curve.base
    elif search == "twiddle":
        threshold, raw = _twiddle(lambda t: _raw_at(curve, t) if 0.0 <= t <= 1.0 else -math.inf)
    else:
        raise ScoringError(f"unknown threshold search {search!r} (sweep or twiddle)")
    score = normalize(raw, curve.n_windows, cost)
    return ThresholdResult(
        threshold=threshold,
        score=score,
        raw=raw,
        null=-cost.fn * curve.n_windows,
        perfect=cost.tp * curve.n_windows,
    )


def event_metrics(files: Sequence[tuple[LabelledSeries, np.ndarray]]) -> EventMetrics:
    """Event-level precision, recall, F1 and mean time to detect of boolean decisions.

    Rules in the module docstring. Raises :class:`ScoringError` for mismatched lengths.
    """
    windows = detected = false_events = 0
    delays: list[int] = []
    delays_s: list[float] = []
    for series, detections in files:
        lay = series._layout
        det = _decisions(series, detections, "detections").astype(bool).copy()
        det[: lay.probation] = False
        out = det & (lay.window_of_row < 0)
        # A run of consecutive out-of-window detections starts where the previous row had none.
        false_events += int(out[0]) + int(np.count_nonzero(out[1:] & ~out[:-1])) if out.size else 0
        fs = score_detections(series, det, PROFILES["standard"])
        windows += lay.n_scored
        detected += fs.tp
        delays.extend(fs.delays_rows)
        delays_s.extend(fs.delays_seconds)
    precision = detected / (detected + false_events) if detected + false_events else 0.0
    recall = detected / windows if windows else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EventMetrics(
        windows=windows,
        detected=detected,
        false_events=false_events,
        precision=precision,
        recall=recall,
        f1=f1,
        mean_delay_rows=float(np.mean(delays)) if delays else None,
        mean_delay_seconds=float(np.mean(delays_s)) if delays_s else None,
    )
