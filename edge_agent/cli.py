"""``edgefleet-agent``: init-config, check-config, run.

Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error, 3 the broker
refused the credentials or its TLS certificate failed verification (retrying would not help),
130 interrupted before start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from shared.version import VersionAction

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
    agent = Agent(config)
    agent.install_signal_handlers()
    return agent.run(exit_at_end=args.exit_at_end)


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
