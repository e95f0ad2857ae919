"""``edgefleet search``: the Optuna study over candidates, and registration of the winners.

:func:`prepare_search` checks every input (profiles, data, labels, space, storage, study name,
registry) before anything is written; :func:`run_search` runs the study; :func:`winners` picks,
per profile, the best trial (or the Pareto front) among those that meet its budget;
:func:`register_winners` retrains each winner through the normal ``train`` path (export,
parity, registry) with lineage ``search → study → trial → candidate → artifacts``.

Storage is Optuna RDB storage, by default SQLite beside the registry
(``<registry>/search.sqlite3``). Every finished trial is committed there, so an interrupted
search (Ctrl-C) resumes with ``--resume``; ``--trials`` counts the trials of the whole study,
finished before or now (a failed or interrupted trial does not count).

Several processes may run trials of one study at once (``edgefleet search worker``, ``search
--jobs``): :func:`open_study` writes everything a trial needs into the study's user attributes
(:data:`SETUP_KEYS`: data files with their sha256, labels, profiles and profile folders, space,
objectives, mode, seed, sampler, pruner, trials, folds), and :mod:`trainer.search.worker` rebuilds the search
from them. ``--trials N`` then bounds the whole study: a process starts a trial only while fewer
than N trials are finished or running, and a trial that storage numbers after N others that are
finished or running (two processes that started at the same moment) ends as FAIL with user
attribute ``surplus`` instead of running. Ctrl-C is delivered only while a trial's objective
runs (a SIGINT while Optuna creates or stores a trial waits for the next objective), so an
interrupted trial is stored as FAIL, never left RUNNING. A trial whose process died (killed,
crashed, its machine lost) is found by Optuna's heartbeat: a running trial writes one every
:data:`HEARTBEAT_S` seconds, and the next trial any process starts marks FAIL a RUNNING trial
silent for :data:`GRACE_S` seconds; until then it counts towards ``--trials``.

A candidate proposed again (same architecture and recipe as a complete trial) is not trained
again: the trial copies the earlier one's figures and records its number in ``same_as``.

Trial user attributes: ``worker`` (``host:pid`` of the process that ran it), ``candidate`` (the candidate's JSON), ``quality`` and
``quality_details``, ``fold_quality`` (with ``--folds K`` ≥ 2: the quality of each fold, in time
order; ``quality`` is their mean, see :mod:`trainer.search.objective`), ``hardware`` (one :class:`~trainer.search.hardware.HardwareRecord` per
profile) and ``constraints`` (their constraint values in profile order). The same values go to the
sampler through ``Trial.set_constraint`` (``{profile}.{budget}``; Optuna 5 deprecates
``constraints_func`` in its favour): a trial is feasible when every value is ≤ 0, and a trial
pruned before its hardware check has none (the leaderboard counts it as not measured).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.profiles import FirmwareProfile, ProfileError, load_profiles
from trainer.search.errors import SearchError
from trainer.search.hardware import BUDGETS
from trainer.search.objective import ObjectiveData, load_folds
from trainer.search.space import Candidate, LeftOut, SearchSpace, default_params, for_profiles

__all__ = [
    "OBJECTIVES",
    "PRUNERS",
    "SETUP_DEFAULTS",
    "SETUP_KEYS",
    "PreparedSearch",
    "SearchRequest",
    "check_folds",
    "default_storage",
    "leaderboard",
    "load_study",
    "open_storage",
    "open_study",
    "prepare_search",
    "register_winners",
    "run_search",
    "run_trials",
    "sha256_file",
    "winners",
]

OBJECTIVES = {"quality": "maximize", "latency": "minimize", "size": "minimize"}
PRUNERS = ("median", "sha", "hyperband", "none")
STORAGE_FILE = "search.sqlite3"
_UNMEASURED = 1e9  # latency/size objective of an artifact that failed parity
SETUP_KEYS = ("name", "data", "labels", "profiles", "profile_dirs", "space", "objectives", "mode",
              "seed", "sampler", "pruner", "trials", "folds")
"""Study user attributes that describe the search: enough for a worker to run its trials."""
SETUP_DEFAULTS = {"folds": 1}
"""Setup keys a study written by an earlier edgefleet may lack, with the value it then meant."""
_SQLITE_LOCK_TIMEOUT_S = 60  # several local processes write one SQLite file


@dataclass(frozen=True)
class SearchRequest:
    """Arguments of one ``edgefleet search`` run."""

    data: Sequence[Path]
    profiles: Sequence[str]
    name: str
    registry: Path
    labels: Path | None = None
    trials: int | None = None
    timeout: float | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    objectives: tuple[str, ...] = ("quality",)
    storage: str | None = None
    study: str | None = None
    resume: bool = False
    seed: int = 0
    register: str = "best"
    space: SearchSpace = field(default_factory=SearchSpace)
    profile_dirs: Sequence[Path] = ()
    # Cross-validation folds of the objective (1 = one hold-out split; see trainer.search.objective)
    folds: int = 1
    # Seconds one trial may train (checked after each epoch); None: no limit. Per process, not
    # owned by the study: machines that share a study may differ in speed.
    trial_timeout: float | None = None


@dataclass(frozen=True)
class PreparedSearch:
    """A checked request with its loaded profiles and data: ``folds`` holds the objective's
    data per fold, in time order (one entry without cross-validation). The request's space
    holds only the families every profile can run; ``left_out`` says which were left out of
    the space asked for, and why (:func:`trainer.search.space.for_profiles`)."""

    request: SearchRequest
    profiles: list[FirmwareProfile]
    folds: tuple[ObjectiveData, ...]
    storage: str
    study_name: str
    left_out: LeftOut | None = None

    @property
    def data(self) -> ObjectiveData:
        """The first fold's data. Every fold has the same mode and features, and the first
        trains on the fewest rows, so a seasonal context that fits it fits every fold."""
        return self.folds[0]


def default_storage(registry: Path) -> str:
    """``sqlite:///<registry>/search.sqlite3`` (absolute)."""
    return f"sqlite:///{(Path(registry) / STORAGE_FILE).resolve()}"


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (hex). Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: A running trial writes a heartbeat this often; one silent for GRACE_S is marked FAIL.
HEARTBEAT_S = 30
GRACE_S = 120


