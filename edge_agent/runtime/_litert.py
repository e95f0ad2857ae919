"""The LiteRT backend (``ai_edge_litert``; ``tflite_runtime`` only where LiteRT is missing)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from shared.bundle import BundleSpec

from ._base import (
    ModelLoadError,
    ModelRuntimeError,
    QuantParams,
    RuntimeUnavailableError,
    as_windows,
    dequantize,
    model_sample_shape,
    quantize,
    score_fixed_batch,
    tensor_spec,
)

logger = logging.getLogger(__name__)


def import_interpreter() -> Any:
    """Return LiteRT's ``Interpreter`` class, else tflite_runtime's, else raise.

    Raises :class:`RuntimeUnavailableError` saying what to install. ``tflite_runtime`` is a
    fallback only: 2.14 fails with numpy 2 and rejects newer op versions.
    """
    # Not only ImportError: a present but broken wheel (missing .so, numpy ABI) fails otherwise.
    try:
        from ai_edge_litert.interpreter import Interpreter
    except Exception:
        try:
            from tflite_runtime.interpreter import Interpreter
        except Exception as e:
            raise RuntimeUnavailableError(
                "this bundle is a TFLite model but no LiteRT interpreter is installed here: "
                "`pip install ai-edge-litert` (or install the agent with "
                "`pip install 'edgefleet[edge]'`)"
            ) from e
        logger.info("ai_edge_litert is missing; using the tflite_runtime interpreter")
    return Interpreter


class LiteRtRuntime:
    """A TFLite model in a LiteRT ``Interpreter`` with ``threads`` CPU threads.

    TFLite graphs exported by litert-torch fix the batch to 1; a model whose batch is dynamic
    (``shape_signature[0] == -1``) is resized to 1 at load. Either way :meth:`score` loops over
    the windows; :meth:`score_one` copies a window into a preallocated input array and uses
    ``set_tensor`` / ``invoke`` / ``get_tensor``.

    Integer input/output tensors are (de)quantized with the params the interpreter reports,
    falling back to the spec's ``TensorSpec.quantization``.

    Raises :class:`RuntimeUnavailableError` when no interpreter is installed and
    :class:`ModelLoadError` when the bytes are not a loadable model matching the spec.
    Not safe for concurrent calls.
    """

    name = "litert"
    format = "tflite"

    def __init__(self, spec: BundleSpec, model_bytes: bytes, *, threads: int = 1) -> None:
        interpreter_cls = import_interpreter()
        try:
            it = interpreter_cls(model_content=bytes(model_bytes), num_threads=max(1, int(threads)))
            inputs = it.get_input_details()
            outputs = it.get_output_details()
            if len(inputs) != 1 or not outputs:
                raise ModelLoadError(
                    f"model has {len(inputs)} inputs and {len(outputs)} outputs; expected one input"
                )
            sig = [int(d) for d in inputs[0].get("shape_signature", inputs[0]["shape"])]
            if sig and sig[0] == -1 and int(inputs[0]["shape"][0]) != 1:
                it.resize_tensor_input(inputs[0]["index"], [1, *inputs[0]["shape"][1:]])
            it.allocate_tensors()
            inputs = it.get_input_details()
            outputs = it.get_output_details()
        except ModelRuntimeError:
            raise
        except Exception as e:  # the interpreter raises ValueError/RuntimeError on bad bytes
            raise ModelLoadError(f"LiteRT cannot load the model: {e}") from e
        self._it = it
        self._spec = spec
        inp = inputs[0]
        out = next(
            (o for o in outputs if spec.outputs and o["name"] == spec.outputs[0].name), outputs[0]
        )
        self._in_index, self._out_index = int(inp["index"]), int(out["index"])
        self._in_dtype = np.dtype(inp["dtype"])
        self._out_dtype = np.dtype(out["dtype"])
        for dt, what in ((self._in_dtype, "input"), (self._out_dtype, "output")):
            if dt.kind not in "fiu":
                raise ModelLoadError(f"model {what} has dtype {dt}; expected float or integer")
        shape = [int(d) for d in inp["shape"]]
        self._sample_shape = model_sample_shape(shape, spec, f"input {inp['name']!r}")
        self.batch_size: int | None = shape[0]
        out_shape = [int(d) for d in out["shape"]]
        if not out_shape or out_shape[0] != self.batch_size or int(np.prod(out_shape[1:])) != 1:
            raise ModelLoadError(
                f"output {out['name']!r} is shaped {out_shape}; expected one score per window"
            )
        self._in_q: QuantParams | None = None
        self._out_q: QuantParams | None = None
        if self._in_dtype.kind in "iu":
            ts = tensor_spec(spec.inputs, 0)
            self._in_q = QuantParams.resolve(
                inp.get("quantization"), ts.quantization if ts else None, f"input {inp['name']!r}"
            )
        if self._out_dtype.kind in "iu":
            ts = tensor_spec(spec.outputs, 0)
            self._out_q = QuantParams.resolve(
                out.get("quantization"), ts.quantization if ts else None, f"output {out['name']!r}"
            )
        self._in_buf = np.zeros((self.batch_size, *self._sample_shape), self._in_dtype)
        self._in_view = self._in_buf[0].reshape(spec.window, len(spec.features))
        self._scratch = np.empty(self._in_view.shape, np.float32)
        self._closed = False
        logger.debug(
            "LiteRT interpreter: input %s %s (q=%s), output %s %s (q=%s), threads %d",
            self._in_dtype, shape, self._in_q, self._out_dtype, out_shape, self._out_q, threads,
        )

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Score ``(n, window, features)`` windows, one model batch at a time."""
        self._check_open()
        arr = as_windows(windows, self._spec)
        n = arr.shape[0]
        if n == 0:
            return np.empty(0, np.float32)
        return score_fixed_batch(self._run, arr.reshape(n, *self._sample_shape), self.batch_size or 1)

    def score_one(self, window: np.ndarray) -> float:
        """Score one ``(window, features)`` window through the preallocated input array."""
        self._check_open()
        w = np.asarray(window)
        if w.shape != self._in_view.shape:
            raise ModelRuntimeError(f"window must be shaped {self._in_view.shape}, got {w.shape}")
        if self._in_q is None:
            np.copyto(self._in_view, w, casting="unsafe")
        else:
            quantize(w, self._in_q, self._in_dtype, out=self._in_view, scratch=self._scratch)
        try:
            self._it.set_tensor(self._in_index, self._in_buf)
            self._it.invoke()
            raw = self._it.get_tensor(self._out_index).flat[0]
        except Exception as e:
            raise ModelRuntimeError(f"LiteRT inference failed: {e}") from e
        if self._out_q is None:
            return float(raw)
        return (float(raw) - self._out_q.zero_point) * self._out_q.scale

    def close(self) -> None:
        """Drop the interpreter. Idempotent."""
        self._closed = True
        self._it = None

    def _run(self, x: np.ndarray) -> np.ndarray:
        feed = x.astype(self._in_dtype) if self._in_q is None else quantize(x, self._in_q, self._in_dtype)
        try:
            self._it.set_tensor(self._in_index, feed)
            self._it.invoke()
            y = self._it.get_tensor(self._out_index).reshape(x.shape[0])
        except Exception as e:
            raise ModelRuntimeError(f"LiteRT inference failed: {e}") from e
        return dequantize(y, self._out_q) if self._out_q else y.astype(np.float32)

    def _check_open(self) -> None:
        if self._closed:
            raise ModelRuntimeError("runtime is closed")
