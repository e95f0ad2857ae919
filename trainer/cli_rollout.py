"""``edgefleet rollout start|status|pause|resume|abort``: staged rollouts with automatic rollback.

Added to the main parser by :func:`add_rollout_commands`. Errors are reported the way the
fleet commands report them (one line, exit 2 for bad input, 1 when the work failed). ``start``
and ``resume`` run the controller in the foreground until the rollout ends; they exit 0 when
it completed and 1 when it was rolled back or aborted. A controller holds
``{registry}/rollouts/{id}.lock`` while it runs, so ``resume`` of a rollout whose controller
is alive only clears the pause, and ``abort`` lets that controller roll back.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.cli_common import EXIT_FAILED, print_json
from trainer.cli_fleet import (
    _broker_args,
    _check_broker,
    _command,
    _connected,
    _failed,
    _topics,
    _usage,
)

if TYPE_CHECKING:
    from trainer.fleet.rollout import RolloutRecord

__all__ = ["add_rollout_commands"]


def _stages(text: str) -> tuple[str, ...]:
    from trainer.fleet.rollout import PlanError, parse_stages

    try:
        return parse_stages(text)
    except PlanError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> float:
    from trainer.fleet.rollout import PlanError, parse_duration

    try:
        return parse_duration(text)
    except PlanError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _gates(text: str) -> Any:
    from trainer.fleet.rollout import GateError, parse_gates

    try:
        return parse_gates(text)
    except GateError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rollout_id(text: str) -> str:
    from trainer.fleet.rollout import check_rollout_id
    from trainer.registry import RegistryError

    try:
        return check_rollout_id(text)
    except RegistryError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- the controller's lock ----------------------------------------------------------------------


def _lock_path(registry: str, rollout_id: str) -> Path:
    return Path(registry) / "rollouts" / f"{rollout_id}.lock"


@contextmanager
def _controller_lock(registry: str, rollout_id: str) -> Iterator[bool]:
    """Try to become the rollout's controller: yields False if another process is."""
    path = _lock_path(registry, rollout_id)
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _controller_alive(registry: str, rollout_id: str) -> bool:
    path = _lock_path(registry, rollout_id)
    if not path.exists():
        return False
    with _controller_lock(registry, rollout_id) as mine:
        return not mine


# -- running a controller ----------------------------------------------------------------------


def _drive(args: argparse.Namespace, rollout_id: str, client: Any, observer: Any) -> int:
    from trainer.fleet.rollout import RolloutController
    from trainer.progress import ProgressBar

    bar: ProgressBar | None = None
    shown: tuple[Any, ...] = ()

    def progress(view: Any) -> None:
        # The controller steps at every agent message: redraw on a new phase, else every 2 s.
        nonlocal bar, shown
        if bar is None:
            bar = ProgressBar(f"rollout {rollout_id}", view.stages, enabled=not args.quiet)
        key = (view.stage, view.phase, view.paused, int(time.monotonic() / 2))
        if key != shown:
            shown = key
            bar.update(view.stage, view.describe())

    controller = RolloutController(
        args.registry, rollout_id, client=client, topics=_topics(args), observer=observer,
        activation_timeout=args.activation_timeout, publish_timeout=args.broker_timeout,
        on_progress=progress,
        on_retry=lambda line: print(f"rollout {rollout_id}: {line}", file=sys.stderr),
    )
    from trainer.fleet.deploy import DeployError
    from trainer.registry import RegistryError

    try:
        record = controller.run()
    except (DeployError, RegistryError) as e:  # the work failed, not the user's input
        raise _failed(f"{e} (rollout {rollout_id} stays as it was: fix it, then "
                      f"`edgefleet rollout resume {rollout_id}`)") from e
    if bar is not None:
        bar.finish()
    _print_record(args, record)
    return 0 if record.state == "completed" else EXIT_FAILED


def _run_controller(args: argparse.Namespace, rollout_id: str, client: Any) -> int:
    from trainer.fleet.rollout import FleetObserver

    with _controller_lock(args.registry, rollout_id) as mine:
        if not mine:
            raise _usage(f"rollout {rollout_id} already has a running controller")
        observer = FleetObserver(client, _topics(args))
        try:
            observer.start(args.broker_timeout)
        except TimeoutError as e:
            raise _failed(f"{e} (rollout {rollout_id} stays as it was: "
                          f"`edgefleet rollout resume {rollout_id}` when the broker answers)") from e
        return _drive(args, rollout_id, client, observer)


# -- commands ---------------------------------------------------------------------------------


