"""ONNX export: fp32 with a dynamic batch, and int8 static QDQ per-channel."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from trainer.export._quiet import quiet_fds

INPUT_NAME = "window"
OUTPUT_NAME = "score"


def _canonical(model: onnx.ModelProto) -> bytes:
    """Serialize without what varies between machines and checkouts.

    The dynamo exporter records source paths and stack traces in node metadata; dropping
    them keeps bundles byte-reproducible across clones and shrinks the file.
    """
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""  # optional in ONNX; the exporter's long names cost bytes on the device
    del graph.value_info[:]
    # Short tensor names: the exporter's are paths like "body.0.weight_DequantizeLinear_Output",
    # which on a small int8 model are a noticeable share of the file. Graph I/O keep theirs.
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del model.metadata_props[:]
    model.doc_string = ""
    model.graph.doc_string = ""
    return model.SerializeToString(deterministic=True)


def export_onnx_fp32(module: torch.nn.Module, example: np.ndarray) -> bytes:
    """A single-file fp32 ONNX model with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    # Traced with a batch of two copies of the first example: with a batch of one, torch.export
    # specializes the batch of a one-channel Conv1d input (a conv model of one metric) to 1 and
    # then refuses the dynamic batch. The graph is the same either way (same bytes for the
    # MLP and linear families).
    example = np.repeat(example[:1], 2, axis=0)
    with tempfile.TemporaryDirectory() as tmp, quiet_fds():
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            (torch.from_numpy(np.ascontiguousarray(example)),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            dynamo=True,
            verbose=False,
            optimize=True,
        )
        return _canonical(onnx.load(str(path)))


class _Windows(CalibrationDataReader):
    def __init__(self, windows: np.ndarray) -> None:
        self._it = iter(windows[i : i + 1] for i in range(len(windows)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        return None if item is None else {INPUT_NAME: item}


def quantize_onnx_int8(fp32_model: bytes, calibration: np.ndarray, per_channel: bool = True) -> bytes:
    """Static QDQ: int8 per-channel weights (per tensor with ``per_channel=False``), 16-bit activations, calibrated on ``calibration``.

    Weights are int8 (the artifact is as small as full int8), activations 16-bit (A16W8): a
    forecaster's output is a small difference of large hidden activations, and 8-bit
    activations in onnxruntime's QDQ make its error as large as the noise it should measure
    (forecast errors off by ~100% of their typical size, with scores ranked almost at random
    against fp32), while 16-bit activations keep them within a fraction of a percent. The model
    is lifted to opset 21, the first with 16-bit QuantizeLinear.

    Biases stay fp32 (``QuantizeBias: False``): on models this small the int32 bias with its
    own per-channel scale and zero point costs more bytes than it saves. Only matrix products
    and convolutions (the conv family's body) are quantized: normalisation (the window's
    level) and the score's error term stay float, because an anomalous window lies outside the
    calibration range by definition and clipping it would hide it. In the attention family
    every MatMul is quantized, the projections (int8 weights) and the two products of
    activations (query·key and weights·value, both inputs 16-bit); its Softmax and
    LayerNormalization stay float.
    """
    with tempfile.TemporaryDirectory() as tmp, quiet_fds():
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32_model)
        quant_pre_process(str(src), str(pre))
        quantize_static(
            str(pre),
            str(out),
            _Windows(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt16,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            extra_options={"QuantizeBias": False, "ActivationSymmetric": False},
        )
        return _canonical(onnx.load(str(out)))


def quantize_onnx_dynamic(fp32_model: bytes) -> bytes:
    """Dynamic quantization: int8 weights of the matrix products, activations quantized to
    8 bits at run time from each input's own range (no calibration set). onnxruntime's
    ``quantize_dynamic`` with its defaults for the operators, per-tensor weights.
    """
    with tempfile.TemporaryDirectory() as tmp, quiet_fds():
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "dynamic.onnx"))
        src.write_bytes(fp32_model)
        quant_pre_process(str(src), str(pre))
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        return _canonical(onnx.load(str(out)))
