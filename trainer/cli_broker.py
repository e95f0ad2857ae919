"""``edgefleet broker acl`` and ``edgefleet broker passwd``: the broker's access-control files.

Bad input (an invalid agent id, a clash with the trainer's user name, an unreadable agents
file, ``mosquitto_passwd`` missing) is one line on stderr and exit code 2, before anything is
written. See ``docs/security.md`` for deploying the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trainer.cli_common import UsageError, print_json

__all__ = ["add_broker_commands"]

DEFAULT_TRAINER_USER = "trainer"


def _topics(args: argparse.Namespace) -> Any:
    from shared.topics import TopicError, Topics

    try:
        return Topics(root=args.topic_root)
    except TopicError as e:
        raise UsageError(f"--topic-root: {e}") from e


def _agent_ids(args: argparse.Namespace) -> list[str] | None:
    """The agents from ``--agent`` and ``--agents-file``; ``None`` for ``--any-agent``."""
    from trainer.fleet.broker import BrokerSetupError, read_agent_ids

    if getattr(args, "any_agent", False):
        if args.agent or args.agents_file:
            raise UsageError("--any-agent does not take --agent or --agents-file: give one or the other")
        return None
    agents = list(args.agent or [])
    try:
        for path in args.agents_file or []:
            agents += read_agent_ids(Path(path))
    except BrokerSetupError as e:
        raise UsageError(f"--agents-file: {e}") from e
    if not agents:
        hint = ", or --any-agent" if hasattr(args, "any_agent") else ""
        raise UsageError(f"no agent given: use --agent ID or --agents-file FILE{hint}")
    return agents


def cmd_broker_acl(args: argparse.Namespace) -> int:
    """Write the Mosquitto ACL file for the trainer's user and the agents."""
    from trainer.fleet.broker import BrokerSetupError, render_acl, write_private

    topics = _topics(args)
    agents = _agent_ids(args)
    try:
        text = render_acl(topics, args.trainer_user, agents)
    except BrokerSetupError as e:
        raise UsageError(str(e)) from e
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out: no such directory {out.parent}")
    try:
        write_private(out, text, mode=0o644)  # no secret in it; the broker's user reads it
    except OSError as e:
        raise UsageError(f"--out: cannot write {out}: {e.strerror or e}") from e
    summary = {
        "acl_file": str(out.absolute()),
        "topic_root": topics.root,
        "trainer_user": args.trainer_user,
        "mode": "pattern" if agents is None else "per-agent",
        "agents": agents if agents is not None else [],
    }
    if args.json:
        print_json(summary)
    else:
        who = "any user named like an agent" if agents is None else f"{len(agents)} agent(s)"
        print(f"wrote {out} for trainer user {args.trainer_user!r} and {who} under {topics.root}")
        print(f"Mosquitto: acl_file {out.absolute()}")
    return 0


def cmd_broker_passwd(args: argparse.Namespace) -> int:
    """Make the per-user password files and the Mosquitto password file."""
    from trainer.fleet.broker import BrokerSetupError, create_passwords

    agents = _agent_ids(args)
    assert agents is not None
    if args.trainer_user in agents:
        raise UsageError(f"agent id {args.trainer_user!r} is the trainer's user name: use another")
    out = Path(args.out_dir)
    if not out.is_dir():
        raise UsageError(f"--out-dir: {out} is not a directory")
    try:
        files = create_passwords(out, [args.trainer_user, *agents], mosquitto_passwd=args.mosquitto_passwd)
    except BrokerSetupError as e:
        raise UsageError(str(e)) from e
    summary = {
        "password_file": str(files.password_file.absolute()),
        "credentials": {user: str(path.absolute()) for user, path in files.credentials.items()},
        "created": list(files.created),
        "kept": [u for u in files.credentials if u not in files.created],
    }
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {files.password_file} ({len(files.credentials)} users, "
              f"{len(files.created)} new password(s))")
        print(f"Mosquitto: password_file {files.password_file.absolute()}")
        print(f"agents: username = AGENT_ID, password_file = {out.absolute() / 'credentials'}/AGENT_ID.password")
    return 0


def _common(p: argparse.ArgumentParser, json_arg: Any) -> None:
    p.add_argument("--agent", action="append", metavar="ID", help="an agent id (repeatable)")
    p.add_argument("--agents-file", action="append", metavar="FILE",
                   help="a file of agent ids, one per line, '#' comments (repeatable)")
    p.add_argument("--trainer-user", default=DEFAULT_TRAINER_USER, metavar="USER",
                   help="the trainer's MQTT user name (default: %(default)s)")
    json_arg(p)


def add_broker_commands(sub: Any, json_arg: Any) -> None:
    """Register ``broker acl`` and ``broker passwd`` on the ``edgefleet`` subparsers."""
    parent = sub.add_parser("broker", help="Mosquitto access control for the fleet (ACL, passwords)")
    broker = parent.add_subparsers(dest="broker_command", required=True, parser_class=type(parent))
    p = broker.add_parser(
        "acl", help="write the Mosquitto ACL file: agents write only their own topics",
        description="Write a Mosquitto ACL file (acl_file): each agent, logged in with its agent id as user "
        "name, may write only its own agents/ID/state|health|events|deployments and read repo/# and its own "
        "commands; the trainer's user may write repo/# and commands and read every agent's topics. "
        "--any-agent writes `pattern` lines with %u instead of one block per agent (docs/security.md).")
    p.add_argument("--out", required=True, metavar="FILE", help="the ACL file to write (replaced atomically)")
    p.add_argument("--topic-root", default="edgefleet/v1", help="topic prefix (default: %(default)s)")
    p.add_argument("--any-agent", action="store_true",
                   help="rules for any user (user name = agent id) instead of listed agents")
    _common(p, json_arg)
    p.set_defaults(func=cmd_broker_acl)
    p = broker.add_parser(
        "passwd", help="make per-user passwords and the Mosquitto password file",
        description="Give the trainer's user and every agent a random password (kept when its file exists) in "
        "OUT_DIR/credentials/USER.password (mode 0600), and write OUT_DIR/passwd, the Mosquitto password_file, "
        "hashed by mosquitto_passwd.")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where to write (an existing directory)")
    p.add_argument("--mosquitto-passwd", metavar="PROGRAM",
                   help="the mosquitto_passwd program (default: found on PATH)")
    _common(p, json_arg)
    p.set_defaults(func=cmd_broker_passwd)
