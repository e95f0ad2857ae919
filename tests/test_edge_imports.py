"""The edge agent imports and runs with torch, optuna, onnx, flwr and dp-accounting unavailable.

A subprocess installs a meta-path finder that refuses those packages (onnxruntime stays
allowed), imports every module under ``edge_agent`` and ``shared``, then loads an ONNX bundle
from bytes, smoke-tests it and runs a Detector over it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

from shared.bundle import BundleSpec, GoldenVectors, ScoreSpec, TensorSpec, write_bundle

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    BLOCKED = {"torch", "optuna", "onnx", "sklearn", "skl2onnx", "flwr", "dp_accounting"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: the agent must not need it)")
            return None

    sys.meta_path.insert(0, Block())
    assert not BLOCKED & {m.split(".")[0] for m in sys.modules}

    imported = []
    for pkg_name in ("shared", "edge_agent"):
        pkg = importlib.import_module(pkg_name)
        imported.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            importlib.import_module(info.name)  # any ImportError fails the test
            imported.append(info.name)

    import numpy as np
    from shared.bundle import read_bundle
    from edge_agent.runtime import available_runtimes, open_runtime, smoke_test
    from edge_agent.detector import Detector

    spec, model = read_bundle(open(sys.argv[1], "rb").read())
    rt = open_runtime(spec, model)
    smoke_test(rt, spec)
    det = Detector(rt, spec, model_version=1)
    out = [det.push(str(i), [float(np.sin(i / 3.0))]) for i in range(40)]
    found = [d for d in out if d is not None]
    assert len(found) == 40 - spec.window + 1, len(found)
    assert not BLOCKED & {m.split(".")[0] for m in sys.modules}
    print(json.dumps({"imported": imported, "detections": len(found),
                      "runtimes": available_runtimes(), "stats": det.stats().inferences}))
    """
)


def _onnx_bundle() -> bytes:
    from onnx import TensorProto, helper  # the test may use onnx; the child may not

    w = 8
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["x2"]),
         helper.make_node("ReduceMean", ["x2", "axes"], ["score"], keepdims=0)],
        "msq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w, 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    spec = BundleSpec(
        name="msq", format="onnx", quantization="fp32", model_file="model.onnx",
        inputs=(TensorSpec("x", "float32", (None, w, 1)),),
        outputs=(TensorSpec("score", "float32", (None,)),),
        window=w, features=("value",), score=ScoreSpec("msq", 0.5, math.log(0.5), 1.0),
        golden=GoldenVectors([[[2.0]] * w, [[0.0]] * w], [4.0, 0.0], 1e-6, 1e-6),
    )
    return write_bundle(spec, model.SerializeToString())


def test_edge_agent_runs_without_torch_optuna_onnx(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(_onnx_bundle())
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "edge_agent.runtime._onnx" in result["imported"]
    assert "edge_agent.runtime._litert" in result["imported"]
    assert "edge_agent.outbox" in result["imported"] and "shared.messages" in result["imported"]
    # the federated modules import without the fl extra (they load it lazily)
    assert {"edge_agent.federated.store", "edge_agent.federated.ledger"} <= set(result["imported"])
    assert result["detections"] == 40 - 8 + 1
    assert "onnxruntime" in result["runtimes"]
