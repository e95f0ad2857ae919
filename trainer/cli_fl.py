"""``edgefleet fl start|status``: federated training with differential privacy on Flower
(:mod:`trainer.federated`), and the privacy ledger of a run."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path
from typing import Any

from trainer.cli_common import (
    EXIT_FAILED,
    UsageError,
    at_least,
    fraction,
    positive_float,
    positive_int,
    print_json,
)
from trainer.cli_fleet import _command

__all__ = ["add_fl_commands"]


def _clip(text: str) -> str | float:
    if text == "adaptive":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'adaptive', got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number or 'adaptive', got {text}")
    return value


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _eps(value: float | str) -> str:
    return "inf" if value == "inf" or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4g}"


@_command  # broker and TUF repository errors: one line, as for the fleet commands
def cmd_fl_start(args: argparse.Namespace) -> int:
    from trainer.federated.flower import FlowerError
    from trainer.federated.options import FederatedOptions
    from trainer.federated.publish import PublishError
    from trainer.federated.run import (
        FederatedError,
        FederatedRunFailed,
        StartRequest,
        prepare,
        start,
    )

    if args.name is not None and args.spec is None:
        raise UsageError("--name names the result of a run from --spec; with --model the result is NAME@N")
    if args.mu is not None and args.strategy != "fedprox":
        raise UsageError(f"--mu is FedProx's proximal weight: it needs --strategy fedprox, not {args.strategy}")
    options = FederatedOptions(
        group=args.group, rounds=args.rounds, strategy=args.strategy, dp=args.dp, noise_multiplier=args.noise,
        clipping_norm=1.0 if args.clip == "adaptive" else args.clip, adaptive_clipping=args.clip == "adaptive",
        epsilon_budget=args.epsilon_budget, delta=args.delta, fraction=args.fraction, min_nodes=args.min_nodes,
        proximal_mu=0.01 if args.mu is None else args.mu, epochs=args.local_epochs, learning_rate=args.learning_rate,
        round_timeout=args.round_timeout, node_wait=args.node_wait, seed=args.seed,
    )
    request = StartRequest(
        ref=args.model, spec=_spec(args.spec), name=args.name, options=options, registry=Path(args.registry), profiles=args.profile or [],
        data=[Path(p) for p in args.data or []], superlink=args.superlink, port=args.port, timeout=args.timeout,
        run=args.run, profile_dirs=[Path(d) for d in args.profiles_dir], host=args.host, advertise=args.advertise,
        tls=_tls_files(args),
    )
    try:
        prepared = prepare(request)
    except FederatedError as e:
        raise UsageError(str(e)) from e
    if prepared.root_certificates is None and not args.quiet:
        print("warning: the SuperLink is plaintext, so only agents on this host can join; for agents "
              "elsewhere give --tls-cert, --tls-key and --tls-ca (docs/federated.md)", file=sys.stderr)

    def progress(stage: str, info: dict[str, Any]) -> None:
        if args.quiet or args.json:
            return
        if stage == "run":
            print(f"run {info['run']}", file=sys.stderr, flush=True)
        elif stage == "submitted":
            print(f"submitted as Flower run {info['flower_run_id']} to {info['superlink']}; waiting for rounds …",
                  file=sys.stderr, flush=True)
        elif stage == "announced":
            print(f"run document {info['target']} signed into the TUF repository", file=sys.stderr, flush=True)
        elif stage == "export":
            print(f"exporting {info['format']}/{info['quantization']} …", file=sys.stderr, flush=True)
        elif stage == "rejected":
            print(f"rejected {info['format']}/{info['quantization']}: {'; '.join(info['why'])}", file=sys.stderr)
        elif stage == "warning":
            print(f"warning: {info['message']}", file=sys.stderr, flush=True)

    announce = _announcer(args)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up as Ctrl-C does
    try:
        outcome = start(prepared, progress, announce)
    except (FederatedRunFailed, FlowerError, PublishError) as e:
        print(f"edgefleet fl start: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print_json({"run": outcome.run.to_json(), "version": outcome.version.to_json()})
        return 0
    _print_run(outcome.run)
    print(f"registered {outcome.version.ref} in {args.registry}")
    return 0


def _spec(path: str | None) -> Any:
    """The :class:`~trainer.models.ArchitectureSpec` in the JSON file ``path`` (``None``: none).

    The file holds what ``ArchitectureSpec.to_json`` writes (a version's ``architecture`` in
    ``edgefleet registry show --json``), read by ``ArchitectureSpec.from_json``."""
    if path is None:
        return None
    import json

    from trainer.models import ArchitectureSpec, SpecError

    try:
        obj = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read --spec {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--spec {path}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise UsageError(f"--spec {path}: expected a JSON object, got {type(obj).__name__}")
    try:
        return ArchitectureSpec.from_json(obj)
    except SpecError as e:
        raise UsageError(f"--spec {path}: {e}") from e


def _tls_files(args: argparse.Namespace) -> Any:
    """``--tls-*`` as :class:`~trainer.federated.tls.TlsFiles`; ``None`` without any."""
    from trainer.federated.tls import TlsFiles

    given = {name: getattr(args, f"tls_{name}") for name in ("cert", "key", "ca")}
    if not any(given.values()):
        return None
    if given["ca"] is None:
        raise UsageError("give --tls-ca with --tls-cert and --tls-key (all three, or --tls-ca alone with --superlink)")
    return TlsFiles(ca=Path(given["ca"]), cert=given["cert"] and Path(given["cert"]),
                    key=given["key"] and Path(given["key"]))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _announcer(args: argparse.Namespace) -> Any:
    """Where the run's document goes: a target in the registry's TUF repository (signed), and
    from there to the broker when ``--broker`` is given; nothing without a repository."""
    from trainer.fleet.deploy import open_repository, repository_lock, repository_path

    if not (repository_path(args.registry) / "metadata" / "root.json").exists():
        if args.broker:
            raise UsageError(f"--broker needs a TUF repository: run `edgefleet repo init --registry {args.registry}`")
        return None
    if args.broker:
        from trainer.cli_fleet import _check_broker

        _check_broker(args)

    def announce(run: Any) -> None:
        if args.broker:
            from trainer.cli_fleet import _connected, _topics
            from trainer.fleet.federated import publish_federated_run

            with _connected(args) as client:
                publish_federated_run(args.registry, run, client=client, topics=_topics(args),
                                      chunk_size=args.chunk_size, timeout=args.broker_timeout)
            return
        from shared.federated import encode_run, run_target

        target = run_target(run.run)
        with repository_lock(args.registry):  # signed now; `edgefleet repo publish` sends it
            open_repository(args.registry).add_targets(
                {target: encode_run(run)}, custom={target: {"kind": "federated-run", "state": run.state}})

    return announce


def _print_run(record: Any) -> None:
    budget = "none" if record.epsilon_budget is None else f"{record.epsilon_budget:g}"
    start = record.params.get("start")
    origin = (f"{record.model} from spec {start['spec_sha256'][:12]}" if start
              else f"{record.model}@{record.parent_version}")
    print(f"{record.run}  {record.state}  {origin} group {record.group}  "
          f"{record.strategy}  dp {record.dp} σ={record.noise_multiplier:g} clip {record.clipping} "
          f"q={record.sampling_rate:g}")
    print(f"  ε spent {_eps(record.epsilon)} of budget {budget} at δ={record.delta:g} (RDP accountant)"
          + (f"; result version {record.model}@{record.result_version}" if record.result_version else ""))
    if record.message and record.message not in {r.get("message") for r in record.round_rows}:
        print(f"  {record.message}")
    print(f"  {'round':>5} {'state':8} {'ε after':>8} {'ε PLD':>8} {'q':>5} {'σ':>5} {'clip':>7}  "
          f"{'nodes':24} metrics")
    for r in record.round_rows:
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(r["metrics"].items()))
        nodes = ",".join(r["nodes_contributed"]) or "-"
        pld = "-" if r["epsilon_pld"] is None else _eps(r["epsilon_pld"])
        print(f"  {r['round']:5d} {r['state']:8} {_eps(r['epsilon']):>8} {pld:>8} {r['sampling_rate']:5.3g} "
              f"{r['noise_multiplier']:5.3g} {r['clipping_norm']:7.4g}  {nodes[:24]:24} {metrics}")
        declined = [f for f in r["failures"] if f["declined"]]
        lost = [f for f in r["failures"] if not f["declined"]]
        if declined:
            print(f"        declined: {len(declined)} node(s)")
        if lost:
            print(f"        failed or no reply: {len(lost)} node(s)")
        if r.get("message"):
            print(f"        {r['message']}")


def cmd_fl_status(args: argparse.Namespace) -> int:
    from trainer.federated.run import FederatedError, status

    try:
        records = status(Path(args.registry), args.run)
    except FederatedError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print_json(records[0].to_json() if args.run else [r.to_json() for r in records])
        return 0
    if not records:
        print(f"no federated runs in {args.registry}")
    for record in records:
        _print_run(record)
    return 0


def add_fl_commands(sub: Any, registry_arg: Any, json_arg: Any) -> None:
    """Register ``fl start`` and ``fl status`` on the ``edgefleet`` subparsers."""
    from trainer.federated.options import DP_MODES, STRATEGIES

    parent = sub.add_parser("fl", help="federated training with differential privacy (Flower)")
    fl = parent.add_subparsers(dest="fl_command", required=True, parser_class=type(parent))
    p = fl.add_parser(
        "start", help="run federated rounds from NAME@V or an architecture spec and register the global model",
        description="Train NAME@V, or a fresh model built from --spec, on the group's hosts with Flower (their "
        "windows never leave them), with central or local differential privacy and a privacy ledger, then export "
        "and register the global model as NAME@N (docs/federated.md).")
    origin = p.add_mutually_exclusive_group(required=True)
    origin.add_argument("--model", metavar="NAME@V", help="the registered version to start from")
    origin.add_argument("--spec", metavar="SPEC.json",
                        help="start from this architecture spec (a version's \"architecture\" JSON), freshly "
                        "initialised with --seed and normalised on the --data rows; needs --name and --data")
    p.add_argument("--name", metavar="NAME", help="with --spec: the model name the result registers as")
    p.add_argument("--group", required=True, help="the group of agents that takes part")
    p.add_argument("--rounds", type=positive_int, required=True, help="federated rounds")
    p.add_argument("--strategy", choices=STRATEGIES, default="fedavg", help="aggregation (default: %(default)s)")
    p.add_argument("--mu", type=positive_float, default=None,
                   help="FedProx proximal weight, only with --strategy fedprox (default: 0.01)")
    p.add_argument("--dp", choices=DP_MODES, default="central",
                   help="central: the server clips and adds noise; local: each host does (Flower's LocalDpMod); "
                   "off: no DP, ε = inf (default: %(default)s)")
    p.add_argument("--noise", type=_nonnegative, default=1.0, metavar="σ",
                   help="noise multiplier: noise std over the clipping norm (default: %(default)s)")
    p.add_argument("--clip", type=_clip, default=1.0, metavar="C|adaptive",
                   help="clipping norm of each host's update, or adaptive (central DP; starts at 1.0)")
    p.add_argument("--epsilon-budget", type=positive_float, metavar="ε",
                   help="refuse any round that would bring the run's ε (RDP, at --delta) over this")
    p.add_argument("--delta", type=fraction, default=1e-5, metavar="δ", help="δ of the ε reported (default: %(default)s)")
    p.add_argument("--fraction", type=fraction, default=1.0, metavar="F",
                   help="Poisson sampling rate of hosts per round (default 1: every connected host)")
    p.add_argument("--min-nodes", type=positive_int, default=2, metavar="K",
                   help="hosts to wait for before a round, and contributions a round needs (default: %(default)s)")
    p.add_argument("--local-epochs", type=positive_int, default=1, help="epochs on each host per round")
    p.add_argument("--learning-rate", type=positive_float, default=1e-3, help="hosts' learning rate")
    p.add_argument("--round-timeout", type=positive_float, default=300.0, metavar="S",
                   help="seconds to wait for replies in a round (a dropped host costs at most this)")
    p.add_argument("--node-wait", type=positive_float, default=120.0, metavar="S",
                   help="seconds to wait for --min-nodes hosts to connect before a round")
    p.add_argument("--profile", action="append", metavar="NAME",
                   help="firmware profile to build artifacts for; repeatable (default: NAME@V's; needed with --spec)")
    p.add_argument("--profiles-dir", action="append", default=[], metavar="DIR",
                   help="look for profiles here before the built-in ones; repeatable")
    p.add_argument("--data", action="append", metavar="CSV",
                   help="reference data on this host for the threshold and int8 calibration (and with --spec the "
                   "input normalisation and feature names); repeatable (default with --model: the files NAME@V "
                   "was trained on, found by name in this folder)")
    p.add_argument("--superlink", metavar="HOST:PORT", help="use this running SuperLink instead of starting one")
    p.add_argument("--port", type=at_least(1), default=9092, help="port of the SuperLink started (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the SuperLink started listens on; agents on other hosts need a non-loopback "
                   "one and TLS (default: %(default)s)")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="the SuperLink address the run document gives agents (default: --host:--port, "
                   "or --superlink)")
    p.add_argument("--tls-cert", metavar="CERT.pem",
                   help="run the SuperLink started with TLS: its certificate (PEM; name the --advertise host "
                   "and the --host address, 127.0.0.1 for 0.0.0.0); needs --tls-key and --tls-ca")
    p.add_argument("--tls-key", metavar="KEY.pem", help="the certificate's unencrypted private key (PEM)")
    p.add_argument("--tls-ca", metavar="CA.pem",
                   help="CA bundle (PEM) that verifies the SuperLink's certificate; agents get it in the "
                   "run document. Alone with --superlink: talk to that SuperLink over TLS")
    p.add_argument("--timeout", type=positive_float, default=3600.0, metavar="S", help="give up on the run after S s")
    p.add_argument("--run", help="name of the run (default: fl-DATE-TIME-RANDOM)")
    p.add_argument("--seed", type=int, default=0, help="seed of node sampling, local training and a --spec model's initial weights")
    from trainer.cli_fleet import _broker_args, _chunk_size_arg

    _broker_args(p, required=False)
    _chunk_size_arg(p)
    registry_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    json_arg(p)
    p.set_defaults(func=cmd_fl_start)

    p = fl.add_parser("status", help="rounds, nodes, metrics and ε of a run (every run without RUN)")
    p.add_argument("run", nargs="?", metavar="RUN")
    registry_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_fl_status)
