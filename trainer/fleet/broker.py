"""Broker access control for a fleet: a Mosquitto ACL file and per-user passwords.

The rules follow the MQTT protocol v1 (``shared.topics``): each agent logs in with its agent
id as user name and may

- write only its own ``agents/{id}/state|health|events|deployments`` (its Last Will goes to its
  state topic),
- read the repository (``repo/#``) and its own ``agents/{id}/commands``;

the trainer's user may write (and read back) ``repo/#`` and every agent's ``commands``, and read
every agent's topics. Every client may use its own ``probe/{client id}/#`` (a ``pattern`` line
with ``%c``, which applies to every user), the private marker topics that retained reads publish
to and read back. Nobody else may do anything: Mosquitto denies what no rule allows once an ACL
file is set.

Mosquitto (2.0) does *not* check a client's Last Will against the ACL at connect: a Will on a
topic the user may not write is accepted and dropped when it is sent. Nor does an MQTT 3.1.1
client learn of a refused publish (the broker acknowledges and drops it); the agent connects
with MQTT 5, where the PUBACK carries 0x87 (Not authorized), and stops when its birth message is
refused (``edge_agent.daemon``).

Two forms: one ``user`` block per listed agent (only those agents get agent rights), or ``pattern``
lines with ``%u`` that give the agent rights to any authenticated user, for topics named after
that user (the password file then decides who is an agent). ``%u`` and not ``%c``: an agent
connects twice, as ``{id}`` and as ``{id}.fetch`` (its TUF fetch), with the same user name.

Passwords: :func:`create_passwords` makes one random password per user (kept if it exists, so
adding agents does not rotate the others) and the Mosquitto password file, hashed by
``mosquitto_passwd -U``: a plain-text file handed to it, never a password on a command line
(``mosquitto_passwd -b`` would show it in the process list).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.topics import TopicError, Topics, validate_agent_id

__all__ = [
    "AGENT_WRITES",
    "AclRule",
    "BrokerSetupError",
    "PasswordFiles",
    "agent_rules",
    "create_passwords",
    "probe_rule",
    "read_agent_ids",
    "render_acl",
    "trainer_rules",
    "write_private",
]

#: The per-agent topic kinds an agent publishes (``commands`` is the one it only reads).
AGENT_WRITES: tuple[str, ...] = ("state", "health", "events", "deployments")
#: Bytes of randomness in a generated password (``secrets.token_urlsafe``).
PASSWORD_BYTES = 24


class BrokerSetupError(ValueError):
    """Bad input for the broker files (an invalid user name, a clash, an unreadable list) or
    ``mosquitto_passwd`` missing or failing; one line."""


@dataclass(frozen=True)
class AclRule:
    """One Mosquitto ACL line: ``access`` is ``read``, ``write`` or ``readwrite``."""

    access: str
    topic: str


def _validate_user(name: str, what: str) -> str:
    # The agent id grammar: no whitespace, no '/', '+', '#' or '%': safe in an ACL file, in a
    # password file ('user:hash') and as a topic level.
    try:
        return validate_agent_id(name)
    except TopicError as e:
        raise BrokerSetupError(f"{what}: {e}") from e


def agent_rules(topics: Topics, agent: str) -> list[AclRule]:
    """The rules of one agent; ``agent`` may be ``%u`` (a ``pattern`` line)."""
    base = f"{topics.root}/agents/{agent}"
    return [
        *(AclRule("write", f"{base}/{kind}") for kind in AGENT_WRITES),
        AclRule("read", f"{base}/commands"),
        AclRule("read", f"{topics.root}/repo/#"),
    ]


def trainer_rules(topics: Topics) -> list[AclRule]:
    """The rules of the trainer's user (publishing, deploying, fleet status, commands)."""
    return [
        AclRule("readwrite", f"{topics.root}/repo/#"),
        AclRule("write", f"{topics.root}/agents/+/commands"),
        AclRule("read", f"{topics.root}/agents/#"),
    ]


def probe_rule(topics: Topics) -> AclRule:
    """Every client's own marker topics (a ``pattern`` line: ``%c`` is its client id)."""
    return AclRule("readwrite", f"{topics.root}/probe/%c/#")


def render_acl(topics: Topics, trainer: str, agents: Sequence[str] | None) -> str:
    """The ACL file's text. ``agents=None``: ``pattern`` lines for any user named like an agent.

    Raises:
        BrokerSetupError: an invalid or duplicated user name, or the trainer's user name among
            the agents.
    """
    trainer = _validate_user(trainer, "trainer user")
    if "%" in topics.root:
        raise BrokerSetupError(f"topic root {topics.root!r}: '%' would be a substitution in the ACL")
    probe = probe_rule(topics)
    lines = [
        f"# Mosquitto ACL for the edgefleet topic root {topics.root}.",
        "# Written by `edgefleet broker acl`; regenerate it rather than editing it.",
        "# Anything not allowed here is denied.",
        "",
        "# Every client: its own marker topics of retained reads (%c: its client id).",
        f"pattern {probe.access} {probe.topic}",
        "",
        f"user {trainer}",
        *(f"topic {r.access} {r.topic}" for r in trainer_rules(topics)),
    ]
    if agents is None:
        lines += ["", "# Agents: the user name is the agent id (any user in the password file).",
                  *(f"pattern {r.access} {r.topic}" for r in agent_rules(topics, "%u"))]
    else:
        seen: set[str] = set()
        for agent in agents:
            agent = _validate_user(agent, "agent id")
            if agent == trainer:
                raise BrokerSetupError(f"agent id {agent!r} is the trainer's user name: use another")
            if agent in seen:
                raise BrokerSetupError(f"agent id {agent!r} is listed twice")
            seen.add(agent)
            lines += ["", f"user {agent}",
                      *(f"topic {r.access} {r.topic}" for r in agent_rules(topics, agent))]
    return "\n".join(lines) + "\n"