def open_storage(url: str) -> Any:
    """Optuna RDB storage for ``url`` (``sqlite:///…``, ``postgresql://…``, any SQLAlchemy URL),
    with heartbeats (:data:`HEARTBEAT_S`, :data:`GRACE_S`; see the module docstring).

    SQLite waits up to a minute for a lock, as several local processes share one file. Raises
    :class:`SearchError` (one line) when the storage cannot be opened.
    """
    import optuna

    kwargs = {"connect_args": {"timeout": _SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
    except Exception as e:  # SQLAlchemy and drivers raise many kinds; one line for the user
        raise SearchError(f"cannot open search storage {url}: {str(e).strip().splitlines()[0]}") from e


def _study_names(storage: str) -> list[str]:
    """Study names in ``storage``, without creating an SQLite file that does not exist yet."""
    import optuna

    path = _sqlite_path(storage)
    if path is not None and not path.exists():
        return []
    try:
        return [s.study_name for s in optuna.get_all_study_summaries(open_storage(storage), False)]
    except SearchError:
        raise
    except Exception as e:  # SQLAlchemy raises many kinds; one line for the user
        raise SearchError(f"cannot open search storage {storage}: {str(e).strip().splitlines()[0]}") from e


def prepare_search(request: SearchRequest) -> PreparedSearch:
    """Check ``request`` and load its data. Raises :class:`SearchError` (one line) with nothing
    written. The families of the space that some profile cannot run are left out (recorded in
    :attr:`PreparedSearch.left_out`); the study stores the space without them."""
    from trainer.registry import Registry, RegistryError, check_model_name

    try:
        check_model_name(request.name)
    except RegistryError as e:
        raise SearchError(str(e)) from e
    if not request.objectives or set(request.objectives) - set(OBJECTIVES) or request.objectives[0] != "quality":
        raise SearchError(
            f"--objectives must start with quality and name only {', '.join(OBJECTIVES)}, "
            f"got {','.join(request.objectives)}"
        )
    if len(set(request.objectives)) != len(request.objectives):
        raise SearchError(f"--objectives names one twice: {','.join(request.objectives)}")
    if request.register == "front" and len(request.objectives) == 1:
        raise SearchError("--register front needs several --objectives (e.g. quality,latency)")
    if request.trials is None and request.timeout is None:
        raise SearchError("give --trials N or --timeout SECONDS")
    if request.folds < 1:
        raise SearchError(f"--folds must be at least 1, got {request.folds}")
    if request.pruner not in PRUNERS:
        raise SearchError(f"unknown pruner {request.pruner!r}; known: {', '.join(PRUNERS)}")
    from trainer.search.grid import grid_of
    from trainer.search.samplers import make_sampler

    grid = grid_of(request.space) if request.sampler == "grid" else None
    # a known name, able to take these objectives (checked before anything is written)
    make_sampler(request.sampler, seed=request.seed, directions=[OBJECTIVES[o] for o in request.objectives],
                 grid=grid)
    try:
        profiles = load_profiles(request.profiles, request.profile_dirs)
    except ProfileError as e:
        raise SearchError(str(e)) from e
    if not profiles:
        raise SearchError("give at least one --profile")
    space, left_out = for_profiles(request.space, profiles)
    request = dataclasses.replace(request, space=space)
    if not request.data:
        raise SearchError("give at least one --data CSV")
    folds = load_folds(request.data, request.labels, seed=request.seed, folds=request.folds)
    check_folds(folds, request.space)
    try:
        Registry.check_writable(request.registry)
    except RegistryError as e:
        raise SearchError(str(e)) from e
    storage = request.storage or default_storage(request.registry)
    study_name = request.study or request.name
    exists = study_name in _study_names(storage)
    if exists and not request.resume:
        raise SearchError(f"study {study_name!r} exists in {storage}: pass --resume to continue it, or --study NEW")
    if request.resume and not exists:
        raise SearchError(f"--resume: no study {study_name!r} in {storage}")
    return PreparedSearch(request, profiles, tuple(folds), storage, study_name, left_out)


def check_folds(folds: Sequence[ObjectiveData], space: SearchSpace) -> None:
    """Raise :class:`SearchError` when a fold's rows to train on are too few for the space."""
    for i, data in enumerate(folds):
        try:
            data.check_space(space)
        except SearchError as e:
            if len(folds) == 1:
                raise
            raise SearchError(f"--folds {len(folds)}: fold {i + 1}: {e}") from None


def _pruner(name: str, epochs: int, multi: bool) -> Any:
    """``epochs`` is the last step a trial reports (the epoch cap: only the first fold reports)."""
    import optuna

    if multi or name == "none":  # Trial.report is not supported with several objectives
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)


def _counts(study: Any) -> tuple[int, int, int]:
    """Finished (complete + pruned), pruned, and complete-but-infeasible trials."""
    from optuna.trial import TrialState

    done = pruned = infeasible = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        done += 1
        if t.state == TrialState.PRUNED:
            pruned += 1
        elif any(c > 0 for c in t.user_attrs.get("constraints", [1.0])):
            infeasible += 1
    return done, pruned, infeasible


def _setup(prepared: PreparedSearch) -> dict[str, Any]:
    req = prepared.request
    return {
        "name": req.name,
        "data": [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in req.data],
        "labels": None if req.labels is None else {"path": str(req.labels.resolve()),
                                                    "sha256": sha256_file(req.labels)},
        "profiles": [p.name for p in prepared.profiles],
        "profile_dirs": [str(Path(d).resolve()) for d in req.profile_dirs],
        "space": req.space.to_json(), "objectives": list(req.objectives), "mode": prepared.data.mode,
        "seed": req.seed, "sampler": req.sampler, "pruner": req.pruner, "trials": req.trials,
        "folds": req.folds,
    }


def make_study_sampler(req: SearchRequest, seed: int | None) -> Any:
    """The sampler of ``req`` (with its grid for ``grid``) seeded with ``seed``."""
    from trainer.search.grid import grid_of
    from trainer.search.samplers import make_sampler

    grid = grid_of(req.space) if req.sampler == "grid" else None
    return make_sampler(req.sampler, seed=seed, directions=[OBJECTIVES[o] for o in req.objectives], grid=grid)


def make_study_pruner(req: SearchRequest) -> Any:
    """The pruner of ``req`` (none in a multi-objective study)."""
    return _pruner(req.pruner, req.space.epochs, len(req.objectives) > 1)


def open_study(prepared: PreparedSearch) -> Any:
    """Create the study (writing :data:`SETUP_KEYS` into its user attributes), or load it for
    ``--resume`` after checking that its objectives, profiles, space and mode are this run's.
    Returns the ``optuna.Study``. Raises :class:`SearchError`."""
    import optuna

    req = prepared.request
    directions: list[Any] = [OBJECTIVES[o] for o in req.objectives]
    path = _sqlite_path(prepared.storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=open_storage(prepared.storage),
        study_name=prepared.study_name,
        sampler=make_study_sampler(req, req.seed),
        pruner=make_study_pruner(req),
        directions=directions,
        load_if_exists=req.resume,
    )
    setup = _setup(prepared)
    if req.resume:
        for k in ("objectives", "profiles", "space", "mode", "seed", "folds"):
            theirs = study.user_attrs.get(k, SETUP_DEFAULTS.get(k))
            if k == "space" and isinstance(theirs, dict):
                # keys added to SearchSpace since the study began take their defaults
                theirs = _space_with_defaults(theirs)
            if theirs != setup[k]:
                raise SearchError(f"--resume: this run's {k} differ from study {prepared.study_name!r}'s "
                                  f"({theirs})")
        # the same files, byte for byte: the study's trials were scored on them
        for k in ("data", "labels"):
            theirs, ours = study.user_attrs.get(k), setup[k]
            if _digests(theirs) != _digests(ours):
                raise SearchError(f"--resume: this run's --{k} differ from the files study "
                                  f"{prepared.study_name!r} was scored on")
        if study.trials:
            # a sampler seeded as the first run's would propose its first candidates again
            study.sampler = make_study_sampler(req, req.seed + len(study.trials))
    elif req.sampler != "grid" and (params := default_params(req.space)) is not None:
        # the first trial of a new study is what `edgefleet train` builds by default (the grid
        # sampler walks its own points): the search then starts from the default's quality
        study.enqueue_trial(params, user_attrs={"baseline": "train default"})
    for k, v in setup.items():  # on resume too: workers follow this run's files and settings
        study.set_user_attr(k, v)
    return study


def _space_with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A study's stored space with the keys it lacks at their defaults (as read back); the
    stored dict itself where it does not read as a space (then it differs from this run's)."""
    try:
        return SearchSpace.from_json(stored).to_json()
    except SearchError:
        return stored


def _digests(files: Any) -> list[str]:
    """The sha256 of a study's ``data``/``labels`` attribute (a list, one entry or None)."""
    if files is None:
        return []
    return [f["sha256"] for f in (files if isinstance(files, list) else [files])]


class SearchFailed(RuntimeError):
    """Trials keep failing (not bad input): the study stopped; its trials are stored."""


class _TrialFailed(Exception):
    """A trial that could not be trained, scored or measured (its reason is in ``error``)."""


#: After this many failed trials in a row the search stops: something is wrong beyond one
#: unlucky candidate (the data, the machine, a runtime).
MAX_FAILURES_IN_A_ROW = 3


class _SurplusTrial(Exception):
    """A trial numbered after ``--trials`` others that are finished or running."""


class _QuietSurplus(logging.Filter):
    """Optuna logs a failed trial with its traceback. A surplus trial is not an error, and a
    failed candidate's one-line reason is in its ``error`` attribute and the progress line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return _SurplusTrial.__name__ not in message and _TrialFailed.__name__ not in message


def _taken(study: Any, below: int | None = None) -> int:
    """Trials that are finished (complete or pruned) or running, numbered below ``below``."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if below is None or t.number < below)


class _InterruptsInsideTrials:
    """Deliver Ctrl-C only while a trial's objective runs.

    Optuna stores a KeyboardInterrupt raised in the objective as a FAIL trial; one raised while
    it creates the next trial (``study.ask``: sampler, storage) or stores a finished one leaves
    that trial RUNNING, where it would count towards ``--trials`` forever. While active, a
    SIGINT handler raises KeyboardInterrupt inside an objective and otherwise keeps it pending,
    raised when the next objective starts or when the search returns.

    A Python handler, not a signal mask: a mask blocks SIGINT for one thread only, and the
    kernel hands a process-directed SIGINT to any thread that does not block it (torch,
    onnxruntime and LiteRT start threads); Python runs its handlers in the main thread
    whichever thread received the signal. Only in the main thread (where ``signal.signal``
    works); elsewhere it does nothing.
    """

    def __init__(self) -> None:
        import threading

        self.active = threading.current_thread() is threading.main_thread()
        self._inside = False
        self._pending = False
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._inside:
            raise KeyboardInterrupt
        self._pending = True

    def __enter__(self) -> _InterruptsInsideTrials:
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if not self.active:
            return
        signal.signal(signal.SIGINT, self._previous)
        if self._pending and exc_type is None:
            self._pending = False
            raise KeyboardInterrupt

    def objective_started(self) -> None:
        self._inside = True
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def objective_ended(self) -> None:
        self._inside = False


#: Trial user attributes about the trial itself, not about its candidate's figures.
_OWN_ATTRS = frozenset({"worker", "candidate", "surplus", "error", "same_as"})


def _same_candidate(study: Any, candidate: dict[str, Any], number: int) -> Any:
    """A complete trial before ``number`` with the same candidate (architecture and recipe,
    seed included), or None. Training is seeded and the data are the study's, so its
    figures are what training this one would give."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number < number and t.user_attrs.get("candidate") == candidate:
            return t
    return None


def _repeat(trial: Any, earlier: Any) -> Any:
    """Record ``earlier``'s figures on ``trial`` (with ``same_as``) and return its values.

    Samplers propose a candidate twice (a grid's conditional parameters, a converged TPE,
    an evolution child whose mutation changed nothing); it is not trained twice."""
    for key, value in earlier.user_attrs.items():  # its figures, whatever the objective records
        if key not in _OWN_ATTRS:
            trial.set_user_attr(key, value)
    for key, value in earlier.constraints.items():
        trial.set_constraint(key, value)
    trial.set_user_attr("same_as", earlier.number)
    values = list(earlier.values)
    return values[0] if len(values) == 1 else values


def run_search(prepared: PreparedSearch, progress: Callable[[str], None] | None = None) -> Any:
    """:func:`open_study` then :func:`run_trials` in this process. Returns the ``optuna.Study``."""
    study = open_study(prepared)
    return run_trials(study, prepared, progress)


def run_trials(study: Any, prepared: PreparedSearch, progress: Callable[[str], None] | None = None) -> Any:
    """Run trials of ``study`` in this process until it has ``--trials`` finished trials (counting
    every process's) or this process's timeout. Other processes may run trials of the same study
    at the same time. Returns ``study``; ``progress(line)`` gets a line after each trial.

    A trial that fails (training, scoring or measuring raised) is stored as FAIL with its
    reason in the ``error`` attribute, and the next one runs; after
    :data:`MAX_FAILURES_IN_A_ROW` failures in a row :class:`SearchFailed` is raised.
    KeyboardInterrupt propagates; every finished trial is already in the storage.
    """
    import optuna

    from trainer.pipeline import seasonal_lag
    from trainer.search.hardware import measure
    from trainer.search.objective import TrialTimeoutError, cross_validate

    req = prepared.request
    data, profiles = prepared.data, prepared.profiles
    worker = f"{socket.gethostname()}:{os.getpid()}"
    lags: dict[int, int] = {}

    def season_lag(window: int) -> int:
        if window not in lags:
            lags[window] = seasonal_lag(data.series, window)
        return lags[window]

    interrupts = _InterruptsInsideTrials()

    def objective(trial: Any) -> Any:
        interrupts.objective_started()
        try:
            return _objective(trial)
        finally:
            interrupts.objective_ended()

    def _objective(trial: Any) -> Any:
        trial.set_user_attr("worker", worker)
        if req.trials is not None and _taken(study, below=trial.number) >= req.trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise _SurplusTrial(f"study {study.study_name!r} already has {req.trials} trials")
        candidate = suggest_candidate(trial, req.space, len(data.features), season_lag, req.seed)
        earlier = _same_candidate(study, trial.user_attrs["candidate"], trial.number)
        if earlier is not None:
            return _repeat(trial, earlier)
        try:
            return _evaluate(trial, candidate)
        except (KeyboardInterrupt, optuna.TrialPruned):
            raise
        except TrialTimeoutError as e:  # an expected outcome, not a failure: pruned, with its reason
            trial.set_user_attr("timeout", str(e))
            raise optuna.TrialPruned(str(e)) from e
        except Exception as e:  # one bad candidate must not end the study: record and go on
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            trial.set_user_attr("error", reason)
            raise _TrialFailed(reason) from e

    def _evaluate(trial: Any, candidate: Candidate) -> Any:
        deadline = None if req.trial_timeout is None else time.monotonic() + req.trial_timeout
        trained, quality = cross_validate(candidate, prepared.folds, trial, deadline)
        trial.set_user_attr("quality", quality.quality)
        if "fold_quality" in quality.details:
            trial.set_user_attr("fold_quality", quality.details["fold_quality"])
        trial.set_user_attr("quality_details", quality.details)
        records = measure(trained, data.features, profiles)
        trial.set_user_attr("hardware", [r.to_json() for r in records])
        trial.set_user_attr("constraints", [c for r in records for c in r.constraints])
        for r in records:  # what the sampler reads (Optuna 5's successor of constraints_func)
            for budget, value in zip(BUDGETS, r.constraints):
                trial.set_constraint(f"{r.profile}.{budget}", value)
        values = [quality.quality]
        for o in req.objectives[1:]:
            if o == "latency":
                lat = [r.latency_p99_ms for r in records]
                values.append(max(lat) if all(map(math.isfinite, lat)) else _UNMEASURED)
            else:
                values.append(max(r.artifact_bytes for r in records))
        return values[0] if len(values) == 1 else values

    started = time.monotonic()
    before = _counts(study)[0]

    failures: list[str] = []  # reasons of the failed trials in a row

    def callback(study: Any, trial: Any) -> None:
        if req.trials is not None and _taken(study) >= req.trials:
            study.stop()
        if "error" in trial.user_attrs:
            failures.append(f"trial {trial.number}: {trial.user_attrs['error']}")
            if len(failures) >= MAX_FAILURES_IN_A_ROW:
                study.stop()
        elif not trial.user_attrs.get("surplus"):
            failures.clear()
        if progress is None or trial.user_attrs.get("surplus"):
            return
        if "error" in trial.user_attrs:
            progress(f"trial {trial.number} failed: {trial.user_attrs['error']}")
        elif "timeout" in trial.user_attrs:
            progress(f"trial {trial.number} stopped: {trial.user_attrs['timeout']}")
        done, pruned, infeasible = _counts(study)
        best = _best_line(study)
        rate = (time.monotonic() - started) / max(1, done - before)
        eta = ""
        if req.trials is not None:
            eta = f", ETA {_duration(rate * max(0, req.trials - done))}"
        elif req.timeout is not None:
            eta = f", {_duration(max(0.0, req.timeout - (time.monotonic() - started)))} left"
        of = f"/{req.trials}" if req.trials is not None else ""
        progress(f"search {prepared.study_name}: {done}{of} trials, {pruned} pruned, {infeasible} infeasible, "
                 f"best {best}{eta}")

    if req.trials is not None and _taken(study) >= req.trials:
        return study
    quiet = _QuietSurplus()
    logger = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    logger.addFilter(quiet)
    try:
        with interrupts:
            study.optimize(objective, timeout=req.timeout, callbacks=[callback],
                           catch=(_SurplusTrial, _TrialFailed), gc_after_trial=False, show_progress_bar=False)
    finally:
        logger.removeFilter(quiet)
    if len(failures) >= MAX_FAILURES_IN_A_ROW:
        raise SearchFailed(f"{len(failures)} trials in a row failed; the last, {failures[-1]}")
    return study


def suggest_candidate(trial: Any, space: SearchSpace, features: int, season_lag: Callable[[int], int],
                      seed: int) -> Candidate:
    """:func:`trainer.search.space.suggest`, recording the candidate in the trial's attributes."""
    from trainer.search.space import suggest

    candidate = suggest(trial, space, features=features, season_lag=season_lag, seed=seed)
    trial.set_user_attr("candidate", candidate.to_json())
    return candidate


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _best_line(study: Any) -> str:
    feasible = feasible_trials(study, None)
    if not feasible:
        return "-"
    t = max(feasible, key=lambda t: t.values[0])
    return f"{t.values[0]:.4g} (trial {t.number})"


def feasible_trials(study: Any, profile_index: int | None) -> list[Any]:
    """Complete trials that meet every budget of one profile (or of all, ``None``); a trial
    that repeats an earlier one's candidate (``same_as``) is left out: it is the same model."""
    from optuna.trial import TrialState

    out = []
    n = len(BUDGETS)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        c = t.user_attrs.get("constraints")
        if "same_as" in t.user_attrs:
            continue
        if not c:
            continue
        part = c if profile_index is None else c[profile_index * n:(profile_index + 1) * n]
        if all(v <= 0 for v in part):
            out.append(t)
    return out


def _dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    signs = [1 if d == "maximize" else -1 for d in directions]
    x = [s * v for s, v in zip(signs, a)]
    y = [s * v for s, v in zip(signs, b)]
    return all(p >= q for p, q in zip(x, y)) and any(p > q for p, q in zip(x, y))


def pareto_front(trials: Sequence[Any], directions: Sequence[str]) -> list[Any]:
    """The trials no other trial dominates."""
    return [t for t in trials if not any(_dominates(o.values, t.values, directions) for o in trials if o is not t)]


def winners(study: Any, profiles: Sequence[str], register: str) -> dict[int, list[str]]:
    """Trial number → the profiles it wins: per profile the best feasible trial by quality
    (``best``) or the Pareto front of its feasible trials (``front``).

    Raises :class:`SearchError` naming the first profile that no trial meets.
    """
    directions = [OBJECTIVES[o] for o in study.user_attrs["objectives"]]
    won: dict[int, list[str]] = {}
    for i, name in enumerate(profiles):
        feasible = feasible_trials(study, i)
        if not feasible:
            raise SearchError(
                f"no candidate of study {study.study_name!r} meets the budget of profile {name!r} "
                f"({_worst_failure(study, i)}); nothing registered"
            )
        if register == "front":
            chosen = pareto_front(feasible, directions)
        else:
            chosen = [max(feasible, key=lambda t: (t.values[0], -t.number))]
        for t in chosen:
            won.setdefault(t.number, []).append(name)
    return won


def _worst_failure(study: Any, index: int) -> str:
    from optuna.trial import TrialState

    counts: dict[str, int] = {}
    measured = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        hw = t.user_attrs.get("hardware")
        if hw:
            measured += 1
            for f in hw[index]["failures"]:
                counts[f] = counts.get(f, 0) + 1
    if not measured:
        return "no trial was measured"
    return f"{measured} measured: " + ", ".join(f"{k} exceeded by {v}" for k, v in sorted(counts.items()))


def load_study(name: str, storage: str) -> Any:
    """The stored study ``name``. Raises :class:`SearchError` when there is none."""
    import optuna

    if name not in _study_names(storage):
        raise SearchError(f"no study {name!r} in {storage}")
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def leaderboard(study: Any) -> list[dict[str, Any]]:
    """Complete trials, best quality first: number, values, feasibility per profile, candidate."""
    from optuna.trial import TrialState

    profiles = study.user_attrs.get("profiles", [])
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        hw = t.user_attrs.get("hardware", [])
        rows.append({
            "trial": t.number,
            "values": list(t.values),
            "feasible": {p: not h["failures"] for p, h in zip(profiles, hw)},
            "failures": {p: h["failures"] for p, h in zip(profiles, hw) if h["failures"]},
            "hardware": hw,
            "candidate": t.user_attrs.get("candidate"),
            "quality_details": t.user_attrs.get("quality_details"),
        })
    rows.sort(key=lambda r: (-r["values"][0], r["trial"]))
    return rows


def register_winners(prepared: PreparedSearch, study: Any,
                     progress: Callable[[str, dict[str, Any]], None] | None = None) -> list[Any]:
    """Retrain and register each winner through the normal ``train`` path (one version per
    winning trial, built for the profiles it wins). Returns the ``VersionRecord``s.

    Raises :class:`SearchError` when a profile has no feasible trial (nothing registered).
    """
    from trainer.pipeline import TrainError, TrainRequest, prepare, train
    from trainer.registry import RegistryError

    req = prepared.request
    won = winners(study, [p.name for p in prepared.profiles], req.register)
    plans = []
    for number, names in sorted(won.items()):
        trial = study.trials[number]
        candidate = Candidate.from_json(trial.user_attrs["candidate"])
        spec, recipe = candidate.architecture, candidate.recipe
        lineage = {"search": {
            "study": study.study_name,
            "storage": prepared.storage,
            "trial": number,
            "objectives": study.user_attrs["objectives"],
            "values": list(trial.values),
            "candidate": candidate.to_json(),
            "hardware": [h for h in trial.user_attrs["hardware"] if h["profile"] in names],
        }}
        request = TrainRequest(
            data=list(req.data), profiles=names, name=req.name, epochs=recipe.epochs, seed=recipe.seed,
            # labelled: each file's probationary rows, the rows its candidates were trained on
            probation=prepared.data.mode == "labelled", family=spec.family, window=spec.window, hidden=spec.hidden,
            centering=spec.centering, season=spec.season, kernel=spec.kernel, dilations=spec.dilations,
            residual=spec.residual, heads=spec.heads, n_estimators=spec.n_estimators, max_depth=spec.max_depth,
            max_samples=spec.max_samples, recipe=recipe, lineage=lineage,
            profile_dirs=list(req.profile_dirs),
        )
        try:
            plans.append(prepare(request))
        except TrainError as e:
            raise SearchError(f"trial {number}: {e}") from e
    records: list[Any] = []
    for plan in plans:
        try:
            records.append(train(plan, req.registry, progress).version)
        except (TrainError, RegistryError) as e:
            done = f" (already registered: {', '.join(r.ref for r in records)})" if records else ""
            raise SearchError(f"{e}{done}") from e
    return records
