"""The streaming detector over a real ONNX model (built with onnx.helper)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from edge_agent.detector import Detection, Detector, detect_series
from edge_agent.runtime import open_runtime
from shared.bundle import BundleSpec, GoldenVectors, ScoreSpec, TensorSpec, anomaly_score

W = 4


def _model(features: int) -> bytes:
    """score = mean(x^2) over the window and features."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["x2"]),
         helper.make_node("ReduceMean", ["x2", "axes"], ["score"], keepdims=0)],
        "msq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", W, features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def _setup(features: int = 1, threshold: float = 4.0):
    spec = BundleSpec(
        name="msq", format="onnx", quantization="fp32", model_file="model.onnx",
        inputs=(TensorSpec("x", "float32", (None, W, features)),),
        outputs=(TensorSpec("score", "float32", (None,)),),
        window=W, features=tuple(f"f{i}" for i in range(features)),
        score=ScoreSpec("msq", threshold, math.log(threshold), 1.0),
        golden=GoldenVectors([[[0.0] * features] * W], [0.0], 1e-6, 1e-6),
    )
    return open_runtime(spec, _model(features)), spec


def _msq(xs: list[float]) -> float:
    return float(np.mean(np.square(np.asarray(xs, np.float32))))


def test_fills_then_one_detection_per_sample() -> None:
    rt, spec = _setup()
    det = Detector(rt, spec, model_version=7, slot="cpu")
    for i in range(W - 1):
        assert det.push(f"t{i}", [1.0]) is None
    d = det.push("t3", [1.0])
    assert isinstance(d, Detection)
    assert (d.timestamp, d.values, d.model_version, d.slot) == ("t3", (1.0,), 7, "cpu")
    assert d.score == pytest.approx(1.0)
    assert not d.is_anomaly and d.threshold == 4.0
    assert d.anomaly_score == pytest.approx(anomaly_score(1.0, spec.score))
    seq = [1.0, 1.0, 1.0, 1.0, 10.0, 0.0, 0.0, 0.0, 0.0]
    scores = []
    for i, v in enumerate(seq[4:], start=4):
        d = det.push(f"t{i}", [v])
        assert d is not None and d.timestamp == f"t{i}"
        scores.append(d.score)
    # the window slides in order: [1,1,1,10], [1,1,10,0], [1,10,0,0], [10,0,0,0], [0,0,0,0]
    expected = [_msq(seq[i - W + 1:i + 1]) for i in range(4, len(seq))]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    st = det.stats()
    assert st.inferences == 6 and st.anomalies == 4 and st.errors == 0
    assert st.latency_samples == 6 and 0 < st.latency_p50_ms <= st.latency_p99_ms


def test_forward_fill_and_leading_missing_skipped() -> None:
    rt, spec = _setup(features=2)
    det = Detector(rt, spec, model_version=1)
    assert det.push("a", [None, 1.0]) is None  # f0 never seen: skipped, not buffered
    assert det.push("b", [float("nan"), 1.0]) is None
    assert det.stats().skipped == 2
    for ts in "cde":
        assert det.push(ts, [2.0, 1.0]) is None
    d = det.push("f", [None, float("nan")])  # both filled from "e"
    assert d is not None and d.values == (2.0, 1.0)
    assert d.score == pytest.approx(_msq([2.0, 1.0] * W))
    assert det.stats().filled == 2
    with pytest.raises(ValueError, match="expected 2 values"):
        det.push("g", [1.0])


def test_restart_window_refills_before_the_next_detection() -> None:
    rt, spec = _setup(features=2)
    det = Detector(rt, spec, model_version=1)
    for i in range(W):
        det.push(f"a{i}", [10.0, 10.0])
    det.restart_window()
    assert det.push("b0", [None, 1.0]) is None  # nothing from before is forward-filled
    assert det.stats().skipped == 1
    for i in range(1, W):
        assert det.push(f"b{i}", [1.0, 1.0]) is None
    d = det.push(f"b{W}", [1.0, 1.0])
    assert d is not None and d.score == pytest.approx(1.0)  # no sample from before the restart
    assert det.stats().inferences == 2  # the counters carry on


def test_detect_series_equals_push_loop() -> None:
    rt, spec = _setup(features=2)
    rng = np.random.default_rng(3)
    values = rng.normal(0, 2, (50, 2))
    values[[0, 7, 20], 0] = np.nan
    ts = [f"2024-01-01T00:00:{i:02d}Z" for i in range(50)]
    series = detect_series(rt, spec, ts, values, model_version=2, slot="s")
    det = Detector(rt, spec, model_version=2, slot="s")
    loop = [d for t, row in zip(ts, values, strict=True) if (d := det.push(t, list(row))) is not None]
    assert series == loop
    assert len(series) == 50 - 1 - (W - 1)  # first row skipped (NaN), then the window fills
    assert any(d.is_anomaly for d in series) and not all(d.is_anomaly for d in series)
    with pytest.raises(ValueError):
        detect_series(rt, spec, ts[:3], values)


