"""``edgefleet repo …``, ``edgefleet deploy`` and ``edgefleet fleet status``.

Added to the main parser by :func:`add_fleet_commands`. Commands report their own errors (one
line on stderr, ``edgefleet: error: …``) and return the exit code: 2 for bad input (bad broker
URL, bad credentials, unknown model, no repository), 1 when the work failed (broker
unreachable, a publish not acknowledged). They do not raise ``trainer.cli.UsageError``: under
``python -m trainer.cli`` that module runs as ``__main__``, and a second import of it would
define a different ``UsageError`` class that ``main()`` does not catch.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from trainer.cli_common import EXIT_FAILED, EXIT_USAGE, positive_float, positive_int, print_json

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["add_fleet_commands"]

PASSWORD_ENV = "EDGEFLEET_MQTT_PASSWORD"
PROG = "edgefleet"
#: ``repo refresh`` warns when root.json expires sooner than this.
ROOT_EXPIRY_WARNING = timedelta(days=30)


class _CommandError(Exception):
    """An error a fleet command reports as one line with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _usage(message: str) -> _CommandError:
    return _CommandError(message, EXIT_USAGE)


def _failed(message: str) -> _CommandError:
    return _CommandError(message, EXIT_FAILED)


def _command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the domain errors of a fleet command into one line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from edge_agent.mqtt import BrokerAuthError, BrokerError
        from trainer.fleet.deploy import DeployError
        from trainer.fleet.publisher import PublishError
        from trainer.registry import RegistryError

        try:
            return func(args)
        except _CommandError as e:
            message, code = str(e), e.exit_code
        except (DeployError, RegistryError, BrokerAuthError) as e:
            message, code = str(e), EXIT_USAGE
        except (BrokerError, PublishError) as e:
            message, code = str(e), EXIT_FAILED
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code

    run.__doc__ = func.__doc__
    return run


# -- broker connection ------------------------------------------------------------------------


def _broker_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("broker")
    g.add_argument(
        "--broker",
        required=required,
        metavar="URL",
        help="mqtt://HOST[:PORT] (1883) or mqtts://HOST[:PORT] (8883, TLS)",
    )
    g.add_argument("--username", help="MQTT user name")
    g.add_argument(
        "--password-file",
        metavar="FILE",
        help=f"file holding the MQTT password (default: ${PASSWORD_ENV})",
    )
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle for mqtts:// (default: system)")
    g.add_argument("--cert-file", metavar="FILE", help="client certificate for mqtts://")
    g.add_argument("--key-file", metavar="FILE", help="client private key for mqtts://")
    g.add_argument("--topic-root", default="edgefleet/v1", help="topic prefix (default: %(default)s)")
    g.add_argument(
        "--broker-timeout",
        type=positive_float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the broker to connect or acknowledge (default: %(default)s)",
    )


def _chunk_size_arg(p: argparse.ArgumentParser) -> None:
    from shared.chunking import DEFAULT_CHUNK_SIZE

    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help="bytes per retained target chunk; keep it under the broker's message size limit "
        "(default: %(default)s)",
    )


def _non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _topics(args: argparse.Namespace):
    from shared.topics import TopicError, Topics

    try:
        return Topics(root=args.topic_root)
    except TopicError as e:
        raise _usage(str(e)) from e


