"""``edgefleet-agent``: init-config, check-config, run, simulate.

Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error, 3 the broker
refused the credentials, its ACL does not let this user publish the agent's state, or its TLS
certificate failed verification before the agent's first connection (retrying would not help),
130 interrupted before start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from shared.version import VersionAction

if TYPE_CHECKING:
    import threading

    from edge_agent.simulate import SimulatedFleet

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_init_config(args: argparse.Namespace) -> int:
    """Print a complete config for the options, with every path made absolute.

    The output usually goes to another folder (``> conf/agent.toml``). A path typed relative
    to this shell, written as is, would resolve against that folder instead: a config's
    relative paths resolve against its own directory.
    """
    from edge_agent.config import render_config
    from edge_agent.mqtt import BrokerError, parse_broker_url
    from edge_agent.sources import SourceError, rebase_source
    from shared.profiles import ProfileError, load_profile
    from shared.topics import TopicError, validate_agent_id

    cwd = Path.cwd()
    try:
        validate_agent_id(args.agent_id)
        validate_agent_id(args.group)
        load_profile(args.profile)
        parse_broker_url(args.broker)
        source = rebase_source(args.source, cwd)
    except (TopicError, ProfileError, BrokerError, SourceError) as e:
        print(f"edgefleet-agent init-config: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(
        render_config(
            agent_id=args.agent_id, group=args.group, profile=args.profile, broker=args.broker,
            trust=_absolute(args.trust, cwd), state_dir=_absolute(args.state_dir, cwd), source=source,
        )
    )
    return 0


def _absolute(path: str, cwd: Path) -> str:
    return os.path.abspath(os.path.join(cwd, os.path.expanduser(path)))


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"edgefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    note = " (emulated on this host)" if config.emulated else ""
    print(f"{args.config}: ok — agent {config.agent_id}, group {config.group}, "
          f"profile {config.profile.name}{note}, source {config.source}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.config import ConfigError, load_config
    from edge_agent.daemon import Agent

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"edgefleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    agent = Agent(config, environ=os.environ)
    agent.install_signal_handlers()
    return agent.run(exit_at_end=args.exit_at_end)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``--count`` simulated agents from a template config until SIGINT/SIGTERM."""
    import json
    import resource
    import signal
    import threading

    from edge_agent.config import ConfigError, load_config
    from edge_agent.simulate import FleetError, SimulatedFleet

    try:
        template = load_config(args.config)
        fleet = SimulatedFleet(template, args.count, prefix=args.prefix, concurrency=args.concurrency)
    except (ConfigError, FleetError) as e:
        print(f"edgefleet-agent simulate: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Each agent holds a few descriptors (socket, outbox database, fetch connection).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fleet.start()
    ready = threading.Thread(target=_announce_ready, args=(fleet, stop, args.json), daemon=True)
    ready.start()
    while not stop.wait(0.5) and fleet.running():
        pass  # woken by a signal, or every agent stopped by itself (e.g. refused credentials)
    logging.getLogger(__name__).info("stopping %d simulated agents", len(fleet.agents))
    fleet.stop()
    code = fleet.exit_code()
    if args.json:
        try:
            print(json.dumps({"stopped": len(fleet.agents), "exit_code": code}), flush=True)
        except BrokenPipeError:  # whoever read the ready line is gone; the exit code still says it
            pass
    return code


def _announce_ready(fleet: SimulatedFleet, stop: threading.Event, as_json: bool) -> None:
    """Print one line once every agent is through its first reconcile pass."""
    import json

    from edge_agent.simulate import fleet_summary

    while not stop.is_set():
        if fleet.wait_ready(1.0):
            summary = fleet_summary(fleet)
            if as_json:
                print(json.dumps({**summary, "ready": True}), flush=True)
            else:
                print(f"{summary['agents']} simulated agents ready ({summary['first']} … {summary['last']}, "
                      f"state under {summary['state_dirs']}); Ctrl-C stops them", flush=True)
            return
        if fleet.exit_codes:
            return


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgefleet-agent", description="The edgefleet edge agent daemon.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("plain", "json"), default="plain")
    parser.add_argument("--version", action=VersionAction, help="print the edgefleet version")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("init-config", help="print a complete, commented config (paths made absolute)")
    p.add_argument("--agent-id", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--profile", required=True, help="firmware profile name")
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--trust", required=True, metavar="ROOT_JSON", help="root.json from `edgefleet repo init`")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--source", required=True, help="host[?period=S] | csv:PATH[?rate=R] | stdin")
    p.set_defaults(func=cmd_init_config)
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--config", required=True)
    p.add_argument("--exit-at-end", action="store_true",
                   help="stop when a csv/stdin source ends (default: keep serving deployments)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "simulate", help="run N simulated agents in this process (fleet-scale tests on one machine)",
        description="Run --count agents from one template config in this process until SIGINT or "
                    "SIGTERM. Agent i (from 0) is PREFIX-{i:04d} (PREFIX: --prefix, default the "
                    "template's agent.id) with state directory {agent.state_dir}/{agent id}; the rest "
                    "comes from the template. Each agent has its own MQTT session, state, outbox "
                    "and TUF metadata and verifies with TUF itself (in this process, at most "
                    "--concurrency passes at once); agents share one runtime session per artifact.")
    p.add_argument("--count", required=True, type=_count, help="how many agents")
    p.add_argument("--config", required=True, help="template agent config")
    p.add_argument("--prefix", help="agent id prefix (default: the template's agent.id)")
    p.add_argument("--concurrency", type=_count, default=16,
                   help="reconcile passes (TUF verification and download) at once (default 16)")
    p.add_argument("--json", action="store_true", help="print the ready and stopped lines as JSON")
    p.set_defaults(func=cmd_simulate)
    return parser


def _configure_logging(verbose: bool, fmt: str) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if fmt == "json":
        import json

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps({"ts": self.formatTime(record), "level": record.levelname,
                                   "logger": record.name, "msg": record.getMessage()})

        handler = logging.StreamHandler()
        handler.setFormatter(_Json())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("tuf", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.log_format)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
