"""The local API's predict contract without HTTP: request parsing, stateless decisions, and a
streaming detector that ad-hoc scoring leaves exactly as it was (real onnxruntime)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_detector import W, _msq, _setup

from edge_agent.api import PredictError, parse_windows
from edge_agent.detector import Detector
from shared.score_pipeline import (
    FixedThresholdPipeline,
    FixedThresholdScorer,
    LikelihoodPipeline,
    reference_steps,
)

# -- ad-hoc scoring leaves the stream alone -------------------------------------------------------


def test_score_windows_batches_and_does_not_touch_the_streaming_state() -> None:
    rng = np.random.default_rng(0)
    series = rng.normal(0, 1, size=200).tolist()
    rt, spec = _setup()
    plain = Detector(rt, spec, model_version=1)
    rt2, _ = _setup()
    durations: list[float] = []
    probed = Detector(rt2, spec, model_version=1, observe_latency=durations.append)
    a, b = [], []
    for i, v in enumerate(series):
        a.append(plain.push(str(i), [v]))
        if i % 7 == 0:
            windows = rng.normal(0, 3, size=(5, W, 1)).astype(np.float32)
            got = probed.score_windows(windows)
            np.testing.assert_allclose(got, [_msq(w.ravel().tolist()) for w in windows], rtol=1e-6)
        b.append(probed.push(str(i), [v]))
    assert a == b  # same detections, same pipeline decisions
    assert plain.stats().inferences == probed.stats().inferences == len(series) - W + 1
    assert len(durations) == probed.stats().inferences and all(d > 0 for d in durations)


# -- stateless decisions ----------------------------------------------------------------------------


def test_reference_steps_against_the_calibrated_prior() -> None:
    prior = tuple(float(v) for v in np.random.default_rng(1).normal(10.0, 2.0, size=400))
    pipeline = LikelihoodPipeline(min_history=288, prior=prior, false_alarm_rate=1e-5)
    mu, sigma = float(np.mean(prior)), float(np.std(prior))
    reference, steps = reference_steps(pipeline, [mu, mu + 10 * sigma, float("nan"), mu - 5 * sigma],
                                       threshold=20.0, center=math.log(20.0), width=1.0)
    assert reference == "prior"
    assert steps[0].tail_probability == pytest.approx(0.5) and not steps[0].is_anomaly
    assert steps[1].is_anomaly and steps[1].anomaly_score >= 0.5
    assert steps[2] == (1.0, 0.0, False)
    assert not steps[3].is_anomaly and steps[3].anomaly_score < 1e-6  # a low error is no anomaly
    # the same scores again: no state, the same answers
    assert reference_steps(pipeline, [mu, mu + 10 * sigma], threshold=20.0, center=math.log(20.0),
                           width=1.0)[1] == steps[:2]


def test_reference_steps_fall_back_to_the_calibrated_threshold() -> None:
    scores = [1.0, 19.9, 20.1, 500.0]
    for pipeline in (FixedThresholdPipeline(), LikelihoodPipeline(prior=(1.0,) * 10)):  # prior too short
        reference, steps = reference_steps(pipeline, scores, threshold=20.0, center=math.log(20.0), width=1.0)
        fixed = FixedThresholdScorer(20.0, math.log(20.0), 1.0)
        assert reference == "threshold" and steps == [fixed.push(s) for s in scores]
        assert [s.is_anomaly for s in steps] == [False, False, True, True]


# -- request parsing ----------------------------------------------------------------------------------


def _parse(doc: object, window: int = 3, features: int = 2) -> np.ndarray:
    return parse_windows(json.dumps(doc).encode(), window=window, features=features, max_windows=4)


def test_parse_windows_takes_exactly_n_by_window_by_features_numbers() -> None:
    w = [[1, 2.5], [3, 4], [5, 6]]
    arr = _parse({"windows": [w, w]})
    assert arr.dtype == np.float32 and arr.shape == (2, 3, 2) and arr[0, 0, 1] == 2.5


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", 'one key, "windows"'),
        (b'{"windows": [], "x": 1}', 'one key, "windows"'),
        (b'{"windows": []}', "non-empty list"),
        (b'{"windows": [[[1, 2], [3, 4]]]}', "window 0 must be a list of 3 rows"),
        (b'{"windows": [[[1, 2], [3, 4], [5]]]}', "window 0 row 2 must be a list of 2 numbers"),
        (b'{"windows": [[[1, 2], [3, 4], [5, true]]]}', "holds true"),
        (b'{"windows": [[[1, 2], [3, 4], [5, "6"]]]}', 'holds "6"'),
        (b'{"windows": [[[1, 2], [3, 4], [5, null]]]}', "holds null"),
        (b'{"windows": [[[1, 2], [3, 4], [5, NaN]]]}', "NaN is not a number"),
        (b'{"windows": [[[1, 2], [3, 4], [5, -Infinity]]]}', "-Infinity is not a number"),
        (b'{"windows": [[[1, 2], [3, 4], [5, 1e300]]]}', "float32 range"),
        (b'{"windows": [' + b",".join([b"[[1,2],[3,4],[5,6]]"] * 5) + b"]}", "at most 4"),
        (b"[" * 100000 + b"]" * 100000, "not JSON"),
    ],
)
def test_parse_windows_refuses_with_400(body: bytes, needle: str) -> None:
    with pytest.raises(PredictError) as e:
        parse_windows(body, window=3, features=2, max_windows=4)
    assert e.value.status == 400 and needle in str(e.value) and "\n" not in str(e.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(doc=_json)
def test_parse_windows_answers_any_json_with_windows_or_a_400(doc: object) -> None:
    try:
        arr = parse_windows(json.dumps(doc).encode(), window=2, features=1, max_windows=3)
    except PredictError as e:
        assert e.status == 400
    else:
        assert arr.shape[1:] == (2, 1) and 1 <= arr.shape[0] <= 3 and np.isfinite(arr).all()
