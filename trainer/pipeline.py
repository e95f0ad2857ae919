"""``edgefleet train``: data → model → calibrated threshold → verified artifacts → registry.

:func:`prepare` validates every input (profiles, files, rows) before any heavy work, so bad
input fails fast and leaves the registry untouched; :func:`train` then does the work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shared.drift import reference_distribution, score_reference
from shared.profiles import FirmwareProfile, load_profiles
from shared.score_pipeline import RANGE_TOLERANCE, LikelihoodPipeline, ScorePipeline
from shared.series import (
    Series,
    SeriesError,
    TimeOrderError,
    file_sha256,
    read_series,
    read_series_ordered_head,
    sort_dedupe,
    timestamp_key,
)
from trainer.data import (
    MIN_VALIDATION_WINDOWS,
    fill_missing,
    forecast_split,
    make_windows,
    min_rows,
    time_split,
)
from trainer.export import BuiltArtifact, ExportInputs, build_artifact
from trainer.export.targets import exportable, refusal
from trainer.models import (
    ArchitectureSpec,
    Recipe,
    SpecError,
    TreeModel,
    fit,
    score_windows,
    weights_bytes,
)
from trainer.models.spec import (
    ATTENTION_HEADS,
    CONV_DILATIONS,
    CONV_KERNEL,
    FORECASTING_FAMILIES,
    ISOLATION_SAMPLES,
    TREE_DEPTH,
    TREE_ESTIMATORS,
)
from trainer.registry import NewArtifact, Registry, RegistryError, VersionRecord, check_model_name
from trainer.scoring import ThresholdPolicy, calibrate

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "DEFAULT_SCORE_PIPELINE",
    "TrainError",
    "TrainOutcome",
    "TrainRequest",
    "prepare",
    "train",
    "training_windows",
]

log = logging.getLogger(__name__)

# Chosen by measured detection quality (docs/model-choice.md, benchmarks/bench_model_choice.py):
# the forecaster, centred on each window's own mean, with one day of seasonal context where the
# timestamps and rows allow it. Hidden widths (512, 64) keep int8 artifacts under 30% of fp32
# (per-channel parameters of narrower layers weigh too much).
class DefaultArchitecture(NamedTuple):
    family: str
    window: int
    hidden: tuple[int, ...]
    centering: str


DEFAULT_ARCHITECTURE = DefaultArchitecture(family="forecaster", window=64, hidden=(512, 64), centering="window")
# Hidden widths when a request names a family but no widths. The conv family's four blocks
# take the default dilations (CONV_DILATIONS): 31 rows of receptive field with kernel 3. The
# attention family's two blocks of width 32 take ATTENTION_HEADS heads (8 channels each).
DEFAULT_HIDDEN = {
    "autoencoder": DEFAULT_ARCHITECTURE.hidden,
    "forecaster": DEFAULT_ARCHITECTURE.hidden,
    "linear": (),
    "conv": (32,) * len(CONV_DILATIONS),
    "attention": (32, 32),
    "trees": (),
    "isolation_forest": (),
}
# The score pipeline `train` declares unless told otherwise (shared.score_pipeline): the anomaly
# likelihood over a robust (winsorized) history, from its first values, and the range check of
# step 0; the trainer adds the training rows' range and the model's seasonal repeats.
DEFAULT_SCORE_PIPELINE = LikelihoodPipeline(robust_history=True, robust_early=True,
                                            range_tolerance=RANGE_TOLERANCE)
VALIDATION_FRACTION = 0.2
SEASON_SECONDS = 86_400  # one day: the cycle of most host and service metrics
SEASON_HALFWIDTH = 8
MAX_SEASON_ROWS = 2048  # an agent buffers this many rows per metric at most for it
# Below this many windows per series the seasonal context is left out: the model would see
# too few days' worth of (recent, day-before) pairs to learn from them.
MIN_SEASONAL_WINDOWS = 200
CALIBRATION_WINDOWS = 256
HOLDOUT_WINDOWS = 512


class TrainError(ValueError):
    """Bad input for training: one line for the user, nothing written."""


@dataclass(frozen=True)
class TrainRequest:
    """Arguments of one ``edgefleet train`` run."""

    data: Sequence[Path]
    profiles: Sequence[str]
    name: str
    epochs: int = 40
    seed: int = 0
    train_fraction: float = 1.0
    # Train on each file's NAB probationary rows (15 %, at most 750) instead of train_fraction:
    # what `search --labels` judged its candidates on, file by file.
    probation: bool = False
    # The rows trained on must be in time order with distinct timestamps; with sort_dedupe
    # they are sorted and repeats dropped instead (counted in the lineage, ``time_order``).
    sort_dedupe: bool = False
    family: str = DEFAULT_ARCHITECTURE.family
    window: int = DEFAULT_ARCHITECTURE.window
    # None = the family's DEFAULT_HIDDEN.
    hidden: tuple[int, ...] | None = None
    centering: str = DEFAULT_ARCHITECTURE.centering
    # Conv family only (ArchitectureSpec): kernel size, dilations (None = CONV_DILATIONS, one
    # per hidden width), residual connections.
    kernel: int = CONV_KERNEL
    dilations: tuple[int, ...] | None = None
    residual: bool = True
    # Attention family only (ArchitectureSpec): attention heads per block.
    heads: int = ATTENTION_HEADS
    # MLP families only (ArchitectureSpec): the hidden layers' activation.
    activation: str = "relu"
    # Tree families only (ArchitectureSpec): trees per forest; the trees family's depth limit;
    # the isolation forest's windows per tree.
    n_estimators: int = TREE_ESTIMATORS
    max_depth: int = TREE_DEPTH
    max_samples: int = ISOLATION_SAMPLES
    # Seasonal context in rows (ArchitectureSpec.season): None = one day when the timestamps
    # and rows allow it (see seasonal_lag), 0 = none.
    season: int | None = None
    threshold: ThresholdPolicy = field(default_factory=ThresholdPolicy)
    score_pipeline: ScorePipeline = DEFAULT_SCORE_PIPELINE
    # Step 5 of the score pipeline (an error at the same time as yesterday's is a repeat, not
    # an anomaly) wherever the model has a season; off: every repeat is judged on its own.
    seasonal_repeats: bool = True
    # The full training recipe (a search's winner); None = defaults with ``epochs`` and ``seed``.
    recipe: Recipe | None = None
    # Extra lineage recorded with the version (e.g. the search study, trial and candidate).
    lineage: Mapping[str, Any] = field(default_factory=dict)
    # Folders searched for firmware profiles before the built-in ones.
    profile_dirs: Sequence[Path] = ()


@dataclass(frozen=True)
class PreparedData:
    """Validated inputs: profiles, series (cut to the train fraction, gaps filled)."""

    request: TrainRequest
    profiles: list[FirmwareProfile]
    series: list[Series]
    datasets: list[dict[str, Any]]
    features: tuple[str, ...]


@dataclass(frozen=True)
class TrainOutcome:
    """The registered version, and the artifacts that failed parity (not registered)."""

    version: VersionRecord
    rejected: list[BuiltArtifact]


def prepare(request: TrainRequest) -> PreparedData:
    """Validate the request and load its data. Raises :class:`TrainError` with one line.

    A file whose rows to train on go back in time or repeat a timestamp is refused (naming the
    first such line) unless ``request.sort_dedupe``; then the whole file is sorted and
    deduplicated first, and each dataset records in ``time_order`` how many rows were moved
    and dropped. A family that cannot be exported to an artifact every profile allows (a tree
    family and a TFLite-only profile: :func:`trainer.export.targets.refusal`) is refused.
    """
    try:
        check_model_name(request.name)
    except RegistryError as e:
        raise TrainError(str(e)) from e
    if not request.profiles:
        raise TrainError("give at least one --profile")
    if not 0 < request.train_fraction <= 1:
        raise TrainError(f"--train-fraction must be in (0, 1], got {request.train_fraction}")
    if request.epochs < 1:
        raise TrainError("--epochs must be at least 1")
    if request.window < 2:
        raise TrainError("--window must be at least 2")
    try:
        profiles = load_profiles(request.profiles, request.profile_dirs)
    except ValueError as e:
        raise TrainError(str(e)) from e
    try:
        spec_for(request, 1, request.season or 0)
    except SpecError as e:
        raise TrainError(f"--season {request.season}: {e}" if request.season else str(e)) from None
    refused = refusal([request.family], profiles)
    if refused:
        raise TrainError(f"--family {request.family}: {refused}")
    if not request.data:
        raise TrainError("give at least one --data CSV")
    series, datasets, features = [], [], None
    for path in request.data:
        try:
            full = _read(path, request)
        except SeriesError as e:
            raise TrainError(str(e)) from e
        repair = None
        if request.sort_dedupe:
            full, repair = sort_dedupe(full)
        if features is None:
            features = full.features
        elif full.features != features:
            raise TrainError(
                f"{path}: columns {list(full.features)} differ from {list(features)} of the first file"
            )
        used = _rows_used(len(full), request)
        part = full.head(used)
        if used < min_rows(request.window):
            after = "its probationary rows" if request.probation else f"--train-fraction {request.train_fraction}"
            raise TrainError(
                f"{path}: {used} rows (after {after}) are too few "
                f"for a window of {request.window}: need at least {min_rows(request.window)}"
            )
        if request.season and used < request.season + SEASON_HALFWIDTH + 1 + MIN_VALIDATION_WINDOWS:
            raise TrainError(
                f"{path}: {used} rows are too few for --season {request.season}: need at least "
                f"{request.season + SEASON_HALFWIDTH + 1 + MIN_VALIDATION_WINDOWS}"
            )
        try:
            filled = fill_missing(part.values)
        except ValueError:
            raise TrainError(f"{path}: a column has no value in the rows used for training") from None
        series.append(Series(part.timestamps, part.features, filled))
        dataset: dict[str, Any] = {
            "file": Path(path).name,
            "sha256": file_sha256(path),
            "rows": len(full),
            "rows_used": used,
            "first": part.timestamps[0],
            "last": part.timestamps[-1],
        }
        if repair is not None:
            dataset["time_order"] = {"moved": repair.moved, "dropped": repair.dropped}
        datasets.append(dataset)
    assert features is not None
    return PreparedData(request, profiles, series, datasets, features)


def spec_for(request: TrainRequest, features: int, season: int) -> ArchitectureSpec:
    """The spec ``request`` asks for, with its family's defaults filled in. Raises
    :class:`SpecError` when the combination is invalid."""
    hidden = DEFAULT_HIDDEN.get(request.family, ()) if request.hidden is None else tuple(request.hidden)
    conv = request.family == "conv"
    dilations = request.dilations
    if dilations is None:
        dilations = CONV_DILATIONS if conv else ()
    return ArchitectureSpec(
        request.family, request.window, features, hidden, request.centering,
        season=season, season_halfwidth=SEASON_HALFWIDTH,
        kernel=request.kernel, dilations=tuple(dilations), residual=request.residual, heads=request.heads,
        n_estimators=request.n_estimators, max_depth=request.max_depth, max_samples=request.max_samples,
        activation=request.activation,
    )


def seasonal_lag(series: Sequence[Series], window: int) -> int:
    """Rows per day for the default seasonal context, or 0 when it cannot be used.

    The sampling interval is each series' median timestamp step. One day must be a whole,
    common number of rows in every series (within 1%), longer than ``window`` plus
    :data:`SEASON_HALFWIDTH` (a shorter day lies inside the window already), at most
    :data:`MAX_SEASON_ROWS`, and leave :data:`MIN_SEASONAL_WINDOWS` windows in every series.
    """
    lags = set()
    for s in series:
        try:
            t = np.array([timestamp_key(x) for x in s.timestamps], np.float64)
        except ValueError:
            return 0
        steps = np.diff(t)
        steps = steps[steps > 0]
        if steps.size == 0:
            return 0
        rows = SEASON_SECONDS / float(np.median(steps))
        lag = int(round(rows))
        if lag < 1 or abs(rows - lag) > 0.01 * rows:
            return 0
        lags.add(lag)
    if len(lags) != 1:
        return 0
    lag = lags.pop()
    if lag - SEASON_HALFWIDTH < window or lag > MAX_SEASON_ROWS:
        return 0
    need = lag + SEASON_HALFWIDTH + MIN_SEASONAL_WINDOWS
    return lag if all(len(s) >= need for s in series) else 0


def with_seasonal_repeats(pipeline: LikelihoodPipeline, season: int) -> LikelihoodPipeline:
    """``pipeline`` with its seasonal-repeat step (:mod:`shared.score_pipeline`, step 5) at
    ``season`` rows (the model's own seasonal lag: ``train``, the search objective and the
    docs use this one rule) and the models' half-width. Unchanged when it has one already,
    when ``season`` is 0, or when a season does not fit in its history (``--season`` of more
    rows than ``long_window`` minus the half-width: the history cannot look that far back).
    """
    if not season or pipeline.season or season + SEASON_HALFWIDTH >= pipeline.long_window:
        return pipeline
    return dataclasses.replace(pipeline, season=season, season_halfwidth=SEASON_HALFWIDTH)


def _rows_used(rows: int, request: TrainRequest) -> int:
    """Rows of a file of ``rows`` rows that ``request`` trains on (its first ones)."""
    if request.probation:
        from trainer.evaluation.nab import probation_rows

        return probation_rows(rows)
    return max(1, int(rows * request.train_fraction))


def _read(path: Path, request: TrainRequest) -> Series:
    """The file's rows; those to train on must be in time order unless ``sort_dedupe``.

    Rows past the train fraction are not trained on, so disorder there is not refused (NAB's
    own files repeat an hour at a daylight-saving change, after their probationary rows).
    Raises :class:`TrainError` naming file and line for disorder in the rows used.
    """
    if request.sort_dedupe:
        return read_series(path)
    try:
        return read_series_ordered_head(path, lambda n: _rows_used(n, request))
    except TimeOrderError as e:
        raise TrainError(str(e)) from e


def _variants(profiles: Sequence[FirmwareProfile], family: str) -> list[tuple[str, str]]:
    """The artifacts to build: every variant a profile allows that ``family`` exports to (a
    tree family: ONNX fp32 only, see :mod:`trainer.export.targets`)."""
    seen: dict[tuple[str, str], None] = {}
    for p in profiles:
        for v in p.variants():
            if v in exportable(family):
                seen.setdefault(v, None)
    return sorted(seen)


def _drift_reference(rows: np.ndarray, features: Sequence[str], val_scores: np.ndarray) -> dict:
    """``spec.json``'s ``drift_reference``: summary statistics of the rows trained on and of
    the validation scores (each artifact's bundle carries its own score entry instead:
    :func:`trainer.export.bundles.build_artifact`), with the bins and quantile sample the agent's drift monitor
    compares live data with (:mod:`shared.drift`). Deterministic: same input, same dict."""
    q = [0.01, 0.5, 0.99]
    ref: dict[str, Any] = {"features": {}, "score": {}}
    for j, name in enumerate(features):
        col = rows[:, j].astype(np.float64)
        col = col[np.isfinite(col)]
        ref["features"][name] = {
            "mean": float(col.mean()),
            "std": float(col.std()),
            "min": float(col.min()),
            "max": float(col.max()),
            "quantiles": dict(zip(("p01", "p50", "p99"), map(float, np.quantile(col, q)))),
            **reference_distribution(col).to_json(),
        }
    # The trained model's; each exported artifact replaces it with its own (build_artifact).
    ref["score"] = score_reference(val_scores)
    return ref


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("edgefleet", "torch", "onnxruntime", "litert-torch", "scikit-learn", "skl2onnx"):
        try:
            out[pkg] = package_version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _evenly(windows: np.ndarray, count: int) -> np.ndarray:
    if len(windows) <= count:
        return windows
    idx = np.linspace(0, len(windows) - 1, count).round().astype(int)
    return np.ascontiguousarray(windows[idx])


def training_windows(
    spec: ArchitectureSpec, series: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training windows, validation windows (the last :data:`VALIDATION_FRACTION` of each
    series, in time order) and the rows trained on, for a model of ``spec``.

    Raises ``ValueError`` when a series is too short for one window plus validation.
    """
    train_parts, val_parts, normal_rows = [], [], []
    for values in series:
        if spec.forecasts:
            # only the forecast row must be unseen (trainer/data/windows.py)
            wsplit = forecast_split(values, spec.input_rows, VALIDATION_FRACTION)
            train_parts.append(wsplit.train)
            val_parts.append(wsplit.validation)
            normal_rows.append(wsplit.train_rows)
        else:
            split = time_split(values, spec.window, VALIDATION_FRACTION)
            train_parts.append(make_windows(split.train, spec.window))
            val_parts.append(make_windows(split.validation, spec.window))
            normal_rows.append(split.train)
    return np.concatenate(train_parts), np.concatenate(val_parts), np.concatenate(normal_rows)



