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
