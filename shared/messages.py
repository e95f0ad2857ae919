"""MQTT message schemas: one paired ``encode_*`` / ``decode_*`` per message type.

Every payload is a UTF-8 JSON object whose ``"schema"`` names its type and major version
(``edgefleet.<type>/<major>``). Policy (see DESIGN.md, MQTT protocol v1):

* writers emit compact JSON with sorted keys and never NaN/Infinity (non-finite numbers are
  written as ``null``);
* readers check the schema and the fields they need, and keep unknown fields, so an old agent
  or trainer survives a newer peer; a newer *major* version is rejected.

Standard library only. Add a new message type as a ``SCHEMA_*`` constant and an
``encode_*``/``decode_*`` pair, with round-trip tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = [
    "MessageError",
    "SCHEMA_EVENT",
    "EventFields",
    "encode_event",
    "decode_event",
]

SCHEMA_EVENT = "edgefleet.event/1"


class MessageError(ValueError):
    """A payload is not valid JSON, names another schema, or lacks/mistypes a field."""


class EventFields(Protocol):
    """What an anomaly event carries (``edge_agent.detector.Detection`` satisfies it)."""

    @property
    def timestamp(self) -> str: ...
    @property
    def values(self) -> Sequence[float]: ...
    @property
    def score(self) -> float: ...
    @property
    def anomaly_score(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    @property
    def is_anomaly(self) -> bool: ...
    @property
    def model_version(self) -> int: ...
    @property
    def slot(self) -> str: ...


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _loads(data: bytes, schema: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MessageError(f"payload is not UTF-8 JSON: {e}") from e
    if not isinstance(obj, dict):
        raise MessageError("payload is not a JSON object")
    got = obj.get("schema")
    kind, _, _ = schema.rpartition("/")
    if not isinstance(got, str) or got.rpartition("/")[0] != kind:
        raise MessageError(f"expected a {schema} message, got schema {got!r}")
    if got != schema:
        raise MessageError(f"unsupported {kind} version {got!r} (this reads {schema})")
    return obj


def _field(obj: dict[str, Any], name: str, types: type | tuple[type, ...], *, nullable: bool = False) -> Any:
    if name not in obj:
        raise MessageError(f"message lacks field {name!r}")
    v = obj[name]
    if v is None and nullable:
        return v
    # bool is an int subclass: never accept it where a number is expected, nor vice versa.
    if isinstance(v, bool) != (types is bool) or not isinstance(v, types):
        raise MessageError(f"field {name!r} has the wrong type ({type(v).__name__})")
    return v


def encode_event(detection: EventFields, agent: str, seq: int) -> bytes:
    """Encode an anomaly event (schema ``edgefleet.event/1``) for ``…/agents/{agent}/events``.

    ``seq`` is the agent's monotonically increasing outbox sequence number, by which receivers
    de-duplicate (delivery is at least once). Non-finite scores or values become ``null``.
    """
    if not isinstance(seq, int) or seq < 1:
        raise MessageError(f"seq must be a positive integer, got {seq!r}")
    return _dumps(
        {
            "schema": SCHEMA_EVENT,
            "seq": seq,
            "agent": agent,
            "slot": detection.slot,
            "model_version": int(detection.model_version),
            "timestamp": detection.timestamp,
            "values": [_num(v) for v in detection.values],
            "score": _num(detection.score),
            "anomaly_score": _num(detection.anomaly_score),
            "threshold": _num(detection.threshold),
            "is_anomaly": bool(detection.is_anomaly),
        }
    )


def decode_event(data: bytes) -> dict[str, Any]:
    """Decode an ``edgefleet.event/1`` payload into a dict, keeping unknown fields.

    Raises :class:`MessageError` for anything else (bad JSON, other schema or major version,
    missing or mistyped field).
    """
    obj = _loads(data, SCHEMA_EVENT)
    seq = _field(obj, "seq", int)
    if seq < 1:
        raise MessageError(f"seq must be positive, got {seq}")
    for name in ("agent", "slot", "timestamp"):
        _field(obj, name, str)
    _field(obj, "model_version", int)
    _field(obj, "is_anomaly", bool)
    for name in ("score", "anomaly_score", "threshold"):
        _field(obj, name, (int, float), nullable=True)
    values = _field(obj, "values", list)
    if not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values):
        raise MessageError("field 'values' must be a list of numbers or nulls")
    return obj


# -- agent → trainer: state, health, deployment status ---------------------------------------
# Added with the trainer's fleet view (trainer.fleet.status). Same policy as above: unknown
# fields are kept in ``extra`` and written back; ``encode_*`` refuses what ``decode_*`` would.
# Status strings are open: a newer agent may report a status or deployment state this version
# does not know; it is kept as it is (and shown by ``edgefleet fleet status``), never refused.

from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

SCHEMA_AGENT_STATE = "edgefleet.agent-state/1"
SCHEMA_AGENT_HEALTH = "edgefleet.agent-health/1"
SCHEMA_DEPLOYMENT_STATUS = "edgefleet.deployment-status/1"
#: ``status`` values this version writes: birth, Last Will, clean stop (readers accept others).
AGENT_STATUSES: tuple[str, ...] = ("online", "offline", "stopped")
#: ``state`` values this version writes, in the order a successful deployment passes them
#: (readers accept others).
DEPLOYMENT_STATES: tuple[str, ...] = (
    "downloading", "verifying", "staging", "active", "failed", "rolled_back", "removed",
)

__all__ += [
    "AGENT_STATUSES",
    "DEPLOYMENT_STATES",
    "SCHEMA_AGENT_HEALTH",
    "SCHEMA_AGENT_STATE",
    "SCHEMA_DEPLOYMENT_STATUS",
    "ActiveModel",
    "AgentHealth",
    "AgentState",
    "DeploymentStatus",
    "decode_agent_health",
    "decode_agent_state",
    "decode_deployment_status",
    "encode_agent_health",
    "encode_agent_state",
    "encode_deployment_status",
]


def _str_list(obj: dict[str, Any], name: str) -> list[str]:
    values = _field(obj, name, list)
    if not all(isinstance(v, str) for v in values):
        raise MessageError(f"field {name!r} must be a list of strings")
    return values


def _count(obj: dict[str, Any], name: str) -> int:
    value = _field(obj, name, int)
    if value < 0:
        raise MessageError(f"field {name!r} must be >= 0, got {value}")
    return value


def _opt_num(x: float | None) -> float | None:
    return None if x is None else _num(x)


def _finite(obj: Any) -> Any:
    """``obj`` (JSON-able) with every non-finite float, at any depth, written as ``None``."""
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _rest(obj: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


@dataclass(frozen=True)
class ActiveModel:
    """A model an agent is running in one slot (part of :class:`AgentState`)."""

    slot: str
    model: str
    version: int
    format: str
    quantization: str
    sha256: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = ("slot", "model", "version", "format", "quantization", "sha256")

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        return {**self.extra, **{k: getattr(self, k) for k in self._KNOWN}}

    @classmethod
    def from_json(cls, obj: Any) -> ActiveModel:
        """Parse one entry of ``active``; raises :class:`MessageError`."""
        if not isinstance(obj, dict):
            raise MessageError("an entry of 'active' is not a JSON object")
        for name in ("slot", "model", "format", "quantization", "sha256"):
            _field(obj, name, str)
        _field(obj, "version", int)
        return cls(**{k: obj[k] for k in cls._KNOWN}, extra=_rest(obj, cls._KNOWN))


@dataclass(frozen=True)
class AgentState:
    """Retained ``…/agents/{agent}/state``: birth (online), Last Will (offline), clean stop.

    ``bdseq`` (birth/death sequence) is the same in a birth and the Will set with it, so a
    reader can tell a stale Will from the current session's. ``status`` is any non-empty
    string (this version writes :data:`AGENT_STATUSES`). ``health_period_s`` is how often the
    agent publishes health, so a reader can tell a retained ``online`` whose agent went silent
    from a live one; ``None`` (the field absent) for agents that predate it.
    """

    agent: str
    status: str
    bdseq: int
    group: str | None
    profile: str
    arch: str
    runtimes: tuple[str, ...]
    active: tuple[ActiveModel, ...]
    emulated: bool
    ts: str
    health_period_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = (
        "schema", "agent", "status", "bdseq", "group", "profile", "arch", "runtimes", "active",
        "emulated", "ts", "health_period_s",
    )

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win; no ``health_period_s`` if unset)."""
        period = {} if self.health_period_s is None else {"health_period_s": self.health_period_s}
        return {
            **self.extra,
            **period,
            "schema": SCHEMA_AGENT_STATE,
            "agent": self.agent,
            "status": self.status,
            "bdseq": self.bdseq,
            "group": self.group,
            "profile": self.profile,
            "arch": self.arch,
            "runtimes": list(self.runtimes),
            "active": [a.to_json() for a in self.active],
            "emulated": self.emulated,
            "ts": self.ts,
        }


