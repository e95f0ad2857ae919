"""The federated run document: which SuperLink a group's agents join, as a signed TUF target.

Target path ``federated/runs/{run}.json`` (:func:`run_target`); the trainer writes it when a
run starts and again when it ends, the agent reads it through its TUF client::

    {"schema": "edgefleet.federated-run/1",
     "run": "fl-20260105-1", "group": "lab", "superlink": "127.0.0.1:9092",
     "app_sha256": "<hex of the FAB>",
     "trusted_entities": {},                  # or {"<public key id>": "<ed25519 public key>"}
     "state": "active" | "finished",
     "epsilon_budget": 8.0, "delta": 1e-5,
     "insecure": false,                       # optional: plaintext to the SuperLink (loopback only)
     "root_certificates": "-----BEGIN CERTIFICATE-----…"}   # optional: PEM CA bundle for the SuperLink's TLS

``trusted_entities`` may be empty, and ``edgefleet fl start`` publishes it empty: on flwr 1.42
an app submitted to a self-hosted SuperLink carries no signature (``flwr run`` cannot sign,
the SuperLink records an empty signature list), so a SuperNode started with
``--trusted-entities`` refuses every such app. Agents pass ``--trusted-entities`` only when the
object is non-empty; that waits for Flower to sign self-submitted apps. Its values are ed25519
public keys, either in OpenSSH form (``ssh-ed25519 AAAA…``, what ``flower-supernode
--trusted-entities`` reads) or as the base64 of the raw 32-byte key (:func:`openssh_ed25519`
converts). ``epsilon_budget`` is the run's (trainer's) budget; ``null`` means none. A document
without ``schema`` is read as version 1.

What protects a host meanwhile: the SuperLink address comes only from this TUF-verified
document; plaintext only to a loopback SuperLink, otherwise TLS verified with the document's
``root_certificates``. ``app_sha256`` is the SHA-256 of the FAB the run's ServerApp sends: the
agent passes it to its SuperNode as node config ``app-sha256`` and the ClientApp declines to
train for an app whose FAB differs. That catches a wrong app (a stale or mistaken run), not a
malicious one: a malicious app's code would simply not run that check.

``insecure`` (plaintext gRPC) is honoured by agents only for a loopback SuperLink
(:func:`is_loopback`); ``root_certificates`` (PEM, signed with the rest of the document) is
the CA bundle the SuperNode verifies the SuperLink's certificate with (default: the system's).
The two exclude each other.

Wire policy (DESIGN.md): unknown fields are kept and written back; a newer major schema is
rejected; anything malformed raises :class:`FederatedRunError`. Standard library only;
importing this module has no side effects.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RUNS_PREFIX",
    "RUN_STATES",
    "SCHEMA_FEDERATED_RUN",
    "FederatedRun",
    "FederatedRunError",
    "decode_run",
    "encode_run",
    "is_address",
    "is_loopback",
    "openssh_ed25519",
    "run_from_target",
    "run_target",
]

SCHEMA_FEDERATED_RUN = "edgefleet.federated-run/1"
RUNS_PREFIX = "federated/runs/"
RUN_STATES = ("active", "finished")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")
_PEM_RE = re.compile(r"\s*(-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----\s*)+")
_KNOWN = ("schema", "run", "group", "superlink", "app_sha256", "trusted_entities", "state",
          "epsilon_budget", "delta", "insecure", "root_certificates")


class FederatedRunError(ValueError):
    """A federated run document (or a run or group name) is malformed."""


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise FederatedRunError(
            f"{what} must be 1-64 letters, digits, '.', '_' or '-' (not first); got {value!r}")
    return value


def run_target(run: str) -> str:
    """The TUF target path of run ``run``'s document: ``federated/runs/{run}.json``."""
    return f"{RUNS_PREFIX}{_name(run, 'run')}.json"


def run_from_target(path: str) -> str | None:
    """The run name of a target path made by :func:`run_target`, else ``None``."""
    if not path.startswith(RUNS_PREFIX) or not path.endswith(".json"):
        return None
    name = path[len(RUNS_PREFIX) : -len(".json")]
    return name if _NAME_RE.fullmatch(name) else None


def is_address(text: str) -> bool:
    """Whether ``text`` is a ``HOST:PORT`` a run document accepts as its ``superlink``."""
    m = _ADDRESS_RE.fullmatch(text)
    return m is not None and 0 < int(m.group(2)) < 65536