@_command
def cmd_rollout_start(args: argparse.Namespace) -> int:
    """Start a staged rollout and run its controller until it completes or rolls back."""
    from trainer.fleet.rollout import DEFAULT_GATES, check_request, create_rollout
    from trainer.fleet.status import read_fleet

    _check_broker(args)
    topics = _topics(args)
    request = check_request(args.registry, args.ref, args.group, args.slot, args.stages,
                            args.soak, args.gates or DEFAULT_GATES, shadow=args.shadow)
    with _connected(args) as client:
        views = read_fleet(client, topics, timeout=args.broker_timeout)
        record, skipped = create_rollout(args.registry, request, views, force=args.force)
        if not args.quiet:
            print(f"rollout {record.id}: {record.ref} to group {record.group} "
                  f"({len(record.agents)} agent(s), replacing version {record.previous_version})"
                  + (", shadow stage first" if request.shadow else ""), file=sys.stderr)
            for agent, why in sorted(skipped.items()):
                print(f"  skipped {agent}: {why}", file=sys.stderr)
        return _run_controller(args, record.id, client)


def _request_and_run(args: argparse.Namespace, action: str, running: str) -> int:
    """Record ``action`` on the rollout; if its controller is running, that controller acts
    on it: print ``running`` (or the record with --json) and return 0. Otherwise run the
    controller here and return its exit code."""
    from trainer.fleet.rollout import RolloutStore
    from trainer.registry import Registry

    _check_broker(args)
    with Registry.open(args.registry) as reg:
        record = RolloutStore(reg).request(args.id, action)
    if _controller_alive(args.registry, args.id):
        if args.json:
            print_json(record.to_json())
        else:
            print(running)
        return 0
    with _connected(args) as client:
        return _run_controller(args, args.id, client)


@_command
def cmd_rollout_resume(args: argparse.Namespace) -> int:
    """Clear a pause; run the controller again if none is running (after a crash)."""
    return _request_and_run(args, "resume", f"rollout {args.id} resumed (its controller is running)")


@_command
def cmd_rollout_pause(args: argparse.Namespace) -> int:
    """Hold a rollout at its current stage (gates keep watching)."""
    from trainer.fleet.rollout import RolloutStore
    from trainer.registry import Registry

    with Registry.open(args.registry) as reg:
        record = RolloutStore(reg).request(args.id, "pause")
    _print_record(args, record)
    return 0


@_command
def cmd_rollout_abort(args: argparse.Namespace) -> int:
    """Abort a rollout: roll its canaries back to the previous version."""
    code = _request_and_run(args, "abort", f"rollout {args.id}: abort requested; its controller rolls it back")
    return 0 if code == EXIT_FAILED else code  # aborted is what was asked


@_command
def cmd_rollout_status(args: argparse.Namespace) -> int:
    """Show one rollout with its log, or all rollouts."""
    from trainer.fleet.rollout import RolloutStore
    from trainer.registry import Registry

    with Registry.open(args.registry) as reg:
        store = RolloutStore(reg)
        if args.id is None:
            records = store.all()
            if args.json:
                print_json([r.to_json() for r in records])
            else:
                for r in records:
                    print(f"{r.id}  {r.ref:<16} group {r.group:<12} {_state(r):<22} {r.created_at}")
                if not records:
                    print("no rollouts")
            return 0
        record = store.get(args.id)
        events = store.events(args.id)
    if args.json:
        print_json({**record.to_json(), "events": events})
        return 0
    _print_record(args, record, events)
    return 0


def _state(r: RolloutRecord) -> str:
    if r.finished:
        return r.state
    phase = r.progress.get("phase", "deploy")
    return f"stage {r.stage + 1} {phase}" + (" paused" if r.paused else "")


def _print_record(args: argparse.Namespace, r: RolloutRecord,
                  events: list[dict[str, Any]] | None = None) -> None:
    if getattr(args, "json", False):
        print_json(r.to_json())
        return
    from trainer.fleet.rollout.plan import stage_sizes

    sizes = stage_sizes(r.stages, len(r.agents), r.progress.get("members"))
    print(f"rollout {r.id}: {r.ref} to group {r.group} (slot {r.slot}), replacing "
          f"{r.model}@{r.previous_version}")
    print(f"  state: {_state(r)}" + (f" - {r.message}" if r.message else ""))
    print(f"  stages: {', '.join(r.stages)} -> {', '.join(map(str, sizes))} of "
          f"{len(r.agents)} agent(s); soak {r.soak_s:g}s")
    print(f"  gates: {r.gates.describe()}")
    p = r.progress
    canaries = p.get("participants", []) + p.get("new", [])
    if canaries:
        print(f"  canaries: {', '.join(canaries)}")
    elif p.get("shadow_agents"):
        print(f"  shadow canaries: {', '.join(p['shadow_agents'])}")
    for agent, result in sorted((p.get("shadow_results") or {}).items()):
        print(f"  shadow on {agent}: {_shadow_result(result)}")
    for e in events or []:
        print(f"  {e['ts']}  stage {e['stage'] + 1}  {e['kind']:<13} {_describe_event(e['detail'])}")