def encode_agent_state(state: AgentState) -> bytes:
    """Encode an ``edgefleet.agent-state/1`` payload; raises :class:`MessageError`."""
    data = _dumps(state.to_json())
    decode_agent_state(data)
    return data


def decode_agent_state(data: bytes) -> AgentState:
    """Decode an ``edgefleet.agent-state/1`` payload, keeping unknown fields.

    Raises :class:`MessageError` for bad JSON, another schema or major version, a missing or
    mistyped field, an empty ``status`` or a ``health_period_s`` that is not a positive number.
    A ``status`` outside :data:`AGENT_STATUSES` is a newer agent's and is kept as it is.
    """
    obj = _loads(data, SCHEMA_AGENT_STATE)
    for name in ("agent", "status", "profile", "arch", "ts"):
        _field(obj, name, str)
    if not obj["status"]:
        raise MessageError("field 'status' is empty")
    period = obj.get("health_period_s")
    if period is not None:
        _field(obj, "health_period_s", (int, float))
        if not (math.isfinite(period) and period > 0):
            raise MessageError(f"field 'health_period_s' must be a positive number, got {period}")
    _count(obj, "bdseq")
    _field(obj, "group", str, nullable=True)
    _field(obj, "emulated", bool)
    runtimes = _str_list(obj, "runtimes")
    active = tuple(ActiveModel.from_json(a) for a in _field(obj, "active", list))
    return AgentState(
        agent=obj["agent"],
        status=obj["status"],
        bdseq=obj["bdseq"],
        group=obj["group"],
        profile=obj["profile"],
        arch=obj["arch"],
        runtimes=tuple(runtimes),
        active=active,
        emulated=obj["emulated"],
        ts=obj["ts"],
        health_period_s=period,
        extra=_rest(obj, AgentState._KNOWN),
    )


