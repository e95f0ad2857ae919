"""The artifact bundle: a zip holding one model file and its ``spec.json``.

This module is the single source of truth for the bundle format that the trainer writes and
the agent reads. It depends on the standard library and numpy only.

A bundle is byte-reproducible: :func:`write_bundle` stores members in a fixed order with a
fixed timestamp and fixed permissions, and ``spec.json`` is serialised with sorted keys, so the
same model bytes and the same spec give the same sha256.

``spec.json`` (schema ``edgefleet.bundle/1``)::

    {
      "schema": "edgefleet.bundle/1",
      "name": "cpu",                      # model name (the version lives in the registry)
      "format": "onnx" | "tflite",
      "quantization": "fp32" | "int8",
      "model_file": "model.onnx",
      "inputs":  [TensorSpec], "outputs": [TensorSpec],
      "window": 64, "features": ["value"],
      "score": {"kind": "forecast_mae", "threshold": 0.8,
                "pipeline": {"kind": "edgefleet.likelihood/1", ...},  # absent: fixed threshold
                "scale": {"center": -0.22, "width": 0.5}},
      "drift_reference": {...},           # per-feature and score statistics and bins (shared/drift.py)
      "golden": {"inputs": [[[...]]], "outputs": [...], "atol": 1e-4, "rtol": 1e-3},
      "lineage": {...},
      "architecture": {...}               # the JSON-able spec that rebuilds the model
    }

``TensorSpec`` is ``{"name", "dtype", "shape", "quantization"}``; ``shape`` uses ``null`` for
a dynamic dimension; ``quantization`` is ``null`` or ``{"scale": float, "zero_point": int}``
for a tensor whose runtime dtype is an integer (the caller (de)quantizes).

Readers keep unknown fields (``BundleSpec.extra``) so an old agent survives a newer trainer.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.score_pipeline import (
    FIXED_THRESHOLD,
    FixedThresholdPipeline,
    FixedThresholdScorer,
    ScorePipeline,
    ScorePipelineError,
    Scorer,
    pipeline_from_json,
)

__all__ = [
    "BUNDLE_SCHEMA",
    "BundleError",
    "BundleSpec",
    "ScoreSpec",
    "TensorSpec",
    "GoldenVectors",
    "anomaly_score",
    "read_bundle",
    "write_bundle",
    "bundle_target_name",
]

BUNDLE_SCHEMA = "edgefleet.bundle/1"
SPEC_FILE = "spec.json"
FORMATS = ("onnx", "tflite")
MODEL_FILES = {"onnx": "model.onnx", "tflite": "model.tflite"}
# 1980-01-01 is the earliest timestamp a zip entry can carry; fixed for reproducibility.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
MAX_BUNDLE_MEMBERS = 8


class BundleError(ValueError):
    """A bundle or its spec is malformed or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype, shape (``None`` = dynamic) and optional affine quantization of a tensor."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    quantization: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "quantization": self.quantization,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        try:
            return cls(
                name=str(obj["name"]),
                dtype=str(obj["dtype"]),
                shape=tuple(None if d is None else int(d) for d in obj["shape"]),
                quantization=dict(obj["quantization"]) if obj.get("quantization") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"bad tensor spec {obj!r}: {e}") from e