def _shadow_result(result: dict[str, Any] | None) -> str:
    """One canary's shadow comparison (``fleet status``'s shadow cell), or why there is none."""
    from trainer.cli_fleet import _shadow_cell

    return "not reported" if result is None else _shadow_cell({"-": result})


def _describe_event(detail: dict[str, Any]) -> str:
    if isinstance(detail.get("shadow"), dict):  # shadow-results: each canary's comparison
        return f"{detail.get('message', '')}: " + "; ".join(
            f"{a} {_shadow_result(r)}" for a, r in sorted(detail["shadow"].items()))
    if detail.get("message"):
        return str(detail["message"])
    agents = detail.get("agents")
    if isinstance(agents, dict):  # promoted / completed: what each canary did during the soak
        return "; ".join(
            f"{a} {w['anomalies']}/{w['inferences']} anomalies, {w['errors']} errors"
            + ("" if w.get("p99_ms") is None else f", p99 {w['p99_ms']:.2f} ms")
            for a, w in sorted(agents.items())
        )
    parts = [] if agents is None else [", ".join(agents)]
    if detail.get("documents"):
        parts.append("wrote " + ", ".join(detail["documents"]))
    if detail.get("removed"):
        parts.append("removed " + ", ".join(detail["removed"]))
    if detail.get("to"):
        parts.append(f"back to {detail['to']}")
    return "; ".join(parts)


# -- parser -----------------------------------------------------------------------------------


def add_rollout_commands(
    sub: Any,
    registry_arg: Callable[[argparse.ArgumentParser], None],
    json_arg: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``rollout …`` to the ``edgefleet`` subcommands."""
    from trainer.fleet.rollout.plan import DEFAULT_STAGES

    parent = sub.add_parser("rollout", help="staged rollouts with gates and automatic rollback")
    ro = parent.add_subparsers(dest="rollout_command", required=True, parser_class=type(parent))

    def controller_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--activation-timeout", type=_duration, default=300.0, metavar="DURATION",
                       help="how long canaries may take to activate, and how long after the "
                       "soak one without enough inferences is waited for (default: 5m)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        _broker_args(p, required=True)
        registry_arg(p)
        json_arg(p)

    p = ro.add_parser("start", help="roll MODEL@VERSION out to a group stage by stage")
    p.add_argument("ref", metavar="MODEL@VERSION")
    p.add_argument("--group", required=True, help="the group whose agents get it")
    p.add_argument("--slot", default="default", help="model slot (default: %(default)s)")
    p.add_argument("--stages", type=_stages, default=DEFAULT_STAGES, metavar="LIST",
                   help="cumulative agent counts or percentages, ending with 100%% "
                   f"(default: {','.join(DEFAULT_STAGES).replace('%', '%%')})")
    p.add_argument("--soak", type=_duration, default=600.0, metavar="DURATION",
                   help="how long each stage is watched before the next (default: 10m)")
    p.add_argument("--force", action="store_true",
                   help="start even though agents of the group have a profile the version was "
                   "not built for (the group's document reaches them at the last stage)")
    p.add_argument("--shadow", action="store_true",
                   help="a shadow stage first: the first stage's canaries run the version beside "
                   "their model for the soak, emitting nothing; then the rollout pauses with "
                   "each canary's decision agreement, score correlation and latency (`rollout "
                   "status`) until `rollout resume` switches or `rollout abort` ends it")
    p.add_argument("--gates", type=_gates, default=None, metavar="LIST",
                   help="change gates, e.g. anomaly-rate=3x,latency-p99=budget,errors=0,drift=off "
                   "(see docs/operations.md)")
    controller_args(p)
    p.set_defaults(func=cmd_rollout_start)

    p = ro.add_parser("status", help="one rollout with its log, or all rollouts")
    p.add_argument("id", nargs="?", type=_rollout_id, metavar="ID")
    registry_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_rollout_status)

    p = ro.add_parser("pause", help="hold a rollout at its current stage")
    p.add_argument("id", type=_rollout_id, metavar="ID")
    registry_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_rollout_pause)

    p = ro.add_parser("resume", help="clear a pause, or run a controller that died again")
    p.add_argument("id", type=_rollout_id, metavar="ID")
    controller_args(p)
    p.set_defaults(func=cmd_rollout_resume)

    p = ro.add_parser("abort", help="roll a rollout's canaries back to the previous version")
    p.add_argument("id", type=_rollout_id, metavar="ID")
    controller_args(p)
    p.set_defaults(func=cmd_rollout_abort)