@dataclass(frozen=True)
class AgentHealth:
    """``…/agents/{agent}/health``: periodic counters and gauges of one agent.

    ``latency_ms`` holds ``p50`` and ``p99`` (milliseconds, ``None`` before any inference) and
    keeps any other keys a newer agent sends. Non-finite numbers are written as ``null``.

    ``federated`` (optional; agents before federated learning omit it) says whether the agent
    can take part in federated training: ``can_join`` (bool) and, when it cannot, ``reason``
    (one line); an agent that can join adds ``run`` (the run it takes part in or ``null``),
    ``supernode`` (``stopped``/``running``/``restarting``), ``restarts``, ``windows`` (stored
    for training), ``epsilon_spent`` (its local ledger; ``null`` when infinite: a round
    without noise), ``epsilon_budget`` (``null``: no local budget), ``delta`` (the δ the
    spent ε was computed at) and ``refused`` (why the group's active run is not joined, e.g.
    plaintext to a SuperLink off the host; ``null`` otherwise). Other keys are kept.

    ``drift`` (optional; agents before drift monitoring omit it) maps each serving slot to its
    drift monitor's figures: ``available`` (bool; ``false`` with a ``reason`` for a bundle
    without a binned drift reference, or with monitoring disabled), ``model``, ``version``,
    ``window`` and ``fill`` (samples), ``drifted`` (bool, the state with hysteresis),
    ``features`` (name → ``{"psi", "ks", "ks_pvalue", "drifted"}``) and ``score`` (the same for
    the raw score). Other keys are kept.

    ``started_at`` (optional; older agents omit it): when the agent process started (ISO
    time); a new value means the counters restarted from zero.

    ``shadow`` (optional; omitted when no slot runs a shadow, and by agents before shadow mode)
    maps each slot that runs a shadow candidate beside its model to the comparison since the
    shadow was installed: ``model``, ``version``, ``state`` (``active``, or ``failed`` with a
    ``reason`` when the candidate could not be installed or loaded, and the ``serial`` of the
    deployment document it failed under), ``samples`` (samples both
    models scored), ``agreement`` (fraction of those where both decisions agree; ``null``
    before the first), ``active_only`` and ``shadow_only`` (alarms raised by one model only),
    ``correlation`` (Pearson correlation of the two raw scores; ``null`` while undefined),
    ``errors`` (failed shadow inferences) and ``latency_ms`` (``p50``/``p99`` of the shadow's
    inferences). Other keys are kept; a malformed entry is dropped when decoding, the rest of
    the report kept.

    ``outbox_refused`` (optional; older agents omit it): anomaly events the broker refused (a
    PUBACK with a failure reason code) since the agent started, each refusal counted.
    """

    agent: str
    ts: str
    inferences: int
    anomalies: int
    errors: int
    latency_ms: Mapping[str, Any]
    outbox_depth: int
    outbox_dropped: int
    rss_mb: float | None
    cpu_percent: float | None
    federated: Mapping[str, Any] | None = None
    drift: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    started_at: str | None = None
    shadow: Mapping[str, Any] | None = None
    outbox_refused: int | None = None

    _COUNTS = ("inferences", "anomalies", "errors", "outbox_depth", "outbox_dropped")
    _KNOWN = ("schema", "agent", "ts", "latency_ms", "rss_mb", "cpu_percent", "federated", "drift",
              "started_at", "shadow", "outbox_refused", *_COUNTS)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        latency = {
            k: (_opt_num(v) if k in ("p50", "p99") else v) for k, v in self.latency_ms.items()
        }
        return {
            **self.extra,
            "schema": SCHEMA_AGENT_HEALTH,
            "agent": self.agent,
            "ts": self.ts,
            **{k: getattr(self, k) for k in self._COUNTS},
            "latency_ms": latency,
            "rss_mb": _opt_num(self.rss_mb),
            "cpu_percent": _opt_num(self.cpu_percent),
            **({} if self.federated is None else {"federated": {
                k: (_opt_num(v) if isinstance(v, float) else v) for k, v in self.federated.items()
            }}),
            **({} if self.drift is None else {"drift": _finite(self.drift)}),
            **({} if self.started_at is None else {"started_at": self.started_at}),
            **({} if self.shadow is None else {"shadow": _finite(self.shadow)}),
            **({} if self.outbox_refused is None else {"outbox_refused": self.outbox_refused}),
        }