def _check_broker(args: argparse.Namespace) -> str | None:
    """Check everything about the broker connection that is the user's input; return the password.

    Run before any work, so that bad input changes nothing: the URL, the credentials (a
    password needs ``--username``), and the TLS files (present, readable, PEM; only with
    ``mqtts://``).
    """
    from edge_agent.mqtt import BrokerError, TlsFileError, check_tls_files, parse_broker_url

    try:
        scheme, _host, _port = parse_broker_url(args.broker)
    except BrokerError as e:
        raise _usage(str(e)) from e
    password = _password(args)
    if password is not None and args.username is None:
        if args.password_file:
            raise _usage("--password-file is given but --username is not: add --username USER")
        raise _usage(
            f"${PASSWORD_ENV} is set but --username is not: add --username USER, or unset "
            f"{PASSWORD_ENV} for a broker that takes anonymous clients"
        )
    tls = {"ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
    given = [f"--{k.replace('_', '-')}" for k, v in tls.items() if v is not None]
    if given and scheme != "mqtts":
        raise _usage(f"{given[0]} needs an mqtts:// broker URL, not {scheme}://")
    try:
        check_tls_files(**tls)
    except TlsFileError as e:
        raise _usage(f"--{e.field.replace('_', '-')}: {e}") from e
    return password


def _password(args: argparse.Namespace) -> str | None:
    """``--password-file`` if given, else ``$EDGEFLEET_MQTT_PASSWORD`` (empty counts as unset)."""
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as e:
            raise _usage(f"cannot read --password-file {args.password_file}: {e.strerror}") from e
    return os.environ.get(PASSWORD_ENV) or None


@contextmanager
def _connected(args: argparse.Namespace) -> Iterator[mqtt.Client]:
    """A connected client for the command; always disconnected afterwards."""
    from edge_agent.mqtt import connect

    password = _check_broker(args)
    client = connect(
        args.broker,
        client_id=f"edgefleet-cli-{uuid.uuid4().hex[:12]}",
        username=args.username,
        password=password,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        timeout=args.broker_timeout,
    )
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


# -- repo -------------------------------------------------------------------------------------


@_command
def cmd_repo_init(args: argparse.Namespace) -> int:
    """Create the TUF repository beside the registry; print the root.json agents trust."""
    from trainer.fleet.deploy import init_repository, repository_path

    repo = init_repository(args.registry, args.root_key_dir)
    root = str(repo.root_json_path)
    if args.json:
        print_json({"root": root, "repository": str(repository_path(args.registry))})
    else:
        print(f"created TUF repository {repository_path(args.registry)}")
        print(f"agents bootstrap from {root}")
        print(f"root key: {repo.root_key_dir / 'root.pem'} (move it offline)")
    return 0


def _publish_summary(report: Any) -> dict[str, Any]:
    return {
        "published_targets": report.published_targets,
        "skipped_targets": report.skipped_targets,
        "published_metadata": report.published_metadata,
        "skipped_metadata": report.skipped_metadata,
        "index_published": report.index_published,
        "cleared_topics": report.cleared_topics,
        "messages": report.messages,
        "bytes": report.bytes,
    }


def _print_publish(report: Any) -> None:
    print(
        f"published {len(report.published_targets)} target(s) "
        f"({len(report.skipped_targets)} already there), "
        f"{len(report.published_metadata)} metadata file(s), "
        f"cleared {len(report.cleared_topics)} stale topic(s): "
        f"{report.messages} message(s), {report.bytes} bytes"
    )


@_command
def cmd_repo_publish(args: argparse.Namespace) -> int:
    """Make the broker's retained repo topics mirror the repository (idempotent; GC)."""
    from trainer.fleet.deploy import open_repository, repository_lock
    from trainer.fleet.publisher import publish_repository

    _check_broker(args)
    topics = _topics(args)
    open_repository(args.registry)
    with repository_lock(args.registry):
        repo = open_repository(args.registry)
        with _connected(args) as client:
            report = publish_repository(
                repo, client, topics, chunk_size=args.chunk_size, timeout=args.broker_timeout
            )
    if args.json:
        print_json(_publish_summary(report))
    else:
        _print_publish(report)
    return 0


@_command
def cmd_repo_refresh(args: argparse.Namespace) -> int:
    """Re-sign timestamp (and snapshot/targets when they would expire first); publish."""
    from trainer.fleet.deploy import open_repository, repository_lock
    from trainer.fleet.publisher import publish_repository

    if args.broker is not None:
        _check_broker(args)
    topics = _topics(args)
    open_repository(args.registry)
    with repository_lock(args.registry):
        repo = open_repository(args.registry)
        renewed = repo.refresh()
        versions, expiries = repo.versions(), repo.expiries()
        report = None
        if args.broker is not None:
            with _connected(args) as client:
                report = publish_repository(
                    repo, client, topics, chunk_size=args.chunk_size, timeout=args.broker_timeout
                )
    root_expires = expiries["root"]
    if root_expires - datetime.now(UTC) < ROOT_EXPIRY_WARNING:
        # The online keys cannot renew root: say so while there is time to do it offline.
        print(
            f"{PROG}: warning: root.json expires {_iso(root_expires)}: sign a new root with "
            "`edgefleet repo rotate-root --root-key-dir DIR`",
            file=sys.stderr,
        )
    if args.json:
        out: dict[str, Any] = {"renewed": renewed, "versions": versions}
        out["expires"] = {role: _iso(t) for role, t in expiries.items()}
        out["published"] = None if report is None else _publish_summary(report)
        print_json(out)
    else:
        print(f"re-signed {', '.join(renewed)} (timestamp v{versions['timestamp']})")
        _print_published(report)
    return 0


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_published(report: Any) -> None:
    if report is not None:
        _print_publish(report)
    else:
        print("not published: run with --broker, or `edgefleet repo publish`")


def _versions_list(versions: tuple[int, ...]) -> str:
    return ", ".join(map(str, versions)) or "-"


@_command
def cmd_repo_prune(args: argparse.Namespace) -> int:
    """Retire old bundles: keep what deployments use plus --keep rollback versions per model."""
    from trainer.fleet.deploy import open_repository
    from trainer.fleet.prune import prune

    publish = args.broker is not None and not args.dry_run
    if publish:
        _check_broker(args)
    topics = _topics(args)
    open_repository(args.registry)
    if publish:
        with _connected(args) as client:
            report = prune(
                args.registry, keep=args.keep, client=client, topics=topics,
                chunk_size=args.chunk_size, timeout=args.broker_timeout,
            )
    else:
        report = prune(args.registry, keep=args.keep, dry_run=args.dry_run)
    plan = report.plan
    if args.json:
        out: dict[str, Any] = plan.to_json()
        out.update(
            dry_run=report.dry_run,
            keep=args.keep,
            versions=dict(report.versions),
            deleted_files=report.deleted_files,
            published=None if report.publish is None else _publish_summary(report.publish),
        )
        print_json(out)
        return 0
    for model, used in plan.in_use.items():
        print(
            f"{model}: in use {_versions_list(used)}; kept for rollback "
            f"{_versions_list(plan.rollback[model])}; "
            f"{'would prune' if report.dry_run else 'pruned'} "
            f"{_versions_list(plan.removed_versions.get(model, ()))}"
        )
    if report.dry_run:
        print(f"dry run: would remove {len(plan.remove)} target(s); nothing changed")
        for target in plan.remove:
            print(f"  {target}")
        return 0
    print(
        f"removed {len(plan.remove)} target(s), deleted {report.deleted_files} file(s) "
        f"(targets v{report.versions['targets']})"
    )
    _print_published(report.publish)
    return 0


def _key_roles(text: str) -> tuple[str, ...]:
    """argparse type of ``--new-keys``: ``all`` or comma-separated role names."""
    from trainer.fleet.tuf_repository import ROLES

    if text == "all":
        return ROLES
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = sorted(set(roles) - set(ROLES))
    if not roles or unknown:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or some of {','.join(ROLES)}, got {text!r}"
        )
    return roles


