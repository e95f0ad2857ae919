"""ONNX export of the tree families: skl2onnx's graph of the forest between the window's
normalisation and the score, so that the artifact takes and gives what every other family's
does (input ``window`` ``(batch, rows, features)`` raw values, output ``score`` ``(batch,)``)
and the agent runs it unchanged.

Three graphs composed with :func:`onnx.compose.merge_models`:

1. *normalise* (written here with :mod:`onnx.helper`): the rows the estimator reads
   (:func:`trainer.models._trees.row_slices`), centred, scaled and clipped as
   :class:`~trainer.models._trees.TreeModel` does it, flattened into ``features``; it also
   passes on, for the forecaster, the windows' ``level`` and the raw last row;
2. *forest*: skl2onnx's conversion of the fitted estimator, reading ``features``;
3. *score* (here): the forecaster's worst-metric absolute error against the raw last row, or
   the isolation forest's anomaly score ``-(decision_function + offset_)``.

Opsets: ONNX 18 and ``ai.onnx.ml`` 3 (:data:`OPSETS`), which skl2onnx needs for
``IsolationForest``; onnxruntime's default CPU build (the agent's) runs the ``ai.onnx.ml``
tree-ensemble operators. The graph is fp32; no int8 form exists (:mod:`trainer.export.targets`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from trainer.export._onnx import INPUT_NAME, OUTPUT_NAME, _canonical
from trainer.models._networks import CLIP
from trainer.models._trees import TreeModel, WindowIsolationForest, row_slices

__all__ = ["OPSETS", "export_tree_onnx"]

OPSETS = {"": 18, "ai.onnx.ml": 3}
_FEATURES = "features"
_PREDICTION = "prediction"
_FOREST_PREFIX = "forest_"


def _import_opsets(model: onnx.ModelProto) -> None:
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in OPSETS.items())


def _model(graph: onnx.GraphProto, ir_version: int) -> onnx.ModelProto:
    model = helper.make_model(graph, ir_version=ir_version)
    _import_opsets(model)
    return model


def _constant(name: str, value: np.ndarray | np.generic) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _normalise_graph(model: TreeModel) -> onnx.GraphProto:
    """``window`` → ``features`` (the estimator's input) and, for the forecaster, the windows'
    ``level`` and raw ``last_rows``."""
    spec = model.spec
    rows, features = spec.input_rows, spec.features
    past, seasonal, last = row_slices(spec)
    init = [
        _constant("std", model.std.reshape(1, 1, features)),
        _constant("clip_low", np.float32(-CLIP)),
        _constant("clip_high", np.float32(CLIP)),
        _constant("time_axis", np.array([1], np.int64)),
    ]
    nodes = []

    def rows_of(name: str, part: slice) -> str:
        init.extend([_constant(f"{name}_start", np.array([part.start], np.int64)),
                     _constant(f"{name}_stop", np.array([part.stop], np.int64))])
        nodes.append(helper.make_node("Slice", [INPUT_NAME, f"{name}_start", f"{name}_stop", "time_axis"],
                                      [f"{name}_rows"]))
        return f"{name}_rows"

    def normalised(name: str, raw: str) -> str:
        nodes.extend([
            helper.make_node("Sub", [raw, "level"], [f"{name}_centred"]),
            helper.make_node("Div", [f"{name}_centred", "std"], [f"{name}_scaled"]),
            helper.make_node("Clip", [f"{name}_scaled", "clip_low", "clip_high"], [f"{name}_clipped"]),
            helper.make_node("Flatten", [f"{name}_clipped"], [f"{name}_flat"], axis=1),
        ])
        return f"{name}_flat"

    past_rows = rows_of("past", past)
    if spec.centering == "window":  # summed in float64, as TreeModel.level sums it
        init.append(_constant("past_count", np.float64(past.stop - past.start)))
        nodes.extend([
            helper.make_node("Cast", [past_rows], ["past_double"], to=TensorProto.DOUBLE),
            helper.make_node("ReduceSum", ["past_double", "time_axis"], ["past_total"], keepdims=1),
            helper.make_node("Div", ["past_total", "past_count"], ["level_double"]),
            helper.make_node("Cast", ["level_double"], ["level"], to=TensorProto.FLOAT),
        ])
    else:  # the training mean, broadcast over the batch
        init.append(_constant("train_mean", model.mean.reshape(1, 1, features)))
        nodes.append(helper.make_node("Identity", ["train_mean"], ["level"]))
    parts = [normalised("past", past_rows)]
    if seasonal is not None:
        parts.append(normalised("seasonal", rows_of("seasonal", seasonal)))
    nodes.append(helper.make_node("Concat", parts, [_FEATURES], axis=1))
    outputs = [helper.make_tensor_value_info(_FEATURES, TensorProto.FLOAT, ["batch", None])]
    if last is not None:  # what the forecast error reads besides the forecast
        rows_of("last", slice(last, last + 1))
        outputs += [helper.make_tensor_value_info("level", TensorProto.FLOAT, [None, 1, features]),
                    helper.make_tensor_value_info("last_rows", TensorProto.FLOAT, ["batch", 1, features])]
    window = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", rows, features])
    return helper.make_graph(nodes, "normalise", [window], outputs, initializer=init)


def _score_graph(model: TreeModel) -> onnx.GraphProto:
    """The forest's output (``prediction``; ``level``, ``last_rows``) → ``score`` ``(batch,)``."""
    features = model.spec.features
    flat = np.array([-1], np.int64)
    if isinstance(model, WindowIsolationForest):
        # skl2onnx's "scores" is decision_function = score_samples - offset_; the raw score is
        # -score_samples, the forest's anomaly score (higher = more anomalous)
        init = [_constant("offset", np.float32(model.estimator.offset_)), _constant("flat", flat)]
        nodes = [
            helper.make_node("Add", [_PREDICTION, "offset"], ["samples"]),
            helper.make_node("Neg", ["samples"], ["anomaly"]),
            helper.make_node("Reshape", ["anomaly", "flat"], [OUTPUT_NAME]),
        ]
        inputs = [helper.make_tensor_value_info(_PREDICTION, TensorProto.FLOAT, ["batch", 1])]
    else:
        # |prediction * std + level - last| / std, worst metric: the torch forecasters' score
        init = [
            _constant("error_std", model.std.reshape(1, 1, features)),
            _constant("row_shape", np.array([-1, 1, features], np.int64)),
            _constant("metric_axes", np.array([1, 2], np.int64)),
        ]
        nodes = [
            helper.make_node("Reshape", [_PREDICTION, "row_shape"], ["predicted"]),
            helper.make_node("Mul", ["predicted", "error_std"], ["predicted_scaled"]),
            helper.make_node("Add", ["predicted_scaled", "level"], ["predicted_raw"]),
            helper.make_node("Sub", ["predicted_raw", "last_rows"], ["error_raw"]),
            helper.make_node("Div", ["error_raw", "error_std"], ["error"]),
            helper.make_node("Abs", ["error"], ["error_abs"]),
            helper.make_node("ReduceMax", ["error_abs", "metric_axes"], [OUTPUT_NAME], keepdims=0),
        ]
        inputs = [
            helper.make_tensor_value_info(_PREDICTION, TensorProto.FLOAT, ["batch", None]),
            helper.make_tensor_value_info("level", TensorProto.FLOAT, [None, 1, features]),
            helper.make_tensor_value_info("last_rows", TensorProto.FLOAT, ["batch", 1, features]),
        ]
    score = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch"])
    return helper.make_graph(nodes, "score", inputs, [score], initializer=init)


def _forest(model: TreeModel, width: int) -> tuple[onnx.ModelProto, str]:
    """skl2onnx's graph of the fitted estimator and the name of the output the score reads."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    forest = to_onnx(model.estimator, initial_types=[(_FEATURES, FloatTensorType([None, width]))],
                     target_opset=OPSETS)
    # skl2onnx declares a forest's output one column wide even with several targets (onnxruntime
    # then warns at every run); it is an inner tensor once composed, so its dimensions are left open
    for out in forest.graph.output:
        for dim in out.type.tensor_type.shape.dim:
            dim.Clear()
    # skl2onnx imports the lowest opsets its operators need (ai.onnx.ml 1 for a regressor's
    # forest, the default domain twice); the composed model imports OPSETS, which cover them
    _import_opsets(forest)
    names = [o.name for o in forest.graph.output]
    return forest, "scores" if isinstance(model, WindowIsolationForest) else names[0]


def export_tree_onnx(model: TreeModel) -> bytes:
    """A single-file fp32 ONNX model of a fitted tree family, with a dynamic batch dimension.

    Raises ``ImportError`` (with how to install it) when skl2onnx is missing.
    """
    try:
        import skl2onnx  # noqa: F401
    except ImportError as e:
        raise ImportError("exporting a tree family needs skl2onnx: `pip install skl2onnx` "
                          "(or install edgefleet with `pip install 'edgefleet[trainer]'`)") from e
    normalise = _normalise_graph(model)
    width = _input_width(model)
    forest, output = _forest(model, width)
    ir = forest.ir_version
    head = compose.merge_models(_model(normalise, ir), forest, io_map=[(_FEATURES, _FEATURES)],
                                prefix2=_FOREST_PREFIX)
    carried = [("level", "level"), ("last_rows", "last_rows")] if model.spec.forecasts else []
    merged = compose.merge_models(head, _model(_score_graph(model), ir),
                                  io_map=[(_FOREST_PREFIX + output, _PREDICTION), *carried],
                                  outputs=[OUTPUT_NAME])
    _import_opsets(merged)  # merge_models lists each model's imports: the same ones, twice
    onnx.checker.check_model(merged, full_check=True)
    return _canonical(merged)


def _input_width(model: TreeModel) -> int:
    past, seasonal, _ = row_slices(model.spec)
    rows = (past.stop - past.start) + (0 if seasonal is None else seasonal.stop - seasonal.start)
    return rows * model.spec.features
