"""Streaming anomaly detection: ring buffer of the last W samples → runtime → score pipeline → decision.

:class:`Detector` is the per-slot inference loop of the agent; :func:`detect_series` runs the
very same :meth:`Detector.push` path over a recorded series, so a backtest sees exactly what the
agent would have reported.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from shared.bundle import BundleSpec

from .runtime import ModelRuntime

__all__ = ["Detection", "DetectorStats", "Detector", "detect_series"]

logger = logging.getLogger(__name__)

DEFAULT_LATENCY_SAMPLES = 1024


class Detection(NamedTuple):
    """The model's verdict on the window that ends at ``timestamp``.

    A named tuple rather than a frozen dataclass: one is built per sample on the hot path,
    and a tuple is several times cheaper to create while just as immutable.

    ``values`` are that last sample's feature values after forward-filling, ``score`` the raw
    model score, ``threshold`` the bundle's calibrated raw-score threshold; ``anomaly_score``
    (``[0, 1]``, 0.5 at the decision boundary), ``is_anomaly`` and ``tail_probability`` come
    from the bundle's streaming score pipeline (:mod:`shared.score_pipeline`).
    """

    timestamp: str
    values: tuple[float, ...]
    score: float
    anomaly_score: float
    threshold: float
    is_anomaly: bool
    model_version: int
    slot: str
    tail_probability: float = 1.0


@dataclass(frozen=True)
class DetectorStats:
    """Counters since the detector was created.

    ``inferences`` scored windows, ``anomalies`` among them, ``errors`` failed inferences,
    ``skipped`` samples dropped because a feature had never had a value, ``filled`` feature
    values forward-filled; latency percentiles (ms) are over the last ``latency_samples``
    inferences (``None`` before the first).
    """

    inferences: int
    anomalies: int
    errors: int
    skipped: int
    filled: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_samples: int


class Detector:
    """Feeds samples through a ring buffer into a runtime, and its scores through the bundle's
    streaming score pipeline (one pipeline state per detector: per slot, per series).

    The ring buffer is a preallocated ``(2 * window, features)`` float32 array where every
    sample is written twice (at ``i`` and ``i + window``), so the last ``window`` samples are
    always one contiguous slice: each :meth:`push` writes in place, takes a view and calls
    ``runtime.score_one`` — no per-sample allocation but the returned :class:`Detection`.

    Missing values (``None``, NaN or ±inf) are forward-filled per feature from the previous
    sample; while a feature has never had a finite value, samples are skipped (not buffered).

    Not thread safe: one thread pushes (the stats may be read from anywhere; they are a
    snapshot of plain counters). :meth:`score_windows` may be called from any thread: the
    runtime is shared under a lock with :meth:`push`, and the streaming state is not touched.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        spec: BundleSpec,
        *,
        model_version: int,
        slot: str = "default",
        latency_samples: int = DEFAULT_LATENCY_SAMPLES,
        observe_latency: Callable[[float], None] | None = None,
    ) -> None:
        self._runtime = runtime
        self._runtime_lock = threading.Lock()  # runtimes are not safe for concurrent calls
        self._observe_latency = observe_latency  # seconds of each inference (e.g. a histogram)
        self._spec = spec
        self._scorer = spec.score.scorer()
        self._threshold = float(spec.score.threshold)
        self.model_version = int(model_version)
        self.slot = slot
        self._window = int(spec.window)
        self._nfeat = len(spec.features)
        self._ring = np.zeros((2 * self._window, self._nfeat), np.float32)
        self._last = np.full(self._nfeat, np.nan, np.float64)
        self._pos = 0  # next write index in [0, window)
        self._count = 0  # samples buffered, saturates at window
        self._inferences = self._anomalies = self._errors = self._skipped = self._filled = 0
        self._latency_ns: deque[int] = deque(maxlen=latency_samples)

    @property
    def spec(self) -> BundleSpec:
        """The bundle spec this detector scores with."""
        return self._spec

    def push(self, timestamp: str, values: Sequence[float | None]) -> Detection | None:
        """Add one sample; return the detection for the window ending here, if full.

        Returns ``None`` while fewer than ``window`` samples are buffered, or when the sample
        is skipped (a feature that never had a value). Raises ``ValueError`` when ``values``
        does not have one entry per feature, and :class:`ModelRuntimeError` (counted in
        ``errors``) when inference fails.
        """
        if len(values) != self._nfeat:
            raise ValueError(f"expected {self._nfeat} values ({', '.join(self._spec.features)}), got {len(values)}")
        last = self._last
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                if math.isnan(last[i]):
                    self._skipped += 1
                    return None
                self._filled += 1
            else:
                last[i] = v
        pos, w = self._pos, self._window
        self._ring[pos] = last
        self._ring[pos + w] = last
        self._pos = pos + 1 if pos + 1 < w else 0
        if self._count < w:
            self._count += 1
            if self._count < w:
                return None
        window = self._ring[self._pos:self._pos + w]
        with self._runtime_lock:
            t0 = time.perf_counter_ns()
            try:
                score = self._runtime.score_one(window)
            except Exception:
                self._errors += 1
                raise
            elapsed = time.perf_counter_ns() - t0
        self._latency_ns.append(elapsed)
        if self._observe_latency is not None:
            self._observe_latency(elapsed / 1e9)
        self._inferences += 1
        # the range check judges the values as the model reads them (float32, as the trainer
        # measured the training range): a float64 source and a CSV backtest decide alike
        step = self._scorer.push(score, self._ring[pos].tolist())
        if step.is_anomaly:
            self._anomalies += 1
        return Detection(
            timestamp=timestamp,
            values=tuple(last.tolist()),
            score=score,
            anomaly_score=step.anomaly_score,
            threshold=self._threshold,
            is_anomaly=step.is_anomaly,
            model_version=self.model_version,
            slot=self.slot,
            tail_probability=step.tail_probability,
        )

    def score_windows(self, windows: np.ndarray) -> np.ndarray:
        """Raw scores of ad-hoc ``(n, window, features)`` windows in one runtime call.

        Thread safe. Touches neither the ring buffer, the score pipeline's state nor the
        counters: the streaming detections are exactly what they would have been without it.
        Raises :class:`ModelRuntimeError` on a wrong shape or a failed inference.
        """
        with self._runtime_lock:
            return self._runtime.score(windows)

    def last_window(self) -> np.ndarray:
        """A copy of the newest full window, ``(window, features)`` float32: right after
        :meth:`push` returned a detection, the input that detection scored."""
        return self._ring[self._pos:self._pos + self._window].copy()

    def restart_window(self) -> None:
        """Forget the buffered samples: the next ``window`` samples refill the ring before the
        next detection, and no value from before is forward-filled into them.

        For samples that do not continue the buffered ones (a gap in time). The score
        pipeline's state and the counters stay.
        """
        self._pos = 0
        self._count = 0
        self._last.fill(np.nan)

    @property
    def errors(self) -> int:
        """Failed inferences so far (as in :meth:`stats`, without computing percentiles)."""
        return self._errors

    def count_error(self) -> None:
        """Count a failure of this detector's inference path that :meth:`push` did not count
        itself (it counts only the runtime's), so that ``errors`` has every failed sample."""
        self._errors += 1

    def stats(self) -> DetectorStats:
        """A snapshot of the counters and latency percentiles."""
        lat = sorted(self._latency_ns)
        return DetectorStats(
            inferences=self._inferences,
            anomalies=self._anomalies,
            errors=self._errors,
            skipped=self._skipped,
            filled=self._filled,
            latency_p50_ms=_percentile(lat, 50) / 1e6 if lat else None,
            latency_p99_ms=_percentile(lat, 99) / 1e6 if lat else None,
            latency_samples=len(lat),
        )


def _percentile(ordered: Sequence[int], q: float) -> float:
    """``numpy.percentile(ordered, q)`` (linear interpolation) of a sorted, non-empty sequence.

    Plain Python: numpy's percentile imports ``numpy.ma`` (about 2 MiB resident in the agent).
    """
    k = (len(ordered) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def detect_series(
    runtime: ModelRuntime,
    spec: BundleSpec,
    timestamps: Sequence[str],
    values_2d: Sequence[Sequence[float | None]] | np.ndarray,
    *,
    model_version: int = 0,
    slot: str = "default",
) -> list[Detection]:
    """Backtest: push every row of ``values_2d`` (samples × features) through a fresh
    :class:`Detector` and return the detections, exactly as the live agent would emit them.

    Raises ``ValueError`` when the lengths differ, plus whatever :meth:`Detector.push` raises.
    """
    if len(timestamps) != len(values_2d):
        raise ValueError(f"{len(timestamps)} timestamps but {len(values_2d)} rows of values")
    det = Detector(runtime, spec, model_version=model_version, slot=slot)
    out: list[Detection] = []
    for ts, row in zip(timestamps, values_2d, strict=True):
        d = det.push(ts, row)
        if d is not None:
            out.append(d)
    return out
