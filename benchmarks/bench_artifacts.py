"""Artifacts of one real model: sizes, single-sample latency, and what int8 does to scores.

Trains ``edgefleet train`` (the CLI, in a subprocess, timed) on one NAB AWS CloudWatch series
for the ``x86-64-v3`` and ``rpi4-arm64`` profiles into a temporary registry, reads the
registered bundles back, and measures for every (format, quantization):

- bundle and model file size, and the int8/fp32 ratio of each;
- single-sample latency, 1 thread: ONNX artifacts in onnxruntime (a bare ``session.run`` on a
  preallocated feed) and TFLite artifacts in LiteRT (a bare ``interpreter.invoke`` on an input
  set once), plus the edge agent's ``score_one`` for each, all in the same process, in
  interleaved blocks so machine noise hits every variant alike; each run times CALLS calls per variant after a warm-up, the run is repeated
  REPEATS times and the median of the per-run p50/p99 is reported;
- score change fp32 → int8 on the held-out validation windows (the last 20% of the series,
  never trained on): mean/max |Δscore| in units of the threshold, decision agreement, and
  alarms at the threshold for each.

Run: ``.venv/bin/python benchmarks/bench_artifacts.py`` (or ``make bench``). Needs the team's
NAB data in ``../shared/data/nab``; exits 0 with a message when it is absent.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _report import (
    machine_line,
    markdown_table,
    median,
    percentile_us,
    print_table,
    update_benchmarks_doc,
)

from shared.bundle import BundleSpec, read_bundle
from shared.series import read_series
from trainer.data import fill_missing, make_windows, time_split
from trainer.export import artifact_scores
from trainer.pipeline import VALIDATION_FRACTION
from trainer.registry import Registry

REPO = Path(__file__).resolve().parent.parent
NAB = REPO.parent / "shared" / "data" / "nab"
SERIES = "ec2_cpu_utilization_24ae8d.csv"
PROFILES = ("x86-64-v3", "rpi4-arm64")
MODEL = "bench-artifacts"
DOC = REPO / "docs" / "benchmarks.md"
COMMAND = ".venv/bin/python benchmarks/bench_artifacts.py"

REPEATS = 3
CALLS = 2000  # timed calls per variant per run
BLOCK = 200  # calls per variant before switching to the next one (interleaving)
WARMUP = 300


@dataclass
class Artifact:
    """One registered artifact, read back from the registry."""

    spec: BundleSpec
    model: bytes
    bundle_bytes: int
    profiles: list[str]

    @property
    def key(self) -> tuple[str, str]:
        return self.spec.format, self.spec.quantization


# -- steps ------------------------------------------------------------------------------------


def train_with_cli(csv: Path, registry: Path) -> float:
    """Run ``edgefleet train`` as a user would; return its wall time in seconds."""
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--data", str(csv), "--name", MODEL,
           "--registry", str(registry), "--quiet", "--json"]
    for p in PROFILES:
        cmd += ["--profile", p]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"edgefleet train failed ({done.returncode}):\n{done.stderr.strip()}")
    rejected = json.loads(done.stdout).get("rejected", [])
    if rejected:
        print(f"note: artifacts rejected by parity: {rejected}")
    return wall


def load_artifacts(registry: Path) -> tuple[dict, list[Artifact]]:
    """The version's metrics and its artifacts (spec, model bytes, sizes) from the registry."""
    with Registry.open(registry) as reg:
        version = reg.get(MODEL)
        arts = []
        for rec in version.artifacts:
            spec, model = read_bundle(reg.bundle(rec.sha256))
            arts.append(Artifact(spec, model, rec.size_bytes, rec.profiles))
    return version.metrics, sorted(arts, key=lambda a: a.key)


def validation_windows(csv: Path, window: int) -> np.ndarray:
    """The held-out validation windows exactly as ``edgefleet train`` split them."""
    values = fill_missing(read_series(csv).values)
    return make_windows(time_split(values, window, VALIDATION_FRACTION).validation, window)


def _onnx_call(model: bytes, x: np.ndarray) -> Callable[[], object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    outs = [sess.get_outputs()[0].name]
    return lambda: sess.run(outs, feed)


def _litert_call(model: bytes, x: np.ndarray) -> Callable[[], object]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model, num_threads=1)
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    interp.set_tensor(detail["index"], x.astype(detail["dtype"]))
    return interp.invoke


