"""Detection quality of one candidate, measured through the agent's own score pipeline.

Two ways, chosen by the data (:class:`ObjectiveData`):

**Labelled** (:func:`labelled_data`, NAB-style windows JSON as ``edgefleet evaluate`` reads):
the candidate trains on the probationary rows of every series (NAB's 15%, at most 750 rows),
its raw scores over each whole series go through the streaming score pipeline an agent runs
(:meth:`shared.bundle.ScoreSpec.scorer`, calibrated as ``edgefleet train`` calibrates it), and
the quality is NAB's normalized *standard* score of those own decisions
(:func:`trainer.evaluation.nab.nab_score`; NAB ignores the probationary rows itself).

**Unlabelled** (:func:`synthetic_data`), after Goswami et al., "Unsupervised model selection
for time-series anomaly detection" (ICLR 2023): the last :data:`HOLDOUT_FRACTION` of each
series is held back. The candidate trains on the rest; copies of the held-back rows get one
seeded synthetic anomaly each (:data:`INJECTIONS`: spike, level shift, slow drift, variance
change, stuck value), and the same score pipeline decides on them. The quality is the event
F1 of those decisions (:func:`trainer.evaluation.nab.event_metrics`: recall over the injected
windows, precision against false events) minus ``0.1 ×`` the mean forecast (or
reconstruction) error on the clean held-back rows, in units of the training standard
deviation, capped at 10: detection first, and among equal detectors the one that models the
normal data better. (The paper aggregates such metrics by rank over all candidates; a
sequential study needs one number per trial, hence the fixed weighting.) The injections
depend on the data and the seed only, so every trial is judged on the same anomalies.

Scores here come from the trained model (torch, or scikit-learn for the tree families); the
artifacts registered at the end are checked against it for parity by the normal ``train`` path.

**Cross-validation** (``edgefleet search --folds K``, :func:`load_folds`). With K = 1 (the
default) a candidate is judged on the single split above. With K ≥ 2 the unlabelled objective
runs on K expanding-window folds (:func:`trainer.data.expanding_folds`, the layout of
scikit-learn's ``TimeSeriesSplit``): each series is cut into K + 1 consecutive blocks of equal
size, and fold i trains on blocks 0..i and is judged on block i + 1 exactly as above (seeded
injections into copies of that block, clean error on it); no shuffling, and no look-ahead: a
forecaster judged in fold i forecasts rows of its block only, reading rows before it as
context as an agent reads its past (an autoencoder's first windows there also reconstruct a
few rows before the block), and fold i trains on no row after its block. The score pipeline
is warmed on the rows before the block, as a running agent's would be (decisions are taken
from the block's first row on).
Within a fold's training rows the usual early-stopping split applies
(:func:`trainer.pipeline.training_windows`). The trial's quality is the mean over folds
(:func:`cross_validate`); each fold's quality and details are kept. Labelled mode follows
NAB's protocol (train on the probationary rows, score the rest of each file), which fixes
the split, so it takes no folds.

Pruning: in a single-objective study :func:`train_candidate` reports the negated validation
loss after each epoch of the first fold (``trial.report``, step = epoch, counted from 1;
negated so that higher is better, as the study maximizes quality) and raises
``optuna.TrialPruned`` when the pruner says so. Later folds report nothing: Optuna's pruners
read a trial's whole curve (the median pruner its best value over all steps, successive
halving its latest one at a rung), and a curve that restarts with each fold's fresh model
would have them compare one fold's loss with another's — keeping a trial whose later folds
are poor, or pruning the fastest learner when its next fold starts. A candidate that reaches
the second fold has passed the pruner on the first. In a multi-objective study nothing is
reported, with or without folds: Optuna raises ``NotImplementedError`` on ``Trial.report`` there, and its pruners do
not support several objectives, so such a study never prunes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.series import Series, SeriesError, TimeOrderError, read_series_ordered_head
from trainer.data import Fold, expanding_folds, fill_missing, make_windows, min_rows
from trainer.evaluation.nab import (
    LabelledSeries,
    ScoringError,
    event_metrics,
    nab_score,
    probation_rows,
)
from trainer.search.errors import SearchError
from trainer.search.space import Candidate, SearchSpace

__all__ = [
    "HOLDOUT_FRACTION",
    "INJECTIONS",
    "CandidateQuality",
    "EvalSeries",
    "MIN_HELD_ROWS",
    "ObjectiveData",
    "TrainedCandidate",
    "cross_validate",
    "detection_decisions",
    "labelled_data",
    "load_folds",
    "measure_quality",
    "synthetic_data",
    "synthetic_folds",
    "train_candidate",
]

HOLDOUT_FRACTION = 0.3
INJECTIONS = ("spike", "level_shift", "drift", "variance", "stuck")
CLEAN_ERROR_WEIGHT = 0.1
CLEAN_ERROR_CAP = 10.0
MIN_HELD_ROWS = 40  # rows judged per series (and per fold): room for an injection and its aftermath


@dataclass(frozen=True)
class EvalSeries:
    """Rows to detect on: ``values`` (rows × features, gaps filled), scored from row
    ``first`` on (rows before it are context only), labelled by ``labels`` over rows
    ``first:``."""

    values: np.ndarray
    first: int
    labels: LabelledSeries


@dataclass(frozen=True)
class ObjectiveData:
    """Everything the objective needs, loaded and checked once per search.

    ``train`` are the rows trained on (one array per series, gaps filled), ``series`` the same
    as :class:`~shared.series.Series` (timestamps for the seasonal lag), ``evaluate`` the
    series detected on, ``clean`` the clean held-back rows (unlabelled mode only).
    """

    mode: str  # "labelled" | "synthetic"
    features: tuple[str, ...]
    train: list[np.ndarray]
    series: list[Series]
    evaluate: list[EvalSeries]
    clean: list[np.ndarray] = field(default_factory=list)

    def check_space(self, space: SearchSpace) -> None:
        """Raise :class:`SearchError` when a series is too short for the space's largest window."""
        need = min_rows(max(space.windows))
        short = [len(t) for t in self.train if len(t) < need]
        if short:
            raise SearchError(
                f"{short[0]} rows to train on are too few for window {max(space.windows)} of the "
                f"search space: need at least {need}"
            )


