"""A trained candidate against a firmware profile's budget: export, measure, compare.

For each profile, :func:`measure` exports the artifact the profile runs (its preferred format
and quantization; for a tree family, which exports to ONNX fp32 only, the variant an agent of
the profile picks among those, :func:`trainer.export.targets.profile_variant`), through
:func:`trainer.export.build_artifact`, parity check included, and measures it in a child
process, in the runtime an agent uses (:func:`edge_agent.runtime.open_runtime`, one thread):

- **latency** — 200 single-sample inferences after 20 warm-up runs, p50 and p99 in ms on this
  machine, as CPU time of the inferring thread: with one thread both runtimes compute in the
  caller's thread, and its CPU time leaves out the time the scheduler gave to other processes,
  so a busy trainer host (other trials, ``--jobs``, a test suite) does not make a model look
  slower than it is. (Wall-clock p99 on a machine with more runnable processes than cores
  reaches the scheduler's time slice, several ms, whatever the model.) The profile's figure is ``p99 / speed_factor``: :mod:`shared.profiles` defines
  ``speed_factor`` as single-core speed relative to one x86-64-v3 core (= 1.0), and the
  measuring machine is taken to be such a core (it is not calibrated here; a faster trainer
  host makes every profile look faster than it is by the same ratio).
- **model RAM** — the resident-set growth of the child from just before the runtime is
  imported to after the session is opened and has run the warm-up inferences: the runtime
  library plus the loaded model, which is what ``budget.model_ram_mb`` covers. Python and
  numpy themselves are not counted (the agent has them anyway). RSS counts shared library
  pages too, so this errs on the high side.
- **size** — the artifact's model file in bytes, against ``budget.model_flash_kb`` (KiB).

Budgets are compared as constraint values ``measured / budget - 1`` (a parity failure is
``1.0``): a candidate is feasible for a profile when every value is ≤ 0, which is Optuna's
``constraints_func`` convention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.profiles import FirmwareProfile
from trainer.search.objective import TrainedCandidate

__all__ = ["BUDGETS", "HardwareRecord", "Measurement", "measure", "measure_artifact"]

BUDGETS = ("latency_p99_ms", "model_ram_mb", "model_flash_kb", "parity")
WARMUP, RUNS = 20, 200
_CALIBRATION_WINDOWS, _HOLDOUT_WINDOWS = 256, 256

_CHILD = """
import json, sys, time
import numpy as np, psutil
from shared.bundle import read_bundle
with open(sys.argv[1], "rb") as f:
    spec, model = read_bundle(f.read())
x = np.asarray(spec.golden.inputs[0], np.float32)
proc = psutil.Process()
before = proc.memory_info().rss
from edge_agent.runtime import open_runtime
runtime = open_runtime(spec, model, threads=1)
for _ in range(int(sys.argv[2])):
    runtime.score_one(x)
after = proc.memory_info().rss
ns = []
for _ in range(int(sys.argv[3])):
    t = time.thread_time_ns()
    runtime.score_one(x)
    ns.append(time.thread_time_ns() - t)
