"""The runtime contract: one small interface over every inference backend.

A :class:`ModelRuntime` scores windows of raw (un-normalised) samples; normalisation, the model
and the score reduction all live inside the graph, so every backend sees the same float32
``(n, window, features)`` input and returns float32 ``(n,)`` scores.

This module holds what the backends share: the error hierarchy, the affine (de)quantization
helpers for integer I/O tensors, the input/output layout checks, batching a fixed-batch model
by looping, and the golden-vector smoke test. It imports numpy and the bundle contract only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from shared.bundle import BundleSpec, TensorSpec

__all__ = [
    "ModelRuntime",
    "ModelRuntimeError",
    "ModelLoadError",
    "RuntimeUnavailableError",
    "SmokeTestError",
    "QuantParams",
    "quantize",
    "dequantize",
    "smoke_test",
]

logger = logging.getLogger(__name__)


class ModelRuntimeError(RuntimeError):
    """Root of every failure raised by a model runtime."""


class RuntimeUnavailableError(ModelRuntimeError):
    """The backend a bundle needs is not installed on this host."""


class ModelLoadError(ModelRuntimeError):
    """The model bytes could not be loaded, or do not match the bundle's spec."""


class SmokeTestError(ModelRuntimeError):
    """The model did not reproduce the bundle's golden outputs within tolerance."""


@runtime_checkable
class ModelRuntime(Protocol):
    """A loaded model that turns windows of raw samples into anomaly scores.

    Attributes:
        name: the backend, ``"onnxruntime"`` or ``"litert"``.
        format: the model format, ``"onnx"`` or ``"tflite"``.
        batch_size: the batch the model was built for, ``None`` when it is dynamic. Callers
            may pass any ``n`` to :meth:`score`; a fixed-batch model is run in a loop.

    Thread safety: a runtime is **not** safe for concurrent calls; give each thread its own
    runtime (or serialise calls). ``score_one`` reuses preallocated buffers.
    """

    name: str
    format: str
    batch_size: int | None

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Score ``windows`` shaped ``(n, window, features)`` (any real dtype, cast to float32).

        Returns a new float32 array shaped ``(n,)``. Raises :class:`ModelRuntimeError` on a
        wrong shape or a failed inference.
        """
        ...

    def score_one(self, window: np.ndarray) -> float:
        """Score one ``(window, features)`` window; the per-sample hot path.

        Copies the window into a preallocated input buffer, so it allocates nothing per call
        beyond what the backend itself needs. Raises :class:`ModelRuntimeError`.
        """
        ...

    def close(self) -> None:
        """Release the backend's resources; the runtime must not be used afterwards."""
        ...


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of one tensor: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int

    @classmethod
    def resolve(
        cls, reported: tuple[float, int] | None, fallback: dict[str, float] | None, what: str
    ) -> QuantParams:
        """Pick the runtime-reported params, else the bundle spec's; raise if neither is usable.

        A reported scale of 0 means "not quantized" in LiteRT's convention, so it falls back.
        """
        if reported is not None and float(reported[0]) > 0:
            return cls(float(reported[0]), int(reported[1]))
        if fallback and float(fallback.get("scale", 0.0)) > 0:
            return cls(float(fallback["scale"]), int(fallback.get("zero_point", 0)))
        raise ModelLoadError(
            f"{what} is an integer tensor but neither the model nor spec.json gives its "
            "quantization (scale, zero_point); rebuild the bundle with quantization params"
        )