def is_loopback(superlink: str) -> bool:
    """Whether the ``HOST:PORT`` address names this host: ``localhost``, 127.0.0.0/8 or ``[::1]``."""
    host = superlink.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def openssh_ed25519(key: str) -> str:
    """``key`` as an OpenSSH ed25519 public key line (``ssh-ed25519 AAAA…``).

    Accepts that form already (returned stripped) or the base64 of the raw 32-byte key.
    Raises :class:`FederatedRunError` for anything else.
    """
    key = key.strip()
    if key.startswith("ssh-ed25519 "):
        parts = key.split()
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, IndexError) as e:
            raise FederatedRunError(f"not an ed25519 public key: {key[:40]!r}") from e
        if blob[:15] != b"\x00\x00\x00\x0bssh-ed25519" or len(blob) != 15 + 4 + 32:
            raise FederatedRunError(f"not an ed25519 public key: {key[:40]!r}")
        return key
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error as e:
        raise FederatedRunError(f"not an ed25519 public key: {key[:40]!r}") from e
    if len(raw) != 32:
        raise FederatedRunError(f"an ed25519 public key has 32 bytes, this one {len(raw)}")
    kind = b"ssh-ed25519"
    blob = struct.pack(">I", len(kind)) + kind + struct.pack(">I", len(raw)) + raw
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


@dataclass(frozen=True)
class FederatedRun:
    """One federated run as the agents see it (see the module docstring).

    ``epsilon_budget`` is ``math.inf`` when the document says ``null`` (no run budget).
    """

    run: str
    group: str
    superlink: str
    app_sha256: str
    trusted_entities: Mapping[str, str]
    state: str
    epsilon_budget: float
    delta: float
    insecure: bool = False
    root_certificates: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state == "active"

    def to_json(self) -> dict[str, Any]:
        """The JSON object (unknown fields first, known ones win)."""
        return {
            **self.extra,
            "schema": SCHEMA_FEDERATED_RUN,
            "run": self.run,
            "group": self.group,
            "superlink": self.superlink,
            "app_sha256": self.app_sha256,
            "trusted_entities": dict(self.trusted_entities),
            "state": self.state,
            "epsilon_budget": None if math.isinf(self.epsilon_budget) else self.epsilon_budget,
            "delta": self.delta,
            "insecure": self.insecure,
            **({} if self.root_certificates is None else {"root_certificates": self.root_certificates}),
        }


def encode_run(run: FederatedRun) -> bytes:
    """Canonical bytes of a run document (sorted keys); checked by decoding them back."""
    data = json.dumps(run.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    decode_run(data)
    return data


def decode_run(data: bytes) -> FederatedRun:
    """Parse and validate a run document, keeping unknown fields.

    Raises :class:`FederatedRunError` naming the field for any problem.
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FederatedRunError(f"not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise FederatedRunError("a run document is a JSON object")
    schema = obj.get("schema", SCHEMA_FEDERATED_RUN)
    if not isinstance(schema, str) or schema.rpartition("/")[0] != SCHEMA_FEDERATED_RUN.rpartition("/")[0]:
        raise FederatedRunError(f"schema {schema!r} is not {SCHEMA_FEDERATED_RUN}")
    if schema.rpartition("/")[2] != SCHEMA_FEDERATED_RUN.rpartition("/")[2]:
        raise FederatedRunError(f"schema {schema!r}: this version reads {SCHEMA_FEDERATED_RUN}")
    for key in ("run", "group", "superlink", "app_sha256", "trusted_entities", "state", "delta"):
        if key not in obj:
            raise FederatedRunError(f"missing field {key!r}")
    superlink = obj["superlink"]
    if not isinstance(superlink, str) or not is_address(superlink):
        raise FederatedRunError(f"superlink must be HOST:PORT; got {superlink!r}")
    sha = obj["app_sha256"]
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise FederatedRunError("app_sha256 must be 64 lowercase hex digits")
    entities = obj["trusted_entities"]
    if not isinstance(entities, dict):
        raise FederatedRunError("trusted_entities must be an object of key id → public key (may be empty)")
    for key_id, key in entities.items():
        if not isinstance(key, str):
            raise FederatedRunError(f"trusted_entities[{key_id!r}] must be a string")
        openssh_ed25519(key)
    state = obj["state"]
    if state not in RUN_STATES:
        raise FederatedRunError(f"state must be one of {', '.join(RUN_STATES)}; got {state!r}")
    budget = obj.get("epsilon_budget")
    if budget is None:
        budget = math.inf
    elif isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0:
        raise FederatedRunError(f"epsilon_budget must be a number >= 0 or null; got {budget!r}")
    delta = obj["delta"]
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise FederatedRunError(f"delta must be in (0, 1); got {delta!r}")
    insecure = obj.get("insecure", False)
    if not isinstance(insecure, bool):
        raise FederatedRunError("insecure must be true or false")
    certs = obj.get("root_certificates")
    if certs is not None:
        if not isinstance(certs, str) or not _PEM_RE.fullmatch(certs):
            raise FederatedRunError("root_certificates must be PEM text of one or more certificates")
        if insecure:
            raise FederatedRunError("root_certificates and insecure exclude each other")
    return FederatedRun(
        run=_name(obj["run"], "run"),
        group=_name(obj["group"], "group"),
        superlink=superlink,
        app_sha256=sha,
        trusted_entities=dict(entities),
        state=state,
        epsilon_budget=float(budget),
        delta=float(delta),
        insecure=insecure,
        root_certificates=certs,
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )
