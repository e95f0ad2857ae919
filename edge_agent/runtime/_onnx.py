"""The onnxruntime backend (CPU execution provider, model loaded from bytes)."""

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

_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
}


def import_onnxruntime() -> Any:
    """Import onnxruntime or raise :class:`RuntimeUnavailableError` saying how to install it."""
    try:
        import onnxruntime
    except Exception as e:  # also a present but broken wheel (missing .so, numpy ABI)
        raise RuntimeUnavailableError(
            "this bundle is an ONNX model but onnxruntime is not installed here: "
            "`pip install onnxruntime` (or install the agent with `pip install 'edgefleet[edge]'`)"
        ) from e
    return onnxruntime


class OnnxRuntime:
    """An ONNX model in an onnxruntime ``InferenceSession`` on the CPU provider.

    One intra-op pool of ``threads`` threads, no inter-op parallelism, and no spinning
    (``session.intra_op.allow_spinning = 0``): an agent scores one window per sample, and a
    spinning pool would burn the edge host's cores between samples.

    ``score_one`` runs through an IO binding over preallocated input (and, when the output
    shape is static, output) buffers, so a call copies the window in and reads one number out.

    Raises :class:`RuntimeUnavailableError` when onnxruntime is missing and
    :class:`ModelLoadError` when the bytes are not a loadable model matching the spec.
    Not safe for concurrent calls.
    """

    name = "onnxruntime"
    format = "onnx"

    def __init__(self, spec: BundleSpec, model_bytes: bytes, *, threads: int = 1) -> None:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only; load failures are raised, not logged
        # Small models, one sample at a time: a pre-sized memory arena and memory-pattern
        # planning only add resident memory on an edge host.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        try:
            self._sess = ort.InferenceSession(
                bytes(model_bytes), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise ModelLoadError(f"onnxruntime cannot load the model: {e}") from e
        self._spec = spec
        inputs = self._sess.get_inputs()
        outputs = self._sess.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(
                f"model has {len(inputs)} inputs and {len(outputs)} outputs; expected one input"
            )
        inp = inputs[0]
        out = next((o for o in outputs if spec.outputs and o.name == spec.outputs[0].name), outputs[0])
        self._in_name, self._out_name = inp.name, out.name
        self._in_dtype = _dtype(inp.type, f"input {inp.name!r}")
        self._out_dtype = _dtype(out.type, f"output {out.name!r}")
        in_shape = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        self._sample_shape = model_sample_shape(in_shape, spec, f"input {inp.name!r}")
        self.batch_size: int | None = in_shape[0]
        self._in_q: QuantParams | None = None
        self._out_q: QuantParams | None = None
        if self._in_dtype.kind in "iu":
            ts = tensor_spec(spec.inputs, 0)
            self._in_q = QuantParams.resolve(None, ts.quantization if ts else None, f"input {inp.name!r}")
        if self._out_dtype.kind in "iu":
            ts = tensor_spec(spec.outputs, 0)
            self._out_q = QuantParams.resolve(None, ts.quantization if ts else None, f"output {out.name!r}")

        # The hot path's buffers: one batch (1, or the fixed batch) of input.
        rows = self.batch_size or 1
        self._in_buf = np.zeros((rows, *self._sample_shape), self._in_dtype)
        self._in_view = self._in_buf[0].reshape(spec.window, len(spec.features))
        self._scratch = np.empty(self._in_view.shape, np.float32)
        self._binding = self._sess.io_binding()
        # ortvalue_from_numpy wraps (does not copy) a CPU array: writes to _in_buf are seen.
        self._in_value = ort.OrtValue.ortvalue_from_numpy(self._in_buf)
        self._binding.bind_ortvalue_input(self._in_name, self._in_value)
        out_shape = [rows if i == 0 else d for i, d in enumerate(out.shape)]
        self._out_buf: np.ndarray | None = None
        if out_shape and all(isinstance(d, int) and d > 0 for d in out_shape):
            if int(np.prod(out_shape[1:])) != 1:
                raise ModelLoadError(
                    f"output {out.name!r} is shaped {out.shape}; expected one score per window"
                )
            self._out_buf = np.zeros(out_shape, self._out_dtype)
            self._out_value = ort.OrtValue.ortvalue_from_numpy(self._out_buf)
            self._binding.bind_ortvalue_output(self._out_name, self._out_value)
        else:
            self._binding.bind_output(self._out_name, "cpu")
        self._closed = False
        logger.debug(
            "onnxruntime session: input %s %s %s, output %s %s, batch %s, threads %d",
            self._in_name, self._in_dtype, in_shape, self._out_name, self._out_dtype,
            self.batch_size, opts.intra_op_num_threads,
        )

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Score ``(n, window, features)`` windows; see :class:`ModelRuntime`."""
        self._check_open()
        arr = as_windows(windows, self._spec)
        n = arr.shape[0]
        if n == 0:
            return np.empty(0, np.float32)
        x = arr.reshape(n, *self._sample_shape)
        if self.batch_size is None:
            return self._run(x)
        return score_fixed_batch(self._run, x, self.batch_size)

    def score_one(self, window: np.ndarray) -> float:
        """Score one ``(window, features)`` window through the preallocated IO binding."""
        self._check_open()
        w = np.asarray(window)
        if w.shape != self._in_view.shape:
            raise ModelRuntimeError(f"window must be shaped {self._in_view.shape}, got {w.shape}")
        if self._in_q is None:
            np.copyto(self._in_view, w, casting="unsafe")
        else:
            quantize(w, self._in_q, self._in_dtype, out=self._in_view, scratch=self._scratch)
        try:
            self._sess.run_with_iobinding(self._binding)
            if self._out_buf is not None:
                raw = self._out_buf.flat[0]
            else:
                raw = self._binding.get_outputs()[0].numpy().flat[0]
        except Exception as e:
            raise ModelRuntimeError(f"onnxruntime inference failed: {e}") from e
        if self._out_q is None:
            return float(raw)
        return (float(raw) - self._out_q.zero_point) * self._out_q.scale

    def close(self) -> None:
        """Drop the session and its buffers. Idempotent."""
        self._closed = True
        self._binding = None
        self._sess = None

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        feed = x if self._in_q is None else quantize(x, self._in_q, self._in_dtype)
        try:
            (y,) = self._sess.run([self._out_name], {self._in_name: feed.astype(self._in_dtype, copy=False)})
        except Exception as e:
            raise ModelRuntimeError(f"onnxruntime inference failed: {e}") from e
        y = np.asarray(y).reshape(n, -1)
        if y.shape[1] != 1:
            raise ModelRuntimeError(
                f"model output {self._out_name!r} has {y.shape[1]} values per window; expected one score"
            )
        y = y[:, 0]
        return dequantize(y, self._out_q) if self._out_q else y.astype(np.float32)

    def _check_open(self) -> None:
        if self._closed:
            raise ModelRuntimeError("runtime is closed")


def _dtype(ort_type: str, what: str) -> np.dtype[Any]:
    try:
        return _ORT_DTYPES[ort_type]
    except KeyError:
        raise ModelLoadError(f"{what} has type {ort_type}; supported: float32, int8/uint8, int16/uint16") from None
