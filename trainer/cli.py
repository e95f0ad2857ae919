"""``edgefleet``: the trainer command line. Thin: parse, call the domain modules, print.

Exit codes: 0 success, 1 the work failed (e.g. no artifact passed parity), 2 usage error or
bad input (one line on stderr, nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from shared.version import VersionAction
from trainer.cli_common import (
    EXIT_FAILED,
    EXIT_USAGE,
    UsageError,
    at_least,
    fraction,
    model_args,
    model_options,
    positive_int,
    print_json,
)
from trainer.progress import ProgressBar


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _registry_default() -> str:
    return os.environ.get("EDGEFLEET_REGISTRY") or ".edgefleet"


# -- train ------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from shared.series import TimeOrderError
    from trainer.pipeline import TrainError, TrainRequest, prepare, train
    from trainer.registry import Registry, RegistryError

    request = TrainRequest(
        data=[Path(p) for p in args.data],
        profiles=args.profile,
        name=args.name,
        epochs=args.epochs,
        seed=args.seed,
        train_fraction=args.train_fraction,
        sort_dedupe=args.sort_dedupe,
        **model_options(args),
    )
    try:
        prepared = prepare(request)
        Registry.check_writable(args.registry)  # before minutes of training, not after
    except (TrainError, RegistryError) as e:
        hint = " (or pass --sort-dedupe)" if isinstance(e.__cause__, TimeOrderError) else ""
        raise UsageError(f"{e}{hint}") from e
    bar = ProgressBar(f"training {args.name}", total=args.epochs, enabled=not args.quiet)
    for dataset in prepared.datasets:
        if "time_order" in dataset:
            fixed = dataset["time_order"]
            bar.note(
                f"{dataset['file']}: --sort-dedupe moved {fixed['moved']} row(s) into time order "
                f"and dropped {fixed['dropped']} row(s) repeating a timestamp",
                always=True,
            )

    def progress(stage: str, info: dict[str, Any]) -> None:
        if stage == "epoch":
            bar.total = info["epochs"]  # a tree family is fitted in one pass
            bar.update(info["epoch"], f"loss {info['train_loss']:.4f} val {info['val_loss']:.4f}")
        elif stage == "export":
            bar.finish()
            bar.note(f"exporting {info['format']}/{info['quantization']} …")
        elif stage == "rejected":
            bar.note(
                f"rejected {info['format']}/{info['quantization']}: {'; '.join(info['why'])}",
                always=True,
            )

    try:
        outcome = train(prepared, Path(args.registry), progress)
        bar.finish()
    except (TrainError, RegistryError) as e:  # e.g. the registry changed while training
        bar.finish()
        print(f"edgefleet train: {e}", file=sys.stderr)
        return EXIT_FAILED
    record = outcome.version
    if args.json:
        obj = record.to_json()
        obj["rejected"] = [
            {"format": a.format, "quantization": a.quantization, "parity": a.parity.to_json()}
            for a in outcome.rejected
        ]
        print_json(obj)
    else:
        print(f"registered {record.ref} in {args.registry}")
        _print_artifacts(record.artifacts)
    return 0


def _print_artifacts(artifacts: Sequence[Any]) -> None:
    print(f"  {'format':7} {'quant':5} {'bytes':>8}  {'rank-corr':>9} {'agree':>6}  profiles")
    for a in artifacts:
        p = a.parity
        print(
            f"  {a.format:7} {a.quantization:5} {a.size_bytes:8d}  "
            f"{p['rank_correlation']:9.4f} {p['decision_agreement']:6.3f}  {','.join(a.profiles)}"
        )


# -- registry ---------------------------------------------------------------------------------


def _open_registry(path: str):
    from trainer.registry import Registry, RegistryError

    try:
        return Registry.open(path)
    except RegistryError as e:
        raise UsageError(str(e)) from e


def cmd_registry_list(args: argparse.Namespace) -> int:
    with _open_registry(args.registry) as reg:
        models = reg.models()
    if args.json:
        print_json(models)
        return 0
    if not models:
        print(f"no models in {args.registry}")
    for m in models:
        print(f"{m['name']:24} latest {m['name']}@{m['latest']}  ({m['versions']} versions)")
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    from trainer.registry import RegistryError, parse_model_ref

    try:
        name, version = parse_model_ref(args.ref)
        with _open_registry(args.registry) as reg:
            record = reg.get(name, version)
    except RegistryError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print_json(record.to_json())
        return 0
    m = record.metrics
    print(f"{record.ref}  created {record.created_at}")
    print(f"  architecture {json.dumps(record.architecture, sort_keys=True)}")
    epochs = f"  best epoch {m['best_epoch']}/{m['epochs_run']}" if "best_epoch" in m else ""
    print(f"  threshold {m['threshold']:.4g}{epochs}  validation alarm rate {m['validation_alarm_rate']:.4f}")
    datasets = ", ".join(f"{d['file']} ({d['rows_used']} rows)" for d in record.lineage["datasets"])
    print(f"  data {datasets}; parent version {record.lineage.get('parent_version')}")
    recipe = record.lineage.get("recipe")
    if recipe:
        print("  recipe " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in sorted(recipe.items())))
    compression = record.lineage.get("compression")
    if compression:
        print(f"  compressed from {compression.get('parent')} by {compression.get('recipe')}")
    federated = record.lineage.get("federated")
    if federated:
        eps = federated.get("epsilon")
        eps_text = f"{eps:.4g}" if isinstance(eps, float) else str(eps)
        print(f"  federated run {federated.get('run')}: {federated.get('rounds_done')} round(s) of "
              f"{federated.get('strategy')} on {', '.join(federated.get('nodes', []))}; "
              f"dp {federated.get('dp')}, ε {eps_text} at δ={federated.get('delta')}")
    search = record.lineage.get("search")
    if search:
        values = ", ".join(f"{o} {v:.4g}" for o, v in zip(search.get("objectives", []), search.get("values", [])))
        print(f"  search study {search.get('study')} trial {search.get('trial')} ({values}) in {search.get('storage')}")
    _print_artifacts(record.artifacts)
    return 0


def cmd_registry_migrate(args: argparse.Namespace) -> int:
    from trainer.registry import Registry, RegistryError

    try:
        before, applied = Registry.migrate(args.registry)
    except RegistryError as e:
        raise UsageError(str(e)) from e
    if applied:
        print(f"migrated {args.registry} from schema v{before} to v{applied[-1]}")
    else:
        print(f"{args.registry} is at schema v{before}: nothing to do")
    return 0


# -- profiles ---------------------------------------------------------------------------------


def cmd_profiles_list(args: argparse.Namespace) -> int:
    from shared.profiles import list_profiles

    profiles = list_profiles()
    if args.json:
        print_json([p.to_json() for p in profiles])
        return 0
    print(f"{'name':22} {'arch':8} {'cores':>5} {'ram':>7}  {'formats':12} {'p99 ms':>7}  train")
    for p in profiles:
        print(
            f"{p.name:22} {p.arch:8} {p.cores:5d} {p.ram_mb:6d}M  {','.join(p.formats):12} "
            f"{p.budget.latency_p99_ms:7g}  {'yes' if p.may_train else 'no'}"
        )
    return 0


def cmd_profiles_show(args: argparse.Namespace) -> int:
    from shared.profiles import ProfileError, load_profile

    try:
        profile = load_profile(args.name)
    except ProfileError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print_json(profile.to_json())
        return 0
    for key, value in profile.to_json().items():
        if isinstance(value, dict):
            for k, v in value.items():
                print(f"{key}.{k:18} {v}")
        else:
            print(f"{key:25} {value}")
    return 0


# -- data -------------------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    from trainer.data import generate_host_metrics, write_host_metrics
    from trainer.data.synthetic import MIN_ROWS

    if args.rows < MIN_ROWS:
        raise UsageError(f"--rows must be at least {MIN_ROWS}, got {args.rows}")
    out = Path(args.out)
    labels = Path(args.labels) if args.labels else out.with_suffix(".labels.json")
    for path in (out, labels):
        if not path.parent.is_dir():
            raise UsageError(f"directory {path.parent} does not exist")
        if path.is_dir():
            raise UsageError(f"{path} is a directory; give a file name")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {path.parent}: permission denied")
    if out.resolve() == labels.resolve():
        raise UsageError(f"--labels {labels} would overwrite the CSV; give another file")
    try:
        metrics = generate_host_metrics(args.rows, seed=args.seed, anomalies=args.anomalies)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        write_host_metrics(metrics, out, labels)
    except OSError as e:
        print(f"edgefleet data synth: cannot write: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print_json({"csv": str(out), "labels": str(labels), "rows": args.rows,
                     "anomalies": len(metrics.anomalies)})
    else:
        print(f"wrote {args.rows} rows to {out}, {len(metrics.anomalies)} anomalies to {labels}")
    return 0


# -- detect -----------------------------------------------------------------------------------


def cmd_detect(args: argparse.Namespace) -> int:
    from edge_agent.runtime import ModelRuntimeError
    from shared.profiles import ProfileError
    from shared.series import SeriesError
    from trainer.backtest import BacktestError, run_backtest

    try:
        result = run_backtest(
            Path(args.registry), args.ref, Path(args.data), Path(args.out),
            fmt=args.format, profile=args.profile,
        )
    except (BacktestError, SeriesError, ProfileError) as e:
        raise UsageError(str(e)) from e
    except ModelRuntimeError as e:  # a registered artifact that does not run here: not input
        print(f"edgefleet detect: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print_json(result.to_json())
    else:
        print(
            f"{result.model}@{result.version} ({result.format}/{result.quantization}): "
            f"{result.rows} rows, {result.scored} windows scored, {result.anomalies} anomalous "
            f"-> {result.out}"
        )
    return 0


# -- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from trainer.demo import DemoError, DemoOptions, run_demo

    def on_stop(*_: object) -> None:  # SIGTERM stops the demo like Ctrl-C: everything is cleaned up
        raise KeyboardInterrupt

    # SIGINT too, explicitly: Python installs its KeyboardInterrupt handler only when SIGINT
    # is not ignored at start-up, and a process started in the background by a non-interactive
    # shell (or by a parent that ignores SIGINT) inherits it ignored; a SIGINT would then be
    # dropped and the demo would run to its end.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_stop)
    if args.broker:
        from edge_agent.mqtt import BrokerError, parse_broker_url

        try:
            parse_broker_url(args.broker)
        except BrokerError as e:
            raise UsageError(str(e)) from e
    try:
        rows = run_demo(DemoOptions(workdir=Path(args.workdir), broker=args.broker, fast=args.fast))
    except DemoError as e:
        print(f"edgefleet demo: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print_json(rows)
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgefleet",
        description="Train small anomaly models, keep them in a registry, ship them to edge agents.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    parser.add_argument("--version", action=VersionAction, help="print the edgefleet version")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def registry_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            default=_registry_default(),
            help="registry directory (default: $EDGEFLEET_REGISTRY, else ./.edgefleet)",
        )

    def json_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("train", help="train a model and register int8/fp32 ONNX and TFLite artifacts")
    p.add_argument("--data", action="append", required=True, metavar="CSV",
                   help="timestamp,value (NAB) or timestamp + N numeric columns; repeatable")
    p.add_argument("--profile", action="append", required=True, metavar="NAME",
                   help="firmware profile to build artifacts for; repeatable")
    p.add_argument("--name", required=True, help="model name")
    registry_arg(p)
    p.add_argument("--epochs", type=positive_int, default=40, help="maximum epochs (early stopping)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--train-fraction", type=fraction, default=1.0, metavar="F",
                   help="train on the first F of the rows only (the rest is left for later)")
    model_args(p)
    p.add_argument("--sort-dedupe", action="store_true",
                   help="sort rows by time and drop repeated timestamps (keeping the first) "
                   "instead of refusing the file; says how many rows it moved and dropped")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    json_arg(p)
    p.set_defaults(func=cmd_train)

    reg = sub.add_parser("registry", help="inspect the model registry").add_subparsers(
        dest="registry_command", required=True, parser_class=_Parser
    )
    p = reg.add_parser("list", help="models in the registry")
    registry_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_registry_list)
    p = reg.add_parser("show", help="one version with its artifacts (latest without @VERSION)")
    p.add_argument("ref", metavar="MODEL[@VERSION]")
    registry_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_registry_show)
    p = reg.add_parser("migrate", help="bring the registry schema up to this edgefleet's")
    registry_arg(p)
    p.set_defaults(func=cmd_registry_migrate)

    prof = sub.add_parser("profiles", help="firmware profiles (hardware targets)").add_subparsers(
        dest="profiles_command", required=True, parser_class=_Parser
    )
    p = prof.add_parser("list", help="all built-in profiles")
    json_arg(p)
    p.set_defaults(func=cmd_profiles_list)
    p = prof.add_parser("show", help="one profile in full")
    p.add_argument("name")
    json_arg(p)
    p.set_defaults(func=cmd_profiles_show)

    p = sub.add_parser("detect", help="backtest: run a model over a CSV with the agent's detection code")
    p.add_argument("ref", metavar="MODEL@VERSION")
    registry_arg(p)
    p.add_argument("--data", required=True, metavar="CSV", help="series to score")
    p.add_argument("--out", required=True, metavar="CSV", help="where to write the scored rows")
    p.add_argument("--format", choices=("onnx", "tflite"), help="artifact format (default: int8 ONNX)")
    p.add_argument("--profile", help="use the variant this profile's agents would run")
    json_arg(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("demo", help="run a small fleet end to end on this machine")
    p.add_argument("--workdir", default=".edgefleet-demo", help="where the demo keeps its files")
    p.add_argument("--broker", help="use this broker instead of a private Mosquitto")
    p.add_argument("--fast", action="store_true", help="smaller data and fewer epochs (CI)")
    json_arg(p)
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="data helpers").add_subparsers(
        dest="data_command", required=True, parser_class=_Parser
    )
    p = data.add_parser("synth", help="generate host metrics with labelled injected anomalies")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--labels", help="labels JSON to write (default: beside the CSV)")
    p.add_argument("--rows", type=positive_int, default=4000,
                   help="rows to generate, at least 200 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomalies", type=at_least(0), default=8,
                   help="anomalies to inject (default: %(default)s)")
    json_arg(p)
    p.set_defaults(func=cmd_data_synth)
    from trainer.cli_broker import add_broker_commands
    from trainer.cli_compress import add_compress_command
    from trainer.cli_evaluate import add_evaluate_command
    from trainer.cli_fl import add_fl_commands
    from trainer.cli_fleet import add_fleet_commands
    from trainer.cli_rollout import add_rollout_commands
    from trainer.cli_search import add_search_command

    add_evaluate_command(sub, registry_arg, json_arg)
    add_search_command(sub, registry_arg, json_arg)
    add_compress_command(sub, registry_arg, json_arg)
    add_fleet_commands(sub, registry_arg, json_arg)
    add_fl_commands(sub, registry_arg, json_arg)
    add_broker_commands(sub, json_arg)
    add_rollout_commands(sub, registry_arg, json_arg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    # Ctrl-C (SIGINT) interrupts every command, explicitly: Python installs its handler only
    # when SIGINT is not ignored at start-up, and a process started in the background by a
    # non-interactive shell or a CI runner inherits it ignored (`train`, `evaluate` and `search`
    # would then run to their end; `search` promises a resumable study on Ctrl-C).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return func(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`edgefleet registry show … | head`): not an error of ours.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
