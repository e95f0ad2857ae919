"""``edgefleet evaluate``: detection quality of the product, measured the way users meet it.

For every labelled series: train on its probationary rows (or take a registered model), then
push the whole series through the agent's own detection path (:class:`edge_agent.detector.
Detector` over the artifact the profile would run, in onnxruntime or LiteRT), and score what
comes out with the NAB-compatible scorer (:mod:`trainer.evaluation.nab`) in two ways:

- **optimized** — NAB's protocol: one threshold on ``anomaly_score`` per cost profile, chosen
  over the whole file set after the fact;
- **own decisions** — the agent's ``is_anomaly``, exactly what a deployed agent would have
  raised. Users act on these, so the gap between the two measures how well the streaming
  score pipeline calibrates itself.

Plus event-level precision, recall, F1 and the mean time to detect, per category (the folder
of a file in the labels' ``category/name.csv`` keys) and overall, and optional per-series plots.

With a compression recipe (``--compress RECIPE``) every series' trained model is also
compressed with it (``edgefleet compress``, fine-tuned on the same probationary rows), both
go through the detection path, the compressed model's figures are the report and the
uncompressed model's are reported beside them with the change: what the recipe costs in
detection quality, in the artifact that ships.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.series import Series, SeriesError, read_series
from trainer.evaluation.nab import (
    PROFILES,
    LabelledSeries,
    ScoringError,
    event_metrics,
    load_windows,
    nab_score,
    optimize_threshold,
)

__all__ = [
    "EvaluateError",
    "EvaluateRequest",
    "EvaluationReport",
    "SeriesResult",
    "discover",
    "evaluate",
    "summarize",
]


class EvaluateError(ValueError):
    """Bad input for an evaluation (one line for the user)."""


@dataclass(frozen=True)
class EvaluateRequest:
    """Arguments of one ``edgefleet evaluate`` run.

    ``model`` is ``NAME@VERSION`` from ``registry`` (one model for every series); without it
    each series trains its own model on its probationary rows (NAB's 15%, at most 750 rows)
    with ``train_options`` (passed to :class:`trainer.pipeline.TrainRequest`). ``compress``
    is a compression recipe applied to each trained model (not with ``model``). Trained and
    compressed models go to a temporary registry, or to ``keep_models`` when given.
    """

    data: Path
    labels: Path
    model: str | None = None
    registry: Path = Path(".edgefleet")
    profile: str = "x86-64-v3"
    train_options: dict[str, Any] = field(default_factory=dict)
    compress: str | None = None
    keep_models: Path | None = None


@dataclass
class SeriesResult:
    """One series after detection: per-row raw score, ``anomaly_score`` and decision;
    ``parent`` is the uncompressed model's result when the model is a compressed one (itself,
    with ``compress_error`` set, when the recipe could not apply to this series' model)."""

    key: str
    model: str
    artifact: str
    series: LabelledSeries
    values: np.ndarray
    score: np.ndarray
    anomaly_score: np.ndarray
    is_anomaly: np.ndarray
    parent: SeriesResult | None = None
    # why the recipe could not apply to this series' model (it was then evaluated uncompressed)
    compress_error: str | None = None

    @property
    def category(self) -> str:
        return self.key.rsplit("/", 1)[0] if "/" in self.key else "."


@dataclass(frozen=True)
class EvaluationReport:
    """Scores over a file set; ``to_json`` is what ``--json`` prints."""

    files: int
    rows: int
    windows: int
    nab: dict[str, dict[str, Any]]
    events: dict[str, Any]
    categories: dict[str, dict[str, Any]]
    per_series: list[dict[str, Any]]
    compress: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def discover(data: Path, labels: Path) -> list[tuple[str, Path, list[tuple[str, str]]]]:
    """The labelled CSVs under ``data`` (a folder, searched recursively, or one CSV).

    A file matches the label key that equals its path relative to ``data`` or, failing that,
    the one key that ends with ``/<file name>``. Raises :class:`EvaluateError` when the labels
    cannot be read, nothing matches, or a name is ambiguous.
    """
    try:
        windows = load_windows(labels)
    except (OSError, ValueError) as e:  # ScoringError already names the file
        raise EvaluateError(str(e)) from e
    if data.is_dir():
        paths = sorted(p for p in data.rglob("*.csv") if p.is_file())
        rel = {p: p.relative_to(data).as_posix() for p in paths}
    elif data.is_file():
        paths, rel = [data], {data: data.name}
    else:
        raise EvaluateError(f"no such file or folder: {data}")
    found = []
    for p in paths:
        key = rel[p] if rel[p] in windows else None
        if key is None:
            hits = [k for k in windows if k == p.name or k.endswith("/" + p.name)]
            if len(hits) > 1:
                raise EvaluateError(f"{p}: file name matches several label keys: {', '.join(hits)}")
            key = hits[0] if hits else None
        if key is not None:
            found.append((key, p, windows[key]))
    if not found:
        raise EvaluateError(f"no CSV under {data} has labels in {labels}")
    return found


def _detect(registry: Path, ref: str, profile: str, series: Series) -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray]:
    """Run ``ref``'s artifact for ``profile`` over ``series`` with the agent's detector."""
    from edge_agent.detector import Detector
    from edge_agent.runtime import open_runtime, smoke_test
    from shared.bundle import read_bundle
    from trainer.backtest import choose_artifact
    from trainer.registry import Registry, parse_model_ref

    name, version = parse_model_ref(ref)
    with Registry.open(registry) as reg:
        record = reg.get(name, version)
        artifact = choose_artifact(record.artifacts, None, profile)
        spec, model = read_bundle(reg.bundle(artifact.sha256))
    missing = [f for f in spec.features if f not in series.features]
    if missing:
        raise EvaluateError(f"series lacks column(s) {missing} that {record.ref} was trained on")
    columns = [series.features.index(f) for f in spec.features]
    runtime = open_runtime(spec, model, threads=1)
    smoke_test(runtime, spec)
    detector = Detector(runtime, spec, model_version=record.version)
    n = len(series)
    score = np.full(n, np.nan)
    anomaly = np.zeros(n)
    decision = np.zeros(n, bool)
    for i, row in enumerate(series.values):
        d = detector.push(series.timestamps[i], [float(row[j]) for j in columns])
        if d is not None:
            score[i], anomaly[i], decision[i] = d.score, d.anomaly_score, d.is_anomaly
    return record.ref, f"{artifact.format}/{artifact.quantization}", score, anomaly, decision


