"""``edgefleet search worker``: one more process running trials of an existing study.

The study's user attributes (:data:`trainer.search.study.SETUP_KEYS`, written by the
``search`` command that created it) say everything: data files and their sha256, labels,
profiles and profile folders, space, objectives, mode, seed, sampler, pruner and the objective's
cross-validation folds (a study from before folds existed has none: one split). A worker on
another machine therefore needs only the storage URL and the study name, and the data files at
the same paths with the same bytes; it refuses to run when one is missing or differs.

A worker's sampler gets fresh entropy (seed None): with the study's seed, every worker would
propose the same candidates in the same order. The candidates' training seed is still the
study's. Workers never register anything; the ``search`` command does, after its own trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.profiles import ProfileError, load_profiles
from trainer.search.errors import SearchError
from trainer.search.space import SearchSpace
from trainer.search.study import (
    SETUP_DEFAULTS,
    SETUP_KEYS,
    PreparedSearch,
    SearchRequest,
    check_folds,
    load_study,
    make_study_pruner,
    make_study_sampler,
    open_storage,
    sha256_file,
)

__all__ = ["join_study"]


def _checked(entry: dict[str, str], what: str) -> Path:
    path = Path(entry["path"])
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise SearchError(f"{what} {path} of the study cannot be read here: {e.strerror or e}") from e
    if digest != entry["sha256"]:
        raise SearchError(f"{what} {path} differs from the study's (sha256 {digest[:12]}…, "
                          f"study has {entry['sha256'][:12]}…)")
    return path


def join_study(name: str, storage: str, trials: int | None, timeout: float | None,
               registry: Path, trial_timeout: float | None = None) -> tuple[Any, PreparedSearch]:
    """Load study ``name`` from ``storage`` with the sampler and pruner its attributes name, and
    the search it describes with its data checked and loaded. ``trials`` defaults to the
    study's own target. Returns ``(study, prepared)`` for
    :func:`trainer.search.study.run_trials`.

    Raises :class:`SearchError` (one line) when the study is missing or was not made by
    ``edgefleet search``, or a data file is missing or differs from the study's.
    """
    import optuna

    from trainer.search.objective import load_folds

    attrs = {**SETUP_DEFAULTS, **load_study(name, storage).user_attrs}
    missing = [k for k in SETUP_KEYS if k not in attrs]
    if missing:
        raise SearchError(f"study {name!r} in {storage} lacks {', '.join(missing)}: "
                          "start it with `edgefleet search`, then add workers")
    trials = trials if trials is not None else attrs["trials"]
    if trials is None and timeout is None:
        raise SearchError(f"study {name!r} has no trial target: give --trials N or --timeout SECONDS")
    data = [_checked(d, "data file") for d in attrs["data"]]
    labels = None if attrs["labels"] is None else _checked(attrs["labels"], "labels file")
    request = SearchRequest(
        data=data, profiles=attrs["profiles"], name=attrs["name"], registry=registry, labels=labels,
        trials=trials, timeout=timeout, sampler=attrs["sampler"], pruner=attrs["pruner"],
        objectives=tuple(attrs["objectives"]), storage=storage, study=name, resume=True,
        seed=attrs["seed"], space=SearchSpace.from_json(attrs["space"]),
        profile_dirs=[Path(d) for d in attrs["profile_dirs"]], folds=attrs["folds"],
        trial_timeout=trial_timeout,
    )
    try:
        profiles = load_profiles(request.profiles, request.profile_dirs)
    except ProfileError as e:
        raise SearchError(f"study {name!r}: {e}") from e
    folds = load_folds(data, labels, seed=request.seed, folds=request.folds)
    check_folds(folds, request.space)
    if folds[0].mode != attrs["mode"]:
        raise SearchError(f"study {name!r} is {attrs['mode']}, its files load as {folds[0].mode}")
    study = optuna.load_study(study_name=name, storage=open_storage(storage),
                              sampler=make_study_sampler(request, None), pruner=make_study_pruner(request))
    return study, PreparedSearch(request, profiles, tuple(folds), storage, name)