def admit_artifact(fmt: str, quant: str, art: BuiltArtifact, profiles: Sequence[FirmwareProfile],
                   notify: Callable[[str, dict[str, Any]], None]) -> NewArtifact | None:
    """``art`` as an artifact to register: for the profiles that allow its variant and whose
    flash budget it fits; ``None`` (and a ``rejected`` notice) when it failed parity or fits none."""
    fits = [p.name for p in profiles if p.allows(fmt, quant) and art.model_size <= p.budget.model_flash_kb * 1024]
    if not art.parity.passed:
        notify("rejected", {"format": fmt, "quantization": quant, "why": list(art.parity.failures)})
        return None
    if not fits:
        notify("rejected", {"format": fmt, "quantization": quant, "why": ["over every profile's flash budget"]})
        return None
    notify("artifact", {"format": fmt, "quantization": quant, "parity": art.parity.to_json()})
    return NewArtifact(fmt, quant, art.bundle, art.model_size, fits, art.parity.to_json())

def train(
    prepared: PreparedData,
    registry_dir: Path,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> TrainOutcome:
    """Train, calibrate, export, check parity and register ``name@N``.

    ``progress(stage, info)`` is called for each epoch (``stage="epoch"``) and each artifact.
    Raises :class:`TrainError` if no artifact passes parity (nothing is registered then), and
    :class:`RegistryError` if the registry cannot take a new version (checked first, before
    any training; see :meth:`Registry.check_writable`).
    """
    Registry.check_writable(registry_dir)
    req = prepared.request
    notify = progress or (lambda stage, info: None)
    started = time.monotonic()
    season = req.season
    if season is None:
        season = seasonal_lag(prepared.series, req.window) if req.family in FORECASTING_FAMILIES else 0
    spec = spec_for(req, len(prepared.features), season)
    train_w, val_w, rows = training_windows(spec, [s.values for s in prepared.series])
    recipe = req.recipe or Recipe(epochs=req.epochs, seed=req.seed)
    result = fit(
        spec,
        train_w,
        val_w,
        rows,
        recipe,
        progress=lambda e, n, tl, vl: notify(
            "epoch", {"epoch": e, "epochs": n, "train_loss": tl, "val_loss": vl}
        ),
    )
    val_scores = score_windows(result.model, val_w)
    pipeline = req.score_pipeline
    if isinstance(pipeline, LikelihoodPipeline):
        # validation windows are consecutive per series: the errors an agent would have seen
        pipeline = pipeline.calibrated(val_scores).with_value_range(
            np.concatenate([s.values for s in prepared.series]))
        if req.seasonal_repeats:
            pipeline = with_seasonal_repeats(pipeline, season)
    score = calibrate(val_scores, spec.score_kind, req.threshold, pipeline)
    holdout = _evenly(val_w, HOLDOUT_WINDOWS)
    inputs = ExportInputs(
        name=req.name,
        module=result.model,
        window=spec.input_rows,
        features=prepared.features,
        score=score,
        # Calibrate int8 ranges on every window seen at training time, validation included:
        # ranges from training windows alone clip the first unusual level that comes along.
        calibration=_evenly(np.concatenate([train_w, val_w]), CALIBRATION_WINDOWS),
        holdout=holdout,
        reference_scores=score_windows(result.model, holdout),
        drift_reference=_drift_reference(rows, prepared.features, val_scores),
        lineage={
            "datasets": prepared.datasets,
            "train_fraction": "probation" if req.probation else req.train_fraction,
            "validation_fraction": VALIDATION_FRACTION,
            "recipe": recipe.to_json(),
            "threshold_policy": req.threshold.to_json(),
            "score_pipeline": {k: v for k, v in pipeline.to_json().items() if k not in ("prior", "value_range")},
            "software": _versions(),
            **req.lineage,
        },
        architecture=spec.to_json(),
    )
    built, rejected, new = [], [], []
    for fmt, quant in _variants(prepared.profiles, spec.family):
        notify("export", {"format": fmt, "quantization": quant})
        art = build_artifact(fmt, quant, inputs)
        built.append(art)
        if not art.parity.passed:
            rejected.append(art)
        admitted = admit_artifact(fmt, quant, art, prepared.profiles, notify)
        if admitted is not None:
            new.append(admitted)
    if not new:
        raise TrainError("no artifact passed its parity check; nothing was registered")
    metrics = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "val_loss": result.best_val_loss,
        "threshold": score.threshold,
        "validation_alarm_rate": float(np.mean(val_scores > score.threshold)),
        "validation_score_p50": float(np.median(val_scores)),
        "validation_score_p99": float(np.quantile(val_scores, 0.99)),
        "train_windows": int(len(train_w)),
        "validation_windows": int(len(val_w)),
        "train_seconds": round(time.monotonic() - started, 2),
    }
    with Registry.open(registry_dir, create=True) as registry:
        record = registry.register(
            req.name,
            metrics=metrics,
            params={
                "epochs": req.epochs,
                "seed": req.seed,
                "train_fraction": "probation" if req.probation else req.train_fraction,
                "profiles": [p.name for p in prepared.profiles],
                "window": req.window,
                "family": req.family,
            },
            lineage=inputs.lineage,
            architecture=spec.to_json(),
            artifacts=new,
            # what `edgefleet compress` starts from (a tree ensemble has no torch weights)
            weights=None if isinstance(result.model, TreeModel) else weights_bytes(result.model),
        )
    return TrainOutcome(record, rejected)