def _train(path: Path, key: str, rows: int, request: EvaluateRequest, registry: Path) -> str:
    from trainer.pipeline import TrainError, TrainRequest, prepare, train

    name = "eval-" + "".join(c if c.isalnum() else "-" for c in Path(key).stem.lower())[:50]
    try:
        prepared = prepare(
            TrainRequest(
                data=[path], profiles=[request.profile], name=name, probation=True,
                **request.train_options,
            )
        )
        outcome = train(prepared, registry)
    except TrainError as e:
        raise EvaluateError(f"{key}: {e}") from e
    return outcome.version.ref


def _check_compress(request: EvaluateRequest) -> None:
    """Refuse a bad ``--compress`` before any training."""
    if request.compress is None:
        return
    if request.model is not None:
        raise EvaluateError("--compress applies to the models evaluate trains: drop --model "
                            "(compress a registered model with `edgefleet compress`, then evaluate that version)")
    from trainer.compress import CompressError, parse_recipe
    from trainer.models.spec import TREE_FAMILIES

    try:
        quantization = parse_recipe(request.compress).export.quantization
    except CompressError as e:
        raise EvaluateError(f"--compress: {e}") from e
    family = request.train_options.get("family")
    if family in TREE_FAMILIES:
        raise EvaluateError(f"--compress works on the torch families, not on --family {family}")
    from shared.profiles import load_profiles

    try:
        (profile,) = load_profiles([request.profile])
    except ValueError as e:
        raise EvaluateError(str(e)) from e
    if quantization and not any(profile.allows(f, quantization) for f in profile.formats):
        raise EvaluateError(f"--compress: profile {profile.name} does not allow {quantization} artifacts")


