"""Shadow mode: a candidate model scored beside a slot's serving model, emitting nothing.

The agent feeds a slot's shadow :class:`~edge_agent.detector.Detector` the very samples its
serving detector gets; :class:`ShadowComparison` keeps what a user needs to judge the
candidate before switching to it, since the shadow was installed, in O(1) memory and time per
sample: how many samples both models scored, how often their decisions agree (and the alarms
only one of them raised), and the Pearson correlation of their raw scores.

Pure arithmetic, no I/O; importing this module has no side effects.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from edge_agent.activation import ActiveRecord
from edge_agent.detector import Detection, Detector

__all__ = ["ShadowComparison", "ShadowModel"]


class ShadowComparison:
    """Decision agreement and score correlation of two models over the same samples.

    The correlation is updated with Welford's co-moment recurrence (means and centred sums of
    squares and products) rather than raw sums of ``x``, ``x²`` and ``xy``: the same O(1)
    running state, without the cancellation raw sums suffer once scores are large or nearly
    constant. Hand-written because it is six lines and no library the agent already depends on
    offers a streaming correlation (numpy's ``corrcoef`` needs the whole series).

    Thread safe: the serving thread calls :meth:`add`, the health reporter :meth:`to_json`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples = 0
        self.agree = 0
        self.active_only = 0
        self.shadow_only = 0
        self._paired = 0  # samples with two finite scores: the correlation's n
        self._mean_x = self._mean_y = 0.0
        self._m2_x = self._m2_y = self._c_xy = 0.0

    def add(self, active: Detection, shadow: Detection) -> None:
        """Count one sample both models scored (``active`` serves, ``shadow`` is compared)."""
        x, y = float(active.score), float(shadow.score)
        with self._lock:
            self.samples += 1
            if active.is_anomaly == shadow.is_anomaly:
                self.agree += 1
            elif active.is_anomaly:
                self.active_only += 1
            else:
                self.shadow_only += 1
            if not (math.isfinite(x) and math.isfinite(y)):
                return  # a non-finite score counts for the decisions, not the correlation
            self._paired += 1
            n = self._paired
            dx, dy = x - self._mean_x, y - self._mean_y
            self._mean_x += dx / n
            self._mean_y += dy / n
            self._m2_x += dx * (x - self._mean_x)
            self._m2_y += dy * (y - self._mean_y)
            self._c_xy += dx * (y - self._mean_y)

    def agreement(self) -> float | None:
        """The fraction of compared samples whose decisions agree; ``None`` before the first."""
        with self._lock:
            return self.agree / self.samples if self.samples else None

    def correlation(self) -> float | None:
        """Pearson's r of the two raw scores; ``None`` before two samples or when either
        model's score has not varied (the correlation is undefined then)."""
        with self._lock:
            if self._paired < 2 or self._m2_x <= 0.0 or self._m2_y <= 0.0:
                return None
            r = self._c_xy / math.sqrt(self._m2_x * self._m2_y)
        return max(-1.0, min(1.0, r))

    def counts(self) -> dict[str, int]:
        """``samples``, ``agree``, ``active_only`` and ``shadow_only`` as one snapshot."""
        with self._lock:
            return {"samples": self.samples, "agree": self.agree,
                    "active_only": self.active_only, "shadow_only": self.shadow_only}


@dataclass
class ShadowModel:
    """A slot's shadow: its detector (fed what the serving detector is fed, never emitting),
    the record of what it runs and the comparison since it was installed."""

    record: ActiveRecord
    detector: Detector
    comparison: ShadowComparison

    def to_json(self) -> dict[str, Any]:
        """The slot's entry in health ``shadow`` (see :class:`~shared.messages.AgentHealth`)."""
        stats = self.detector.stats()
        counts = self.comparison.counts()
        return {
            "model": self.record.model,
            "version": self.record.version,
            "state": "active",
            "samples": counts["samples"],
            "agreement": self.comparison.agreement(),
            "active_only": counts["active_only"],
            "shadow_only": counts["shadow_only"],
            "correlation": self.comparison.correlation(),
            "errors": stats.errors,
            "latency_ms": {"p50": stats.latency_p50_ms, "p99": stats.latency_p99_ms},
        }
