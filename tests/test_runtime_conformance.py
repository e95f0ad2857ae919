"""One conformance suite for every model runtime: each (backend × quantization) available.

Bundles come from two sources, both real: the trainer CLI (``trainer.cli train`` on a sine
CSV, artifacts read back from its registry) and small models built here — ONNX graphs made
with ``onnx.helper`` (float I/O with dynamic or fixed batch, and int8-in/uint8-out I/O) and
TFLite models converted by litert-torch (float I/O, and full-int8 with int8 I/O).
Tests may import torch/onnx; ``edge_agent`` never does.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from edge_agent.runtime import (
    ModelRuntimeError,
    QuantParams,
    SmokeTestError,
    available_runtimes,
    dequantize,
    open_runtime,
    quantize,
    smoke_test,
)
from shared.bundle import (
    BundleSpec,
    GoldenVectors,
    ScoreSpec,
    TensorSpec,
    read_bundle,
    write_bundle,
)

REPO = Path(__file__).resolve().parents[1]
W, F = 16, 1
BACKEND = {"onnx": "onnxruntime", "tflite": "litert"}


@dataclass
class Case:
    id: str
    spec: BundleSpec
    model: bytes


def _spec(fmt: str, quant: str, inputs, outputs, golden_in: np.ndarray, golden_out: np.ndarray,
          atol: float, rtol: float, window: int = W) -> BundleSpec:
    return BundleSpec(
        name="conf-handmade", format=fmt, quantization=quant,
        model_file="model.onnx" if fmt == "onnx" else "model.tflite",
        inputs=tuple(inputs), outputs=tuple(outputs), window=window, features=("value",) * F,
        score=ScoreSpec(kind="mse", threshold=1.0, center=0.0, width=0.5),
        golden=GoldenVectors(inputs=golden_in.tolist(), outputs=[float(v) for v in golden_out],
                             atol=atol, rtol=rtol),
    )


def _golden_inputs(n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(W)
    base = np.sin(2 * np.pi * (t[None, :] + rng.integers(0, 50, n)[:, None]) / 8.0)
    return (base + 0.3 * rng.standard_normal((n, W))).astype(np.float32)[..., None]


# -- ONNX built with onnx.helper: score = mean((x - c)^2) over the window ------------------------

_C = 0.25


def _onnx_mse(batch: int | str, int8_io: bool) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], [helper.make_tensor("c", TensorProto.FLOAT, [], [_C]),
                        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])]
    x = "x"
    in_type = TensorProto.INT8 if int8_io else TensorProto.FLOAT
    if int8_io:
        inits += [helper.make_tensor("xs", TensorProto.FLOAT, [], [0.02]),
                  helper.make_tensor("xz", TensorProto.INT8, [], [3]),
                  helper.make_tensor("ys", TensorProto.FLOAT, [], [0.01]),
                  helper.make_tensor("yz", TensorProto.UINT8, [], [0])]
        nodes.append(helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]))
        x = "xf"
    nodes += [helper.make_node("Sub", [x, "c"], ["d"]), helper.make_node("Mul", ["d", "d"], ["d2"]),
              helper.make_node("ReduceMean", ["d2", "axes"], ["s"], keepdims=0)]
    out_type = TensorProto.FLOAT
    if int8_io:
        nodes.append(helper.make_node("QuantizeLinear", ["s", "ys", "yz"], ["score"]))
        out_type = TensorProto.UINT8
    else:
        nodes[-1].output[0] = "score"
    graph = helper.make_graph(
        nodes, "mse", [helper.make_tensor_value_info("x", in_type, [batch, W, F])],
        [helper.make_tensor_value_info("score", out_type, [batch])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _onnx_cases() -> list[Case]:
    g = _golden_inputs()
    ref = ((g.astype(np.float64) - _C) ** 2).mean(axis=(1, 2))
    x_t = TensorSpec("x", "float32", (None, W, F))
    s_t = TensorSpec("score", "float32", (None,))
    cases = [
        Case("handmade-onnx-fp32-dynbatch", _spec("onnx", "fp32", [x_t], [s_t], g, ref, 1e-5, 1e-4),
             _onnx_mse("n", False)),
        Case("handmade-onnx-fp32-batch1", _spec("onnx", "fp32", [replace(x_t, shape=(1, W, F))],
                                                [replace(s_t, shape=(1,))], g, ref, 1e-5, 1e-4),
             _onnx_mse(1, False)),
    ]
    # int8 in, uint8 out: onnxruntime reports no quantization params, so the spec's are used.
    xq, yq = QuantParams(0.02, 3), QuantParams(0.01, 0)
    g_q = dequantize(quantize(g, xq, np.int8), xq)
    ref_q = ((g_q.astype(np.float64) - _C) ** 2).mean(axis=(1, 2))
    cases.append(Case(
        "handmade-onnx-int8io",
        _spec("onnx", "int8",
              [TensorSpec("x", "int8", (None, W, F), {"scale": 0.02, "zero_point": 3})],
              [TensorSpec("score", "uint8", (None,), {"scale": 0.01, "zero_point": 0})],
              g, ref_q, yq.scale * 0.51, 0.0),
        _onnx_mse("n", True)))
    return cases


# -- TFLite via litert-torch ---------------------------------------------------------------------


def _tflite_cases(tmp: Path) -> list[Case]:
    import litert_torch
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(F, 8), torch.nn.Linear(8 * W, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.l1(x))
            return torch.nn.functional.softplus(self.l2(h.reshape(h.shape[0], -1)))[:, 0]

    torch.manual_seed(0)
    net = Net().eval()
    ex = torch.zeros(1, W, F)
    g = _golden_inputs()
    with torch.no_grad():
        ref = net(torch.from_numpy(g)).numpy().astype(np.float64)
    litert_torch.convert(net, (ex,)).export(str(tmp / "fp32.tflite"))
    x_t = TensorSpec("x", "float32", (1, W, F))
    s_t = TensorSpec("score", "float32", (1,))
    cases = [Case("handmade-tflite-fp32", _spec("tflite", "fp32", [x_t], [s_t], g, ref, 1e-4, 1e-3),
                  (tmp / "fp32.tflite").read_bytes())]

    # Full int8 (PT2E static quantization): litert-torch gives this graph int8 input and output.
    class Head(torch.nn.Module):  # no softplus: keep every op quantizable
        def __init__(self, net: Net) -> None:
            super().__init__()
            self.l1, self.l2 = net.l1, net.l2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.l1(x))
            return self.l2(h.reshape(h.shape[0], -1))

    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=False, is_dynamic=False))
    head = Head(net).eval()
    prepared = prepare_pt2e(torch.export.export(head, (ex,)).module(), quantizer)
    for i in range(len(g)):
        prepared(torch.from_numpy(g[i:i + 1]))
    converted = convert_pt2e(prepared, fold_quantize=False)
    litert_torch.convert(converted, (ex,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)
                         ).export(str(tmp / "int8.tflite"))
    model = (tmp / "int8.tflite").read_bytes()
    # Golden outputs from an independent, hand-written (de)quantization around the interpreter.
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    it.allocate_tensors()
    i_d, o_d = it.get_input_details()[0], it.get_output_details()[0]
    assert i_d["dtype"] == np.int8 and o_d["dtype"] == np.int8, "expected an int8-I/O TFLite model"
    (si, zi), (so, zo) = i_d["quantization"], o_d["quantization"]
    ref_q = []
    for w in g:
        q = np.clip(np.round(w / si) + zi, -128, 127).astype(np.int8)[None]
        it.set_tensor(i_d["index"], q)
        it.invoke()
        ref_q.append((float(it.get_tensor(o_d["index"]).flat[0]) - zo) * so)
    cases.append(Case(
        "handmade-tflite-int8io",
        # The spec's params are deliberately wrong: the runtime must prefer the model's own.
        _spec("tflite", "int8",
              [TensorSpec("x", "int8", (1, W, F), {"scale": 1.0, "zero_point": 0})],
              [TensorSpec("score", "int8", (1,), {"scale": 1.0, "zero_point": 0})],
              g, np.array(ref_q), so * 1.01, 0.0),
        model))
    return cases


# -- the trainer's bundles -----------------------------------------------------------------------

TRAINER_COMBOS = [("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")]


def _trainer_cases(tmp: Path) -> tuple[list[Case], str | None]:
    if not (REPO / "trainer" / "cli.py").exists():
        return [], "trainer.cli is not in this tree yet"
    n = 2000
    rng = np.random.default_rng(1)
    v = np.sin(2 * np.pi * np.arange(n) / 50) + 0.1 * rng.standard_normal(n)
    csv = tmp / "conf.csv"
    t0 = dt.datetime(2024, 1, 1)
    csv.write_text("timestamp,value\n" + "".join(
        f"{t0 + dt.timedelta(minutes=i):%Y-%m-%d %H:%M:%S},{v[i]:.6f}\n" for i in range(n)))
    reg = tmp / "registry"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--data", str(csv), "--profile", "x86-64-v3",
         "--profile", "rpi4-arm64", "--name", "conf", "--registry", str(reg), "--epochs", "3",
         "--seed", "1", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return [], f"trainer.cli train failed ({proc.returncode}): {proc.stderr[-2000:]}"
    show = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "registry", "show", "conf", "--registry", str(reg), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    doc = json.loads(show.stdout if show.returncode == 0 else proc.stdout)
    versions = doc.get("versions") or [doc]
    cases = []
    for art in versions[-1]["artifacts"]:
        sha = art["sha256"]
        blob = (reg / "blobs" / sha[:2] / sha).read_bytes()
        spec, model = read_bundle(blob)
        cases.append(Case(f"trainer-{art['format']}-{art['quantization']}", spec, model))
    return cases, None


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case | str]:
    """All cases by id; a string value is the reason a case could not be built."""
    tmp = tmp_path_factory.mktemp("conformance")
    out: dict[str, Case | str] = {}
    for case in _onnx_cases() + _tflite_cases(tmp):
        # Round-trip through the real bundle format, as the agent receives it.
        spec, model = read_bundle(write_bundle(case.spec, case.model))
        out[case.id] = Case(case.id, spec, model)
    cases, why = _trainer_cases(tmp)
    for case in cases:
        out[case.id] = case
    for fmt, quant in TRAINER_COMBOS:
        out.setdefault(f"trainer-{fmt}-{quant}", why or f"the trainer produced no {fmt}/{quant} artifact")
    return out


CASE_IDS = [
    "handmade-onnx-fp32-dynbatch", "handmade-onnx-fp32-batch1", "handmade-onnx-int8io",
    "handmade-tflite-fp32", "handmade-tflite-int8io",
    *[f"trainer-{f}-{q}" for f, q in TRAINER_COMBOS],
]


@pytest.fixture(params=CASE_IDS)
def case(request: pytest.FixtureRequest, bundles: dict[str, Case | str]) -> Case:
    c = bundles[request.param]
    if isinstance(c, str):
        if request.param.startswith("trainer") and os.environ.get("CI") == "true":
            pytest.fail(c)
        pytest.skip(c)
    if BACKEND[c.spec.format] not in available_runtimes():
        pytest.skip(f"{BACKEND[c.spec.format]} is not installed")
    return c


@pytest.fixture
def runtime(case: Case):
    rt = open_runtime(case.spec, case.model, threads=1)
    yield rt
    rt.close()


def _windows(case: Case, n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(case.spec.window)
    base = np.sin(2 * np.pi * (t[None, :, None] + rng.integers(0, 50, (n, 1, 1))) / 8.0)
    return (base + 0.2 * rng.standard_normal((n, case.spec.window, len(case.spec.features)))).astype(np.float32)


# -- the contract ------------------------------------------------------------------------------


def test_identity(case: Case, runtime) -> None:
    assert runtime.name == BACKEND[case.spec.format]
    assert runtime.format == case.spec.format
    assert runtime.batch_size is None or runtime.batch_size >= 1
    if case.spec.format == "tflite":
        assert runtime.batch_size == 1


def test_output_shape_and_dtype(case: Case, runtime) -> None:
    for n in (1, 3):
        y = runtime.score(_windows(case, n))
        assert y.shape == (n,) and y.dtype == np.float32
        assert np.isfinite(y).all()
    assert runtime.score(np.zeros((0, case.spec.window, len(case.spec.features)), np.float32)).shape == (0,)


def test_golden_smoke_test_passes(case: Case, runtime) -> None:
    smoke_test(runtime, case.spec)


def test_score_one_equals_batch_of_one(case: Case, runtime) -> None:
    ws = _windows(case, 5)
    one = [runtime.score_one(w) for w in ws]  # consecutive calls: the buffer is really refilled
    assert all(isinstance(v, float) for v in one)
    batch1 = [float(runtime.score(w[None])[0]) for w in ws]
    np.testing.assert_allclose(one, batch1, rtol=1e-6, atol=1e-7)
    assert len(set(one)) > 1  # different windows, different scores
    # float64 and non-contiguous inputs are accepted by the hot path
    assert runtime.score_one(np.asfortranarray(ws[0].astype(np.float64))) == pytest.approx(one[0], rel=1e-6)


def test_any_batch_size_matches_one_by_one(case: Case, runtime) -> None:
    ws = _windows(case, 7)
    many = runtime.score(ws)  # a batch-1 model loops; a dynamic one runs once
    singles = np.array([runtime.score(w[None])[0] for w in ws])
    if case.spec.quantization == "int8":
        # A batch may sum a window's mean in another order than one window alone; a float
        # difference in the last bit can land the body's input one 16-bit quantization step
        # apart. The agent, detect and evaluate all score one window at a time (score_one).
        np.testing.assert_allclose(many, singles, rtol=1e-3, atol=1e-4)
    else:
        np.testing.assert_allclose(many, singles, rtol=1e-5, atol=1e-6)


def test_deterministic(case: Case, runtime) -> None:
    ws = _windows(case, 4)
    a, b = runtime.score(ws), runtime.score(ws)
    np.testing.assert_array_equal(a, b)
    assert runtime.score_one(ws[1]) == runtime.score_one(ws[1])


def test_wrong_window_shape_is_a_runtime_error(case: Case, runtime) -> None:
    with pytest.raises(ModelRuntimeError):
        runtime.score(np.zeros((2, case.spec.window + 1, len(case.spec.features)), np.float32))
    with pytest.raises(ModelRuntimeError):
        runtime.score_one(np.zeros((case.spec.window - 1, len(case.spec.features)), np.float32))


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "flipped-header"])
def test_corrupted_model_is_a_runtime_error(case: Case, damage: str) -> None:
    model = case.model
    bad = {
        "empty": b"",
        "truncated": model[: len(model) // 3],
        "garbage": np.random.default_rng(0).bytes(4096),
        "flipped-header": bytes(b ^ 0xFF for b in model[:64]) + model[64:],
    }[damage]
    with pytest.raises(ModelRuntimeError):
        open_runtime(case.spec, bad)


def test_golden_mismatch_is_a_smoke_test_error(case: Case, runtime) -> None:
    g = case.spec.golden
    shifted = [v + 10 * (g.atol + g.rtol * abs(v)) + 1.0 if i == 2 else v for i, v in enumerate(g.outputs)]
    spec = replace(case.spec, golden=replace(g, outputs=shifted))
    with pytest.raises(SmokeTestError, match=r"golden vector 2 of \d+: got .* expected .*\|diff\|"):
        smoke_test(runtime, spec)


def test_closed_runtime_refuses(case: Case) -> None:
    rt = open_runtime(case.spec, case.model)
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(ModelRuntimeError, match="closed"):
        rt.score_one(np.zeros((case.spec.window, len(case.spec.features)), np.float32))


def test_threads_option(case: Case) -> None:
    rt = open_runtime(case.spec, case.model, threads=2)
    try:
        smoke_test(rt, case.spec)
    finally:
        rt.close()


# -- (de)quantization helpers, with numbers ------------------------------------------------------


def test_quantize_rounds_offsets_and_clips() -> None:
    p = QuantParams(scale=0.5, zero_point=-10)
    x = np.array([0.0, 0.26, -0.26, 1.0, 1000.0, -1000.0], np.float32)
    q = quantize(x, p, np.int8)
    assert q.dtype == np.int8
    assert q.tolist() == [-10, -9, -11, -8, 127, -128]
    assert quantize(np.array([-5.0, 200.0], np.float32), QuantParams(1.0, 0), np.uint8).tolist() == [0, 200]
    np.testing.assert_allclose(dequantize(np.array([-10, -8, 127], np.int8), p), [0.0, 1.0, 68.5])
    out = np.empty(3, np.int8)
    scratch = np.empty(3, np.float32)
    assert quantize(np.array([0.5, 1.5, 2.5], np.float32), QuantParams(1.0, 0), np.int8,
                    out=out, scratch=scratch) is out
    assert out.tolist() == [0, 2, 2]  # half to even, like np.rint


def test_quant_params_prefer_the_model_and_fall_back_to_the_spec() -> None:
    assert QuantParams.resolve((0.1, 4), {"scale": 9.0, "zero_point": 1}, "x") == QuantParams(0.1, 4)
    assert QuantParams.resolve((0.0, 0), {"scale": 9.0, "zero_point": 1}, "x") == QuantParams(9.0, 1)
    with pytest.raises(ModelRuntimeError, match="quantization"):
        QuantParams.resolve((0.0, 0), None, "input 'x'")


def test_int8_onnx_without_quantization_params_is_refused(bundles) -> None:
    c = bundles["handmade-onnx-int8io"]
    spec = replace(c.spec, inputs=(replace(c.spec.inputs[0], quantization=None),))
    with pytest.raises(ModelRuntimeError, match="quantization"):
        open_runtime(spec, c.model)


def test_model_not_matching_the_spec_window_is_refused(bundles) -> None:
    c = bundles["handmade-onnx-fp32-batch1"]
    with pytest.raises(ModelRuntimeError, match="window"):
        open_runtime(replace(c.spec, window=W * 2), c.model)


def test_unknown_format_is_refused(bundles) -> None:
    c = bundles["handmade-onnx-fp32-dynbatch"]
    with pytest.raises(ModelRuntimeError, match="format"):
        open_runtime(replace(c.spec, format="pte"), c.model)

