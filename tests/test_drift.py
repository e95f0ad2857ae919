"""Drift detection: the reference a bundle ships, PSI and KS against scipy, the rolling monitor
(no drift on the same distribution, drift on a shifted one, hysteresis), the wire format of
drift in health and of the drift event, and the fleet view's summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from edge_agent.drift import (
    DriftMonitor,
    DriftSettings,
    DriftUnavailable,
    effective_sizes,
    ks_critical_value,
    ks_pvalue,
    ks_statistic,
    monitor_for,
    psi,
    window_for,
)
from shared.bundle import BundleSpec
from shared.drift import (
    REFERENCE_SAMPLE,
    DriftReference,
    DriftReferenceError,
    ReferenceDistribution,
    reference_distribution,
)
from shared.messages import (
    AgentHealth,
    MessageError,
    decode_agent_event,
    decode_agent_health,
    decode_drift_event,
    encode_agent_health,
    encode_drift_event,
    encode_event,
)
from trainer.cli_fleet import _drift_cell
from trainer.fleet.status import drift_summary
from trainer.pipeline import _drift_reference

# -- the reference ------------------------------------------------------------------------------


def test_reference_has_decile_bins_proportions_and_a_bounded_sorted_sample() -> None:
    values = np.random.default_rng(0).normal(10, 2, 5000)
    ref = reference_distribution(values)
    assert len(ref.edges) == 9 and len(ref.proportions) == 10
    assert all(abs(p - 0.1) < 0.002 for p in ref.proportions)
    assert len(ref.sample) == REFERENCE_SAMPLE and list(ref.sample) == sorted(ref.sample)
    # the same binning rule as the agent's: bisect_right == searchsorted(side="right")
    counts = np.bincount(np.searchsorted(ref.edges, values, side="right"), minlength=10)
    assert np.allclose(counts / len(values), ref.proportions, atol=1e-3)


def test_reference_of_ties_has_fewer_bins_and_of_few_values_keeps_them_all() -> None:
    stuck = np.array([5.0] * 95 + [7.0] * 5)
    ref = reference_distribution(stuck)
    assert ref.edges == (5.0,) and ref.proportions == (0.0, 1.0)
    few = np.array([3.0, 1.0, 2.0])
    assert reference_distribution(few).sample == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError):
        reference_distribution(np.array([1.0, math.nan]))


def test_drift_reference_of_a_training_is_deterministic_and_keeps_the_old_statistics() -> None:
    rng = np.random.default_rng(1)
    rows, scores = rng.normal(size=(3000, 2)).astype(np.float32), rng.gamma(2.0, size=400)
    a = _drift_reference(rows, ("cpu", "memory"), scores)
    b = _drift_reference(rows.copy(), ("cpu", "memory"), scores.copy())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # same bytes in spec.json
    assert {"mean", "std", "min", "max", "quantiles", "edges", "proportions", "sample"} <= set(a["features"]["cpu"])
    assert {"p01", "p50", "p99", "edges", "proportions", "sample"} <= set(a["score"])
    ref = DriftReference.from_spec(a, ("cpu", "memory"))
    assert ref is not None and [name for name, _ in ref.features] == ["cpu", "memory"]


def test_an_old_reference_gives_no_drift_and_a_malformed_one_is_an_error() -> None:
    old = {"features": {"cpu": {"mean": 1.0, "std": 0.1, "quantiles": {"p01": 0.8}}},
           "score": {"p01": 0.1, "p50": 0.2, "p99": 0.4}}
    assert DriftReference.from_spec(old, ("cpu",)) is None
    assert DriftReference.from_spec({}, ("cpu",)) is None
    good = reference_distribution(np.arange(100.0)).to_json()
    with pytest.raises(DriftReferenceError, match="cpu"):
        DriftReference.from_spec({"features": {"cpu": {**good, "proportions": [1.0]}}, "score": good}, ("cpu",))
    with pytest.raises(DriftReferenceError, match="memory"):
        DriftReference.from_spec({"features": {"cpu": good}, "score": good}, ("cpu", "memory"))


# -- the statistics against scipy --------------------------------------------------------------

DISTRIBUTIONS = {
    "same normal": (lambda r, n: r.normal(0, 1, n), lambda r, n: r.normal(0, 1, n)),
    "shifted normal": (lambda r, n: r.normal(0, 1, n), lambda r, n: r.normal(0.3, 1, n)),
    "wider normal": (lambda r, n: r.normal(0, 1, n), lambda r, n: r.normal(0, 1.5, n)),
    "gamma vs lognormal": (lambda r, n: r.gamma(2.0, 1.0, n), lambda r, n: r.lognormal(0.5, 0.6, n)),
    "discrete": (lambda r, n: r.integers(0, 5, n).astype(float), lambda r, n: r.integers(1, 6, n).astype(float)),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("n, m", [(1000, 256), (300, 256), (2000, 100)])
def test_ks_matches_scipy(name: str, n: int, m: int) -> None:
    ref_draw, live_draw = DISTRIBUTIONS[name]
    rng = np.random.default_rng(7)
    ref, live = np.sort(ref_draw(rng, m)), np.sort(live_draw(rng, n))
    expected = stats.ks_2samp(live, ref, method="asymp")
    d = ks_statistic(live, ref)
    assert d == pytest.approx(expected.statistic, abs=1e-12)
    p = ks_pvalue(d, n, m)
    # scipy's asymptotic p-value uses the one-sample distribution at n m / (n + m); Stephens'
    # correction approximates it to a few per cent
    assert p == pytest.approx(expected.pvalue, abs=0.01, rel=0.1)
    # the critical value agrees with the p-value's decision away from the boundary
    if abs(expected.pvalue - 0.05) > 0.02:
        assert (d > ks_critical_value(0.05, n, m)) == (expected.pvalue < 0.05)


def test_psi_matches_the_population_index_of_a_known_shift() -> None:
    rng = np.random.default_rng(3)
    ref = reference_distribution(rng.normal(0, 1, 200_000))
    edges = np.array(ref.edges)
    for shift in (0.0, 0.25, 0.5, 1.0):
        live = rng.normal(shift, 1, 200_000)
        shares = np.bincount(np.searchsorted(edges, live, side="right"), minlength=len(edges) + 1) / len(live)
        # the population value: bin shares from the normal CDFs at the same edges
        cdf = np.concatenate([[0.0], stats.norm.cdf(edges, loc=shift), [1.0]])
        cdf0 = np.concatenate([[0.0], stats.norm.cdf(edges), [1.0]])
        a, e = np.diff(cdf), np.diff(cdf0)
        population = float(np.sum((a - e) * np.log(a / e)))
        assert psi(np.array(ref.proportions), shares) == pytest.approx(population, abs=0.01)
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    assert math.isfinite(psi(np.array([0.5, 0.5]), np.array([1.0, 0.0])))  # an empty bin


# -- the monitor ---------------------------------------------------------------------------------


def _monitor(rng: np.random.Generator, window: int = 500) -> DriftMonitor:
    rows = rng.normal([10.0, 50.0], [2.0, 5.0], size=(20_000, 2))
    scores = rng.gamma(2.0, 0.1, 2000)
    reference = DriftReference.from_spec(_drift_reference(rows, ("cpu", "memory"), scores), ("cpu", "memory"))
    assert reference is not None
    return DriftMonitor(reference, DriftSettings(window=window), slot="default", model="host", model_version=3)


def _feed(monitor: DriftMonitor, rng: np.random.Generator, count: int, *, cpu_shift: float = 0.0,
          score_scale: float = 0.1) -> None:
    for i in range(count):
        cpu, memory = rng.normal([10.0 + cpu_shift, 50.0], [2.0, 5.0])
        monitor.observe(f"t{i}", (float(cpu), float(memory)), float(rng.gamma(2.0, score_scale)))


def test_no_drift_on_the_same_distribution() -> None:
    rng = np.random.default_rng(11)
    monitor = _monitor(rng)
    report = monitor.assess()
    assert (report.fill, report.drifted, report.score["psi"]) == (0, False, None)
    _feed(monitor, rng, 200)
    report = monitor.assess()
    assert (report.fill, report.window, report.drifted) == (200, 500, False)
    for _ in range(6):  # the window turns over several times
        _feed(monitor, rng, 500)
        report = monitor.assess()
        assert report.fill == 500 and not report.drifted and not report.raised
        assert max(f["psi"] for f in [*report.features.values(), report.score]) < 0.1


def test_drift_on_a_shifted_input_is_raised_once_and_clears_with_hysteresis() -> None:
    rng = np.random.default_rng(12)
    monitor = _monitor(rng)
    _feed(monitor, rng, 500)
    assert not monitor.assess().drifted

    _feed(monitor, rng, 500, cpu_shift=4.0)  # two standard deviations: a new level
    report = monitor.assess()
    assert report.drifted and report.raised
    assert report.features["cpu"]["drifted"] and not report.features["memory"]["drifted"]
    assert report.features["cpu"]["psi"] >= 0.25 and report.features["cpu"]["ks_pvalue"] < 0.05
    assert report.timestamp == "t499"
    _feed(monitor, rng, 100, cpu_shift=4.0)
    again = monitor.assess()
    assert again.drifted and not again.raised  # raised once, not at every assessment

    # partly back: between the clear and raise bounds, the state holds
    _feed(monitor, rng, 500, cpu_shift=0.9)
    middle = monitor.assess()
    assert 0.1 <= middle.features["cpu"]["psi"] < 0.25
    assert middle.drifted and not middle.raised

    _feed(monitor, rng, 500)  # back to normal: clears
    cleared = monitor.assess()
    assert not cleared.drifted and not cleared.raised

    _feed(monitor, rng, 500, score_scale=0.3)  # the score shifts: raised again
    report = monitor.assess()
    assert report.drifted and report.raised and report.score["drifted"]


def test_an_assessment_is_reused_until_a_tenth_of_a_window_arrived() -> None:
    rng = np.random.default_rng(14)
    monitor = _monitor(rng)  # window 500: recomputed every 50 samples
    _feed(monitor, rng, 500)
    first = monitor.assess()
    assert first.fill == 500 and first.timestamp == "t499"
    _feed(monitor, rng, 49, cpu_shift=4.0)
    assert monitor.assess() is first  # the cached report, nothing recomputed
    _feed(monitor, rng, 1, cpu_shift=4.0)
    again = monitor.assess()
    assert again is not first and again.timestamp == "t0"  # the newest of the 50 fed last
    assert again.features["cpu"]["psi"] > first.features["cpu"]["psi"]


def test_a_raise_is_reported_once_even_from_the_cache() -> None:
    rng = np.random.default_rng(15)
    monitor = _monitor(rng, window=200)
    _feed(monitor, rng, 200, cpu_shift=5.0)
    assert monitor.assess().raised
    cached = monitor.assess()
    assert cached.drifted and not cached.raised


def test_the_window_is_in_arrival_order_once_the_ring_wraps() -> None:
    rng = np.random.default_rng(16)
    monitor = _monitor(rng, window=100)
    for i in range(250):
        monitor.observe(f"t{i}", (10.0 + 0.01 * i, 50.0), 0.2)
    report = monitor.assess()
    assert (report.fill, report.timestamp) == (100, "t249")
    monitor.observe("late", (10.0, 50.0), float("nan"))  # a non-finite score is ignored
    assert monitor._count == 250


def test_observing_while_assessing_from_another_thread_is_safe() -> None:
    import threading

    rng = np.random.default_rng(17)
    monitor = _monitor(rng, window=100)
    values = [(float(c), float(m)) for c, m in rng.normal([10.0, 50.0], [2.0, 5.0], size=(20_000, 2))]
    done = threading.Event()
    reports = []

    def read() -> None:
        while not done.is_set():
            reports.append(monitor.assess())

    reader = threading.Thread(target=read)
    reader.start()
    for i, v in enumerate(values):
        monitor.observe(f"t{i}", v, 0.2)
    done.set()
    reader.join(timeout=60)
    assert not reader.is_alive() and reports
    assert all(0 <= r.fill <= 100 for r in reports)
    seen = [int(r.timestamp[1:]) for r in reports if r.timestamp is not None]
    assert seen == sorted(seen)  # never an older window after a newer one
    assert monitor.assess().timestamp == f"t{len(values) - 1}"


def test_effective_size_shrinks_with_autocorrelation() -> None:
    rng = np.random.default_rng(18)
    n, phi = 5000, 0.9
    noise = rng.normal(size=n)
    ar = np.empty(n)
    ar[0] = noise[0]
    for t in range(1, n):
        ar[t] = phi * ar[t - 1] + noise[t]
    x = np.column_stack([rng.normal(size=n), ar, np.full(n, 3.0), np.tile([1.0, -1.0], n // 2)])
    iid, correlated, constant, alternating = effective_sizes(x)
    assert iid == pytest.approx(n, rel=0.1)
    assert correlated == pytest.approx(n * (1 - phi) / (1 + phi), rel=0.25)
    assert (constant, alternating) == (n, n)  # no autocorrelation; clipped to [1, n]
    assert effective_sizes(np.full((100, 1), 0.2)).tolist() == [100.0]  # rounding is no correlation
    assert effective_sizes(x[:2]).tolist() == [2.0] * 4


def test_an_autocorrelated_window_gets_a_larger_ks_pvalue_than_independent_samples_would() -> None:
    rng = np.random.default_rng(19)
    monitor = _monitor(rng)
    cpu = 10.0
    for i in range(500):  # a slowly wandering cpu around its usual level: strongly autocorrelated
        cpu = 10.0 + 0.95 * (cpu - 10.0) + rng.normal(0.0, 2.0 * math.sqrt(1 - 0.95**2))
        monitor.observe(f"t{i}", (cpu, float(rng.normal(50.0, 5.0))), 0.2)
    figures = monitor.assess().features["cpu"]
    rows = 20_000  # the reference's training rows, shipped in the bundle
    assert figures["ks_pvalue"] > ks_pvalue(figures["ks"], 500, rows)


def test_a_stuck_metric_away_from_its_reference_drifts() -> None:
    rng = np.random.default_rng(21)
    monitor = _monitor(rng, window=200)
    for i in range(200):
        monitor.observe(f"t{i}", (20.0, float(rng.normal(50.0, 5.0))), float(rng.gamma(2.0, 0.1)))
    report = monitor.assess()
    assert report.raised and report.features["cpu"]["drifted"]


def test_the_window_is_rounded_up_to_whole_seasons() -> None:
    assert (window_for(1000, 0), window_for(1000, 288), window_for(1152, 288), window_for(100, 288)) == (
        1000, 1152, 1152, 288)
    rng = np.random.default_rng(20)
    rows = rng.normal([10.0, 50.0], [2.0, 5.0], size=(2000, 2))
    spec = BundleSpec.from_json({
        "schema": "edgefleet.bundle/1", "name": "host", "format": "onnx", "quantization": "fp32",
        "model_file": "model.onnx", "window": 4, "features": ["cpu", "memory"],
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4, 2], "quantization": None}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1], "quantization": None}],
        "score": {"kind": "forecast_mae", "threshold": 1.0, "scale": {"center": 0.0, "width": 1.0}},
        "golden": {"inputs": [[[[0.0, 0.0]] * 4]], "outputs": [0.0], "atol": 1e-4, "rtol": 1e-3},
        "drift_reference": _drift_reference(rows, ("cpu", "memory"), rng.gamma(2.0, 0.1, 500)),
        "architecture": {"family": "mlp", "season": 288},
    })
    monitor = monitor_for(spec, DriftSettings(window=1000), slot="default", model="host", model_version=1)
    assert isinstance(monitor, DriftMonitor) and monitor.assess().window == 1152
    plain = BundleSpec.from_json({**spec.to_json(), "architecture": {"family": "mlp"}})
    monitor = monitor_for(plain, DriftSettings(window=1000), slot="default", model="host", model_version=1)
    assert isinstance(monitor, DriftMonitor) and monitor.assess().window == 1000


def test_a_bundle_without_bins_has_no_monitor_and_says_why() -> None:
    spec = BundleSpec.from_json({
        "schema": "edgefleet.bundle/1", "name": "host", "format": "onnx", "quantization": "fp32",
        "model_file": "model.onnx", "window": 4, "features": ["cpu"],
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4, 1], "quantization": None}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1], "quantization": None}],
        "score": {"kind": "forecast_mae", "threshold": 1.0, "scale": {"center": 0.0, "width": 1.0}},
        "golden": {"inputs": [[[[0.0]] * 4]], "outputs": [0.0], "atol": 1e-4, "rtol": 1e-3},
        "drift_reference": {"features": {"cpu": {"mean": 1.0}}, "score": {"p50": 0.1}},
    })
    got = monitor_for(spec, DriftSettings(), slot="default", model="host", model_version=1)
    assert isinstance(got, DriftUnavailable) and "no binned drift reference" in got.reason
    assert got.to_json()["available"] is False
    off = monitor_for(spec, DriftSettings(enabled=False), slot="default", model="host", model_version=1)
    assert isinstance(off, DriftUnavailable) and "disabled" in off.reason


# -- the wire format ----------------------------------------------------------------------------


def _drifted_report():
    rng = np.random.default_rng(13)
    monitor = _monitor(rng, window=200)
    _feed(monitor, rng, 200, cpu_shift=5.0)
    report = monitor.assess()
    assert report.raised
    return report


def test_drift_event_round_trips_and_shares_the_events_topic_with_anomaly_events() -> None:
    report = _drifted_report()
    data = encode_drift_event(report, "edge-1", 7)
    event = decode_drift_event(data)
    assert event["schema"] == "edgefleet.drift/1" and event["seq"] == 7 and event["agent"] == "edge-1"
    assert (event["slot"], event["model"], event["model_version"], event["window"]) == ("default", "host", 3, 200)
    assert event["drifted_features"] == ["cpu"] and isinstance(event["score_drifted"], bool)
    assert event["features"]["cpu"]["psi"] >= 0.25 and event["psi_threshold"] == 0.25
    assert decode_agent_event(data) == event
    newer = json.dumps({**event, "added_later": 1}).encode()
    assert decode_drift_event(newer)["added_later"] == 1  # unknown fields are kept
    with pytest.raises(MessageError):
        decode_drift_event(json.dumps({**event, "schema": "edgefleet.drift/2"}).encode())
    with pytest.raises(MessageError):
        decode_drift_event(json.dumps({k: v for k, v in event.items() if k != "features"}).encode())
    with pytest.raises(MessageError):
        encode_drift_event(report, "edge-1", 0)

    class Anomaly:
        timestamp, values, score, anomaly_score, threshold = "t", (1.0,), 2.0, 0.9, 1.0
        is_anomaly, model_version, slot = True, 1, "default"

    assert decode_agent_event(encode_event(Anomaly(), "edge-1", 8))["schema"] == "edgefleet.event/1"


def test_health_carries_drift_and_old_readers_of_it_survive() -> None:
    report = _drifted_report()
    health = AgentHealth(agent="edge-1", ts="2026-01-01T00:00:00Z", inferences=1, anomalies=0, errors=0,
                         latency_ms={"p50": None, "p99": None}, outbox_depth=0, outbox_dropped=0,
                         rss_mb=None, cpu_percent=None,
                         drift={"default": report.to_json(),
                                "old": DriftUnavailable("m", 1, "no bins").to_json()})
    back = decode_agent_health(encode_agent_health(health))
    assert back.drift is not None and back.drift["default"]["drifted"] is True
    assert back.drift["default"]["features"]["cpu"]["drifted"] is True
    assert back.drift["old"] == {"available": False, "model": "m", "version": 1, "reason": "no bins"}
    assert "drift" not in back.extra
    without = AgentHealth(agent="a", ts="t", inferences=0, anomalies=0, errors=0,
                          latency_ms={"p50": None, "p99": None}, outbox_depth=0, outbox_dropped=0,
                          rss_mb=None, cpu_percent=None)
    assert "drift" not in json.loads(encode_agent_health(without)) and decode_agent_health(
        encode_agent_health(without)).drift is None


def test_fleet_view_summarises_drift_per_slot() -> None:
    report = _drifted_report()
    summary = drift_summary({"default": report.to_json(),
                             "old": DriftUnavailable("m", 1, "no bins").to_json()})
    assert summary["default"]["drifted"] is True and summary["default"]["drifted_features"] == ["cpu"]
    assert summary["default"]["psi_max"] >= 0.25 and summary["default"]["fill"] == 200
    assert summary["old"] == {"available": False, "model": "m", "version": 1, "reason": "no bins"}
    cell = _drift_cell(summary)
    assert cell.startswith("default: DRIFTED cpu (psi ") and cell.endswith("; old: n/a")
    assert _drift_cell(None) == "-"
    assert _drift_cell({"default": {**summary["default"], "drifted": False, "fill": 20}}) == "filling 20/200"


def test_a_feature_named_score_is_not_mistaken_for_the_raw_score() -> None:
    def health(feature_drifted: bool, score_drifted: bool) -> dict:
        return {"default": {
            "available": True, "model": "m", "version": 1, "window": 200, "fill": 200, "drifted": True,
            "features": {"score": {"psi": 0.5, "ks": 0.3, "ks_pvalue": 0.0, "drifted": feature_drifted}},
            "score": {"psi": 0.4, "ks": 0.3, "ks_pvalue": 0.0, "drifted": score_drifted},
        }}

    feature = drift_summary(health(True, False))["default"]
    assert (feature["drifted_features"], feature["score_drifted"], feature["psi_max"]) == (["score"], False, 0.5)
    assert _drift_cell({"default": feature}) == "DRIFTED score (psi 0.50)"
    raw = drift_summary(health(False, True))["default"]
    assert (raw["drifted_features"], raw["score_drifted"]) == ([], True)
    assert _drift_cell({"default": raw}) == "DRIFTED (score) (psi 0.50)"


def test_reference_distribution_json_round_trip() -> None:
    ref = reference_distribution(np.linspace(0, 1, 1000))
    assert ref.rows == 1000  # the KS test counts the reference as its rows, not its sample
    assert ReferenceDistribution.from_json(json.loads(json.dumps(ref.to_json())), "x") == ref


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
).map(lambda v: json.dumps(v).encode()))
def test_event_decoders_refuse_garbage_with_the_codec_error(raw: bytes) -> None:
    for decode in (decode_drift_event, decode_agent_event):
        try:
            decode(raw)
        except MessageError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["seq", "agent", "slot", "model", "model_version", "window", "features",
                        "score", "drifted_features", "score_drifted"]), st.booleans())
def test_a_drift_event_missing_or_mistyping_a_field_is_refused(key: str, drop: bool) -> None:
    wire = json.loads(encode_drift_event(_drifted_report(), "edge-1", 1))
    if drop:
        del wire[key]
    else:
        wire[key] = [] if not isinstance(wire[key], list) else "x"
    with pytest.raises(MessageError):
        decode_drift_event(json.dumps(wire).encode())