def quantize(
    x: np.ndarray, params: QuantParams, dtype: np.dtype[Any] | type, *, out: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize real values: ``q = clip(rint(x / scale) + zero_point)`` in ``dtype``'s range.

    Rounds half to even (``np.rint``); TFLite's reference kernel rounds half away from zero,
    which differs only on exact ties. ``out`` (shape of ``x``, integer ``dtype``) and
    ``scratch`` (float32, shape of ``x``) let the hot path run without allocating.
    """
    info = np.iinfo(dtype)
    tmp = np.empty(np.shape(x), np.float32) if scratch is None else scratch
    np.divide(x, np.float32(params.scale), out=tmp, casting="unsafe")
    np.rint(tmp, out=tmp)
    tmp += np.float32(params.zero_point)
    np.clip(tmp, info.min, info.max, out=tmp)
    if out is None:
        return tmp.astype(dtype)
    np.copyto(out, tmp, casting="unsafe")
    return out


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """Dequantize integers to float32: ``(q - zero_point) * scale``."""
    return ((np.asarray(q, dtype=np.float32) - np.float32(params.zero_point))
            * np.float32(params.scale)).astype(np.float32, copy=False)


def model_sample_shape(
    model_shape: Sequence[int | None], spec: BundleSpec, what: str
) -> tuple[int, ...]:
    """The per-sample (non-batch) input shape of the model, checked against the spec.

    The model may lay a window out as ``(window, features)`` or any reshape of it with the same
    number of elements (e.g. ``(window,)`` for one feature); windows are reshaped in C order.
    Dynamic non-batch dimensions are filled from the spec's window and feature count.
    """
    if len(model_shape) < 2:
        raise ModelLoadError(f"{what}: input must have a batch dimension, got shape {list(model_shape)}")
    fill = [spec.window, len(spec.features)]
    dims: list[int] = []
    for i, d in enumerate(model_shape[1:]):
        if d is None or d < 0:
            if i >= len(fill):
                raise ModelLoadError(f"{what}: cannot resolve dynamic input dim {i + 1}")
            d = fill[i]
        dims.append(int(d))
    need = spec.window * len(spec.features)
    if int(np.prod(dims)) != need:
        raise ModelLoadError(
            f"{what}: model input {list(model_shape)} does not hold a window of "
            f"{spec.window} x {len(spec.features)} samples from spec.json"
        )
    return tuple(dims)


def as_windows(windows: np.ndarray, spec: BundleSpec) -> np.ndarray:
    """Validate and view ``windows`` as float32 ``(n, window, features)``."""
    arr = np.asarray(windows, dtype=np.float32)
    want = (spec.window, len(spec.features))
    if arr.ndim == 2 and arr.shape == want:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != want:
        raise ModelRuntimeError(
            f"windows must be shaped (n, {want[0]}, {want[1]}), got {arr.shape}"
        )
    return arr


def score_fixed_batch(
    run: Callable[[np.ndarray], np.ndarray], windows: np.ndarray, batch: int
) -> np.ndarray:
    """Score ``windows`` with a model whose batch is fixed to ``batch`` by looping over chunks.

    ``run`` takes exactly ``batch`` windows and returns ``batch`` scores; the last chunk is
    padded by repeating its final window and the padding's scores are discarded.
    """
    n = windows.shape[0]
    out = np.empty(n, np.float32)
    for start in range(0, n, batch):
        chunk = windows[start:start + batch]
        k = chunk.shape[0]
        if k < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - k, axis=0)])
        out[start:start + k] = run(chunk)[:k]
    return out


def smoke_test(runtime: ModelRuntime, spec: BundleSpec) -> None:
    """Run the bundle's golden inputs and compare with its golden outputs.

    A vector passes when ``|got - want| <= atol + rtol * |want|`` (``numpy.isclose``).
    Raises :class:`SmokeTestError` naming the first failing vector, the difference and how
    many vectors failed; inference errors surface as :class:`ModelRuntimeError` too.
    """
    g = spec.golden
    try:
        inputs = np.asarray(g.inputs, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise SmokeTestError(f"golden inputs are not a numeric array: {e}") from e
    want_n = len(g.outputs)
    per = spec.window * len(spec.features)
    if inputs.size != want_n * per:
        raise SmokeTestError(
            f"golden inputs hold {inputs.size} values, expected {want_n} windows of "
            f"{spec.window} x {len(spec.features)}"
        )
    inputs = inputs.reshape(want_n, spec.window, len(spec.features))
    want = np.asarray(g.outputs, dtype=np.float64)
    got = runtime.score(inputs).astype(np.float64)
    if got.shape != want.shape:
        raise SmokeTestError(f"model returned scores shaped {got.shape}, expected {want.shape}")
    ok = np.isclose(got, want, atol=g.atol, rtol=g.rtol)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        i = int(bad[0])
        diff = abs(got[i] - want[i])
        raise SmokeTestError(
            f"golden vector {i} of {want_n}: got {got[i]:.6g}, expected {want[i]:.6g} "
            f"(|diff| {diff:.3g} > atol {g.atol:g} + rtol {g.rtol:g} * |expected|); "
            f"{bad.size} of {want_n} vectors out of tolerance"
        )
    logger.debug("smoke test passed: %d golden vectors on %s/%s", want_n, runtime.name, runtime.format)


def tensor_spec(specs: Sequence[TensorSpec], index: int) -> TensorSpec | None:
    """The spec's tensor at ``index`` or ``None``."""
    return specs[index] if index < len(specs) else None
