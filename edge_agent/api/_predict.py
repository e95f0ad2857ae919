"""``POST /v1/slots/{slot}/predict``: ad-hoc windows scored by a slot's active model.

The contract (also in docs/operations.md):

- **Input**: ``{"windows": [W1, W2, ...]}``, each window ``window`` rows (oldest first) of
  ``len(features)`` finite JSON numbers in the model's feature order — the shape and order
  ``GET /v1/slots/{slot}`` reports. Anything else (another key, a string, ``true``, ``null``, a
  ragged or wrongly sized window, too many windows) is refused with 400 and a JSON error; the
  model is not run.
- **Score**: all windows go to the slot's runtime in one ``score`` call, the same runtime
  object (and so the same bytes, backend and quantization) the streaming detector uses;
  ``score`` is the raw model score, exactly what the stream would have computed for that
  window.
- **Decision**: each window is judged on its own, statelessly, against the bundle's
  calibrated reference (:func:`shared.score_pipeline.reference_steps`): ``tail_probability``,
  ``anomaly_score`` (0.5 at the boundary) and ``is_anomaly``, with ``reference`` saying which
  reference decided (``prior``: the model's validation errors; ``threshold``: the calibrated
  raw-score threshold). With score kind ``edgefleet.likelihood/6`` a window whose newest row
  lies beyond the model's training range by more than the tolerance alarms too, under either
  reference. It is *not* what the streaming detector would report for the same window at this
  moment: that decision depends on the series' recent history, smoothing and hysteresis. Nothing of the streaming detector changes — its window, its score pipeline's
  history and its counters (health ``inferences`` counts streamed windows only).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from edge_agent.activation import ActiveRecord
from edge_agent.detector import Detector
from edge_agent.runtime import ModelRuntimeError
from shared.score_pipeline import reference_steps

__all__ = ["PredictError", "model_description", "parse_windows", "predict"]


class PredictError(ValueError):
    """A request the API refuses; ``status`` is the HTTP status (4xx) to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> float:
    raise PredictError(400, f"{name} is not a number: windows hold finite numbers only")


def parse_windows(body: bytes, *, window: int, features: int, max_windows: int) -> np.ndarray:
    """The windows of a predict request as float32 ``(n, window, features)``.

    Raises:
        PredictError: 400 for anything but ``{"windows": [...]}`` of 1 to ``max_windows``
            windows of ``window`` × ``features`` finite numbers (JSON booleans are not numbers).
    """
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except PredictError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise PredictError(400, f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"windows"}:
        raise PredictError(400, 'the body must be an object with one key, "windows"')
    windows = doc["windows"]
    if not isinstance(windows, list) or not windows:
        raise PredictError(400, '"windows" must be a non-empty list of windows')
    if len(windows) > max_windows:
        raise PredictError(400, f"{len(windows)} windows in one request; at most {max_windows}")
    arr = _all_numbers(body, windows, window=window, features=features)
    if arr is None:  # something is wrong: find it, and say where
        arr = _checked(windows, window=window, features=features)
    if (np.abs(arr) > np.finfo(np.float32).max).any():
        raise PredictError(400, "a value is beyond the float32 range the model takes")
    return arr.astype(np.float32)


def _all_numbers(body: bytes, windows: list, *, window: int, features: int) -> np.ndarray | None:
    """The windows as float64 when the request is well formed, checked in numpy; ``None`` when
    anything may be wrong (then :func:`_checked` walks it value by value for the error).

    numpy converts JSON booleans and numeric strings to numbers without complaint, so this fast
    path is taken only when the body holds no ``true``/``false``/``null`` literal and exactly
    one string (the ``"windows"`` key): every leaf is then a JSON number.
    """
    if body.count(b'"') != 2 or b"true" in body or b"false" in body or b"null" in body:
        return None
    try:
        arr = np.asarray(windows, np.float64)
    except (ValueError, TypeError, OverflowError):  # ragged, or too deep / too large
        return None
    if arr.shape != (len(windows), window, features) or not np.isfinite(arr).all():
        return None
    return arr


def _checked(windows: list, *, window: int, features: int) -> np.ndarray:
    for i, w in enumerate(windows):
        if not isinstance(w, list) or len(w) != window:
            raise PredictError(400, f"window {i} must be a list of {window} rows (the model's window)")
        for j, row in enumerate(w):
            if not isinstance(row, list) or len(row) != features:
                raise PredictError(400, f"window {i} row {j} must be a list of {features} numbers "
                                        "(one per feature)")
            for v in row:
                # type() rather than isinstance(): JSON true/false are bools, a subclass of int
                if (type(v) is not float and type(v) is not int) or not math.isfinite(v):
                    raise PredictError(400, f"window {i} row {j} holds {json.dumps(v)}: "
                                            "windows hold finite numbers only")
    try:
        return np.asarray(windows, np.float64)
    except OverflowError:  # an integer beyond float64
        raise PredictError(400, "a value is beyond the float32 range the model takes") from None


def model_description(slot: str, detector: Detector, record: ActiveRecord) -> dict[str, Any]:
    """What a client needs to build windows for the slot's model (``GET /v1/slots/{slot}``)."""
    spec = detector.spec
    return {
        "slot": slot, "model": record.model, "version": record.version, "format": record.format,
        "quantization": record.quantization, "window": spec.window, "features": list(spec.features),
        "threshold": spec.score.threshold, "pipeline": spec.score.pipeline.kind,
    }


def predict(slot: str, detector: Detector, record: ActiveRecord, body: bytes, *,
            max_windows: int) -> dict[str, Any]:
    """Score and judge the request's windows (see the module docstring for the contract).

    Raises:
        PredictError: 400 for a malformed request, 500 if the runtime fails on valid input
            (reported as JSON with the runtime's one-line reason).
    """
    spec = detector.spec
    windows = parse_windows(body, window=spec.window, features=len(spec.features), max_windows=max_windows)
    try:
        scores = detector.score_windows(windows)
    except ModelRuntimeError as e:
        raise PredictError(500, f"inference failed: {e}") from e
    s = spec.score
    reference, steps = reference_steps(s.pipeline, [float(x) for x in scores],
                                       threshold=s.threshold, center=s.center, width=s.width,
                                       rows=windows[:, -1, :].astype(np.float64).tolist())
    return {
        **model_description(slot, detector, record),
        "reference": reference,
        "results": [
            {"score": float(score) if math.isfinite(score) else None, "anomaly_score": step.anomaly_score,
             "tail_probability": step.tail_probability, "is_anomaly": step.is_anomaly}
            for score, step in zip(scores, steps, strict=True)
        ],
    }