def _compress(path: Path, ref: str, request: EvaluateRequest, registry: Path, windows: int) -> tuple[str, str | None]:
    """Compress ``ref`` with the request's recipe on ``path``'s probationary rows: the new ref,
    or ``ref`` and why the recipe could not apply to this model (e.g. no int8 artifact of a
    flat series passes parity).

    Its steps are judged on the file's NAB score when it has labelled ``windows`` after its
    probation, else (a file without anomalies) on anomalies injected into those rows.
    """
    from trainer.compress import CompressError, CompressRequest, compress, prepare
    from trainer.registry import RegistryError

    assert request.compress is not None
    try:
        prepared = prepare(CompressRequest(ref=ref, recipe=request.compress, profiles=[request.profile],
                                           data=[path], labels=request.labels if windows else None,
                                           seed=int(request.train_options.get("seed", 0))), registry)
        return compress(prepared).version.ref, None
    except (CompressError, RegistryError) as e:
        return ref, str(e)


def evaluate(
    request: EvaluateRequest, progress: Callable[[int, int, str], None] | None = None
) -> list[SeriesResult]:
    """Detect on every labelled series of ``request``; ``progress(done, total, key)`` after each.

    Models trained here go to a temporary registry that is removed afterwards (or to
    ``request.keep_models``). Raises
    :class:`EvaluateError` for bad input (before any training where it can be checked).
    """
    _check_compress(request)
    found = discover(request.data, request.labels)
    loaded = []
    for key, path, windows in found:
        try:
            series = read_series(path)
            labelled = LabelledSeries(key, list(series.timestamps), windows)
        except (SeriesError, ScoringError) as e:
            raise EvaluateError(str(e)) from e
        loaded.append((key, path, series, labelled))
    if request.keep_models is not None:
        from trainer.registry import Registry, RegistryError

        if request.model is not None:
            raise EvaluateError("--keep-models keeps the models evaluate trains: drop --model")
        try:
            Registry.check_writable(request.keep_models)
        except RegistryError as e:
            raise EvaluateError(f"--keep-models: {e}") from e
    if request.model is not None and not (request.registry / "registry.sqlite").exists():
        raise EvaluateError(f"no registry at {request.registry} (for --model {request.model})")
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-evaluate-") as tmp:
        work = request.keep_models or Path(tmp)
        for done, (key, path, series, labelled) in enumerate(loaded, 1):
            if request.model is None:
                ref = _train(path, key, len(series), request, work)
                registry = work
            else:
                ref, registry = request.model, request.registry
            values = np.asarray(series.values, np.float64)
            parent = None
            if request.compress is not None:
                _, artifact, score, anomaly, decision = _detect_or_fail(key, registry, ref, request.profile, series)
                parent = SeriesResult(key, ref, artifact, labelled, values, score, anomaly, decision)
                ref, failed = _compress(path, ref, request, registry, labelled.scored_windows)
                if failed is not None:  # this series keeps its uncompressed model (and says so)
                    results.append(dataclasses.replace(parent, parent=parent, compress_error=failed))
                    if progress is not None:
                        progress(done, len(loaded), key)
                    continue
            ref, artifact, score, anomaly, decision = _detect_or_fail(key, registry, ref, request.profile, series)
            results.append(SeriesResult(key, ref, artifact, labelled, values, score, anomaly, decision, parent))
            if progress is not None:
                progress(done, len(loaded), key)
    reasons = [(r.key, r.compress_error) for r in results if r.compress_error is not None]
    if reasons and len(reasons) == len(results):
        raise EvaluateError(f"--compress {request.compress} applied to no series: {reasons[0][0]}: {reasons[0][1]}")
    return results