def _load(path: Path, trained_rows: Callable[[int], int], first_trained: Callable[[int], int] | None = None) -> Series:
    """The file's rows, gaps filled. The rows a candidate trains on (``trained_rows(n)`` of
    ``n``) must be in time order with distinct timestamps, as ``edgefleet train`` requires:
    disorder after them (NAB files repeat an hour at a daylight-saving change) is let be.

    Filling takes a column's leading gap from its first value; so that no candidate trains on a
    value from rows it is judged on, every column needs a value in the first
    ``first_trained(n)`` rows (the fewest any fold trains on)."""
    try:
        try:
            s = read_series_ordered_head(path, trained_rows)
        except TimeOrderError as e:
            raise SearchError(f"{e} (edgefleet train --sort-dedupe repairs a copy)") from None
        if first_trained is not None:
            head = first_trained(len(s))
            empty = [f for j, f in enumerate(s.features) if not np.isfinite(s.values[:head, j]).any()]
            if empty and np.isfinite(s.values[:, [s.features.index(f) for f in empty]]).any(axis=0).all():
                raise SearchError(f"{path}: column {empty[0]!r} has no value in the first {head} rows, "
                                  "which a candidate trains on (its first value comes later)")
        return Series(s.timestamps, s.features, fill_missing(s.values))
    except SearchError:
        raise
    except SeriesError as e:
        raise SearchError(str(e)) from e
    except ValueError:  # fill_missing: a column with no value at all
        raise SearchError(f"{path}: a column has no value") from None


def _same_features(series: Sequence[Series], paths: Sequence[Path]) -> tuple[str, ...]:
    features = series[0].features
    for s, p in zip(series, paths):
        if s.features != features:
            raise SearchError(f"{p}: columns {list(s.features)} differ from {list(features)} of the first file")
    return features


def labelled_data(paths: Sequence[Path], labels: Path) -> ObjectiveData:
    """Labelled mode: train on each series' probationary rows, score NAB on all of it.

    Files are matched to label keys as ``edgefleet evaluate`` matches them. Raises
    :class:`SearchError` for unreadable files or labels, or a file without labels.
    """
    from trainer.evaluation.harness import EvaluateError, discover

    loaded, train, evaluate = [], [], []
    for path in paths:
        try:
            found = discover(path, labels)
        except EvaluateError as e:
            raise SearchError(str(e)) from e
        key, _, windows = found[0]
        s = _load(path, probation_rows)
        try:
            labelled = LabelledSeries(key, list(s.timestamps), windows)
        except ScoringError as e:
            raise SearchError(str(e)) from e
        if not labelled.scored_windows:
            raise SearchError(f"{path}: no labelled window after the probationary rows")
        rows = probation_rows(len(s))
        loaded.append(s.head(rows))
        train.append(s.values[:rows])
        evaluate.append(EvalSeries(s.values, 0, labelled))
    return ObjectiveData("labelled", _same_features(loaded, paths), train, loaded, evaluate)