@dataclass(frozen=True)
class ScoreSpec:
    """How a raw window score becomes a decision and a normalised ``anomaly_score``.

    ``pipeline`` (``score.pipeline`` in ``spec.json``, see :mod:`shared.score_pipeline`) is the
    versioned streaming pipeline that decides; without it the decision is ``score > threshold``
    and ``anomaly_score`` is the logistic below. ``threshold`` stays the calibrated raw-score
    bound either way: parity and smoke tests measure errors in its units.

    ``anomaly_score = sigmoid((ln(score) - center) / width)`` with ``center = ln(threshold)``,
    so it is exactly 0.5 at the threshold, monotonic in the score and always in ``[0, 1]``.
    """

    kind: str
    threshold: float
    center: float
    width: float
    pipeline: ScorePipeline = field(default_factory=FixedThresholdPipeline)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "kind": self.kind,
            "threshold": self.threshold,
            "scale": {"center": self.center, "width": self.width},
        }
        if self.pipeline.kind != FIXED_THRESHOLD:  # absent means fixed: older agents read it so
            obj["pipeline"] = self.pipeline.to_json()
        return obj

    def scorer(self) -> Scorer:
        """A fresh streaming scorer for one series (see :mod:`shared.score_pipeline`)."""
        return self.pipeline.scorer(self.threshold, self.center, self.width)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ScoreSpec:
        try:
            spec = cls(
                kind=str(obj["kind"]),
                threshold=float(obj["threshold"]),
                center=float(obj["scale"]["center"]),
                width=float(obj["scale"]["width"]),
                pipeline=pipeline_from_json(obj.get("pipeline")),
            )
        except ScorePipelineError as e:
            raise BundleError(str(e)) from e
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"bad score spec: {e}") from e
        if not (spec.threshold > 0 and spec.width > 0 and math.isfinite(spec.center)):
            raise BundleError("score spec needs threshold > 0, width > 0 and a finite center")
        return spec


def anomaly_score(score: float, spec: ScoreSpec) -> float:
    """Map a raw score to ``[0, 1]`` with the spec's logistic (0.5 at the threshold).

    This is the stateless scale of the raw score; the decision and the ``anomaly_score`` an
    agent reports come from the streaming pipeline (:meth:`ScoreSpec.scorer`).
    """
    return FixedThresholdScorer(spec.threshold, spec.center, spec.width).push(score).anomaly_score