def encode_agent_health(health: AgentHealth) -> bytes:
    """Encode an ``edgefleet.agent-health/1`` payload; raises :class:`MessageError`."""
    data = _dumps(health.to_json())
    decode_agent_health(data)
    return data


def decode_agent_health(data: bytes) -> AgentHealth:
    """Decode an ``edgefleet.agent-health/1`` payload, keeping unknown fields.

    Raises :class:`MessageError` for bad JSON, another schema or major version, a missing or
    mistyped field, or a negative counter.
    """
    obj = _loads(data, SCHEMA_AGENT_HEALTH)
    _field(obj, "agent", str)
    _field(obj, "ts", str)
    for name in AgentHealth._COUNTS:
        _count(obj, name)
    latency = _field(obj, "latency_ms", dict)
    for name in ("p50", "p99"):
        _field(latency, name, (int, float), nullable=True)
    for name in ("rss_mb", "cpu_percent"):
        _field(obj, name, (int, float), nullable=True)
    federated = obj.get("federated")
    if federated is not None:
        _field(obj, "federated", dict)
        _field(federated, "can_join", bool)
        if "reason" in federated:
            _field(federated, "reason", str, nullable=True)
    drift = obj.get("drift")
    if drift is not None:
        _field(obj, "drift", dict)
        for slot in drift.values():
            if not isinstance(slot, dict):
                raise MessageError("field 'drift' must map slots to JSON objects")
            _field(slot, "available", bool)
            if slot["available"]:
                _field(slot, "drifted", bool)
    if "started_at" in obj:
        _field(obj, "started_at", str, nullable=True)
    shadow = obj.get("shadow")
    if shadow is not None:
        _field(obj, "shadow", dict)
        shadow = {slot: entry for slot, entry in shadow.items() if _shadow_entry_ok(entry)}
    if obj.get("outbox_refused") is not None:
        _count(obj, "outbox_refused")
    return AgentHealth(
        agent=obj["agent"],
        ts=obj["ts"],
        **{k: obj[k] for k in AgentHealth._COUNTS},
        latency_ms=dict(latency),
        rss_mb=obj["rss_mb"],
        cpu_percent=obj["cpu_percent"],
        federated=None if federated is None else dict(federated),
        drift=None if drift is None else dict(drift),
        extra=_rest(obj, AgentHealth._KNOWN),
        started_at=obj.get("started_at"),
        shadow=shadow,
        outbox_refused=obj.get("outbox_refused"),
    )