def _agent_call(art: Artifact, x: np.ndarray) -> Callable[[], object]:
    from edge_agent.runtime import open_runtime

    runtime = open_runtime(art.spec, art.model, threads=1)
    window = np.ascontiguousarray(x[0])
    return lambda: runtime.score_one(window)


Key = tuple[str, str, str]  # format, quantization, call path ("bare" or "agent")


def measure_latency(arts: list[Artifact], x: np.ndarray) -> dict[Key, tuple[float, float]]:
    """Median over REPEATS runs of per-run (p50, p99) single-call latency in µs.

    Two call paths per artifact: ``bare`` (``session.run`` / ``interpreter.invoke``) and
    ``agent`` (the edge agent's ``ModelRuntime.score_one``: copy the window in, run, read the
    score out: what one sample costs the agent).
    """
    calls: dict[Key, Callable[[], object]] = {}
    for a in arts:
        bare = _onnx_call if a.spec.format == "onnx" else _litert_call
        calls[(*a.key, "bare")] = bare(a.model, x)
        calls[(*a.key, "agent")] = _agent_call(a, x)
    keys = list(calls)
    per_run: dict[Key, list[tuple[float, float]]] = {k: [] for k in keys}
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for run in range(REPEATS):
            for k in keys:
                for _ in range(WARMUP):
                    calls[k]()
            samples = {k: np.empty(CALLS, np.int64) for k in keys}
            for b, start in enumerate(range(0, CALLS, BLOCK)):
                shift = (b + run) % len(keys)  # rotate who goes first in each block
                for k in keys[shift:] + keys[:shift]:
                    call, out = calls[k], samples[k]
                    for i in range(start, min(start + BLOCK, CALLS)):
                        t0 = clock()
                        call()
                        out[i] = clock() - t0
            for k in keys:
                per_run[k].append((percentile_us(samples[k], 50), percentile_us(samples[k], 99)))
    finally:
        gc.enable()
    return {k: (median(r[0] for r in v), median(r[1] for r in v)) for k, v in per_run.items()}


@dataclass(frozen=True)
class ScoreChange:
    """fp32 → int8 on the validation windows, in units of the decision threshold."""

    fmt: str
    windows: int
    mean_rel: float
    max_rel: float
    agreement: float
    alarms_fp32: int
    alarms_int8: int


def score_change(arts: list[Artifact], windows: np.ndarray) -> list[ScoreChange]:
    """Compare each format's int8 artifact with its fp32 twin on the same windows."""
    by_key = {a.key: a for a in arts}
    out = []
    for fmt in sorted({a.spec.format for a in arts}):
        if (fmt, "fp32") not in by_key or (fmt, "int8") not in by_key:
            continue
        fp32, int8 = by_key[(fmt, "fp32")], by_key[(fmt, "int8")]
        thr = fp32.spec.score.threshold
        s32 = artifact_scores(fp32.spec, fp32.model, windows).astype(np.float64)
        s8 = artifact_scores(int8.spec, int8.model, windows).astype(np.float64)
        rel = np.abs(s8 - s32) / thr
        out.append(
            ScoreChange(
                fmt, len(windows), float(rel.mean()), float(rel.max()),
                float(np.mean((s32 > thr) == (s8 > thr))), int(np.sum(s32 > thr)), int(np.sum(s8 > thr)),
            )
        )
    return out


# -- report -----------------------------------------------------------------------------------


def size_rows(arts: list[Artifact], latency: dict) -> list[list[str]]:
    by_key = {a.key: a for a in arts}
    rows = []
    for a in arts:
        fp32 = by_key.get((a.spec.format, "fp32"))
        if a.spec.quantization == "int8" and fp32 is not None:
            ratio_b = f"{a.bundle_bytes / fp32.bundle_bytes:.1%}"
            ratio_m = f"{len(a.model) / len(fp32.model):.1%}"
        else:
            ratio_b = ratio_m = "—"
        p50, p99 = latency[(*a.key, "bare")]
        a50, a99 = latency[(*a.key, "agent")]
        runtime = "onnxruntime" if a.spec.format == "onnx" else "LiteRT"
        rows.append([
            a.spec.format, a.spec.quantization, f"{a.bundle_bytes:,}", f"{len(a.model):,}",
            ratio_b, ratio_m, runtime, f"{p50:.1f}", f"{p99:.1f}", f"{a50:.1f}", f"{a99:.1f}",
            ", ".join(sorted(a.profiles)),
        ])
    return rows