@dataclass(frozen=True)
class GoldenVectors:
    """Known inputs and the outputs the artifact must reproduce within tolerance."""

    inputs: list[Any]
    outputs: list[float]
    atol: float
    rtol: float

    def to_json(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs, "atol": self.atol, "rtol": self.rtol}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GoldenVectors:
        try:
            g = cls(
                inputs=list(obj["inputs"]),
                outputs=[float(v) for v in obj["outputs"]],
                atol=float(obj["atol"]),
                rtol=float(obj["rtol"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"bad golden vectors: {e}") from e
        if len(g.inputs) != len(g.outputs) or not g.inputs:
            raise BundleError("golden vectors need as many outputs as inputs, at least one")
        return g


_KNOWN = {
    "schema", "name", "format", "quantization", "model_file", "inputs", "outputs", "window",
    "features", "score", "drift_reference", "golden", "lineage", "architecture",
}


@dataclass(frozen=True)
class BundleSpec:
    """The parsed ``spec.json`` of a bundle. Unknown fields are kept in ``extra``."""

    name: str
    format: str
    quantization: str
    model_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    window: int
    features: tuple[str, ...]
    score: ScoreSpec
    golden: GoldenVectors
    drift_reference: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        obj = dict(self.extra)
        obj.update(
            {
                "schema": BUNDLE_SCHEMA,
                "name": self.name,
                "format": self.format,
                "quantization": self.quantization,
                "model_file": self.model_file,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "window": self.window,
                "features": list(self.features),
                "score": self.score.to_json(),
                "drift_reference": self.drift_reference,
                "golden": self.golden.to_json(),
                "lineage": self.lineage,
                "architecture": self.architecture,
            }
        )
        return obj

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, UTF-8, trailing newline."""
        return (
            json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)
            + "\n"
        ).encode()

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BundleSpec:
        if not isinstance(obj, Mapping):
            raise BundleError("spec.json is not a JSON object")
        schema = obj.get("schema")
        if not isinstance(schema, str) or not schema.startswith("edgefleet.bundle/"):
            raise BundleError(f"not a bundle spec (schema {schema!r})")
        if schema != BUNDLE_SCHEMA:
            raise BundleError(f"unsupported bundle schema {schema!r} (this reads {BUNDLE_SCHEMA})")
        try:
            spec = cls(
                name=str(obj["name"]),
                format=str(obj["format"]),
                quantization=str(obj["quantization"]),
                model_file=str(obj["model_file"]),
                inputs=tuple(TensorSpec.from_json(t) for t in obj["inputs"]),
                outputs=tuple(TensorSpec.from_json(t) for t in obj["outputs"]),
                window=int(obj["window"]),
                features=tuple(str(f) for f in obj["features"]),
                score=ScoreSpec.from_json(obj["score"]),
                golden=GoldenVectors.from_json(obj["golden"]),
                drift_reference=dict(obj.get("drift_reference") or {}),
                lineage=dict(obj.get("lineage") or {}),
                architecture=dict(obj.get("architecture") or {}),
                extra={k: v for k, v in obj.items() if k not in _KNOWN},
            )
        except KeyError as e:
            raise BundleError(f"spec.json lacks field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise BundleError(f"bad spec.json: {e}") from e
        if spec.format not in FORMATS:
            raise BundleError(f"unknown model format {spec.format!r}")
        if spec.model_file != MODEL_FILES[spec.format]:
            raise BundleError(f"{spec.format} bundle must hold {MODEL_FILES[spec.format]}")
        if spec.window < 1 or not spec.features or len(spec.inputs) != 1 or not spec.outputs:
            raise BundleError("spec needs window >= 1, features, one input and an output")
        bounds = getattr(spec.score.pipeline, "value_range", ())
        if bounds and len(bounds) != len(spec.features):
            raise BundleError(f"score pipeline value_range holds {len(bounds)} range(s) "
                              f"for {len(spec.features)} feature(s)")
        return spec

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleSpec:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"spec.json is not valid JSON: {e}") from e
        return cls.from_json(obj)


def bundle_target_name(name: str, version: int, fmt: str, quantization: str) -> str:
    """The TUF target path of a bundle: ``artifacts/{name}-{version}-{format}-{quant}.zip``."""
    return f"artifacts/{name}-{version}-{fmt}-{quantization}.zip"


def write_bundle(spec: BundleSpec, model_bytes: bytes) -> bytes:
    """Return the bytes of a reproducible zip with ``spec.json`` and the model file."""
    buf = io.BytesIO()
    # The model is stored, not deflated: weights barely compress (int8 by ~3%), and a stored
    # member's size on the device is exactly the model's, whatever the weights' entropy.
    members = (
        (SPEC_FILE, spec.to_bytes(), zipfile.ZIP_DEFLATED),
        (spec.model_file, model_bytes, zipfile.ZIP_STORED),
    )
    with zipfile.ZipFile(buf, "w") as zf:
        for member, payload, method in members:
            info = zipfile.ZipInfo(member, date_time=_ZIP_EPOCH)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever host wrote it
            zf.writestr(info, payload, compresslevel=9)
    return buf.getvalue()


def read_bundle(data: bytes, *, max_model_bytes: int = 256 * 1024 * 1024) -> tuple[BundleSpec, bytes]:
    """Parse bundle bytes into its spec and model bytes.

    Raises :class:`BundleError` for anything but a well-formed bundle (not a zip, missing or
    extra members, a model file larger than ``max_model_bytes``, a bad spec).
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise BundleError(f"not a zip file: {e}") from e
    # A damaged member (bad local header, CRC, deflate stream) only shows when it is read.
    damaged = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        if len(infos) > MAX_BUNDLE_MEMBERS or SPEC_FILE not in infos:
            raise BundleError("bundle must hold spec.json and one model file")
        try:
            raw_spec = zf.read(SPEC_FILE)
        except damaged as e:
            raise BundleError(f"damaged {SPEC_FILE}: {e}") from e
        spec = BundleSpec.from_bytes(raw_spec)
        info = infos.get(spec.model_file)
        if info is None:
            raise BundleError(f"bundle lacks {spec.model_file}")
        if info.file_size > max_model_bytes:
            raise BundleError(f"{spec.model_file} is {info.file_size} bytes, over the cap")
        try:
            model = zf.read(info)
        except damaged as e:
            raise BundleError(f"damaged {spec.model_file}: {e}") from e
    return spec, model


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
