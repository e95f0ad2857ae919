"""``edgefleet compress``: a registered version → recipe steps → measured rows → a new version.

:func:`prepare` checks everything that can be checked before any work (the recipe, the
version and its stored weights, the profiles, the data, whether each step fits the family,
that the registry is writable) and raises :class:`CompressError` or
:class:`~trainer.registry.RegistryError` with one line. :func:`compress` then applies the
steps one by one; after each it exports the artifact every profile would ship, checks its
parity and golden vectors in the agent's runtime (:func:`trainer.export.build_artifact`) and
measures it (:mod:`trainer.compress.measure`). The quality gate compares each judged step
(a step followed by ``finetune`` or ``distill`` is judged after it) with the parent's
artifact on the same profile; a drop over ``max_quality_drop`` raises
:class:`QualityGateError` and nothing is registered. Otherwise the final model's artifacts
(every variant the profiles allow, or the recipe's quantization) are registered as a new
version whose lineage names the parent version and the recipe, with its weights, so it can
be compressed or fine-tuned again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from shared.bundle import ScoreSpec, read_bundle
from shared.profiles import FirmwareProfile, load_profiles
from shared.score_pipeline import LikelihoodPipeline
from trainer.compress._base import CompressError, ModelState, StepData
from trainer.compress._distill import Distillation
from trainer.compress._quantize import CALIBRATION
from trainer.compress.measure import (
    ArtifactQuality,
    StepRow,
    failed_row,
    judge_artifact,
    measure_row,
)
from trainer.compress.recipe import CompressionRecipe, parse_recipe
from trainer.export import BuiltArtifact, ExportInputs, build_artifact
from trainer.models import (
    ArchitectureSpec,
    CheckpointError,
    Recipe,
    SpecError,
    compressed_layers,
    load_weights,
    parameter_count,
    score_windows,
    weights_bytes,
)
from trainer.models.spec import TREE_FAMILIES
from trainer.registry import Registry, VersionRecord, parse_model_ref
from trainer.scoring import ThresholdPolicy, calibrate
from trainer.search.errors import SearchError
from trainer.search.objective import ObjectiveData, TrainedCandidate, labelled_data, synthetic_data
from trainer.search.space import Candidate

__all__ = ["CompressOutcome", "CompressRequest", "QualityGateError", "compress", "prepare"]

log = logging.getLogger(__name__)
CALIBRATION_WINDOWS = 256
HOLDOUT_WINDOWS = 512

Progress = Callable[[str, dict[str, Any]], None]


class QualityGateError(CompressError):
    """A step lost more detection quality than ``--max-quality-drop`` allows."""


@dataclass(frozen=True)
class CompressRequest:
    """Arguments of one ``edgefleet compress`` run."""

    ref: str
    recipe: str
    profiles: Sequence[str]
    data: Sequence[Path] = ()
    labels: Path | None = None
    max_quality_drop: float | None = None
    seed: int = 0
    profile_dirs: Sequence[Path] = ()
    # Measures a bundle's latency (default: trainer.search.hardware.measure_artifact).
    measure_latency: Callable[[bytes], dict[str, float]] | None = None


@dataclass
class Prepared:
    """A validated request: parent version and model, profiles, data."""

    request: CompressRequest
    recipe: CompressionRecipe
    registry: Path
    parent: VersionRecord
    parent_model: nn.Module
    parent_spec: ArchitectureSpec
    parent_score: ScoreSpec
    features: tuple[str, ...]
    profiles: list[FirmwareProfile]
    series: list[np.ndarray]
    objective: ObjectiveData
    datasets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # from resolving the recipe (distill:front)


@dataclass(frozen=True)
class CompressOutcome:
    """The registered version and every measured row, in order."""

    version: VersionRecord
    rows: list[StepRow]
    notes: list[str]


def prepare(request: CompressRequest, registry_dir: Path) -> Prepared:
    """Validate ``request`` (see the module docstring). Raises :class:`CompressError` or
    :class:`RegistryError` with one line; nothing is written."""
    recipe = parse_recipe(request.recipe)
    if request.max_quality_drop is not None and not request.max_quality_drop >= 0:
        raise CompressError(f"--max-quality-drop must be a number >= 0, got {request.max_quality_drop}")
    name, version = parse_model_ref(request.ref)
    if version is None:
        raise CompressError(f"name the version to compress: {name}@N")
    if not request.profiles:
        raise CompressError("give at least one --profile")
    try:
        profiles = load_profiles(request.profiles, request.profile_dirs)
    except ValueError as e:
        raise CompressError(str(e)) from e
    export = recipe.export
    for p in profiles:
        if export.quantization and not any(p.allows(f, export.quantization) for f in p.formats):
            raise CompressError(f"profile {p.name} does not allow {export.quantization} artifacts "
                                f"(it allows {', '.join(p.quantizations)})")
    with Registry.open(registry_dir) as reg:
        parent = reg.get(name, version)
        if parent.architecture.get("family") in TREE_FAMILIES:
            raise CompressError(f"{parent.ref} is a {parent.architecture['family']} model: compress works on "
                                "the torch families (a tree ensemble has no layers to prune, factorize or distill)")
        weights = reg.weights(parent)
        if not parent.artifacts:
            raise CompressError(f"{parent.ref} has no artifact")
        bundle_spec, _ = read_bundle(reg.bundle(parent.artifacts[0].sha256))
    try:
        spec = ArchitectureSpec.from_json(parent.architecture)
        model = load_weights(spec, weights)
    except (SpecError, CheckpointError) as e:
        raise CompressError(f"{parent.ref}: {e}") from e
    recipe, notes = _resolve_front(recipe, parent, [p.name for p in profiles], spec)
    for step in recipe.steps:
        step.check(spec)
    features = tuple(bundle_spec.features)
    paths = list(request.data) or _lineage_files(parent)
    from shared.series import file_sha256

    # a file the parent was trained on is used up to the rows it was trained on (its
    # --train-fraction: the rest is what the deployed model meets, not training data)
    trained_on = {d.get("sha256"): d.get("rows_used") for d in parent.lineage.get("datasets") or []}
    try:
        shas = [file_sha256(p) for p in paths]
    except OSError as e:
        raise CompressError(f"cannot read {e.filename}: {e.strerror or e}") from e
    rows_used = [trained_on.get(sha) for sha in shas]
    try:
        objective = (labelled_data(paths, request.labels) if request.labels
                     else synthetic_data(paths, seed=request.seed, rows_used=rows_used))
    except SearchError as e:
        raise CompressError(str(e)) from e
    if objective.features != features:
        raise CompressError(f"{paths[0]}: columns {list(objective.features)} differ from the model's {list(features)}")
    # Steps train on the rows the objective does not judge: with labels NAB's probationary rows,
    # without them the rows before the held-back part that carries the injected anomalies.
    series = [np.asarray(t, np.float32) for t in objective.train]
    from trainer.data import MIN_VALIDATION_WINDOWS, min_rows

    # what edgefleet train needs (trainer/data/windows.py): a forecaster only needs its forecast
    # rows unseen, so a seasonal input does not need twice its length
    need = spec.input_rows + MIN_VALIDATION_WINDOWS if spec.forecasts else min_rows(spec.window)
    for path, values in zip(paths, series):
        if len(values) < need:
            raise CompressError(f"{path}: {len(values)} rows are too few for {parent.ref}'s "
                                f"{spec.input_rows}-row input: need at least {need}")
    Registry.check_writable(registry_dir)
    datasets = [{"file": Path(p).name, "sha256": sha, "rows_used": len(v)} for p, sha, v in zip(paths, shas, series)]
    return Prepared(request, recipe, Path(registry_dir), parent, model, spec, bundle_spec.score, features,
                    profiles, series, objective, datasets, notes)


def _resolve_front(recipe: CompressionRecipe, parent: VersionRecord, profiles: list[str],
                   spec: ArchitectureSpec) -> tuple[CompressionRecipe, list[str]]:
    """``distill:front`` steps with the widths of the parent's search front (see
    :func:`trainer.compress._distill.smallest_front_widths`), and a note for each."""
    steps, notes = [], []
    for step in recipe.steps:
        if isinstance(step, Distillation) and step.front:
            step, note = step.with_front(parent.lineage, profiles, spec)
            notes.append(note)
        steps.append(step)
    return CompressionRecipe(tuple(steps)), notes


def _lineage_files(parent: VersionRecord) -> list[Path]:
    """Without ``--data``: the files ``parent`` was trained on, by name in the current folder,
    each with the content recorded in its lineage."""
    from shared.series import file_sha256

    datasets = parent.lineage.get("datasets") or []
    if not datasets:
        raise CompressError(f"give --data CSV: {parent.ref} records no data it was trained on")
    paths = []
    for d in datasets:
        path = Path(d["file"])
        if not path.is_file() or file_sha256(path) != d.get("sha256"):
            names = ", ".join(x["file"] for x in datasets)
            raise CompressError(f"give --data CSV: {parent.ref} was trained on {names}, "
                                f"and ./{path} is {'missing' if not path.is_file() else 'not that file'}")
        paths.append(path)
    return paths


def _evenly(windows: np.ndarray, count: int) -> np.ndarray:
    if len(windows) <= count:
        return windows
    return np.ascontiguousarray(windows[np.linspace(0, len(windows) - 1, count).round().astype(int)])


class _Exporter:
    """Builds (and caches) the artifacts of one model state, with its recalibrated score spec."""

    def __init__(self, prepared: Prepared, state: ModelState, windows: tuple[np.ndarray, np.ndarray, np.ndarray],
                 lineage: dict[str, Any]) -> None:
        from trainer.pipeline import _drift_reference

        train_w, val_w, rows = windows
        self.model = state.finalized()
        self.spec = compressed_layers(self.model, state.spec)
        val_scores = score_windows(self.model, val_w)
        self.val_scores = val_scores
        pipeline = prepared.parent_score.pipeline
        if isinstance(pipeline, LikelihoodPipeline):  # as train calibrates it, on the rows given
            pipeline = pipeline.calibrated(val_scores).with_value_range(np.concatenate(prepared.series))
        policy = ThresholdPolicy(**prepared.parent.lineage.get("threshold_policy", {}))
        self.score = calibrate(val_scores, self.spec.score_kind, policy, pipeline)
        holdout = _evenly(val_w, HOLDOUT_WINDOWS)
        self.inputs = ExportInputs(
            name=prepared.parent.model, module=self.model, window=self.spec.input_rows, features=prepared.features,
            score=self.score, calibration=_evenly(np.concatenate([train_w, val_w]), CALIBRATION_WINDOWS),
            holdout=holdout, reference_scores=score_windows(self.model, holdout),
            drift_reference=_drift_reference(rows, prepared.features, val_scores),
            lineage=lineage, architecture=self.spec.to_json(),
        )
        self.trained = TrainedCandidate(Candidate(self.spec, Recipe()), self.model, train_w, val_w, rows,
                                        self.score, 0, 0, 0.0)
        self._built: dict[tuple[str, str, str], BuiltArtifact] = {}

    def build(self, fmt: str, quantization: str, scheme: str) -> BuiltArtifact:
        key = (fmt, quantization, scheme if quantization == "int8" else "static")
        if key not in self._built:
            self._built[key] = build_artifact(fmt, quantization, self.inputs, key[2])
        return self._built[key]


_PARENT_TRAINING_METRICS = ("best_epoch", "epochs_run", "val_loss", "train_seconds", "train_windows",
                            "validation_windows")

def _variant(profile: FirmwareProfile, quantization: str | None) -> tuple[str, str]:
    """The (format, quantization) ``profile`` ships: its preferred one, in ``quantization``
    when the recipe fixes it (in its preferred format if allowed, else its first format that is)."""
    if quantization is None or profile.allows(profile.preferred_format, quantization):
        return profile.preferred_format, quantization or profile.preferred_quantization
    return next(f for f in profile.formats if profile.allows(f, quantization)), quantization


def compress(prepared: Prepared, progress: Progress | None = None) -> CompressOutcome:
    """Apply the recipe, measure every step, gate, register (see the module docstring).

    Raises :class:`QualityGateError` (nothing registered) when a step drops quality too far,
    :class:`CompressError` when a step cannot be applied or no artifact passes parity.
    """
    from trainer.pipeline import _variants, _versions, admit_artifact, training_windows

    notify = progress or (lambda stage, info: None)
    req, recipe = prepared.request, prepared.recipe
    parent = prepared.parent
    recipe_json = parent.lineage.get("recipe")
    train_recipe = dataclasses.replace(Recipe.from_json(recipe_json) if recipe_json else Recipe(), seed=req.seed)
    lineage = {
        # not "search": the trial and its measured quality describe the parent, not this model
        **{k: v for k, v in parent.lineage.items()
           if k not in ("parent_version", "software", "compression", "search")},
        "parent_version": parent.version,
        "compression": {
            "parent": parent.ref,
            "recipe": recipe.text,
            "recipe_given": req.recipe,
            "datasets": prepared.datasets,
            "calibration": CALIBRATION,
            "quality": "nab_standard" if req.labels else "synthetic_event_f1",
            "seed": req.seed,
        },
        "software": _versions(),
    }
    rows: list[StepRow] = []

    # -- the parent --------------------------------------------------------------------------------
    # Exported and calibrated exactly as every step's model is (same data split, same export),
    # not read from its registered bundles: a change in a row then comes from the steps alone,
    # not from a score pipeline calibrated on other rows. (The model and export path are the
    # registered version's, so sizes and latency are those of what it ships.)
    windows = training_windows(prepared.parent_spec, prepared.series)
    parent_state = ModelState(prepared.parent_model, prepared.parent_spec)
    parent_export = _Exporter(prepared, parent_state, windows, lineage)
    parent_quality: dict[str, ArtifactQuality] = {}
    window = parent_export.inputs.holdout[0]
    for profile in prepared.profiles:
        fmt, quant = _variant(profile, None)
        bundle = parent_export.build(fmt, quant, "static").bundle
        # the preferred variant may fail parity (train then registered another): use what it ships
        shipped = [(a.format, a.quantization) for a in parent.artifacts if profile.name in a.profiles]
        for fmt, quant in shipped if not bundle else ():
            bundle = parent_export.build(fmt, quant, "static").bundle
            if bundle:
                break
        if not bundle:
            raise CompressError(f"{parent.ref}: no artifact for {profile.name} passes parity when re-exported")
        quality = judge_artifact(bundle, parent_export.trained, prepared.objective)
        parent_quality[profile.name] = quality
        row = measure_row("parent", profile, bundle, parent_export.model, window, quality, quality,
                          measure_latency=req.measure_latency)
        rows.append(row)
        notify("row", {"row": row})

    # -- the steps ------------------------------------------------------------------------------
    teacher = parent_export.model
    state = ModelState(load_weights(prepared.parent_spec, weights_bytes(prepared.parent_model)).train(),
                       prepared.parent_spec, notes=list(prepared.notes))
    judged = set(recipe.judged_steps())
    exporter = parent_export
    for index, step in enumerate(recipe.steps):
        notify("step", {"step": step.token})
        data = StepData(windows[0], windows[1], windows[2], train_recipe, teacher)
        state = step.apply(state, data)
        exporter = _Exporter(prepared, state, windows, lineage)
        window = exporter.inputs.holdout[0]
        for profile in prepared.profiles:
            fmt, quant = _variant(profile, state.export.quantization)
            art = exporter.build(fmt, quant, state.export.scheme)
            if not art.parity.passed:
                row = failed_row(step.token, profile, fmt, quant, state.export.scheme, exporter.model, window,
                                 art.model_size, art.parity.failures)
            else:
                quality = judge_artifact(art.bundle, exporter.trained, prepared.objective)
                row = measure_row(step.token, profile, art.bundle, exporter.model, window, quality,
                                  parent_quality[profile.name], latency_changes=step.changes_latency,
                                  measure_latency=req.measure_latency)
            rows.append(row)
            notify("row", {"row": row})
            if req.max_quality_drop is not None and index in judged and row.quality_change is None:
                # the artifact this profile runs cannot be judged: the gate cannot pass it
                raise QualityGateError(
                    f"step {recipe.gate_label(index)}: the {fmt}/{quant} artifact {profile.name} runs fails "
                    "its parity check, so its quality cannot be judged against --max-quality-drop: "
                    "nothing registered")
            if (req.max_quality_drop is not None and index in judged and row.quality_change is not None
                    and -row.quality_change > req.max_quality_drop):
                raise QualityGateError(
                    f"step {recipe.gate_label(index)} lost {-row.quality_change:.4g} quality on {profile.name} "
                    f"({rows[_parent_index(rows, profile.name)].quality:.4g} -> {row.quality:.4g}), "
                    f"more than --max-quality-drop {req.max_quality_drop:g}: nothing registered")

    # -- register ---------------------------------------------------------------------------------
    final = exporter
    new = []
    for fmt, quant in _variants(prepared.profiles, state.spec.family):
        if state.export.quantization and quant != state.export.quantization:
            continue
        notify("export", {"format": fmt, "quantization": quant})
        art = final.build(fmt, quant, state.export.scheme)
        admitted = admit_artifact(fmt, quant, art, prepared.profiles, notify)
        if admitted is not None:
            new.append(admitted)
    if not new:
        raise CompressError("no artifact of the compressed model passed its parity check; nothing was registered")
    weights = weights_bytes(final.model)
    load_weights(final.spec, weights)  # the spec and weights registered rebuild the model
    lineage["compression"]["steps"] = [r.to_json() for r in rows]
    lineage["compression"]["notes"] = state.notes
    metrics = {
        # the parent's training figures (epochs, loss, time) describe the parent's training,
        # not this model's; what the steps trained is in lineage.compression.steps
        **{k: v for k, v in parent.metrics.items() if k not in _PARENT_TRAINING_METRICS},
        "threshold": final.score.threshold,
        "validation_alarm_rate": float(np.mean(final.val_scores > final.score.threshold)),
        "validation_score_p50": float(np.median(final.val_scores)),
        "validation_score_p99": float(np.quantile(final.val_scores, 0.99)),
        "parameters": parameter_count(final.model),
    }
    with Registry.open(prepared.registry) as reg:
        record = reg.register(
            parent.model, metrics=metrics,
            params={**parent.params, "compress": recipe.text, "compressed_from": parent.ref,
                    "profiles": [p.name for p in prepared.profiles]},
            lineage=lineage, architecture=final.spec.to_json(), artifacts=new, weights=weights)
    return CompressOutcome(record, rows, state.notes)


def _parent_index(rows: Sequence[StepRow], profile: str) -> int:
    return next(i for i, r in enumerate(rows) if r.step == "parent" and r.profile == profile)