def test_counters_and_bounded_latency_window() -> None:
    rt, spec = _setup(threshold=0.5)
    det = Detector(rt, spec, model_version=1, latency_samples=8)
    assert det.stats().latency_p50_ms is None
    for i in range(30):
        det.push(str(i), [1.0 if i % 2 else 0.0])
    st = det.stats()
    assert st.inferences == 30 - (W - 1)
    assert st.anomalies == 0  # mean square of alternating 0/1 is 0.5: not above the threshold
    assert st.latency_samples == 8


def test_runtime_errors_are_counted_and_raised() -> None:
    rt, spec = _setup()
    det = Detector(rt, spec, model_version=1)
    for i in range(W - 1):
        det.push(str(i), [1.0])
    rt.close()
    with pytest.raises(RuntimeError):
        det.push("x", [1.0])
    assert det.stats().errors == 1


def test_a_failed_inference_is_one_error_in_the_agent_health(tmp_path) -> None:
    """The serving loop and the detector do not both count the same failed inference."""
    from edge_agent.config import parse_config, render_config
    from edge_agent.daemon import Agent
    from edge_agent.sources import Sample

    root = tmp_path / "root.json"
    root.write_text("{}")
    config = parse_config(render_config(agent_id="a1", group="lab", profile="x86-64-v3",
                                        broker="mqtt://127.0.0.1:1883", trust=str(root),
                                        state_dir=str(tmp_path / "state"), source="stdin"),
                          base=tmp_path)
    agent = Agent(config)
    rt, spec = _setup()
    agent._detectors["main"] = Detector(rt, spec, model_version=1, slot="main")
    samples = [Sample(str(i), {"f0": 1.0}) for i in range(W)]
    agent._serve(iter(samples[:-1]))
    rt.close()
    agent._serve(iter(samples[-1:]))
    health = agent.health(cpu_share=False)
    assert (health.inferences, health.errors) == (0, 1)


def test_a_failing_shadow_counts_its_errors_and_the_serving_model_carries_on(tmp_path) -> None:
    """Whatever the shadow's inference raises stays in the shadow's ``errors``: the serving
    model scores the sample and nothing reaches the serving loop."""
    from edge_agent.activation import ActiveRecord
    from edge_agent.config import parse_config, render_config
    from edge_agent.daemon import Agent
    from edge_agent.shadow import ShadowComparison, ShadowModel
    from edge_agent.sources import Sample

    root = tmp_path / "root.json"
    root.write_text("{}")
    config = parse_config(render_config(agent_id="a1", group="lab", profile="x86-64-v3",
                                        broker="mqtt://127.0.0.1:1883", trust=str(root),
                                        state_dir=str(tmp_path / "state"), source="stdin"),
                          base=tmp_path)
    agent = Agent(config)
    rt, spec = _setup()
    agent._detectors["main"] = Detector(rt, spec, model_version=1, slot="main")
    shadow_rt, spec_f0 = _setup()
    shadow_spec = dataclasses.replace(spec_f0, features=("g0",))
    record = ActiveRecord(model="msq", version=2, format="onnx", quantization="fp32", sha256="0" * 64,
                          target="msq-2.zip", serial=1)
    shadow = ShadowModel(record, Detector(shadow_rt, shadow_spec, model_version=2, slot="main"),
                         ShadowComparison())
    agent._shadows = {"main": shadow}
    samples = [Sample(str(i), {"f0": 1.0, "g0": 1.0}) for i in range(W)]
    agent._serve(iter(samples[:W - 1]))
    shadow_rt.close()  # the runtime fails: push counts it
    agent._serve(iter(samples[W - 1:]))
    agent._serve(iter([Sample("w", {"f0": 1.0, "g0": "bad"})]))  # fails before the runtime: counted here
    health = agent.health(cpu_share=False)
    assert (health.inferences, health.errors) == (2, 0)
    assert health.shadow is not None and health.shadow["main"]["errors"] == 2


def test_the_detector_hands_each_sample_to_the_range_check() -> None:
    from shared.score_pipeline import LikelihoodPipeline

    rt, spec = _setup()
    pipeline = LikelihoodPipeline(range_tolerance=0.05, value_range=((0.0, 1.0),))
    spec = dataclasses.replace(spec, score=dataclasses.replace(spec.score, pipeline=pipeline))
    det = Detector(rt, spec, model_version=1)
    seen = [det.push(f"t{i}", [v]) for i, v in enumerate([0.5] * W + [1.02, 1.2, 0.5])]
    # 1.02 is within 5% of the training range, 1.2 beyond it; the score stays small throughout
    assert [d.is_anomaly for d in seen[W - 1:]] == [False, False, True, False]
    assert seen[W + 1].tail_probability == 0.0 and seen[W + 1].values == (1.2,)
