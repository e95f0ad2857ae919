"""The deployment document: the desired state the trainer publishes as a TUF target.

Schema ``edgefleet.deployment/1``::

    {"schema": "edgefleet.deployment/1",
     "scope": {"group": "lab"} | {"agent": "pi-07"},
     "serial": 3,                       # increases with every document of that scope
     "slots": {"default": {"model": "m", "version": 2, "variants": [
         {"target": "artifacts/m-2-onnx-int8.zip", "format": "onnx", "quantization": "int8",
          "profiles": ["rpi4-arm64", "x86-64-v3"], "sha256": "…", "size_bytes": 75184}],
         "shadow": {"model": "m", "version": 3, "variants": [ … ]}}}}   # optional

A slot's optional ``shadow`` names a candidate the agent runs next to the slot's model on the
same samples, emitting nothing, to compare the two (shadow mode); it has the shape of a slot
(model, version, variants; a ``shadow`` inside a shadow is kept as an unknown field, never
run). Agents that predate shadow mode keep it as an unknown slot field and ignore it: such
an agent keeps serving the slot's model and simply reports no shadow figures.

Target paths: ``deployments/groups/{group}.json`` and ``deployments/agents/{agent}.json``; an
agent document overrides its group's (canary, pinning). A rollback is simply a newer document
(higher serial) naming an older version.

Wire policy (DESIGN.md): unknown fields are kept at every level (document, scope, slot,
variant) and written back, so an old agent survives a newer trainer; a newer *major* schema is
rejected. A variant's ``format`` and ``quantization`` are open strings: a newer trainer may
offer variants this version cannot run (a new format or quantization), which decode and
re-encode unchanged and which :func:`choose_variant` skips. Anything malformed raises
:class:`DeploymentError`. Standard library only; importing this module has no side effects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "SCHEMA_DEPLOYMENT",
    "Deployment",
    "DeploymentError",
    "Scope",
    "Slot",
    "Variant",
    "agent_target",
    "choose_variant",
    "decode_deployment",
    "describe_unrunnable",
    "encode_deployment",
    "group_target",
    "scope_target",
]

SCHEMA_DEPLOYMENT = "edgefleet.deployment/1"
#: Artifact formats this version knows (the bundle's ``format``); a document may name others.
FORMATS: tuple[str, ...] = ("onnx", "tflite")
#: Quantizations this version knows (the bundle's ``quantization``); a document may name others.
QUANTIZATIONS: tuple[str, ...] = ("fp32", "int8")

# Group, agent and slot names become single path levels and topic levels.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SCOPE_KINDS = ("group", "agent")


class DeploymentError(ValueError):
    """A deployment document (or a name that goes into one) is malformed."""


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise DeploymentError(
            f"invalid {what} {value!r}: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"
        )
    return value


def group_target(group: str) -> str:
    """The TUF target path of ``group``'s document: ``deployments/groups/{group}.json``.

    Raises:
        DeploymentError: ``group`` is not a valid name.
    """
    return f"deployments/groups/{_check_name(group, 'group name')}.json"


def agent_target(agent: str) -> str:
    """The TUF target path of ``agent``'s own document: ``deployments/agents/{agent}.json``.

    Raises:
        DeploymentError: ``agent`` is not a valid agent id.
    """
    return f"deployments/agents/{_check_name(agent, 'agent id')}.json"


# -- model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Who a document is for: ``kind`` is ``"group"`` or ``"agent"``; ``name`` names it."""

    kind: str
    name: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _SCOPE_KINDS:
            raise DeploymentError(f"scope kind must be 'group' or 'agent', got {self.kind!r}")
        _check_name(self.name, f"{self.kind} name")

    @property
    def target(self) -> str:
        """The TUF target path of this scope's document."""
        return group_target(self.name) if self.kind == "group" else agent_target(self.name)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        return {**self.extra, self.kind: self.name}


def scope_target(*, group: str | None = None, agent: str | None = None) -> Scope:
    """The :class:`Scope` for exactly one of ``group`` / ``agent``.

    Raises:
        DeploymentError: neither or both given, or an invalid name.
    """
    if (group is None) == (agent is None):
        raise DeploymentError("give exactly one of a group or an agent")
    return Scope("group", group) if group is not None else Scope("agent", agent)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Variant:
    """One artifact of a slot's model version, as the agent needs to choose and fetch it."""

    target: str
    format: str
    quantization: str
    profiles: tuple[str, ...]
    sha256: str
    size_bytes: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        return {
            **self.extra,
            "target": self.target,
            "format": self.format,
            "quantization": self.quantization,
            "profiles": list(self.profiles),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
        }


