"""``edgefleet detect``: run a registered artifact over a CSV offline, through the agent's code.

The scoring goes through :class:`edge_agent.detector.Detector` and
:func:`edge_agent.runtime.open_runtime` — the very path an agent runs — so a backtest shows
what a deployed agent would have flagged on that data.
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent.detector import Detector
from edge_agent.runtime import open_runtime, smoke_test
from shared.bundle import BundleSpec, read_bundle
from shared.profiles import load_profile
from shared.series import read_series
from trainer.registry import ArtifactRecord, Registry, RegistryError, parse_model_ref

__all__ = ["BacktestError", "BacktestResult", "choose_artifact", "run_backtest"]


class BacktestError(ValueError):
    """Bad input for a backtest (one line for the user)."""


@dataclass(frozen=True)
class BacktestResult:
    """What a backtest did: which artifact, how many rows, windows scored and anomalies."""

    model: str
    version: int
    format: str
    quantization: str
    rows: int
    scored: int
    anomalies: int
    out: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


def choose_artifact(
    artifacts: list[ArtifactRecord], fmt: str | None, profile: str | None
) -> ArtifactRecord:
    """The artifact an agent would run: the profile's preferred variant, else int8 of ``fmt``."""
    candidates = artifacts
    preferred = ("onnx", "int8")
    if profile:
        p = load_profile(profile)
        candidates = [a for a in artifacts if p.name in a.profiles]
        preferred = (p.preferred_format, p.preferred_quantization)
    if fmt:
        candidates = [a for a in candidates if a.format == fmt]
        preferred = (fmt, preferred[1])
    if not candidates:
        raise BacktestError(
            f"no artifact for format={fmt or 'any'} profile={profile or 'any'}; registered: "
            + ", ".join(f"{a.format}/{a.quantization} {a.profiles}" for a in artifacts)
        )

    def rank(a: ArtifactRecord) -> tuple:
        return ((a.format, a.quantization) != preferred, a.format != preferred[0], a.format, a.quantization)

    return sorted(candidates, key=rank)[0]


def run_backtest(
    registry_dir: Path, ref: str, data: Path, out: Path, *, fmt: str | None = None, profile: str | None = None
) -> BacktestResult:
    """Score every row of ``data`` and write ``out`` (atomically).

    Output columns: ``timestamp``, the input value(s), ``score``, ``anomaly_score``,
    ``is_anomaly``; rows before the first full window have empty scores and ``is_anomaly`` 0.
    Raises :class:`BacktestError` (bad reference, unusable registry, missing columns, an
    output path that cannot be written, …), ``SeriesError`` (unreadable data), or
    ``ModelRuntimeError`` (the artifact does not load or run on this host). Nothing is
    written unless it succeeds.
    """
    _check_output(out, data)
    try:
        name, version = parse_model_ref(ref)
        with Registry.open(registry_dir) as reg:
            record = reg.get(name, version)
            artifact = choose_artifact(record.artifacts, fmt, profile)
            spec, model = read_bundle(reg.bundle(artifact.sha256))
    except (RegistryError, ValueError) as e:
        raise BacktestError(str(e)) from e
    series = read_series(data)
    missing = [f for f in spec.features if f not in series.features]
    if missing:
        raise BacktestError(f"{data}: lacks column(s) {missing} that {record.ref} was trained on")
    columns = [series.features.index(f) for f in spec.features]
    runtime = open_runtime(spec, model, threads=1)
    smoke_test(runtime, spec)
    try:
        scored, anomalies = _write(out, series, spec, runtime, columns, record.version)
    except OSError as e:
        raise BacktestError(f"cannot write {out}: {e.strerror or e}") from e
    return BacktestResult(name, record.version, artifact.format, artifact.quantization,
                          len(series), scored, anomalies, str(out))


def _check_output(out: Path, data: Path) -> None:
    if not out.parent.is_dir():
        raise BacktestError(f"output directory {out.parent} does not exist")
    if out.is_dir():
        raise BacktestError(f"output {out} is a directory; give a file name")
    if out.exists() and data.exists() and os.path.samefile(out, data):
        raise BacktestError(f"output {out} is the input file; write the scores elsewhere")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise BacktestError(f"cannot write to {out.parent}: permission denied")


def _write(out: Path, series, spec: BundleSpec, runtime, columns: list[int], version: int) -> tuple[int, int]:
    detector = Detector(runtime, spec, model_version=version)
    scored = anomalies = 0
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["timestamp", *series.features, "score", "anomaly_score", "is_anomaly"])
            for ts, row in zip(series.timestamps, series.values):
                d = detector.push(ts, [float(row[j]) for j in columns])
                values = ["" if v != v else f"{v:g}" for v in row.tolist()]
                if d is None:
                    w.writerow([ts, *values, "", "", 0])
                    continue
                scored += 1
                anomalies += int(d.is_anomaly)
                w.writerow([ts, *values, f"{d.score:.6g}", f"{d.anomaly_score:.4f}", int(d.is_anomaly)])
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return scored, anomalies
