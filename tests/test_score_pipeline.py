"""The streaming score pipeline: adapts to a new normal, one alarm per excursion, O(1) state,
declared in spec.json and refused when unknown."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bundle import BundleError, BundleSpec
from shared.score_pipeline import (
    FIXED_THRESHOLD,
    LIKELIHOOD,
    LIKELIHOOD_RANGE,
    LIKELIHOOD_RECURRENT,
    LIKELIHOOD_ROBUST,
    LIKELIHOOD_ROBUST_EARLY,
    LIKELIHOOD_SEASONAL,
    FixedThresholdPipeline,
    LikelihoodPipeline,
    ScorePipelineError,
    pipeline_from_json,
    reference_steps,
)
from tests.test_bundle import make_spec


def _run(pipeline: LikelihoodPipeline, scores: np.ndarray) -> list:
    scorer = pipeline.scorer(1.0, 0.0, 1.0)
    return [scorer.push(float(s)) for s in scores]


def _errors(n: int, seed: int = 0) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).normal(size=n))


def test_level_shift_alarms_once_then_becomes_the_new_normal():
    errors = _errors(6000)
    errors[3000:] += 4.0  # the model's error jumps and stays there (a level shift it cannot follow)
    steps = _run(LikelihoodPipeline(long_window=2000), errors)
    alarms = [i for i, s in enumerate(steps) if s.is_anomaly]
    assert alarms and 3000 <= alarms[0] <= 3010, alarms
    assert all(i < 3300 for i in alarms), f"still alarming long after the shift: {alarms[-5:]}"
    # the tail probability recovers once the shifted errors fill the history
    assert steps[-1].tail_probability > 0.01


def test_stationary_noise_stays_quiet_and_warmup_never_alarms():
    steps = _run(LikelihoodPipeline(), _errors(20000, seed=1))
    assert sum(s.is_anomaly for s in steps) <= 2
    assert all(s.tail_probability == 1.0 for s in steps[:288])


def test_a_run_of_exceedances_is_one_alarm_and_scores_agree_with_decisions():
    errors = _errors(3000, seed=2)
    errors[2000:2040] += 8.0  # a 40-sample burst
    steps = _run(LikelihoodPipeline(), errors)
    alarms = [i for i, s in enumerate(steps) if s.is_anomaly]
    assert len(alarms) == 1 and 2000 <= alarms[0] <= 2005
    # anomaly_score >= 0.5 exactly on the decisions, so a threshold of 0.5 reproduces them
    assert all((s.anomaly_score >= 0.5) == s.is_anomaly for s in steps)
    assert all(0.0 <= s.anomaly_score <= 1.0 for s in steps)


def test_flat_errors_do_not_divide_by_zero():
    errors = np.zeros(1000)
    errors[800] = 1.0
    steps = _run(LikelihoodPipeline(min_history=100), errors)
    assert steps[800].is_anomaly and sum(s.is_anomaly for s in steps) == 1
    assert all(math.isfinite(s.anomaly_score) for s in steps)


def test_non_finite_scores_change_nothing():
    p = LikelihoodPipeline(min_history=10, long_window=50)
    a, b = p.scorer(1, 0, 1), p.scorer(1, 0, 1)
    errors = _errors(200, seed=3)
    for i, e in enumerate(errors):
        if i % 7 == 0:
            assert a.push(float("nan")) == (1.0, 0.0, False)
        assert a.push(float(e)) == b.push(float(e))


def test_running_sums_stay_exact_over_many_windows():
    p = LikelihoodPipeline(long_window=100, min_history=50)
    scorer = p.scorer(1, 0, 1)
    errors = _errors(10_050, seed=4) * 1e6  # large values make float drift visible if unbounded
    for e in errors:
        scorer.push(float(e))
    live = np.asarray(scorer._long, np.float64)
    assert scorer._long_sum == pytest.approx(live.sum(), rel=1e-9)
    assert scorer._long_sq == pytest.approx(float(np.dot(live, live)), rel=1e-9)


def _spikes(period: int, n: int, seed: int) -> np.ndarray:
    errors = _errors(n, seed=seed)
    errors[period::period] += 30.0  # the same large error every `period` samples (a daily job)
    return errors


def test_a_recurring_error_stops_alarming():
    errors = _spikes(288, 288 * 12, seed=7)
    recurrent = [i for i, s in enumerate(_run(LikelihoodPipeline(recurrences=2), errors)) if s.is_anomaly]
    # the first two spikes alarm (the first repeat of an incident is still news); after that
    # only a spike whose smoothed error tops every earlier one by chance can (one here)
    assert recurrent[:2] == [288, 576] and len(recurrent) <= 3, recurrent
    # kind likelihood/1 (no recurrence step) alarms on every one of them
    plain = [i for i, s in enumerate(_run(LikelihoodPipeline(recurrences=0), errors)) if s.is_anomaly]
    assert len(plain) >= 9


def test_a_larger_error_than_the_recurring_ones_still_alarms():
    errors = _spikes(288, 288 * 12, seed=8)
    errors[288 * 10 + 100 : 288 * 10 + 105] += 60.0  # an incident far above the daily spikes
    steps = _run(LikelihoodPipeline(recurrences=2), errors)
    alarms = [i for i, s in enumerate(steps) if s.is_anomaly]
    assert any(288 * 10 + 100 <= i <= 288 * 10 + 105 for i in alarms), alarms
    # the tail probability is never below the rate the history shows for a recurring error
    spike = steps[288 * 11]
    assert not spike.is_anomaly and spike.tail_probability > 1e-5


def test_recurrence_counts_the_history_in_time_order_across_the_ring_seam():
    # a history shorter than the stream: the ring wraps many times and must still count runs
    p = LikelihoodPipeline(long_window=500, min_history=100, recurrences=2)
    errors = _spikes(100, 5000, seed=9)
    steps = _run(p, errors)
    assert sum(s.is_anomaly for s in steps) <= 3


def _daily(n: int, day: int, phase: int, seed: int, jitter: int = 3) -> np.ndarray:
    """Noise, and a burst of large errors at about the same time every day (a nightly job)."""
    rng = np.random.default_rng(seed)
    errors = _errors(n, seed)
    for start in range(phase, n, day):
        at = start + int(rng.integers(-jitter, jitter + 1))
        errors[at:at + 3] += 12.0 * rng.uniform(0.95, 1.05)
    return errors


def test_an_error_at_the_same_time_as_yesterdays_is_a_repeat_not_an_anomaly():
    day = 288
    errors = _daily(day * 14, day, phase=100, seed=5)
    plain_steps = _run(LikelihoodPipeline(), errors)
    plain = [i for i, s in enumerate(plain_steps) if s.is_anomaly]
    seasonal_steps = _run(LikelihoodPipeline(season=day), errors)
    seasonal = [i for i, s in enumerate(seasonal_steps) if s.is_anomaly]
    assert len(plain) >= 10, plain  # the Gaussian tail alone reports the job every day
    # once yesterday's is in the history (here from the warm-up day on), it is not reported again
    assert len(seasonal) <= 1 and all(i < 3 * day for i in seasonal), seasonal
    # a repeat is reported as an error that happens once a season, not as a decision: the
    # samples of day 10's burst that the Gaussian tail alone finds rare
    start = 100 + 10 * day - 3 + int(np.argmax(errors[100 + 10 * day - 3:] > 6.0))
    rare = [i for i in range(start, start + 13) if plain_steps[i].tail_probability <= 1e-5]
    assert rare
    assert all(seasonal_steps[i].tail_probability == 1 / day and not seasonal_steps[i].is_anomaly for i in rare)


def test_an_incident_at_another_time_of_day_still_alarms():
    day = 288
    errors = _daily(day * 14, day, phase=100, seed=6)
    errors[10 * day + 200:10 * day + 220] += 12.0  # nothing like it the day before at this hour
    alarms = [i for i, s in enumerate(_run(LikelihoodPipeline(season=day), errors)) if s.is_anomaly]
    assert any(10 * day + 200 <= i <= 10 * day + 210 for i in alarms), alarms


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 50), st.integers(50, 5000), st.integers(2, 50),
    st.floats(1e-9, 0.49, allow_nan=False), st.integers(0, 5),
)
def test_pipeline_json_round_trip(short, long, min_hist, far, recurrences):
    p = LikelihoodPipeline(short, max(long, short, min_hist), min_hist, far, recurrences=recurrences)
    obj = json.loads(json.dumps(p.to_json()))
    assert obj["kind"] == (LIKELIHOOD_RECURRENT if recurrences else LIKELIHOOD)
    assert pipeline_from_json(obj) == p
    seasonal = dataclasses.replace(p, long_window=max(p.long_window, 400), season=288, season_halfwidth=8)
    obj = json.loads(json.dumps(seasonal.to_json()))
    assert obj["kind"] == LIKELIHOOD_SEASONAL and obj["season"] == 288
    assert pipeline_from_json(obj) == seasonal
    for base in (p, seasonal):
        robust = dataclasses.replace(base, robust_history=True)
        obj = json.loads(json.dumps(robust.to_json()))
        assert obj["kind"] == LIKELIHOOD_ROBUST and obj["robust_history"] is True
        assert pipeline_from_json(obj) == robust
        early = dataclasses.replace(robust, robust_early=True)
        obj = json.loads(json.dumps(early.to_json()))
        assert obj["kind"] == LIKELIHOOD_ROBUST_EARLY and obj["robust_history"] is True
        assert "robust_early" not in obj  # the kind says it
        assert pipeline_from_json(obj) == early


def test_a_robust_history_does_not_let_one_spike_hide_later_incidents():
    errors = _errors(6000, seed=11)
    errors[1000:1010] += 300.0  # one huge error early on (an incident, or a glitch)
    errors[3000:3020] += 6.0  # a later, smaller incident: far outside this series' normal noise
    plain = [i for i, s in enumerate(_run(LikelihoodPipeline(), errors)) if s.is_anomaly]
    robust_steps = _run(LikelihoodPipeline(robust_history=True), errors)
    robust = [i for i, s in enumerate(robust_steps) if s.is_anomaly]
    # the huge spike inflates the plain history's spread for its whole long window
    assert any(1000 <= i <= 1010 for i in plain) and not any(3000 <= i <= 3030 for i in plain), plain
    # clipped at the decision boundary on its way into the history, it no longer does
    assert any(1000 <= i <= 1010 for i in robust) and any(3000 <= i <= 3010 for i in robust), robust
    assert len(robust) <= 4, robust
    assert all((s.anomaly_score >= 0.5) == s.is_anomaly for s in robust_steps)


def test_a_spike_in_the_learning_period_does_not_hide_the_first_incident_after_it():
    """A newly deployed model's first hours: a spike before ``min_history`` errors are known
    (no decision is made yet) enters kind 4's history as it is and widens its spread for the
    whole long window; kind 5 clips it as it clips every later one."""
    errors = _errors(3000, seed=13)
    errors[100:110] += 300.0  # in the learning period (min_history 288): no decision yet
    errors[1500:1520] += 6.0  # an incident well after it
    late = _run(LikelihoodPipeline(robust_history=True), errors)
    early_steps = _run(LikelihoodPipeline(robust_history=True, robust_early=True), errors)
    early = [i for i, s in enumerate(early_steps) if s.is_anomaly]
    assert not any(s.is_anomaly for s in late[:288]) and not any(s.is_anomaly for s in early_steps[:288])
    assert not any(late[i].is_anomaly for i in range(1500, 1530)), "kind 4 should miss it"
    assert any(1500 <= i <= 1510 for i in early), early
    assert len(early) <= 2, early
    assert all((s.anomaly_score >= 0.5) == s.is_anomaly for s in early_steps)


def test_without_a_prior_clipping_from_the_second_value_does_not_collapse_the_history():
    """A spread estimated from a handful of values is poor; the clip it gives must not trap the
    history near its first values (every later error clipped to a tiny boundary, then alarms
    on everything). On a stationary, heavy-tailed stream kind 5 decides exactly as kind 4."""
    errors = np.random.default_rng(14).lognormal(0.0, 1.0, size=20000)
    late = _run(LikelihoodPipeline(robust_history=True), errors)
    early = _run(LikelihoodPipeline(robust_history=True, robust_early=True), errors)
    assert [s.is_anomaly for s in early] == [s.is_anomaly for s in late]
    assert sum(s.is_anomaly for s in early) < 40


def test_robust_early_needs_a_robust_history():
    with pytest.raises(ScorePipelineError, match="robust_early needs robust_history"):
        LikelihoodPipeline(robust_early=True)
    with pytest.raises(ScorePipelineError, match="needs robust_history: true"):
        pipeline_from_json({"kind": LIKELIHOOD_ROBUST_EARLY})
    with pytest.raises(ScorePipelineError, match=r"unknown parameter\(s\) \['robust_early'\]"):
        pipeline_from_json({"kind": LIKELIHOOD_ROBUST_EARLY, "robust_history": True, "robust_early": True})


def test_with_a_robust_history_a_lasting_change_still_becomes_the_new_normal():
    errors = _errors(8000, seed=12)
    errors[3000:] += 4.0
    steps = _run(LikelihoodPipeline(long_window=2000, robust_history=True), errors)
    alarms = [i for i, s in enumerate(steps) if s.is_anomaly]
    assert alarms and 3000 <= alarms[0] <= 3010 and all(i < 3500 for i in alarms), alarms
    assert steps[-1].tail_probability > 0.01


def test_unknown_or_bad_pipelines_are_refused_with_a_reason():
    with pytest.raises(ScorePipelineError, match=r"unknown score pipeline kind 'edgefleet.spot/9'.*likelihood/2"):
        pipeline_from_json({"kind": "edgefleet.spot/9"})
    with pytest.raises(ScorePipelineError, match=r"unknown parameter\(s\) \['recurrences'\]"):
        pipeline_from_json({"kind": LIKELIHOOD, "recurrences": 2})  # /1 has no recurrence step
    with pytest.raises(ScorePipelineError, match="unknown parameter"):
        pipeline_from_json({"kind": LIKELIHOOD, "gain": 2})
    with pytest.raises(ScorePipelineError, match="false_alarm_rate"):
        pipeline_from_json({"kind": LIKELIHOOD, "false_alarm_rate": 0.9})
    with pytest.raises(ScorePipelineError, match=r"unknown parameter\(s\) \['season'\]"):
        pipeline_from_json({"kind": LIKELIHOOD, "season": 288})  # /1 has no seasonal step
    with pytest.raises(ScorePipelineError, match="needs an integer season >= 1"):
        pipeline_from_json({"kind": LIKELIHOOD_SEASONAL})
    with pytest.raises(ScorePipelineError, match="needs an integer season_halfwidth >= 0"):
        pipeline_from_json({"kind": LIKELIHOOD_SEASONAL, "season": 288, "season_halfwidth": "8"})
    with pytest.raises(ScorePipelineError, match="season_halfwidth < season"):
        pipeline_from_json({"kind": LIKELIHOOD_SEASONAL, "season": 8, "season_halfwidth": 8})
    with pytest.raises(ScorePipelineError, match="long_window"):
        pipeline_from_json({"kind": LIKELIHOOD_SEASONAL, "season": 8640})
    with pytest.raises(ScorePipelineError, match=r"unknown parameter\(s\) \['robust_history'\]"):
        pipeline_from_json({"kind": LIKELIHOOD_SEASONAL, "season": 288, "robust_history": True})
    with pytest.raises(ScorePipelineError, match="needs robust_history: true"):
        pipeline_from_json({"kind": LIKELIHOOD_ROBUST})
    with pytest.raises(ScorePipelineError, match="needs an integer season >= 1"):
        pipeline_from_json({"kind": LIKELIHOOD_ROBUST, "robust_history": True, "season": 0})
    assert pipeline_from_json(None) == FixedThresholdPipeline()
    assert pipeline_from_json({"kind": FIXED_THRESHOLD}) == FixedThresholdPipeline()


def test_bundle_spec_declares_the_pipeline_and_refuses_an_unknown_kind():
    spec = make_spec()
    for pipeline, kind in ((LikelihoodPipeline(), LIKELIHOOD), (LikelihoodPipeline(recurrences=2), LIKELIHOOD_RECURRENT),
                           (LikelihoodPipeline(season=288), LIKELIHOOD_SEASONAL),
                           (LikelihoodPipeline(season=288, robust_history=True), LIKELIHOOD_ROBUST),
                           (LikelihoodPipeline(season=288, robust_history=True, robust_early=True),
                            LIKELIHOOD_ROBUST_EARLY),
                           (LikelihoodPipeline(season=288, robust_history=True, robust_early=True,
                                               range_tolerance=0.05, value_range=((0.0, 1.5),)),
                            LIKELIHOOD_RANGE)):
        spec = dataclasses.replace(spec, score=dataclasses.replace(spec.score, pipeline=pipeline))
        obj = json.loads(spec.to_bytes())
        assert obj["score"]["pipeline"]["kind"] == kind
        assert BundleSpec.from_json(obj).score.pipeline == pipeline
    obj["score"]["pipeline"]["kind"] = "edgefleet.likelihood/9"
    with pytest.raises(BundleError, match="unknown score pipeline kind 'edgefleet.likelihood/9'"):
        BundleSpec.from_json(obj)
    # a spec without a pipeline (an older trainer) decides on the fixed threshold
    legacy = json.loads(make_spec().to_bytes())
    assert "pipeline" not in legacy["score"]
    assert BundleSpec.from_json(legacy).score.pipeline == FixedThresholdPipeline()


def test_a_prior_from_validation_errors_lets_the_pipeline_decide_at_once():
    validation = _errors(600, seed=5)
    p = LikelihoodPipeline().calibrated(validation)
    assert len(p.prior) == 600 and p.prior[-1] == pytest.approx(validation[-10:].mean(), rel=1e-5)
    live = _errors(50, seed=6)
    live[30] += 12.0  # an excursion 30 samples after activation (or a restart)
    steps = _run(p, live)
    assert [i for i, s in enumerate(steps) if s.is_anomaly] == [30]
    # without a prior the same stream is still warming up
    assert not any(s.is_anomaly for s in _run(LikelihoodPipeline(), live))
    # the prior travels in spec.json
    assert pipeline_from_json(json.loads(json.dumps(p.to_json()))) == p


def test_prior_is_bounded_and_finite():
    p = LikelihoodPipeline().calibrated(_errors(5000))
    assert len(p.prior) == 2048
    with pytest.raises(ScorePipelineError, match="prior"):
        LikelihoodPipeline(prior=(1.0, float("nan")))
    with pytest.raises(ScorePipelineError, match="prior"):
        LikelihoodPipeline(long_window=10, min_history=5, prior=(1.0,) * 11)


# --- step 0: the range check (kind /6) ---------------------------------------------------------

_RANGE = LikelihoodPipeline(robust_history=True, robust_early=True, range_tolerance=0.05)


def _push_values(pipeline: LikelihoodPipeline, errors: np.ndarray, values: list[list[float]]) -> list:
    scorer = pipeline.scorer(1.0, 0.0, 1.0)
    return [scorer.push(float(e), v) for e, v in zip(errors, values, strict=True)]


def test_a_value_beyond_the_training_range_alarms_though_its_error_is_usual():
    errors = _errors(2000, seed=20)  # nothing in the model's error stands out
    values = [[5.0]] * 2000
    values[800] = [10.4]  # past the training high (10) but within 5% of the range (0.5): normal
    values[1200] = [11.0]  # past it by more: never seen, whatever the error says
    values[1500] = [11.5]  # within 5% of the widened range (0..11, so up to 11.55): seen now
    values[1700] = [-0.6]  # below the low by more than 5% of 0..11.5
    steps = _push_values(_RANGE.with_value_range(np.array([[0.0], [10.0], [3.0]])), errors, values)
    alarms = [i for i, s in enumerate(steps) if s.is_anomaly]
    assert alarms == [1200, 1700]
    assert steps[1200].tail_probability == 0.0 and steps[1200].anomaly_score == 1.0
    # and the same errors without the values decide as kind /5 does: nothing
    assert not any(s.is_anomaly for s in _run(_RANGE, errors))


def test_the_range_check_applies_from_the_first_sample_and_without_a_prior():
    # an agent just activated (or restarted) knows its model's training range at once
    steps = _push_values(_RANGE.with_value_range(np.array([[0.0], [1.0]])), np.ones(3), [[0.5], [2.0], [0.5]])
    assert [s.is_anomaly for s in steps] == [False, True, False]


def test_without_a_training_range_the_stream_starts_it_and_a_constant_feature_is_not_checked():
    steps = _push_values(_RANGE, np.ones(6), [[3.0, 7.0], [3.0, 7.0], [3.0, 9.0], [3.0, 9.0], [3.0, 9.5], [4.0, 9.0]])
    # feature 0 is constant until the last row: no range to be beyond; feature 1 starts at 7,
    # spans 7..9 after its first change, and 9.5 is beyond 9 by 25% of that
    assert [s.is_anomaly for s in steps] == [False, False, False, False, True, False]


def test_values_beyond_the_range_in_a_row_are_one_alarm_and_scores_agree_with_decisions():
    values = [[float(v)] for v in [1, 2, 1, 2] + [3, 4, 5, 6] + [1] * 4 + [9]]
    steps = _push_values(_RANGE, np.ones(len(values)), values)
    # a climb to new highs is one excursion; once a value is back in range the next one alarms
    assert [i for i, s in enumerate(steps) if s.is_anomaly] == [4, 12]
    assert all((s.anomaly_score >= 0.5) == s.is_anomaly for s in steps)
    assert all(s.anomaly_score > 0.49 for s in steps[4:8])


def test_a_row_of_the_wrong_width_is_refused():
    scorer = _RANGE.with_value_range(np.array([[0.0, 1.0], [1.0, 2.0]])).scorer(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="range holds 2 feature"):
        scorer.push(1.0, [0.5])


def test_the_training_range_ignores_missing_values_and_needs_one_per_feature():
    rows = np.array([[1.0, np.nan], [np.nan, 5.0], [-2.0, 4.0]])
    assert _RANGE.with_value_range(rows).value_range == ((-2.0, 1.0), (4.0, 5.0))
    assert LikelihoodPipeline().with_value_range(rows) == LikelihoodPipeline()  # no step 0
    with pytest.raises(ScorePipelineError, match="a finite value per feature"):
        _RANGE.with_value_range(np.array([[1.0, np.nan], [2.0, np.nan]]))


def test_range_pipeline_json_round_trip_and_refusals():
    pipeline = dataclasses.replace(_RANGE.with_value_range(np.array([[0.0, -1.0], [2.5, 1.0]])), season=288)
    obj = pipeline.to_json()
    assert obj["kind"] == LIKELIHOOD_RANGE and obj["value_range"] == [[0.0, 2.5], [-1.0, 1.0]]
    assert pipeline_from_json(json.loads(json.dumps(obj))) == pipeline
    # the range step combines with any earlier option, and without the robust history too
    plain = LikelihoodPipeline(range_tolerance=0.05)
    assert plain.kind == LIKELIHOOD_RANGE and pipeline_from_json(plain.to_json()) == plain
    bad = [
        ({"range_tolerance": 0}, "range_tolerance > 0"),
        ({"range_tolerance": True}, "range_tolerance > 0"),
        ({"range_tolerance": "0.05"}, "range_tolerance > 0"),
        ({"range_tolerance": 0.05, "value_range": [[1.0]]}, r"value_range as \[\[low, high\]"),
        ({"range_tolerance": 0.05, "value_range": [[2.0, 1.0]]}, "low <= high"),
        ({"range_tolerance": 0.05, "value_range": {"f0": [0, 1]}}, "value_range as"),
        ({"range_tolerance": 0.05, "robust_early": True}, "robust_early needs robust_history"),
        ({"range_tolerance": 0.05, "robust_history": "yes"}, "robust_history true or false"),
        ({"range_tolerance": 0.05, "gain": 1}, r"unknown parameter\(s\) \['gain'\]"),
    ]
    for params, reason in bad:
        with pytest.raises(ScorePipelineError, match=reason):
            pipeline_from_json({"kind": LIKELIHOOD_RANGE, **params})
    # kind /5 has no range step: an agent of this version refuses the parameter, not ignores it
    with pytest.raises(ScorePipelineError, match=r"unknown parameter\(s\) \['range_tolerance'\]"):
        pipeline_from_json({"kind": LIKELIHOOD_ROBUST_EARLY, "robust_history": True, "range_tolerance": 0.05})


def test_a_bundle_whose_range_does_not_match_its_features_is_refused():
    spec = make_spec()
    pipeline = LikelihoodPipeline(range_tolerance=0.05, value_range=((0.0, 1.0),) * (len(spec.features) + 1))
    obj = json.loads(dataclasses.replace(spec, score=dataclasses.replace(spec.score, pipeline=pipeline)).to_bytes())
    with pytest.raises(BundleError, match=f"value_range holds {len(spec.features) + 1} range"):
        BundleSpec.from_json(obj)


def test_a_single_window_is_judged_against_the_training_range_alone():
    pipeline = _RANGE.with_value_range(np.array([[0.0], [10.0]])).calibrated(_errors(400, seed=3))
    usual = float(np.median(pipeline.prior))
    reference, steps = reference_steps(pipeline, [usual] * 3, threshold=1.0, center=0.0, width=1.0,
                                       rows=[[10.4], [11.0], [10.9]])
    # nothing widens the range between windows: 10.9 is as far out as 11.0 was
    assert reference == "prior" and [s.is_anomaly for s in steps] == [False, True, True]
    assert steps[1].tail_probability == 0.0
    _, steps = reference_steps(pipeline, [usual], threshold=1.0, center=0.0, width=1.0)
    assert not steps[0].is_anomaly  # without rows there is no step 0


def test_float_noise_is_not_a_range_and_non_finite_values_change_nothing():
    # a feature constant in training, measured in float32, then streamed as float64
    pipeline = _RANGE.with_value_range(np.array([[np.float32(0.1)]], np.float64))
    steps = _push_values(pipeline, np.ones(4), [[0.1], [0.2], [0.2], [0.3]])
    assert [s.is_anomaly for s in steps] == [False, False, False, True]
    steps = _push_values(_RANGE.with_value_range(np.array([[0.0], [1.0]])), np.ones(3),
                         [[math.inf], [0.5], [-1.0]])
    assert [s.is_anomaly for s in steps] == [False, False, True]


def test_a_single_window_is_judged_against_the_training_range_under_the_threshold_reference_too():
    pipeline = _RANGE.with_value_range(np.array([[0.0], [10.0]]))  # no prior: the threshold decides
    reference, steps = reference_steps(pipeline, [0.5, 0.5, math.nan], threshold=1.0, center=0.0, width=1.0,
                                       rows=[[5.0], [11.0], [11.0]])
    assert reference == "threshold" and [s.is_anomaly for s in steps] == [False, True, False]


def test_numbers_too_large_for_a_float_are_refused_with_a_reason():
    with pytest.raises(ScorePipelineError, match="bad score pipeline parameters"):
        pipeline_from_json({"kind": LIKELIHOOD_RANGE, "range_tolerance": 0.05, "value_range": [[0, 10**400]]})
