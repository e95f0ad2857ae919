"""``edgefleet search``: hardware-aware model search (see :mod:`trainer.search.study`).

``edgefleet search --data CSV --profile P --name NAME --trials N [--jobs K]`` runs a study
(in K local processes) and registers the winner(s); ``edgefleet search worker --study NAME
--storage URL`` runs more trials of an existing study, from this or another machine (see
:mod:`trainer.search.worker`); ``edgefleet search show STUDY`` prints a study's leaderboard.
``--plots DIR`` on ``search`` and ``search show`` writes PNGs (:mod:`trainer.search.plots`).
``--folds K`` judges each candidate by expanding-window cross-validation over K folds
(:mod:`trainer.search.objective`). Pruning needs one objective: a study with several
``--objectives`` never prunes (Optuna's ``Trial.report`` is not supported for
multi-objective optimization), with or without folds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.cli_common import EXIT_FAILED, UsageError, positive_float, positive_int, print_json

__all__ = ["add_search_command"]


def _objectives(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _space(path: str | None) -> Any:
    from trainer.search.errors import SearchError
    from trainer.search.space import SearchSpace

    if path is None:
        return SearchSpace()
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read --space {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise UsageError(f"--space {path}: not valid JSON: {e}") from e
    try:
        return SearchSpace.from_json(obj)
    except SearchError as e:
        raise UsageError(f"--space {path}: {e}") from e


def _plots_dir(text: str | None) -> Path | None:
    """``--plots DIR``: must be a folder this process can write into (checked before any trial)."""
    if text is None:
        return None
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--plots {path} exists and is not a folder")
    # nothing is created yet (bad input writes nothing): the folder, or the nearest existing
    # folder above it, must let this process create files
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--plots {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--plots {path}: {existing} is not writable")
    return path


def _write_plots(study: Any, folder: Path | None, quiet: bool) -> None:
    """Write the plots; a failure is a warning (the study and what it registered stand)."""
    from trainer.search.plots import write_plots

    if folder is not None:
        try:
            written = write_plots(study, folder)
        except OSError as e:
            print(f"edgefleet search: warning: plots not written to {folder}: {e.strerror or e}", file=sys.stderr)
            return
        if not quiet:
            print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)


_STUDY_OWNED = (("--data", "data"), ("--profile", "profile"), ("--name", "name"), ("--labels", "labels"),
                ("--space", "space"), ("--profiles-dir", "profiles_dir"), ("--resume", "resume"),
                ("--plots", "plots"), ("--sampler", "sampler"), ("--pruner", "pruner"),
                ("--objectives", "objectives"), ("--seed", "seed"), ("--register", "register"),
                ("--folds", "folds"))
# Defaults of the options a study owns: applied by `search` only, so that `search worker` can
# tell an option given on its command line (refused: the study decides) from one left out.
_STUDY_DEFAULTS = {"sampler": "tpe", "pruner": "median", "objectives": "quality", "seed": 0, "register": "best",
                   "folds": 1}


def _left_out(value: object) -> bool:
    """Whether an option's parsed value is its "not given" default (None, False or [])."""
    return value is None or value is False or value == []


