"""Model runtimes: one small interface (:class:`ModelRuntime`) over onnxruntime and LiteRT.

Usage::

    spec, model = read_bundle(bundle_bytes)
    runtime = open_runtime(spec, model, threads=2)
    smoke_test(runtime, spec)          # golden vectors before the model may serve
    score = runtime.score_one(window)  # float32 (window, features) raw samples

Backends are imported only when a bundle needs them, so this package imports without either
installed; :func:`available_runtimes` says which ones load here.
"""

from __future__ import annotations

from collections.abc import Collection

from shared.bundle import BundleSpec

from ._base import (
    ModelLoadError,
    ModelRuntime,
    ModelRuntimeError,
    QuantParams,
    RuntimeUnavailableError,
    SmokeTestError,
    dequantize,
    quantize,
    smoke_test,
)

__all__ = [
    "ModelLoadError",
    "ModelRuntime",
    "ModelRuntimeError",
    "QuantParams",
    "RuntimeUnavailableError",
    "SmokeTestError",
    "available_runtimes",
    "dequantize",
    "open_runtime",
    "quantize",
    "smoke_test",
]

# format -> backend name; one backend per format today.
_BACKENDS = {"onnx": "onnxruntime", "tflite": "litert"}


def available_runtimes(only: Collection[str] | None = None) -> list[str]:
    """Names of the backends that import here: a subset of ``["onnxruntime", "litert"]``.

    Really imports each backend (a package that is present but broken, like tflite_runtime
    2.14 under numpy 2, does not count); call it at start-up, not per sample. ``only`` limits
    the probe to those names, so an agent does not load (and pay memory for) a runtime its
    profile never uses.
    """
    from ._litert import import_interpreter
    from ._onnx import import_onnxruntime

    found = []
    for name, probe in (("onnxruntime", import_onnxruntime), ("litert", import_interpreter)):
        if only is not None and name not in only:
            continue
        try:
            probe()
        except RuntimeUnavailableError:
            continue
        found.append(name)
    return found


def open_runtime(spec: BundleSpec, model_bytes: bytes, *, threads: int = 1) -> ModelRuntime:
    """Load ``model_bytes`` with the backend for ``spec.format``.

    Raises :class:`RuntimeUnavailableError` when that backend is not installed,
    :class:`ModelLoadError` when the bytes do not load or do not match the spec (input shape
    vs window and features, one score per window, integer tensors without quantization
    params), :class:`ModelRuntimeError` for an unknown format. Does not run the smoke test:
    call :func:`smoke_test` before serving.
    """
    if spec.format == "onnx":
        from ._onnx import OnnxRuntime

        return OnnxRuntime(spec, model_bytes, threads=threads)
    if spec.format == "tflite":
        from ._litert import LiteRtRuntime

        return LiteRtRuntime(spec, model_bytes, threads=threads)
    raise ModelRuntimeError(
        f"no runtime for model format {spec.format!r}; this agent runs {sorted(_BACKENDS)}"
    )