def _shadow_entry_ok(entry: Any) -> bool:
    """Whether a health ``shadow`` entry is well-formed. A malformed one is dropped by
    :func:`decode_agent_health`, not the whole report: the serving model's figures still count."""
    try:
        if not isinstance(entry, dict):
            raise MessageError("a shadow entry must be a JSON object")
        _field(entry, "model", str)
        _field(entry, "version", int)
        if "samples" in entry:
            _count(entry, "samples")
        if "serial" in entry:
            _count(entry, "serial")
        for name in ("agreement", "correlation"):
            if name in entry:
                _field(entry, name, (int, float), nullable=True)
    except MessageError:
        return False
    return True


@dataclass(frozen=True)
class DeploymentStatus:
    """``…/agents/{agent}/deployments``: one state change of a slot's deployment.

    ``serial`` is the serial of the deployment document being applied; ``reason`` explains a
    ``failed`` or ``rolled_back`` state (``None`` otherwise). ``state`` is any non-empty
    string (this version writes :data:`DEPLOYMENT_STATES`).

    ``role`` says which model of the slot the status is about: ``active`` (the model that
    serves; the field is omitted for it, as agents before shadow mode wrote no role) or
    ``shadow`` (a candidate run beside it for comparison, see
    :class:`~shared.deployment.Slot`), which also reports ``removed`` when it is unloaded.
    Agents publish shadow statuses unretained: the retained status stays the serving model's.
    """

    agent: str
    slot: str
    model: str
    version: int
    state: str
    reason: str | None
    serial: int
    ts: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    role: str = "active"

    _KNOWN = ("schema", "agent", "slot", "model", "version", "state", "reason", "serial", "ts",
              "role")

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        return {
            **self.extra,
            "schema": SCHEMA_DEPLOYMENT_STATUS,
            **{k: getattr(self, k) for k in self._KNOWN[1:-1]},
            **({} if self.role == "active" else {"role": self.role}),
        }


def encode_deployment_status(status: DeploymentStatus) -> bytes:
    """Encode an ``edgefleet.deployment-status/1`` payload; raises :class:`MessageError`."""
    data = _dumps(status.to_json())
    decode_deployment_status(data)
    return data


def decode_deployment_status(data: bytes) -> DeploymentStatus:
    """Decode an ``edgefleet.deployment-status/1`` payload, keeping unknown fields.

    Raises :class:`MessageError` for bad JSON, another schema or major version, a missing or
    mistyped field, or an empty ``state``. A ``state`` outside :data:`DEPLOYMENT_STATES` is a
    newer agent's and is kept as it is.
    """
    obj = _loads(data, SCHEMA_DEPLOYMENT_STATUS)
    for name in ("agent", "slot", "model", "state", "ts"):
        _field(obj, name, str)
    if not obj["state"]:
        raise MessageError("field 'state' is empty")
    _field(obj, "version", int)
    _count(obj, "serial")
    _field(obj, "reason", str, nullable=True)
    role = obj.get("role", "active")
    if not isinstance(role, str) or not role:
        raise MessageError("field 'role' must be a non-empty string")
    return DeploymentStatus(
        **{k: obj[k] for k in DeploymentStatus._KNOWN[1:-1]},
        extra=_rest(obj, DeploymentStatus._KNOWN),
        role=role,
    )


# -- agent → trainer: drift events --------------------------------------------------------------
# A drift event shares the events topic and the outbox's ``seq`` with anomaly events, so
# receivers de-duplicate every event the same way; its ``schema`` tells the two apart
# (:func:`decode_agent_event`).