SIZE_HEADER = ["format", "quant", "bundle B", "model B", "int8/fp32 bundle", "int8/fp32 model",
               "runtime", "bare p50 µs", "bare p99 µs", "agent p50 µs", "agent p99 µs", "profiles"]
SCORE_HEADER = ["format", "val windows", "mean |Δ|/thr", "max |Δ|/thr", "decision agreement",
                "alarms fp32", "alarms int8"]


def score_rows(changes: list[ScoreChange]) -> list[list[str]]:
    return [
        [c.fmt, str(c.windows), f"{c.mean_rel:.4f}", f"{c.max_rel:.4f}", f"{c.agreement:.2%}",
         str(c.alarms_fp32), str(c.alarms_int8)]
        for c in changes
    ]


def render_markdown(metrics: dict, wall: float, arts: list[Artifact], sizes: list, scores: list) -> str:
    arch = arts[0].spec.architecture
    return "\n".join([
        "## Artifacts of one model",
        "",
        f"Model: `{arch['family']}`, window {arch['window']}, hidden {arch['hidden']}, "
        f"centred on the {arch.get('centering', 'train')} mean, seasonal context "
        f"{str(arch['season']) + ' rows back' if arch.get('season') else 'none'}, trained by "
        f"`edgefleet train --data …/realAWSCloudwatch/{SERIES} "
        + " ".join(f"--profile {p}" for p in PROFILES)
        + "` (default epochs, seed 0).",
        f"Training command wall time: **{wall:.1f} s** (process start to exit; the pipeline itself "
        f"reports {metrics['train_seconds']:.1f} s; {metrics['epochs_run']} epochs, best "
        f"{metrics['best_epoch']}). Threshold {metrics['threshold']:.4g}.",
        f"Machine: {machine_line()}.",
        "",
        "Sizes, and single-sample latency at 1 thread, ONNX in onnxruntime and TFLite in LiteRT, "
        "all in one process. _bare_: `session.run` with a preallocated feed dict / "
        "`interpreter.invoke` with the input set once; the onnxruntime figure includes binding "
        "the feed and allocating the output, the LiteRT one excludes `set_tensor`/`get_tensor`, "
        "so bare figures do not compare across formats. _agent_: the edge agent's "
        "`ModelRuntime.score_one(window)` (preallocated IO binding / `set_tensor` + `invoke` + "
        "`get_tensor`), what one sample costs on the agent: this one compares across formats. "
        f"{WARMUP} warm-up calls, then {CALLS} timed calls per variant per run in interleaved "
        f"blocks of {BLOCK}; median of {REPEATS} runs' p50/p99.",
        "",
        markdown_table(SIZE_HEADER, sizes),
        "",
        "Score change fp32 → int8 on the held-out validation windows (last "
        f"{VALIDATION_FRACTION:.0%} of the series), in units of the decision threshold:",
        "",
        markdown_table(SCORE_HEADER, scores),
    ])


# -- composition root -------------------------------------------------------------------------


def main() -> int:
    csv = NAB / "data" / "realAWSCloudwatch" / SERIES
    if not csv.exists():
        print(f"skipped: NAB data not found at {csv} (the team's data lives in ../shared/data/nab)")
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        registry = Path(tmp) / "registry"
        print(f"training {MODEL} on {SERIES} for {', '.join(PROFILES)} …", flush=True)
        wall = train_with_cli(csv, registry)
        metrics, arts = load_artifacts(registry)
    windows = validation_windows(csv, arts[0].spec.window)
    print(f"training command: {wall:.1f} s; measuring latency ({REPEATS}×{CALLS} calls × "
          f"{len(arts)} artifacts) …", flush=True)
    latency = measure_latency(arts, np.ascontiguousarray(windows[:1]))
    changes = score_change(arts, windows)
    sizes, scores = size_rows(arts, latency), score_rows(changes)
    print()
    print_table(SIZE_HEADER, sizes)
    print()
    print_table(SCORE_HEADER, scores)
    doc = update_benchmarks_doc(
        "artifacts", render_markdown(metrics, wall, arts, sizes, scores), command=COMMAND, path=DOC
    )
    print(f"\nwrote section 'artifacts' of {doc.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
