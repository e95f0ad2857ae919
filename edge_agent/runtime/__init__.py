"""Model runtimes: one small interface (:class:`ModelRuntime`) over onnxruntime and LiteRT.

Usage::

    spec, model = read_bundle(bundle_bytes)
    runtime = open_runtime(spec, model, threads=2)
    smoke_test(runtime, spec)          # golden vectors before the model may serve
    score = runtime.score_one(window)  # float32 (window, features) raw samples

Backends are imported only when a bundle of their format is opened, so this package imports
without either installed, and an agent maps only the runtime its active model needs (each one
is 12-20 MiB resident). :func:`available_runtimes` says which ones are installed here without
importing them.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib.util import find_spec

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
# backend name -> the top-level packages that provide it (any one will do)
_PACKAGES = {"onnxruntime": ("onnxruntime",), "litert": ("ai_edge_litert", "tflite_runtime")}


def available_runtimes(only: Collection[str] | None = None) -> list[str]:
    """Names of the backends installed here: a subset of ``["onnxruntime", "litert"]``.

    Looks the packages up on the import path (:func:`importlib.util.find_spec`) without
    importing them: a backend is imported by :func:`open_runtime` when a bundle of its format
    is opened, never by probing. So a package that is present but broken (say tflite_runtime
    2.14 under numpy 2) counts as available here and fails at :func:`open_runtime` with
    :class:`RuntimeUnavailableError`, which says what to install. ``only`` limits the answer
    to those names (the runtimes a firmware profile allows).
    """
    found = []
    for name, packages in _PACKAGES.items():
        if only is not None and name not in only:
            continue
        if any(_installed(p) for p in packages):
            found.append(name)
    return found


def _installed(package: str) -> bool:
    try:
        return find_spec(package) is not None
    except (ImportError, ValueError):  # a broken parent package or a bad __spec__
        return False


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