@_command
def cmd_repo_rotate_root(args: argparse.Namespace) -> int:
    """Sign a new root version (optionally with new keys), re-sign, publish."""
    from trainer.fleet.deploy import open_repository, repository_lock
    from trainer.fleet.publisher import publish_repository
    from trainer.fleet.tuf_repository import RepositoryError

    if args.broker is not None:
        _check_broker(args)
    topics = _topics(args)
    new_keys = args.new_keys or ()
    # A wrong --root-key-dir is refused before the lock is taken (it creates tuf/.lock).
    key_dir = open_repository(args.registry, args.root_key_dir).root_key_dir
    if not (key_dir / "root.pem").exists() and not (key_dir / "root.pem.next").exists():
        raise _usage(
            f"no root key at {key_dir / 'root.pem'}: pass the directory given to "
            "`repo init --root-key-dir`"
        )
    with repository_lock(args.registry):
        repo = open_repository(args.registry, args.root_key_dir)
        try:
            renewed = repo.rotate_root(
                new_keys=new_keys,
                expires=None if args.expires is None else timedelta(days=args.expires),
            )
        except RepositoryError as e:
            raise _usage(str(e)) from e
        versions, expiries = repo.versions(), repo.expiries()
        report = None
        if args.broker is not None:
            with _connected(args) as client:
                report = publish_repository(
                    repo, client, topics, chunk_size=args.chunk_size, timeout=args.broker_timeout
                )
    if args.json:
        print_json({
            "renewed": renewed,
            "new_keys": list(new_keys),
            "versions": versions,
            "expires": {role: _iso(t) for role, t in expiries.items()},
            "root": str(repo.root_json_path),
            "published": None if report is None else _publish_summary(report),
        })
    else:
        keys = f"new keys for {', '.join(new_keys)}" if new_keys else "same keys"
        print(
            f"signed root v{versions['root']} ({keys}), expires {_iso(expiries['root'])}; "
            f"re-signed {', '.join(renewed[1:])}"
        )
        print(f"new agents bootstrap from {repo.root_json_path}; running agents follow the chain")
        _print_published(report)
    return 0