ms = np.asarray(ns) / 1e6
print(json.dumps({"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                  "rss_delta": after - before}))
"""


@dataclass(frozen=True)
class Measurement:
    """One artifact measured on this machine (one thread)."""

    format: str
    quantization: str
    parity_passed: bool
    artifact_bytes: int
    latency_p50_ms_here: float
    latency_p99_ms_here: float
    model_ram_mb: float


@dataclass(frozen=True)
class HardwareRecord:
    """A measured artifact against one profile: figures scaled to it, and the budgets it fails."""

    profile: str
    format: str
    quantization: str
    artifact_bytes: int
    latency_p99_ms_here: float
    latency_p99_ms: float  # on the profile: latency here / speed_factor
    model_ram_mb: float
    parity_passed: bool
    constraints: tuple[float, ...]  # per BUDGETS: measured / budget - 1 (> 0 fails)
    failures: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["constraints"], d["failures"] = list(self.constraints), list(self.failures)
        return d


def measure_artifact(spec_bytes: bytes) -> dict[str, float]:
    """Latency (ms) and RSS growth (bytes) of a bundle in a fresh child process (see module doc).

    Raises ``RuntimeError`` with the child's last line of stderr when it fails.
    """
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with tempfile.NamedTemporaryFile(suffix=".zip") as f:
        f.write(spec_bytes)
        f.flush()
        proc = subprocess.run([sys.executable, "-c", _CHILD, f.name, str(WARMUP), str(RUNS)],
                              capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the artifact failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _evenly(windows: np.ndarray, count: int) -> np.ndarray:
    if len(windows) <= count:
        return windows
    return np.ascontiguousarray(windows[np.linspace(0, len(windows) - 1, count).round().astype(int)])


def _export_inputs(trained: TrainedCandidate, features: Sequence[str]) -> Any:
    from trainer.export import ExportInputs
    from trainer.models import score_windows

    holdout = _evenly(trained.validation_windows, _HOLDOUT_WINDOWS)
    return ExportInputs(
        name="candidate",
        module=trained.model,
        window=trained.candidate.architecture.input_rows,
        features=tuple(features),
        score=trained.score,
        calibration=_evenly(np.concatenate([trained.train_windows, trained.validation_windows]),
                            _CALIBRATION_WINDOWS),
        holdout=holdout,
        reference_scores=score_windows(trained.model, holdout),
        drift_reference={},
        lineage={},
        architecture=trained.candidate.architecture.to_json(),
    )


def _variant_measurement(fmt: str, quant: str, inputs: Any) -> Measurement:
    from trainer.export import build_artifact

    art = build_artifact(fmt, quant, inputs)
    if not art.parity.passed:
        return Measurement(fmt, quant, False, art.model_size, float("nan"), float("nan"), float("nan"))
    figures = measure_artifact(art.bundle)
    return Measurement(fmt, quant, True, art.model_size, figures["p50"], figures["p99"],
                       figures["rss_delta"] / 1e6)


def check(m: Measurement, profile: FirmwareProfile) -> HardwareRecord:
    """``m`` against ``profile``'s budget (pure: no I/O)."""
    b = profile.budget
    if not m.parity_passed:
        constraints = (1.0, 1.0, m.artifact_bytes / (b.model_flash_kb * 1024) - 1, 1.0)
        scaled = float("nan")
    else:
        scaled = m.latency_p99_ms_here / profile.speed_factor
        constraints = (scaled / b.latency_p99_ms - 1, m.model_ram_mb / b.model_ram_mb - 1,
                       m.artifact_bytes / (b.model_flash_kb * 1024) - 1, -1.0)
    failures = tuple(name for name, c in zip(BUDGETS, constraints) if c > 0)
    return HardwareRecord(profile.name, m.format, m.quantization, m.artifact_bytes,
                          m.latency_p99_ms_here, scaled, m.model_ram_mb, m.parity_passed,
                          tuple(float(c) for c in constraints), failures)


def measure(trained: TrainedCandidate, features: Sequence[str],
            profiles: Sequence[FirmwareProfile]) -> list[HardwareRecord]:
    """Export and measure the artifact each profile runs (each variant once), one record per
    profile in order. Raises ``RuntimeError`` when an artifact cannot be measured."""
    from trainer.export.targets import profile_variant

    inputs = _export_inputs(trained, features)
    measured: dict[tuple[str, str], Measurement] = {}
    records = []
    for p in profiles:
        key = profile_variant(trained.candidate.architecture.family, p)
        if key is None:  # the search leaves such families out of its space
            raise RuntimeError(f"profile {p.name} allows no artifact of the "
                               f"{trained.candidate.architecture.family} family")
        if key not in measured:
            measured[key] = _variant_measurement(*key, inputs)
        records.append(check(measured[key], p))
    return records