SCHEMA_DRIFT_EVENT = "edgefleet.drift/1"
#: The event schemas this version writes on ``…/agents/{agent}/events``.
EVENT_SCHEMAS: tuple[str, ...] = (SCHEMA_EVENT, SCHEMA_DRIFT_EVENT)

__all__ += [
    "EVENT_SCHEMAS",
    "SCHEMA_DRIFT_EVENT",
    "DriftFields",
    "decode_agent_event",
    "decode_drift_event",
    "encode_drift_event",
]


class DriftFields(Protocol):
    """What a drift event carries (``edge_agent.drift.DriftReport`` satisfies it).

    ``features`` maps each feature to ``{"psi", "ks", "ks_pvalue", "drifted"}``; ``score`` is
    the same for the raw model score.
    """

    @property
    def slot(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def model_version(self) -> int: ...
    @property
    def timestamp(self) -> str | None: ...
    @property
    def window(self) -> int: ...
    @property
    def features(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def score(self) -> Mapping[str, Any]: ...
    @property
    def psi_threshold(self) -> float: ...
    @property
    def ks_alpha(self) -> float: ...


def _series_figures(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MessageError(f"{what} is not a JSON object")
    for name in ("psi", "ks", "ks_pvalue"):
        _field(obj, name, (int, float), nullable=True)
    _field(obj, "drifted", bool)
    return obj


def encode_drift_event(drift: DriftFields, agent: str, seq: int) -> bytes:
    """Encode a drift event (schema ``edgefleet.drift/1``) for ``…/agents/{agent}/events``.

    ``drifted_features`` lists the features that drifted (in ``features`` order) and
    ``score_drifted`` says whether the raw score did. Raises :class:`MessageError`.
    """
    if not isinstance(seq, int) or seq < 1:
        raise MessageError(f"seq must be a positive integer, got {seq!r}")
    data = _dumps(
        {
            "schema": SCHEMA_DRIFT_EVENT,
            "seq": seq,
            "agent": agent,
            "slot": drift.slot,
            "model": drift.model,
            "model_version": int(drift.model_version),
            "timestamp": drift.timestamp,
            "window": int(drift.window),
            "features": _finite({k: dict(v) for k, v in drift.features.items()}),
            "score": _finite(dict(drift.score)),
            "drifted_features": [k for k, v in drift.features.items() if v.get("drifted")],
            "score_drifted": bool(drift.score.get("drifted")),
            "psi_threshold": _num(drift.psi_threshold),
            "ks_alpha": _num(drift.ks_alpha),
        }
    )
    decode_drift_event(data)
    return data


def decode_drift_event(data: bytes) -> dict[str, Any]:
    """Decode an ``edgefleet.drift/1`` payload into a dict, keeping unknown fields.

    Raises :class:`MessageError` for anything else (bad JSON, other schema or major version,
    missing or mistyped field).
    """
    obj = _loads(data, SCHEMA_DRIFT_EVENT)
    seq = _field(obj, "seq", int)
    if seq < 1:
        raise MessageError(f"seq must be positive, got {seq}")
    for name in ("agent", "slot", "model"):
        _field(obj, name, str)
    _field(obj, "timestamp", str, nullable=True)
    _field(obj, "model_version", int)
    _count(obj, "window")
    features = _field(obj, "features", dict)
    for name, figures in features.items():
        _series_figures(figures, f"features[{name!r}]")
    _series_figures(_field(obj, "score", dict), "score")
    _str_list(obj, "drifted_features")
    _field(obj, "score_drifted", bool)
    for name in ("psi_threshold", "ks_alpha"):
        _field(obj, name, (int, float), nullable=True)
    return obj


def decode_agent_event(data: bytes) -> dict[str, Any]:
    """Decode any event of ``…/agents/{agent}/events`` (:data:`EVENT_SCHEMAS`) by its schema.

    Raises :class:`MessageError` like the decoder of that schema, or for a schema that is
    not an event's.
    """
    try:
        schema = json.loads(data).get("schema")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise MessageError(f"payload is not a JSON object: {e}") from e
    kind = schema.rpartition("/")[0] if isinstance(schema, str) else None
    if kind == SCHEMA_DRIFT_EVENT.rpartition("/")[0]:
        return decode_drift_event(data)
    return decode_event(data)