# -- deploy -----------------------------------------------------------------------------------


@_command
def cmd_deploy(args: argparse.Namespace) -> int:
    """Deploy MODEL@VERSION to a group or one agent and publish it (``--shadow``: as the
    slot's shadow candidate; ``--clear-shadow``: remove the slot's shadow candidate)."""
    from shared.deployment import DeploymentError, scope_target
    from trainer.fleet.deploy import (
        clear_shadow,
        deploy,
        open_repository,
        plan_deployment,
        plan_shadow_removal,
    )
    from trainer.registry import Registry, parse_model_ref

    _check_broker(args)
    topics = _topics(args)
    if args.clear_shadow and args.ref is not None:
        raise _usage("--clear-shadow takes no MODEL@VERSION: it removes the slot's shadow")
    if not args.clear_shadow and args.ref is None:
        raise _usage("give MODEL@VERSION to deploy (or --clear-shadow to remove a shadow)")
    try:
        scope = scope_target(group=args.group, agent=args.agent)
    except DeploymentError as e:
        raise _usage(str(e)) from e
    # Everything that is the user's input is checked before connecting.
    if args.clear_shadow:
        with Registry.open(args.registry) as reg:
            if not args.force:
                _refuse_during_rollout(reg, group=args.group, agent=args.agent)
        plan_shadow_removal(open_repository(args.registry), scope, args.slot)
    else:
        name, version = parse_model_ref(args.ref)
        with Registry.open(args.registry) as reg:
            reg.get(name, version)
            if not args.force:
                _refuse_during_rollout(reg, group=args.group, agent=args.agent)
            repo = open_repository(args.registry)
            if args.shadow:  # the slot must serve a model to shadow (a dry run, nothing written)
                plan_deployment(reg, repo, args.ref, scope, args.slot, shadow=True)
    with _connected(args) as client:
        common: dict[str, Any] = dict(group=args.group, agent=args.agent, slot=args.slot, client=client,
                                      topics=topics, chunk_size=args.chunk_size,
                                      timeout=args.broker_timeout)
        if args.clear_shadow:
            report = clear_shadow(args.registry, **common)
        else:
            report = deploy(args.registry, args.ref, shadow=args.shadow, **common)
    if args.json:
        print_json(report.to_json())
    else:
        scope = report.scope
        what = {"active": "deployed", "shadow": "deployed as shadow",
                "shadow-cleared": "cleared the shadow"}[report.role]
        print(
            f"{what} {report.model}@{report.version} {'of' if report.role == 'shadow-cleared' else 'to'} "
            f"{scope.kind} {scope.name} "
            f"(slot {report.slot}, serial {report.serial}) as {report.document_target}"
        )
        for target in report.bundle_targets:
            print(f"  {target}")
        _print_publish(report.publish)
    return 0


def _refuse_during_rollout(reg: Any, *, group: str | None, agent: str | None) -> None:
    """A deploy to a group (or an agent of a group) that a running rollout holds would be
    undone by the rollout's promotion or rollback: refuse it."""
    from trainer.fleet.rollout.store import RolloutStore

    held = RolloutStore(reg).holding(group=group, agent=agent)
    if held is not None:
        what = f"group {group}" if group is not None else f"agent {agent} (group {held.group})"
        raise _usage(
            f"rollout {held.id} of {held.ref} holds {what}: let it finish, or "
            f"`edgefleet rollout abort {held.id}` (or deploy with --force)"
        )


# -- fleet ------------------------------------------------------------------------------------


