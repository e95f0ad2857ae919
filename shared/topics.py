"""MQTT topic names of protocol v1: the one place topic strings are built and parsed.

Layout (``root`` defaults to ``edgefleet/v1``)::

    {root}/agents/{agent}/state|health|events|deployments|commands
    {root}/repo/index                              retained list of repository files
    {root}/repo/metadata/{filename}                TUF metadata (consistent snapshots)
    {root}/repo/targets/{path}/index               chunk index of a target file
    {root}/repo/targets/{path}/chunks/{i}          chunk ``i`` of a target file
    {root}/probe/{client_id}/{token}               private marker topic of one reader

Nothing outside this module slices topic strings by hand. Standard library only; importing it
has no side effects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "AGENT_KINDS",
    "MAX_TARGET_DEPTH",
    "RepoTopic",
    "TopicError",
    "Topics",
    "validate_agent_id",
    "validate_path",
]

#: The per-agent topic kinds of protocol v1.
AGENT_KINDS: tuple[str, ...] = ("state", "health", "events", "deployments", "commands")

_AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FORBIDDEN = ("+", "#", "\x00")
# MQTT topics are at most 65535 bytes; leave room for the root and the suffixes.
_MAX_PATH_BYTES = 60000
#: Most levels a repository target path may have. MQTT's ``#`` can only end a filter, so a
#: reader lists every target's chunk index, without receiving any chunk, with one ``+``
#: filter per depth (:meth:`Topics.repo_target_indexes`); a bound keeps that list short.
MAX_TARGET_DEPTH = 8


class TopicError(ValueError):
    """A topic, agent id or path that protocol v1 does not allow."""


def validate_agent_id(agent: str) -> str:
    """Return ``agent`` if it is a valid agent id (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``).

    Raises:
        TopicError: anything else.
    """
    if not isinstance(agent, str) or _AGENT_RE.fullmatch(agent) is None:
        raise TopicError(f"invalid agent id {agent!r}: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")
    return agent


def validate_path(path: str, *, what: str = "path") -> str:
    """Return ``path`` if it is a valid multi-level topic path.

    A valid path has no empty level (no leading, trailing or doubled ``/``), no ``.`` or ``..``
    level, and no ``+``, ``#`` or NUL anywhere, so that it can never act as a wildcard nor
    escape a directory when mapped to a file system.

    Raises:
        TopicError: the path breaks one of these rules.
    """
    if not isinstance(path, str) or not path:
        raise TopicError(f"invalid {what} {path!r}: empty")
    for ch in _FORBIDDEN:
        if ch in path:
            raise TopicError(f"invalid {what} {path!r}: contains {ch!r}")
    for level in path.split("/"):
        if level in ("", ".", ".."):
            raise TopicError(f"invalid {what} {path!r}: empty, '.' or '..' level")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise TopicError(f"invalid {what} {path!r}: not encodable as UTF-8") from e
    if size > _MAX_PATH_BYTES:
        raise TopicError(f"invalid {what}: longer than {_MAX_PATH_BYTES} bytes")
    return path


def _validate_level(level: str, *, what: str) -> str:
    validate_path(level, what=what)
    if "/" in level:
        raise TopicError(f"invalid {what} {level!r}: must be a single topic level")
    return level


@dataclass(frozen=True)
class RepoTopic:
    """A parsed ``{root}/repo/...`` topic.

    ``kind`` is ``"index"`` (the repo index), ``"metadata"`` (``name`` is the file name),
    ``"target-index"`` (``name`` is the target url path) or ``"target-chunk"`` (``name`` is the
    target url path and ``chunk`` the chunk number).
    """

    kind: str
    name: str = ""
    chunk: int | None = None


@dataclass(frozen=True)
class Topics:
    """Builds and parses every topic of protocol v1 under ``root``.

    Builders validate their arguments and raise :class:`TopicError`; parsers return ``None``
    for a topic that is not theirs. Instances are immutable and thread safe.
    """

    root: str = "edgefleet/v1"

    def __post_init__(self) -> None:
        validate_path(self.root, what="topic root")

    # -- agents --------------------------------------------------------------------------

    def _agent(self, agent: str, kind: str) -> str:
        return f"{self.root}/agents/{validate_agent_id(agent)}/{kind}"

    def agent_state(self, agent: str) -> str:
        """Retained birth / will / stop state of ``agent``."""
        return self._agent(agent, "state")

    def agent_health(self, agent: str) -> str:
        """Periodic health reports of ``agent`` (QoS 0)."""
        return self._agent(agent, "health")

    def agent_events(self, agent: str) -> str:
        """Anomaly events of ``agent`` (QoS 1, from its durable outbox)."""
        return self._agent(agent, "events")

    def agent_deployments(self, agent: str) -> str:
        """Deployment state changes of ``agent``."""
        return self._agent(agent, "deployments")

    def agent_commands(self, agent: str) -> str:
        """Signed commands sent to ``agent``."""
        return self._agent(agent, "commands")

    def all_agent_states(self) -> str:
        """Subscription filter matching every agent's state topic."""
        return f"{self.root}/agents/+/state"

    def parse_agent_topic(self, topic: str) -> tuple[str, str] | None:
        """Return ``(agent, kind)`` for a per-agent topic under this root, else ``None``."""
        prefix = f"{self.root}/agents/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            return None
        agent, kind = parts
        if kind not in AGENT_KINDS or _AGENT_RE.fullmatch(agent) is None:
            return None
        return agent, kind

    # -- repository ----------------------------------------------------------------------

    def repo_index(self) -> str:
        """Retained index of the repository files that exist (see ``shared.chunking.RepoIndex``)."""
        return f"{self.root}/repo/index"

    def repo_metadata(self, filename: str) -> str:
        """Retained TUF metadata file ``filename`` (e.g. ``3.snapshot.json``)."""
        return f"{self.root}/repo/metadata/{_validate_level(filename, what='metadata filename')}"

    def repo_target_index(self, path: str) -> str:
        """Retained chunk index of the target at url path ``path``."""
        return f"{self.root}/repo/targets/{validate_path(path, what='target path')}/index"

    def repo_target_chunk(self, path: str, i: int) -> str:
        """Retained chunk ``i`` (0-based) of the target at url path ``path``."""
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TopicError(f"invalid chunk number {i!r}")
        return f"{self.root}/repo/targets/{validate_path(path, what='target path')}/chunks/{i}"

    def repo_target_chunks(self, path: str) -> str:
        """Subscription filter matching every chunk of the target at ``path``."""
        return f"{self.root}/repo/targets/{validate_path(path, what='target path')}/chunks/+"

    def repo_all(self) -> str:
        """Subscription filter matching every repository topic (chunks included)."""
        return f"{self.root}/repo/#"

    def repo_metadata_all(self) -> str:
        """Subscription filter matching every retained metadata file."""
        return f"{self.root}/repo/metadata/+"

    def repo_target_indexes(self) -> tuple[str, ...]:
        """Subscription filters matching the chunk index of every target, and no chunk.

        One filter per target path depth, 1 to :data:`MAX_TARGET_DEPTH`: a chunk topic ends
        in a number, never in ``index``, so none of them matches a chunk.
        """
        return tuple(
            f"{self.root}/repo/targets/{'+/' * depth}index"
            for depth in range(1, MAX_TARGET_DEPTH + 1)
        )

    def parse_repo_topic(self, topic: str) -> RepoTopic | None:
        """Parse a ``{root}/repo/...`` topic; ``None`` if it is not a valid repository topic."""
        prefix = f"{self.root}/repo/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :]
        try:
            if rest == "index":
                return RepoTopic("index")
            if rest.startswith("metadata/"):
                return RepoTopic("metadata", _validate_level(rest[len("metadata/") :], what="name"))
            if rest.startswith("targets/"):
                body = rest[len("targets/") :]
                head, _, last = body.rpartition("/")
                if last == "index" and head:
                    return RepoTopic("target-index", validate_path(head))
                path, _, marker = head.rpartition("/")
                if marker == "chunks" and path and last.isascii() and last.isdigit():
                    if last != str(int(last)):
                        return None  # "007" is never built, so it is not ours
                    return RepoTopic("target-chunk", validate_path(path), int(last))
        except TopicError:
            return None
        return None

    # -- private markers -----------------------------------------------------------------

    def probe(self, client_id: str, token: str) -> str:
        """A reader's private marker topic (see ``edge_agent.mqtt.RetainedReader``), under its
        MQTT client id: the broker's ACL lets each client use only its own ``probe/{client_id}/``
        (``trainer.fleet.broker``)."""
        client_id = _validate_level(client_id, what="probe client id")
        if "%" in client_id:  # a substitution in a Mosquitto ACL pattern, never matched literally
            raise TopicError(f"invalid probe client id {client_id!r}: no '%'")
        return f"{self.root}/probe/{client_id}/{_validate_level(token, what='probe token')}"