def _worker(args: argparse.Namespace) -> int:
    """``edgefleet search worker``: run trials of an existing study (no registration)."""
    # identity, not equality: `--seed 0` is given (0 == False), an absent option is None/False/[]
    given = [o for o, k in _STUDY_OWNED if not _left_out(getattr(args, k))]
    if given or args.jobs != 1:
        raise UsageError(f"`search worker` takes {', '.join(given) or '--jobs'} from the study: "
                         "give only --study, --storage, --trials, --timeout, --trial-timeout, --registry")
    if not args.study:
        raise UsageError("`search worker` needs --study NAME (and --storage URL unless it is in --registry)")
    import optuna

    from trainer.progress import ProgressBar
    from trainer.search.errors import SearchError
    from trainer.search.study import SearchFailed, default_storage, run_trials
    from trainer.search.worker import join_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = args.storage or default_storage(Path(args.registry))
    try:
        study, prepared = join_study(args.study, storage, args.trials, args.timeout, Path(args.registry),
                                     args.trial_timeout)
    except SearchError as e:
        raise UsageError(str(e)) from e
    bar = ProgressBar("search", total=1, enabled=not args.quiet)
    try:
        run_trials(study, prepared, (lambda line: bar.note(line)) if not args.quiet else None)
    except SearchFailed as e:
        print(f"edgefleet search worker: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _start_workers(count: int, study: str, storage: str, trials: int | None,
                   timeout: float | None, trial_timeout: float | None = None) -> list[subprocess.Popen[bytes]]:
    """``count`` local ``edgefleet search worker`` processes on ``study`` (quiet)."""
    argv = [sys.executable, "-m", "trainer.cli", "search", "worker", "--study", study, "--storage", storage, "-q"]
    if trials is not None:
        argv += ["--trials", str(trials)]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    if trial_timeout is not None:
        argv += ["--trial-timeout", str(trial_timeout)]
    return [subprocess.Popen(argv, stdin=subprocess.DEVNULL) for _ in range(count)]


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """Interrupt workers still running (their running trial ends as FAIL) and reap them."""
    import signal

    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGINT)
    for w in workers:
        try:
            w.wait(timeout=60)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def cmd_search(args: argparse.Namespace) -> int:
    if args.words:
        if args.words == ["worker"]:
            return _worker(args)
        if len(args.words) != 2 or args.words[0] != "show":
            raise UsageError(f"unexpected {' '.join(args.words)!r}: use `edgefleet search show STUDY`, "
                             "`edgefleet search worker --study NAME` or options only")
        return _show(args, args.words[1])
    missing = [o for o, v in (("--data", args.data), ("--profile", args.profile), ("--name", args.name)) if not v]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")
    for k, v in _STUDY_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    import optuna

    from trainer.progress import ProgressBar
    from trainer.search.errors import SearchError
    from trainer.search.study import (
        SearchFailed,
        SearchRequest,
        open_study,
        prepare_search,
        register_winners,
        run_trials,
        winners,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    request = SearchRequest(
        data=[Path(p) for p in args.data], profiles=args.profile, name=args.name,
        registry=Path(args.registry), labels=Path(args.labels) if args.labels else None,
        trials=args.trials, timeout=args.timeout, sampler=args.sampler, pruner=args.pruner,
        objectives=_objectives(args.objectives), storage=args.storage, study=args.study,
        resume=args.resume, seed=args.seed, register=args.register, space=_space(args.space),
        profile_dirs=[Path(d) for d in args.profiles_dir], folds=args.folds, trial_timeout=args.trial_timeout,
    )
    plots = _plots_dir(args.plots)
    if args.compress:
        from trainer.compress import RecipeError, parse_recipe

        try:
            parse_recipe(args.compress)
        except RecipeError as e:
            raise UsageError(f"--compress: {e}") from e
    try:
        prepared = prepare_search(request)
        study = open_study(prepared)
    except SearchError as e:
        raise UsageError(str(e)) from e
    bar = ProgressBar("search", total=1, enabled=not args.quiet)
    if prepared.left_out is not None:
        bar.note(f"search {prepared.study_name}: left out of the search space: {prepared.left_out.reason}")
    workers = _start_workers(args.jobs - 1, prepared.study_name, prepared.storage, args.trials, args.timeout,
                             args.trial_timeout)
    try:
        run_trials(study, prepared, (lambda line: bar.note(line)) if not args.quiet else None)
        for w in workers:
            w.wait()
    except SearchFailed as e:
        print(f"edgefleet search: {e}; nothing registered (the study keeps its trials: --resume)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        _stop_workers(workers)
    failed = [w for w in workers if w.returncode != 0]
    if failed:
        print(f"edgefleet search: worker process {failed[0].pid} exited {failed[0].returncode}; "
              "nothing registered", file=sys.stderr)
        return EXIT_FAILED
    try:
        won = winners(study, [p.name for p in prepared.profiles], request.register)
    except SearchError as e:
        _write_plots(study, plots, args.quiet)
        raise UsageError(str(e)) from e
    bar.note(f"retraining {len(won)} winner(s): trial(s) {', '.join(map(str, won))} …")
    try:
        records = register_winners(prepared, study)
    except SearchError as e:
        print(f"edgefleet search: {e}", file=sys.stderr)
        return EXIT_FAILED
    _write_plots(study, plots, args.quiet)
    compressed = []
    if args.compress:
        try:
            compressed = _compress_winners(args, request, records, bar)
        except ValueError as e:  # CompressError: a step does not fit a winner; the winners stand
            print(f"edgefleet search: --compress {args.compress}: {e} (the winners are registered "
                  "uncompressed)", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print_json({"study": study.study_name, "storage": prepared.storage,
                    "versions": [r.to_json() for r in records],
                    "left_out": None if prepared.left_out is None else prepared.left_out.to_json(),
                    **({"compressed": [r.to_json() for r in compressed]} if args.compress else {})})
    else:
        for r in records:
            s = r.lineage["search"]
            print(f"registered {r.ref} in {args.registry} from study {s['study']} trial {s['trial']} "
                  f"(quality {s['values'][0]:.4g}; profiles {', '.join(a for a in sorted({p for x in r.artifacts for p in x.profiles}))})")
        for r in compressed:
            c = r.lineage["compression"]
            print(f"registered {r.ref} in {args.registry}: {c['parent']} compressed by {c['recipe']}")
    return 0


def _compress_winners(args: argparse.Namespace, request: Any, records: list[Any], bar: Any) -> list[Any]:
    """``--compress RECIPE``: each registered winner through ``edgefleet compress`` (its
    profiles, the search's data and labels). Raises ``CompressError`` /
    ``RegistryError`` (both ``ValueError``s or reported as such) on the first that fails."""
    from trainer.compress import CompressError, CompressRequest, compress, parse_recipe, prepare
    from trainer.models.spec import TREE_FAMILIES, ArchitectureSpec
    from trainer.registry import RegistryError

    recipe = parse_recipe(args.compress)
    out = []
    for r in records:
        if r.architecture.get("family") in TREE_FAMILIES:
            bar.note(f"{r.ref} is a {r.architecture['family']} model: left uncompressed (no torch layers)",
                     always=True)
            continue
        try:  # a step that cannot apply to this winner's architecture (e.g. prune on a GRU) skips it
            spec = ArchitectureSpec.from_json(r.architecture)
            for step in recipe.steps:
                step.check(spec)
        except CompressError as e:
            bar.note(f"{r.ref} left uncompressed: {e}", always=True)
            continue
        profiles = sorted({p for a in r.artifacts for p in a.profiles})
        bar.note(f"compressing {r.ref} ({args.compress}) …")
        try:
            prepared = prepare(CompressRequest(
                ref=r.ref, recipe=args.compress, profiles=profiles, data=request.data, labels=request.labels,
                seed=request.seed, profile_dirs=request.profile_dirs), request.registry)
            out.append(compress(prepared).version)
        except RegistryError as e:
            raise ValueError(str(e)) from e
    return out


def _show(args: argparse.Namespace, name: str) -> int:
    import optuna

    from trainer.search.errors import SearchError
    from trainer.search.study import (
        OBJECTIVES,
        default_storage,
        leaderboard,
        load_study,
        pareto_front,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plots = _plots_dir(args.plots)
    storage = args.storage or default_storage(Path(args.registry))
    try:
        study = load_study(name, storage)
    except SearchError as e:
        raise UsageError(str(e)) from e
    _write_plots(study, plots, args.json)
    rows = leaderboard(study)
    objectives = study.user_attrs.get("objectives", ["quality"])
    front: list[int] = []
    if len(objectives) > 1:
        done = [t for t in study.trials if t.values is not None and t.state.name == "COMPLETE"]
        front = sorted(t.number for t in pareto_front(done, [OBJECTIVES[o] for o in objectives]))
    if args.json:
        print_json({"study": name, "objectives": objectives, "trials": rows, "front": front})
        return 0
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    print(f"study {name} ({study.user_attrs.get('mode')}): "
          + ", ".join(f"{v} {k}" for k, v in sorted(states.items())))
    print(f"  {'trial':>5}  " + "  ".join(f"{o:>10}" for o in objectives) + "  feasible  candidate")
    for r in rows:
        arch = (r["candidate"] or {}).get("architecture", {})
        ok = ",".join(p for p, f in r["feasible"].items() if f) or "-"
        print(f"  {r['trial']:5d}  " + "  ".join(f"{v:10.4g}" for v in r["values"])
              + f"  {ok:8}  {arch.get('family')} w{arch.get('window')} {arch.get('hidden')}")
    if front:
        print(f"  Pareto front: trials {', '.join(map(str, front))}")
    return 0


def add_search_command(sub: Any, registry_arg: Any, json_arg: Any) -> None:
    """Register ``search`` on the ``edgefleet`` subparsers."""
    p = sub.add_parser(
        "search",
        help="search architectures and hyperparameters under profiles' budgets (Optuna)",
        description="Run a study and register the winner(s), or `search show STUDY` for a leaderboard.",
    )
    p.add_argument("words", nargs="*", metavar="show STUDY | worker",
                   help="`show STUDY`: print the leaderboard of STUDY; `worker`: run trials of the "
                   "existing study --study (from --storage) until it has --trials finished trials")
    p.add_argument("--data", action="append", metavar="CSV", help="series to search on; repeatable")
    p.add_argument("--profile", action="append", metavar="NAME", help="firmware profile; repeatable")
    p.add_argument("--profiles-dir", action="append", default=[], metavar="DIR",
                   help="look for profiles here before the built-in ones; repeatable")
    p.add_argument("--name", help="model name to register")
    p.add_argument("--labels", metavar="LABELS.json",
                   help="anomaly windows (NAB format): score NAB on them; without, inject synthetic anomalies")
    p.add_argument("--trials", type=positive_int, help="finished trials the study should reach")
    p.add_argument("--timeout", type=positive_float, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--trial-timeout", type=positive_float, metavar="S",
                   help="stop a trial whose time passes S seconds (checked after each epoch and before "
                   "each fold; export and latency measurement are not covered): it ends pruned, with "
                   "its reason")
    p.add_argument("--sampler", metavar="NAME",
                   help="tpe (default, multivariate), random, gp, cmaes (one objective), nsga2, "
                   "evolution (regularized), reinforce (policy gradient, one objective), grid "
                   "(every choice, 3 values per range; see trainer.search.grid)")
    p.add_argument("--pruner", choices=("median", "sha", "hyperband", "none"),
                   help="stop unpromising trials early on their per-epoch validation loss: median "
                   "(default), sha, hyperband, none. Only with one objective: with several --objectives "
                   "no trial is pruned (Optuna's Trial.report is not supported for multi-objective "
                   "optimization)")
    p.add_argument("--folds", type=positive_int, metavar="K",
                   help="judge each candidate by time-series cross-validation on K expanding-window "
                   "folds (fold i trains on the first i+1 of K+1 blocks of each series and is judged "
                   "on the next; quality = the mean; unlabelled objective only). Default 1: one "
                   "hold-out split. Only the first fold's epochs are reported to the pruner")
    p.add_argument("--objectives", metavar="quality[,latency,size]",
                   help="what to optimize: quality (default), optionally latency and artifact size too")
    p.add_argument("--space", metavar="SPACE.json", help="search space (default: the built-in one)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (default: sqlite in the registry)")
    p.add_argument("--study", metavar="NAME", help="study name (default: --name)")
    p.add_argument("--resume", action="store_true", help="continue an existing study")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="K",
                   help="run trials in K local processes sharing the storage (default: 1)")
    p.add_argument("--plots", metavar="DIR", help="write history, importance and Pareto-front PNGs here")
    p.add_argument("--seed", type=int, help="sampler and training seed (default: 0)")
    p.add_argument("--compress", metavar="RECIPE",
                   help="compress each registered winner with this recipe, as `edgefleet compress` does "
                   "(e.g. prune:0.5,finetune:5,quantize:int8; docs/compression.md), registering one more "
                   "version per winner")
    p.add_argument("--register", choices=("best", "front"),
                   help="register the best trial per profile (default), or every trial of its Pareto front")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    registry_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_search)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: edgefleet search")