def _inject(kind: str, rows: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """A copy of ``rows`` with one anomaly of ``kind`` on one metric; its first and last row."""
    out = rows.copy()
    n = len(out)
    j = int(rng.integers(out.shape[1]))
    sigma = float(scale[j])
    length = 1 + int(rng.integers(3)) if kind == "spike" else max(10, n // 10)
    start = int(rng.integers(n // 4, max(n // 4 + 1, n - length - 1)))
    end = min(n, start + length)
    seg = slice(start, end)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "spike":
        out[seg, j] += sign * 6 * sigma
    elif kind == "level_shift":
        out[seg, j] += sign * 3 * sigma
    elif kind == "drift":
        out[seg, j] += sign * np.linspace(0, 4 * sigma, end - start)
    elif kind == "variance":
        out[seg, j] += rng.normal(0, 2 * sigma, end - start)
    else:  # stuck
        out[seg, j] = out[start, j]
    return out, start, end - 1


def synthetic_data(paths: Sequence[Path], *, seed: int,
                   rows_used: Sequence[int | None] | None = None) -> ObjectiveData:
    """Unlabelled mode: hold back the last :data:`HOLDOUT_FRACTION` of each file and make one
    copy of it per kind in :data:`INJECTIONS`, each with one seeded anomaly.

    ``rows_used`` (one entry per path, ``None`` = all) limits each file to its first rows
    before anything is held back.
    Raises :class:`SearchError` for unreadable files or too few rows to hold any back.
    """
    splits = []
    for i, path in enumerate(paths):
        limit = rows_used[i] if rows_used else None

        def used(n: int, limit: int | None = limit) -> int:
            return min(n, limit) if limit else n

        def trained(n: int, used: Callable[[int], int] = used) -> int:
            return used(n) - int(used(n) * HOLDOUT_FRACTION)

        s = _load(path, trained, trained)
        s = s.head(used(len(s)))
        cut = len(s) - int(len(s) * HOLDOUT_FRACTION)
        if len(s) - cut < MIN_HELD_ROWS:
            raise SearchError(f"{path}: {len(s)} rows are too few to hold back {HOLDOUT_FRACTION:.0%} to test on")
        splits.append((path, s, cut, len(s), (seed, i)))
    return _synthetic(splits)


def _fold_layout(rows: int, folds: int) -> list[Fold]:
    try:
        return expanding_folds(rows, folds)
    except ValueError:
        return []


def synthetic_folds(paths: Sequence[Path], *, seed: int, folds: int) -> list[ObjectiveData]:
    """Unlabelled mode on ``folds`` expanding-window folds (see the module docstring): one
    :class:`ObjectiveData` per fold, in time order. ``folds == 1`` is :func:`synthetic_data`.

    Raises :class:`SearchError` for ``folds < 1``, unreadable files, or a file whose blocks
    would hold fewer than :data:`MIN_HELD_ROWS` rows.
    """
    if folds < 1:
        raise SearchError(f"--folds must be at least 1, got {folds}")
    if folds == 1:
        return [synthetic_data(paths, seed=seed)]
    per_fold: list[list[tuple[Path, Series, int, int, tuple[int, ...]]]] = [[] for _ in range(folds)]
    for i, path in enumerate(paths):
        # rows trained on in some fold: up to the last fold's cut (they must be in time order)
        s = _load(path, lambda n: (_fold_layout(n, folds) or [Fold(n, n)])[-1].train_end,
                  lambda n: (_fold_layout(n, folds) or [Fold(n, n)])[0].train_end)
        layout = _fold_layout(len(s), folds)
        if not layout or layout[0].validation_end - layout[0].train_end < MIN_HELD_ROWS:
            raise SearchError(f"{path}: {len(s)} rows are too few for --folds {folds}: each of the "
                              f"{folds + 1} blocks needs at least {MIN_HELD_ROWS} rows, "
                              f"{MIN_HELD_ROWS * (folds + 1)} rows in all")
        for f, fold in enumerate(layout):
            per_fold[f].append((path, s, fold.train_end, fold.validation_end, (seed, i, f)))
    return [_synthetic(splits) for splits in per_fold]


def _synthetic(splits: Sequence[tuple[Path, Series, int, int, tuple[int, ...]]]) -> ObjectiveData:
    """The unlabelled objective on rows ``[0, cut)`` (trained on) and ``[cut, end)`` (judged,
    with one seeded injection per kind) of each ``(path, series, cut, end, seed key)``."""
    loaded, train, evaluate, clean = [], [], [], []
    for path, s, cut, end, key in splits:
        held = s.values[cut:end]
        part = s.head(cut)
        loaded.append(part)
        train.append(part.values)
        clean.append(s.values[:end])
        scale = np.maximum(np.std(part.values, axis=0), 1e-3 * np.abs(np.mean(part.values, axis=0)) + 1e-9)
        stamps = list(s.timestamps[cut:end])
        for k, kind in enumerate(INJECTIONS):
            rng = np.random.default_rng([*key[:2], k, *key[2:]])
            rows, start, last = _inject(kind, held, scale, rng)
            stop = min(len(held) - 1, last + max(10, (last - start + 1) // 2))
            labels = LabelledSeries(f"{Path(path).name}#{kind}", stamps, [(stamps[start], stamps[stop])])
            evaluate.append(EvalSeries(np.concatenate([s.values[:cut], rows]), cut, labels))
    paths = [p for p, *_ in splits]
    return ObjectiveData("synthetic", _same_features(loaded, paths), train, loaded, evaluate, clean)


def load_folds(paths: Sequence[Path], labels: Path | None, *, seed: int, folds: int) -> list[ObjectiveData]:
    """The objective's data as a search loads it: labelled (``labels`` given; one split) or
    unlabelled on ``folds`` folds. Raises :class:`SearchError` (one line) for bad input,
    including ``folds < 1`` and ``folds > 1`` with labels."""
    if folds < 1:
        raise SearchError(f"--folds must be at least 1, got {folds}")
    if labels is not None:
        if folds > 1:
            raise SearchError(f"--folds {folds} needs the unlabelled objective: with --labels a candidate "
                              "trains on NAB's probationary rows and is scored on the rest of each file")
        return [labelled_data(paths, labels)]
    return synthetic_folds(paths, seed=seed, folds=folds)


@dataclass
class TrainedCandidate:
    """A trained candidate and what exporting it needs (windows, calibrated score spec)."""

    candidate: Candidate
    model: Any  # torch.nn.Module
    train_windows: np.ndarray
    validation_windows: np.ndarray
    rows: np.ndarray
    score: Any  # shared.bundle.ScoreSpec
    best_epoch: int
    epochs_run: int
    val_loss: float


@dataclass(frozen=True)
class CandidateQuality:
    """The objective's verdict: ``quality`` (higher is better) and the figures behind it."""

    quality: float
    details: dict[str, Any]


class TrialTimeoutError(Exception):
    """A candidate's training went past its ``--trial-timeout`` (checked after each epoch)."""


def train_candidate(candidate: Candidate, data: ObjectiveData, trial: Any = None, fold: int = 0,
                    deadline: float | None = None,
                    clock: Callable[[], float] = time.monotonic) -> TrainedCandidate:
    """Train ``candidate`` on ``data.train`` with early stopping, calibrate its score pipeline.

    ``deadline`` (in ``clock()`` seconds): :class:`TrialTimeoutError` is raised when an epoch
    ends after it, or when the training of a fold would start after it.

    With an Optuna ``trial`` of a single-objective study and ``fold`` 0, reports each epoch and
    raises ``optuna.TrialPruned`` when its pruner says so (see the module docstring).
    """
    from trainer.models import fit, score_windows
    from trainer.pipeline import DEFAULT_SCORE_PIPELINE, training_windows, with_seasonal_repeats
    from trainer.scoring import ThresholdPolicy, calibrate

    def check_time(where: str) -> None:
        if deadline is not None and clock() > deadline:
            raise TrialTimeoutError(f"over --trial-timeout {where}")

    where_fold = f"fold {fold + 1} " if fold else ""
    check_time(f"before {where_fold or 'training'}".rstrip())
    spec = candidate.architecture
    train_w, val_w, rows = training_windows(spec, data.train)
    reports = trial is not None and len(trial.study.directions) == 1 and fold == 0

    def progress(epoch: int, epochs: int, train_loss: float, val_loss: float) -> None:
        check_time(f"at {where_fold}epoch {epoch}")
        if reports:
            import optuna

            trial.report(-val_loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (validation loss {val_loss:.4g})")

    result = fit(spec, train_w, val_w, rows, candidate.recipe, progress=progress)
    val_scores = score_windows(result.model, val_w)
    pipeline = with_seasonal_repeats(
        DEFAULT_SCORE_PIPELINE.calibrated(val_scores).with_value_range(np.concatenate(data.train)), spec.season)
    score = calibrate(val_scores, spec.score_kind, ThresholdPolicy(), pipeline)
    return TrainedCandidate(candidate, result.model, train_w, val_w, rows, score, result.best_epoch,
                            len(result.history), result.best_val_loss)


ScoreFn = Callable[[np.ndarray], np.ndarray]


def _torch_scores(trained: TrainedCandidate) -> ScoreFn:
    from trainer.models import score_windows

    return lambda windows: score_windows(trained.model, windows)


def _decisions(trained: TrainedCandidate, ev: EvalSeries, score: ScoreFn) -> np.ndarray:
    """The agent's own decisions on rows ``ev.first:`` (the score pipeline over the scores)."""
    rows = trained.candidate.architecture.input_rows
    # warm the pipeline on the rows before ev.first, as an agent that ran through them would be
    pipeline = trained.score.pipeline
    warm = getattr(pipeline, "min_history", 0) + getattr(pipeline, "short_window", 0)
    start = max(0, ev.first - rows + 1 - warm)
    windows = make_windows(ev.values[start:].astype(np.float32), rows)
    scores = score(windows)
    scorer = trained.score.scorer()
    decided = np.zeros(len(ev.values) - start, bool)
    newest = ev.values[start + rows - 1:].astype(np.float64).tolist()  # each window's newest row
    for i, s in enumerate(scores):
        decided[i + rows - 1] = scorer.push(float(s), newest[i]).is_anomaly
    return decided[ev.first - start:]


def detection_decisions(trained: TrainedCandidate, data: ObjectiveData,
                        scores: ScoreFn | None = None) -> list[np.ndarray]:
    """The decisions :func:`measure_quality` judges, one array per ``data.evaluate`` series.

    ``scores`` maps ``(n, rows, features)`` windows to raw scores; default: the torch model's
    (an exported artifact's runtime scores judge the artifact instead).
    """
    score = scores or _torch_scores(trained)
    return [_decisions(trained, ev, score) for ev in data.evaluate]


def measure_quality(trained: TrainedCandidate, data: ObjectiveData, scores: ScoreFn | None = None,
                    decisions: Sequence[np.ndarray] | None = None) -> CandidateQuality:
    """Detection quality of ``trained`` on ``data`` (rules in the module docstring).

    ``scores`` as for :func:`detection_decisions`; ``decisions``: its result, when already known.
    """
    score = scores or _torch_scores(trained)
    if decisions is None:
        decisions = detection_decisions(trained, data, score)
    files = list(zip((ev.labels for ev in data.evaluate), decisions))
    events = event_metrics(files)
    details: dict[str, Any] = {
        "event_recall": events.recall,
        "event_precision": events.precision,
        "event_f1": events.f1,
        "windows": events.windows,
        "detected": events.detected,
        "false_events": events.false_events,
    }
    if data.mode == "labelled":
        quality = nab_score(files, "standard")
        details["nab_standard"] = quality
        return CandidateQuality(float(quality), details)
    spec = trained.candidate.architecture
    errors = []
    for values, train in zip(data.clean, data.train):
        start = len(train) - spec.input_rows + 1
        errors.append(score(make_windows(values[start:].astype(np.float32), spec.input_rows)))
    clean_error = float(np.mean(np.concatenate(errors)))
    details["clean_error"] = clean_error
    quality = events.f1 - CLEAN_ERROR_WEIGHT * min(clean_error, CLEAN_ERROR_CAP)
    return CandidateQuality(float(quality), details)


def cross_validate(candidate: Candidate, folds: Sequence[ObjectiveData], trial: Any = None,
                   deadline: float | None = None,
                   clock: Callable[[], float] = time.monotonic) -> tuple[TrainedCandidate, CandidateQuality]:
    """Train and judge ``candidate`` on every fold, in time order (:func:`train_candidate`,
    :func:`measure_quality`). Returns the candidate trained on the last fold (the most rows)
    and the quality: with one fold that fold's, with several the mean over folds, with
    ``details`` holding ``folds``, ``fold_quality`` (one value per fold) and ``fold_details``.
    Raises ``optuna.TrialPruned`` and :class:`TrialTimeoutError` as :func:`train_candidate` does.
    """
    if not folds:
        raise ValueError("no fold to cross-validate on")
    results = []
    for f, data in enumerate(folds):
        trained = train_candidate(candidate, data, trial, fold=f, deadline=deadline, clock=clock)
        results.append(measure_quality(trained, data))
    if len(results) == 1:
        return trained, results[0]
    values = [r.quality for r in results]
    details: dict[str, Any] = {"folds": len(results), "fold_quality": values,
                               "fold_details": [r.details for r in results]}
    for key in ("event_recall", "event_precision", "event_f1", "clean_error"):
        if all(key in r.details for r in results):
            details[key] = float(np.mean([r.details[key] for r in results]))
    return trained, CandidateQuality(float(np.mean(values)), details)
