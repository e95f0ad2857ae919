"""Compression recipes on one trained model: size, latency side by side, detection quality.

Trains the default model (``edgefleet train``, in-process API) on synthetic host metrics
(4 metrics, 4000 rows, seed 3) for ``x86-64-v3`` (ONNX) and ``rpi4-arm64`` (LiteRT), then runs
``edgefleet compress`` (the same API) with each recipe of :data:`RECIPES` on it, and reports
per recipe:

- **size ×**: the parent's fp32 model file divided by the recipe's int8 model file, per
  format (ONNX, TFLite); the deflated (zlib) size ratio too;
- **latency ratio** against the ``quantize:int8`` (int8 only) model, per runtime: every
  recipe's int8 ONNX artifact in onnxruntime and int8 TFLite artifact in LiteRT are opened in
  this one process through the agent's runtime and timed side by side, in interleaved blocks
  of :data:`BLOCK` single-window calls (:data:`CALLS` per artifact, after a warm-up), so
  machine noise hits every variant alike; the ratio is of the median latencies (< 1 = faster);
- **quality change**: the change of ``compress``'s detection quality (the search objective:
  event F1 minus 0.1 × clean error, on held-back rows with injected anomalies, judged on the
  rpi4-arm64 artifact) against the parent's.

Then, on the team's NAB files (``../shared/data/nab``, skipped when absent or with
``--no-nab``), ``edgefleet evaluate --compress RECIPE`` for each recipe of :data:`NAB_RECIPES`:
every file's default model (trained on its probationary rows) is compressed on those same rows
and both run through the agent's detection path on the x86-64-v3 artifact; the table gives
the NAB standard score (threshold optimized over the files, and the models' own decisions)
of the uncompressed and the compressed models, the change, and the median size ratio over
the files (parent fp32 ONNX / compressed int8 ONNX).

The distillation student is a fixed small spec (hidden 64-16), not "the smallest front
member of a search".

Run: ``.venv/bin/python benchmarks/bench_compress.py`` (``--quick``: 10 training epochs and
three recipes, no NAB part, a few minutes). Writes the ``compress`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from _report import markdown_table, print_table, update_benchmarks_doc

from edge_agent.runtime import open_runtime
from shared.bundle import read_bundle
from trainer.compress import CompressRequest, compress, prepare
from trainer.data import generate_host_metrics, write_host_metrics
from trainer.pipeline import TrainRequest, train
from trainer.pipeline import prepare as prepare_train
from trainer.registry import Registry

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
PROFILES = ("x86-64-v3", "rpi4-arm64")
RECIPES = (
    "quantize:int8",
    "prune:0.3,finetune:10,quantize:int8",
    "prune:0.5,finetune:10,quantize:int8",
    "prune:0.7,finetune:10,quantize:int8",
    "lowrank:0.9,finetune:10,quantize:int8",
    "distill:64-16,quantize:int8",
    "prune:0.5,distill,quantize:int8",
)
QUICK = RECIPES[:1] + RECIPES[2:3] + RECIPES[4:5]
NAB_RECIPES = (RECIPES[0], RECIPES[2], RECIPES[5], RECIPES[6])
NAB = REPO.parent / "shared" / "data" / "nab"
CALLS, BLOCK, WARMUP = 3000, 100, 200


def _model_bytes(registry: Path, ref: tuple[str, int]) -> dict[tuple[str, str], bytes]:
    with Registry.open(registry) as reg:
        record = reg.get(*ref)
        return {(a.format, a.quantization): read_bundle(reg.bundle(a.sha256))[1] for a in record.artifacts}


def _bundles(registry: Path, ref: tuple[str, int]) -> dict[tuple[str, str], bytes]:
    with Registry.open(registry) as reg:
        record = reg.get(*ref)
        return {(a.format, a.quantization): reg.bundle(a.sha256) for a in record.artifacts}


def side_by_side(bundles: dict[str, bytes]) -> dict[str, float]:
    """Median single-window latency (µs) of each bundle, timed interleaved in this process."""
    runtimes = {}
    for key, bundle in bundles.items():
        spec, model = read_bundle(bundle)
        runtimes[key] = (open_runtime(spec, model, threads=1), np.asarray(spec.golden.inputs[0], np.float32))
    samples: dict[str, list[int]] = {k: [] for k in runtimes}
    try:
        for runtime, x in runtimes.values():
            for _ in range(WARMUP):
                runtime.score_one(x)
        gc.disable()
        for _ in range(CALLS // BLOCK):
            for key, (runtime, x) in runtimes.items():
                for _ in range(BLOCK):
                    t = time.perf_counter_ns()
                    runtime.score_one(x)
                    samples[key].append(time.perf_counter_ns() - t)
    finally:
        gc.enable()
        for runtime, _ in runtimes.values():
            runtime.close()
    return {k: float(np.median(v)) / 1e3 for k, v in samples.items()}


def nab_table() -> tuple[list[str], list[list[str]]]:
    """``evaluate --compress`` on the NAB files for each of :data:`NAB_RECIPES` (see the module docstring)."""
    from trainer.evaluation.harness import EvaluateRequest, evaluate, summarize

    header = ["recipe", "ONNX size × (median)", "standard, uncompressed", "standard, compressed", "change",
              "own decisions change", "windows", "false events", "not compressed"]
    rows = []
    for recipe in NAB_RECIPES:
        print(f"evaluate --compress {recipe} on {NAB / 'data'} …", flush=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-nab-") as tmp:
            request = EvaluateRequest(data=NAB / "data", labels=NAB / "labels" / "combined_windows.json",
                                      compress=recipe, keep_models=Path(tmp))
            results = evaluate(request)
            ratios = []
            for r in results:
                assert r.parent is not None
                if r.compress_error is not None:
                    continue
                parent = _model_bytes(Path(tmp), _ref(r.parent.model))[("onnx", "fp32")]
                ours = _model_bytes(Path(tmp), _ref(r.model))[("onnx", "int8")]
                ratios.append(len(parent) / len(ours))
        report = summarize(results)
        assert report.compress is not None
        before, after = report.compress["parent_nab"]["standard"], report.nab["standard"]
        change = report.compress["change"]["standard"]
        rows.append([f"`{recipe}`", f"{np.median(ratios):.1f}",
                     f"{before['optimized']:.1f} / {before['own_decisions']:.1f}",
                     f"{after['optimized']:.1f} / {after['own_decisions']:.1f}",
                     f"{change['optimized']:+.1f}", f"{change['own_decisions']:+.1f}",
                     f"{report.events['detected']}/{report.events['windows']}", str(report.events["false_events"]),
                     str(len(report.compress["not_compressed"]))])
        print(f"  {rows[-1]}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return header, rows


def _ref(ref: str) -> tuple[str, int]:
    name, version = ref.rsplit("@", 1)
    return name, int(version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 training epochs, three recipes, no NAB part")
    parser.add_argument("--no-nab", action="store_true", help="skip the NAB part")
    args = parser.parse_args()
    recipes = QUICK if args.quick else RECIPES
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        folder = Path(tmp)
        csv = folder / "host.csv"
        write_host_metrics(generate_host_metrics(4000, seed=3), csv)
        registry = folder / "registry"
        print("training the default model on synthetic host metrics …", flush=True)
        parent = train(prepare_train(TrainRequest(data=[csv], profiles=PROFILES, name="host",
                                                  epochs=10 if args.quick else 40)), registry).version
        parent_models = _model_bytes(registry, ("host", parent.version))
        results = []
        parent_parameters = 0
        for recipe in recipes:
            print(f"compress {parent.ref} --recipe {recipe} …", flush=True)
            prepared = prepare(CompressRequest(ref=parent.ref, recipe=recipe, profiles=PROFILES, data=[csv]), registry)
            outcome = compress(prepared)
            last = {r.profile: r for r in outcome.rows if r.step != "parent"}
            parent_parameters = outcome.rows[0].parameters
            v = outcome.version.version
            results.append((recipe, v, last["rpi4-arm64"], _model_bytes(registry, ("host", v)),
                            _bundles(registry, ("host", v))))
        print("timing every int8 artifact side by side …", flush=True)
        timed = side_by_side({f"{i}/{fmt}": bundles[(fmt, "int8")]
                              for i, (*_, bundles) in enumerate(results) for fmt in ("onnx", "tflite")})
    base = {fmt: timed[f"0/{fmt}"] for fmt in ("onnx", "tflite")}
    header = ["recipe", "params", "ONNX size ×", "TFLite size ×", "TFLite deflated ×", "onnxruntime latency",
              "LiteRT latency", "quality change"]
    rows = []
    for i, (recipe, _, row, models, _) in enumerate(results):
        onnx, tflite = models[("onnx", "int8")], models[("tflite", "int8")]
        fp32_t = parent_models[("tflite", "fp32")]
        rows.append([
            f"`{recipe}`", str(row.parameters),
            f"{len(parent_models[('onnx', 'fp32')]) / len(onnx):.1f}", f"{len(fp32_t) / len(tflite):.1f}",
            f"{len(zlib.compress(fp32_t, 9)) / len(zlib.compress(tflite, 9)):.1f}",
            f"{timed[f'{i}/onnx'] / base['onnx']:.2f} ({timed[f'{i}/onnx']:.0f} µs)",
            f"{timed[f'{i}/tflite'] / base['tflite']:.2f} ({timed[f'{i}/tflite']:.0f} µs)",
            f"{row.quality_change:+.3f}" if row.quality_change is not None else "-",
        ])
    print_table(header, rows)
    nab = None if args.quick or args.no_nab or not (NAB / "data").is_dir() else nab_table()
    if nab is not None:
        print_table(*nab)
    body = (f"Parent: the default forecaster, {parent_parameters} "
            f"parameters, trained {'10' if args.quick else '40'} epochs (early stopping) on synthetic host metrics "
            f"(4000 rows). Size × = parent fp32 file / recipe int8 file. Latency = median single-window call "
            f"through the agent's runtime, 1 thread, all artifacts interleaved in one process, as a ratio to "
            f"`quantize:int8` (< 1 is faster). Quality change: the compress objective on the rpi4-arm64 "
            f"artifact.{' Quick run (--quick): three recipes.' if args.quick else ''}\n\n"
            f"{markdown_table(header, rows)}\n")
    if nab is not None:
        body += ("\nOn the NAB files (`edgefleet evaluate --compress RECIPE`, x86-64-v3 artifact): every file's "
                 "default model, trained on its probationary rows, and that model compressed on the same rows. "
                 "Standard = NAB standard profile, threshold optimized over the files / the models' own "
                 "decisions; windows and false events are the compressed models' own decisions. Size × = "
                 "the uncompressed fp32 ONNX file / the compressed int8 ONNX file, median over the files. "
                 "Not compressed: files whose model the recipe could not compress (no int8 artifact of a "
                 "flat series passes parity); they count with their uncompressed model.\n\n"
                 f"{markdown_table(*nab)}\n")
    command = ".venv/bin/python benchmarks/bench_compress.py" + (" --quick" if args.quick else "")
    doc = update_benchmarks_doc("compress", body, command=command, path=DOC)
    print(f"\nwrote section 'compress' of {doc.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