def read_agent_ids(path: Path) -> list[str]:
    """Agent ids from a text file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        BrokerSetupError: the file cannot be read, or a line is not a valid agent id.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BrokerSetupError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(_validate_user(line, f"{path}:{number}"))
    return ids


def write_private(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically with permissions ``mode`` (default: its owner
    only): a temp file in the same directory, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _passwords(store: Path, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Each user's password: the one in ``store/{user}.password`` if it exists, else a new
    random one (returned in the second item, not written yet)."""
    passwords: dict[str, str] = {}
    created = []
    for user in names:
        path = store / f"{user}.password"
        if path.exists():
            passwords[user] = path.read_text(encoding="utf-8").strip()
            if not passwords[user]:
                raise BrokerSetupError(f"{path} is empty: delete it to make a new password")
        else:
            passwords[user] = secrets.token_urlsafe(PASSWORD_BYTES)
            created.append(user)
    return passwords, created


def _hash_in_place(tool: str, plain: str, timeout: float) -> None:
    """Run ``mosquitto_passwd -U`` on the plain-text file ``plain``."""
    try:
        proc = subprocess.run([tool, "-U", plain], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BrokerSetupError(f"{tool} -U did not finish within {timeout:g} s") from None
    except OSError as e:
        raise BrokerSetupError(f"cannot run {tool}: {e.strerror or e}") from e
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BrokerSetupError(f"{tool} -U failed: {detail[-1] if detail else proc.returncode}")


def _keep_owner_and_mode(old: Path, new: Path) -> None:
    """Give ``new`` the owner, group and mode of ``old`` if it exists, so that replacing a
    password file Mosquitto reads (``chown mosquitto``) keeps it readable by Mosquitto.

    Raises:
        BrokerSetupError: this user may not give ``new`` that owner or group.
    """
    try:
        st = old.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise BrokerSetupError(f"cannot read the owner of {old}: {e.strerror or e}") from e
    try:
        current = new.stat()
        if (current.st_uid, current.st_gid) != (st.st_uid, st.st_gid):
            os.chown(new, st.st_uid, st.st_gid)
        os.chmod(new, stat.S_IMODE(st.st_mode))
    except PermissionError:
        raise BrokerSetupError(
            f"cannot keep the owner of {old} (uid {st.st_uid}, gid {st.st_gid}) on its new version: "
            "run as root or as that user") from None
    except OSError as e:
        raise BrokerSetupError(f"cannot write in {new.parent}: {e.strerror or e}") from e


@dataclass(frozen=True)
class PasswordFiles:
    """What :func:`create_passwords` wrote: the broker's hashed ``password_file`` and one
    plain-text password file per user (``credentials/{user}.password``, mode 0600), with the
    users whose password was made now (the others were kept)."""

    password_file: Path
    credentials: dict[str, Path]
    created: tuple[str, ...]


def create_passwords(
    out_dir: Path, users: Iterable[str], *, mosquitto_passwd: str | None = None, timeout: float = 60.0
) -> PasswordFiles:
    """Give every user a password and write the Mosquitto password file ``out_dir/passwd``.

    A user whose ``credentials/{user}.password`` exists keeps it. The password file lists
    exactly ``users`` and is replaced atomically, keeping the owner, group and mode of the file
    it replaces (a new one is 0600, owned by this user); nothing is written when an input is
    bad or ``mosquitto_passwd`` fails.

    ``timeout``: seconds ``mosquitto_passwd`` may take.

    Raises:
        BrokerSetupError: invalid or duplicated user names, ``mosquitto_passwd`` missing or
            failing, ``out_dir`` not writable, or the old password file's owner cannot be
            kept.
    """
    names: list[str] = []
    for user in users:
        user = _validate_user(user, "user name")
        if user in names:
            raise BrokerSetupError(f"user {user!r} is listed twice")
        names.append(user)
    if not names:
        raise BrokerSetupError("no user given")
    tool = mosquitto_passwd or shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists() and shutil.which(tool) is None:
        raise BrokerSetupError(f"{tool} not found: install mosquitto (it ships mosquitto_passwd)")
    if Path(tool).exists() and not (Path(tool).is_file() and os.access(tool, os.X_OK)):
        raise BrokerSetupError(f"{tool} is not an executable program")
    store = out_dir / "credentials"
    final = out_dir / "passwd"
    try:
        passwords, created = _passwords(store, names)
        fd, plain = tempfile.mkstemp(dir=out_dir, prefix=".passwd.")  # 0600 from mkstemp
    except OSError as e:
        raise BrokerSetupError(f"cannot write in {out_dir}: {e.strerror or e}") from e
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(f"{user}:{passwords[user]}\n" for user in names)
        except OSError as e:
            raise BrokerSetupError(f"cannot write in {out_dir}: {e.strerror or e}") from e
        _hash_in_place(tool, plain, timeout)
        _keep_owner_and_mode(final, Path(plain))
        try:
            # Only now, once the password file is ready: a failure before leaves nothing behind.
            store.mkdir(exist_ok=True, mode=0o700)
            for user in created:
                write_private(store / f"{user}.password", passwords[user] + "\n")
            os.replace(plain, final)
        except OSError as e:
            raise BrokerSetupError(f"cannot write in {out_dir}: {e.strerror or e}") from e
    finally:
        Path(plain).unlink(missing_ok=True)
    return PasswordFiles(final, {u: store / f"{u}.password" for u in names}, tuple(created))