def _detect_or_fail(key: str, registry: Path, ref: str, profile: str,
                    series: Series) -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray]:
    from trainer.registry import RegistryError

    try:
        return _detect(registry, ref, profile, series)
    except (ValueError, KeyError, RegistryError) as e:  # e.g. --model names no version
        raise EvaluateError(f"{key}: {e}") from e


def _quality(results: Sequence[SeriesResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PROFILES:
        opt = optimize_threshold([(r.series, r.anomaly_score) for r in results], name)
        own = nab_score([(r.series, r.is_anomaly) for r in results], name)
        out[name] = {"optimized": opt.score, "threshold": opt.threshold, "own_decisions": own}
    ev = event_metrics([(r.series, r.is_anomaly) for r in results])
    out["events"] = dict(ev.__dict__)
    return out


def summarize(results: Sequence[SeriesResult]) -> EvaluationReport:
    """NAB scores (optimized and own decisions) for every profile, overall and per category,
    event metrics, and a line per series. Raises :class:`EvaluateError` without any window.
    """
    if not any(r.series.scored_windows for r in results):
        raise EvaluateError("the labelled series hold no anomaly window to score against")
    overall = _quality(results)
    categories = {}
    for cat in sorted({r.category for r in results}):
        part = [r for r in results if r.category == cat]
        if any(r.series.scored_windows for r in part):
            categories[cat] = _quality(part)
    per_series = []
    for r in results:
        ev = event_metrics([(r.series, r.is_anomaly)]) if r.series.scored_windows else None
        after = r.is_anomaly[r.series.probation:]
        per_series.append(
            {
                "key": r.key,
                "model": r.model,
                "artifact": r.artifact,
                "rows": len(r.series),
                "windows": r.series.scored_windows,
                "alarms": int(after.sum()),
                "detected": None if ev is None else ev.detected,
                "false_events": None if ev is None else ev.false_events,
            }
        )
    events = overall.pop("events")
    compress = None
    parents = [r.parent for r in results if r.parent is not None]
    if parents:
        if len(parents) != len(results):
            raise ValueError("either every result or none has an uncompressed parent")
        before = _quality(parents)
        compress = {
            "parent_nab": {k: v for k, v in before.items() if k != "events"},
            "parent_events": before["events"],
            "change": {name: {m: overall[name][m] - before[name][m] for m in ("optimized", "own_decisions")}
                       for name in PROFILES},
            "parent_models": [r.model for r in parents],
            "not_compressed": [{"key": r.key, "reason": r.compress_error} for r in results
                               if r.compress_error is not None],
        }
    return EvaluationReport(
        files=len(results),
        rows=sum(len(r.series) for r in results),
        windows=sum(r.series.scored_windows for r in results),
        nab=overall,
        events=events,
        categories=categories,
        per_series=per_series,
        compress=compress,
    )


def plot_series(result: SeriesResult, out: Path) -> None:
    """A PNG: the series with its labelled windows and alarms, and ``anomaly_score`` below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(result.series))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 4.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for j in range(result.values.shape[1]):
        top.plot(x, result.values[:, j], lw=0.6)
    for start, end in result.series.window_rows:
        for ax in (top, bottom):
            ax.axvspan(start, end, color="tab:red", alpha=0.15, lw=0)
    for ax in (top, bottom):
        ax.axvline(result.series.probation, color="0.4", ls="--", lw=0.8)
    alarms = np.flatnonzero(result.is_anomaly)
    if alarms.size:
        top.scatter(alarms, result.values[alarms, 0], color="tab:red", s=14, zorder=3, label="is_anomaly")
        top.legend(loc="upper left", fontsize=7)
    bottom.plot(x, result.anomaly_score, lw=0.7, color="tab:purple")
    bottom.axhline(0.5, color="tab:red", lw=0.6, ls=":")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("anomaly_score", fontsize=8)
    top.set_title(f"{result.key} — {result.model} ({result.artifact}); shaded: labelled windows, "
                  "dashed: end of probation", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