@_command
def cmd_fleet_status(args: argparse.Namespace) -> int:
    """Show every agent's state, running models, last deployment and health."""
    from trainer.fleet.status import read_fleet

    _check_broker(args)
    topics = _topics(args)
    with _connected(args) as client:
        views = read_fleet(client, topics, timeout=args.timeout)
    if args.json:
        print_json([v.to_json() for v in views])
        return 0
    if not views:
        print("no agents have reported")
        return 0
    rows = [_status_row(v) for v in views]
    header = ("AGENT", "STATUS", "GROUP", "PROFILE", "ACTIVE", "LAST DEPLOYMENT", "HEALTH", "DRIFT",
              "SHADOW", "SINCE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _status_row(v: Any) -> tuple[str, ...]:
    active = ", ".join(
        f"{a['slot']}={a['model']}@{a['version']}/{a['format']}-{a['quantization']}"
        for a in v.active
    ) or "-"
    last = "-"
    if v.last_deployment is not None:
        d = v.last_deployment
        last = f"{d['model']}@{d['version']} {d['state']}"
        if d.get("reason"):
            last += f" ({d['reason']})"
    health = "-"
    if v.health is not None:
        h = v.health
        p99 = h["latency_ms"].get("p99")
        age = "" if v.health_age_s is None else f"{_ago(v.health_age_s)}: "
        health = (
            f"{age}p99 {'-' if p99 is None else f'{p99:.2f}'} ms, {h['inferences']} inf, "
            f"{h['anomalies']} anom, {h['errors']} err"
        )
    notes = [n for n, on in (("stale", v.stale), ("emulated", v.emulated)) if on]
    status = v.status + (f" ({', '.join(notes)})" if notes else "")
    return (v.agent, status, v.group or "-", v.profile, active, last, health, _drift_cell(v.drift),
            _shadow_cell(v.shadow), v.ts)


def _shadow_cell(shadow: dict[str, dict[str, Any]] | None) -> str:
    """``-`` (no shadow), ``host@2 FAILED (reason)`` or ``host@2 agree 97.1% r 0.93 (1200 samples,
    3 active-only, 5 shadow-only, p99 0.41 ms)``; prefixed by the slot when several run one."""
    if not shadow:
        return "-"
    cells = []
    for slot, d in shadow.items():
        name = f"{d['model']}@{d['version']}"
        if d["state"] == "failed":
            cell = f"{name} FAILED ({d.get('reason') or 'no reason given'})"
        else:
            agreement = "-" if d["agreement"] is None else f"{100 * d['agreement']:.1f}%"
            r = "-" if d["correlation"] is None else f"{d['correlation']:.2f}"
            p99 = "-" if d["latency_p99_ms"] is None else f"{d['latency_p99_ms']:.2f}"
            cell = (f"{name} agree {agreement} r {r} ({d['samples']} samples, "
                    f"{d['active_only']} active-only, {d['shadow_only']} shadow-only, p99 {p99} ms)")
        cells.append(cell if len(shadow) == 1 else f"{slot}: {cell}")
    return "; ".join(cells)


def _drift_cell(drift: dict[str, dict[str, Any]] | None) -> str:
    """``-`` (not reported), ``n/a``, ``filling 120/1000``, ``ok (psi 0.03)`` or
    ``DRIFTED cpu,(score) (psi 0.61)`` (the series drifting now, ``(score)`` for the raw score,
    which no feature name can be mistaken for; none named while the state
    waits, with hysteresis, for the PSI to fall below the clear bound); prefixed by the slot when an agent serves several."""
    if not drift:
        return "-"
    cells = []
    for slot, d in drift.items():
        psi = "" if d.get("psi_max") is None else f" (psi {d['psi_max']:.2f})"
        if not d["available"]:
            cell = "n/a"
        elif d.get("drifted"):
            names = ",".join([*(d.get("drifted_features") or []), *(["(score)"] if d.get("score_drifted") else [])])
            cell = f"DRIFTED{' ' + names if names else ''}{psi}"
        elif d.get("fill") is not None and d.get("window") and d["fill"] < d["window"]:
            cell = f"filling {d['fill']}/{d['window']}"
        else:
            cell = f"ok{psi}"
        cells.append(cell if len(drift) == 1 else f"{slot}: {cell}")
    return "; ".join(cells)


def _ago(seconds: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago`` (rounded down)."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


# -- parser -----------------------------------------------------------------------------------


def add_fleet_commands(
    sub: argparse._SubParsersAction,
    registry_arg: Callable[[argparse.ArgumentParser], None],
    json_arg: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``repo init|publish|refresh|prune|rotate-root``, ``deploy`` and ``fleet status``.

    ``registry_arg`` / ``json_arg`` add the main parser's ``--registry`` and ``--json``.
    """
    repo_parser = sub.add_parser("repo", help="the TUF repository agents verify deployments with")
    repo = repo_parser.add_subparsers(
        dest="repo_command", required=True, parser_class=type(repo_parser)
    )
    p = repo.add_parser("init", help="create the TUF repository beside the registry")
    registry_arg(p)
    p.add_argument(
        "--root-key-dir",
        metavar="DIR",
        help="where to write the root private key (default: REGISTRY/tuf/keys; keep it offline)",
    )
    json_arg(p)
    p.set_defaults(func=cmd_repo_init)

    p = repo.add_parser("publish", help="re-sync the broker's retained repository (idempotent)")
    registry_arg(p)
    _broker_args(p, required=True)
    _chunk_size_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_repo_publish)

    p = repo.add_parser("refresh", help="re-sign timestamp/snapshot before they expire")
    registry_arg(p)
    _broker_args(p, required=False)
    _chunk_size_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_repo_refresh)

    p = repo.add_parser(
        "prune",
        help="retire old bundles: keep what deployments use plus rollback versions",
        description="Remove from the repository (and, with --broker, from the broker) the "
        "bundles of every model version that no deployment document uses, except the --keep "
        "newest of each model. A pruned version can be deployed again.",
    )
    registry_arg(p)
    p.add_argument(
        "--keep", type=_non_negative_int, default=2, metavar="N",
        help="versions kept per model besides those in use, for rollback (default: %(default)s)",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")
    _broker_args(p, required=False)
    _chunk_size_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_repo_prune)

    p = repo.add_parser(
        "rotate-root",
        help="sign a new root version (renews its expiry; optionally new keys)",
        description="Sign root version N+1 with the current root key (and the new one), so "
        "that agents holding version N accept it. Needs the root private key.",
    )
    registry_arg(p)
    p.add_argument(
        "--root-key-dir", metavar="DIR",
        help="where the root private key is (default: REGISTRY/tuf/keys)",
    )
    p.add_argument(
        "--new-keys", nargs="?", const="all", type=_key_roles, metavar="ROLES",
        help="new keys for 'all' roles (the default when given alone) or for some of "
        "root,targets,snapshot,timestamp (comma-separated)",
    )
    p.add_argument(
        "--expires", type=positive_int, metavar="DAYS",
        help="days until the new root expires (default: 365)",
    )
    _broker_args(p, required=False)
    _chunk_size_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_repo_rotate_root)

    p = sub.add_parser("deploy", help="deploy MODEL@VERSION to a group or an agent")
    p.add_argument("ref", metavar="MODEL@VERSION", nargs="?",
                   help="what to deploy (MODEL alone: latest); omitted with --clear-shadow")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--group", metavar="G", help="every agent of group G")
    scope.add_argument("--agent", metavar="ID", help="one agent (overrides its group's document)")
    p.add_argument("--slot", default="default", help="model slot (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="deploy even while a rollout holds the group (the rollout's promotion "
                   "or rollback may overwrite it)")
    role = p.add_mutually_exclusive_group()
    role.add_argument(
        "--shadow", action="store_true",
        help="run it as the slot's shadow candidate: beside the slot's model on the same "
             "samples, emitting no events; agents report decision agreement and score "
             "correlation (fleet status)")
    role.add_argument("--clear-shadow", action="store_true",
                      help="remove the slot's shadow candidate (no MODEL@VERSION)")
    registry_arg(p)
    _broker_args(p, required=True)
    _chunk_size_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_deploy)

    fleet_parser = sub.add_parser("fleet", help="what the agents report")
    fleet = fleet_parser.add_subparsers(
        dest="fleet_command", required=True, parser_class=type(fleet_parser)
    )
    p = fleet.add_parser("status", help="every agent's state, models, last deployment, health")
    _broker_args(p, required=True)
    p.add_argument(
        "--timeout", type=positive_float, default=10.0, metavar="S",
        help="seconds to wait for the retained messages (default: %(default)s)",
    )
    json_arg(p)
    p.set_defaults(func=cmd_fleet_status)
