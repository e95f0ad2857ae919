"""The bundle format: canonical spec, reproducible zip, strict reading, anomaly_score."""

from __future__ import annotations

import io
import math
import zipfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.bundle import (
    BundleError,
    BundleSpec,
    GoldenVectors,
    ScoreSpec,
    TensorSpec,
    anomaly_score,
    read_bundle,
    write_bundle,
)

SCORE = ScoreSpec("reconstruction_mse", threshold=2.0, center=math.log(2.0), width=0.5)


def make_spec(**extra) -> BundleSpec:
    return BundleSpec(
        name="m",
        format="onnx",
        quantization="int8",
        model_file="model.onnx",
        inputs=(TensorSpec("window", "float32", (None, 4, 1)),),
        outputs=(TensorSpec("score", "float32", (None,)),),
        window=4,
        features=("value",),
        score=SCORE,
        golden=GoldenVectors([[[1.0], [2.0], [3.0], [4.0]]], [0.5], 1e-3, 1e-3),
        extra=extra,
    )


def test_round_trip_keeps_unknown_fields() -> None:
    spec = make_spec(future_field={"x": 1})
    back, model = read_bundle(write_bundle(spec, b"model-bytes"))
    assert back == spec and model == b"model-bytes"
    assert back.to_json()["future_field"] == {"x": 1}


def test_same_inputs_same_bytes() -> None:
    assert write_bundle(make_spec(), b"abc") == write_bundle(make_spec(), b"abc")


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda o: o.pop("window"), "lacks field 'window'"),
        (lambda o: o.update(schema="edgefleet.bundle/9"), "unsupported bundle schema"),
        (lambda o: o.update(format="pt"), "unknown model format"),
        (lambda o: o.update(model_file="model.tflite"), "must hold model.onnx"),
        (lambda o: o["score"].update(threshold=-1), "threshold > 0"),
        (lambda o: o["golden"].update(outputs=[]), "golden vectors"),
    ],
)
def test_bad_specs_are_refused(mutate, needle) -> None:
    obj = make_spec().to_json()
    mutate(obj)
    with pytest.raises(BundleError, match=needle):
        BundleSpec.from_json(obj)


def test_not_a_zip_and_missing_model() -> None:
    with pytest.raises(BundleError, match="not a zip"):
        read_bundle(b"nope")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("spec.json", make_spec().to_bytes())
    with pytest.raises(BundleError, match="lacks model.onnx"):
        read_bundle(buf.getvalue())


def test_a_damaged_member_is_a_bundle_error() -> None:
    """A bundle whose first bytes were overwritten still lists its members (the central
    directory is at the end); reading one fails, and that is a :class:`BundleError`."""
    good = write_bundle(make_spec(), b"x" * 100)
    with pytest.raises(BundleError, match="damaged spec.json"):
        read_bundle(b"not a bundle" + good[12:])
    model_at = good.index(b"model.onnx")  # the model's local header comes after spec.json's data
    assert model_at > 30
    with pytest.raises(BundleError, match="damaged model.onnx"):
        read_bundle(good[:model_at - 30] + b"\0" * 4 + good[model_at - 26:])


def test_model_size_cap() -> None:
    with pytest.raises(BundleError, match="over the cap"):
        read_bundle(write_bundle(make_spec(), b"x" * 100), max_model_bytes=10)


def test_anomaly_score_is_half_at_threshold() -> None:
    assert anomaly_score(2.0, SCORE) == pytest.approx(0.5)


@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1e30))
def test_anomaly_score_bounded_and_monotonic(a: float, b: float) -> None:
    sa = anomaly_score(a, SCORE)
    assert 0.0 <= sa <= 1.0
    if math.isfinite(a) and a > 0 and b > a:
        assert anomaly_score(b, SCORE) >= sa