@dataclass(frozen=True)
class Slot:
    """What one model slot should run: ``model@version`` in one of several variants, and
    optionally a ``shadow`` candidate (a :class:`Slot` without a shadow of its own) that runs
    beside it without emitting anything."""

    model: str
    version: int
    variants: tuple[Variant, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    shadow: Slot | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        return {
            **self.extra,
            "model": self.model,
            "version": self.version,
            "variants": [v.to_json() for v in self.variants],
            **({} if self.shadow is None else {"shadow": self.shadow.to_json()}),
        }


@dataclass(frozen=True)
class Deployment:
    """A whole deployment document. Immutable; build a new one for every change."""

    scope: Scope
    serial: int
    slots: Mapping[str, Slot]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The TUF target path this document is published under."""
        return self.scope.target

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        return {
            **self.extra,
            "schema": SCHEMA_DEPLOYMENT,
            "scope": self.scope.to_json(),
            "serial": self.serial,
            "slots": {name: slot.to_json() for name, slot in self.slots.items()},
        }


# -- codec ------------------------------------------------------------------------------------


def encode_deployment(doc: Deployment) -> bytes:
    """Canonical bytes of ``doc``: UTF-8 JSON, sorted keys, no spaces, trailing newline.

    The same document always gives the same bytes (so the same TUF target hash).

    Raises:
        DeploymentError: the document would not decode again (invalid field values).
    """
    obj = doc.to_json()
    _decode_obj(obj)  # writers never emit what readers refuse
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DeploymentError(f"deployment document is not JSON-serializable: {e}") from e
    return (text + "\n").encode()


def decode_deployment(data: bytes) -> Deployment:
    """Parse a deployment document, keeping unknown fields at every level.

    Raises:
        DeploymentError: not UTF-8 JSON, another schema or major version, or a missing or
            mistyped field.
    """
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise DeploymentError(f"deployment document is not UTF-8 JSON: {e}") from e
    return _decode_obj(obj)


def _decode_obj(obj: Any) -> Deployment:
    if not isinstance(obj, dict):
        raise DeploymentError("deployment document is not a JSON object")
    schema = obj.get("schema")
    if not isinstance(schema, str) or not schema.startswith("edgefleet.deployment/"):
        raise DeploymentError(f"not a deployment document (schema {schema!r})")
    if schema != SCHEMA_DEPLOYMENT:
        raise DeploymentError(
            f"unsupported deployment schema {schema!r} (this reads {SCHEMA_DEPLOYMENT})"
        )
    scope = _scope(_get(obj, "scope", dict, "document"))
    serial = _get(obj, "serial", int, "document")
    if serial < 0:
        raise DeploymentError(f"serial must be >= 0, got {serial}")
    raw_slots = _get(obj, "slots", dict, "document")
    slots = {_check_name(name, "slot name"): _slot(raw, name) for name, raw in raw_slots.items()}
    extra = {k: v for k, v in obj.items() if k not in ("schema", "scope", "serial", "slots")}
    return Deployment(scope=scope, serial=serial, slots=slots, extra=extra)


def _get(obj: Mapping[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in obj:
        raise DeploymentError(f"{where} lacks field {key!r}")
    value = obj[key]
    # bool is an int subclass: never accept one for the other.
    if isinstance(value, bool) != (typ is bool) or not isinstance(value, typ):
        raise DeploymentError(f"{where} field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _scope(obj: dict[str, Any]) -> Scope:
    kinds = [k for k in _SCOPE_KINDS if k in obj]
    if len(kinds) != 1:
        raise DeploymentError("scope must name exactly one of 'group' or 'agent'")
    kind = kinds[0]
    extra = {k: v for k, v in obj.items() if k != kind}
    return Scope(kind, _check_name(obj[kind], f"{kind} name"), extra)


def _slot(obj: Any, name: str, *, shadow_of: str | None = None) -> Slot:
    where = f"slot {name!r}" if shadow_of is None else f"the shadow of slot {shadow_of!r}"
    if not isinstance(obj, dict):
        raise DeploymentError(f"{where} is not a JSON object")
    model = _get(obj, "model", str, where)
    if not model:
        raise DeploymentError(f"{where} has an empty model name")
    version = _get(obj, "version", int, where)
    if version < 1:
        raise DeploymentError(f"{where} version must be >= 1, got {version}")
    variants = tuple(_variant(v, where) for v in _get(obj, "variants", list, where))
    shadow = None
    known: tuple[str, ...] = ("model", "version", "variants")
    if shadow_of is None:  # a shadow's own "shadow" is an unknown field: kept, never run
        known += ("shadow",)
        if obj.get("shadow") is not None:
            shadow = _slot(obj["shadow"], name, shadow_of=name)
    extra = {k: v for k, v in obj.items() if k not in known}
    return Slot(model=model, version=version, variants=variants, extra=extra, shadow=shadow)


def _variant(obj: Any, slot_where: str) -> Variant:
    where = f"a variant of {slot_where}"
    if not isinstance(obj, dict):
        raise DeploymentError(f"{where} is not a JSON object")
    target = _get(obj, "target", str, where)
    levels = target.split("/")
    if not target or any(level in ("", ".", "..") for level in levels):
        raise DeploymentError(f"{where} has an invalid target path {target!r}")
    # Unknown formats and quantizations are a newer trainer's, not malformed: kept, skipped
    # by choose_variant. Only an empty string is refused.
    fmt = _get(obj, "format", str, where)
    if not fmt:
        raise DeploymentError(f"{where} has an empty format")
    quant = _get(obj, "quantization", str, where)
    if not quant:
        raise DeploymentError(f"{where} has an empty quantization")
    profiles = _get(obj, "profiles", list, where)
    if not all(isinstance(p, str) for p in profiles):
        raise DeploymentError(f"{where}: profiles must be strings")
    sha = _get(obj, "sha256", str, where)
    if _SHA256_RE.fullmatch(sha) is None:
        raise DeploymentError(f"{where}: sha256 must be 64 lowercase hex digits")
    size = _get(obj, "size_bytes", int, where)
    if size < 0:
        raise DeploymentError(f"{where}: size_bytes must be >= 0")
    known = ("target", "format", "quantization", "profiles", "sha256", "size_bytes")
    return Variant(
        target=target,
        format=fmt,
        quantization=quant,
        profiles=tuple(profiles),
        sha256=sha,
        size_bytes=size,
        extra={k: v for k, v in obj.items() if k not in known},
    )


# -- the agent's choice -----------------------------------------------------------------------


def describe_unrunnable(
    variant: Variant, profile_name: str, available_formats: Collection[str]
) -> str | None:
    """Why an agent of ``profile_name`` cannot run ``variant``, or ``None`` if it can.

    A variant is runnable when it lists ``profile_name``, its format has a runtime available
    on the agent (``available_formats``, a subset of :data:`FORMATS`) and its quantization is
    one of :data:`QUANTIZATIONS`. The reason names the first check that fails, e.g.
    ``"onnx/int4: unknown quantization"``.
    """
    name = f"{variant.format}/{variant.quantization}"
    if variant.format not in FORMATS:
        return f"{name}: unknown format"
    if variant.quantization not in QUANTIZATIONS:
        return f"{name}: unknown quantization"
    if variant.format not in available_formats:
        return f"{name}: no {variant.format} runtime"
    if profile_name not in variant.profiles:
        return f"{name}: not built for {profile_name}"
    return None


def choose_variant(
    slot: Slot,
    profile_name: str,
    preferred_format: str,
    preferred_quantization: str,
    available_formats: Collection[str],
) -> Variant | None:
    """The variant an agent of ``profile_name`` should run, or ``None`` if none fits.

    Candidates are the variants the agent can run (:func:`describe_unrunnable` says ``None``):
    built for ``profile_name``, a format with a runtime available on the agent, a known
    quantization. Variants of an unknown format or quantization are skipped, never an error.
    Among the candidates the preferred format *and* quantization wins, then the preferred
    format, then the preferred quantization in another format, then anything. Ties break on
    (format, quantization, target), so the result never depends on variant order.
    """
    candidates = [
        v for v in slot.variants
        if describe_unrunnable(v, profile_name, available_formats) is None
    ]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda v: (
            v.format != preferred_format,
            v.quantization != preferred_quantization,
            v.format,
            v.quantization,
            v.target,
        ),
    )
