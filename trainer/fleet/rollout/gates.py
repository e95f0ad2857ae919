"""Rollout gates: when a stage's canaries are judged bad. Pure rules, no I/O.

A stage's evidence is what its canaries reported since their soak began (counter deltas from
their health reports, their p99 latency, a drift flag, a ``failed`` deployment report) plus
references: each canary's own counters under the previous version (before the stage) and the
counters of the agents still on the previous version over the same window.
:func:`evaluate_gates` turns evidence into a :class:`Verdict`; the controller
(:mod:`trainer.fleet.rollout.controller`) rolls back on any breach.

``--gates`` syntax (:func:`parse_gates`): comma-separated ``NAME=VALUE`` items that change the
defaults of :data:`DEFAULT_GATES`; ``off`` disables a gate::

    failures=on|off             a failed deployment report (download, verify, smoke test)
    anomaly-rate=3x|off         canary anomaly rate > F × its reference rate
    anomaly-floor=2%            the smallest reference rate (a quiet fleet has rate 0)
    min-inferences=50           inferences a canary needs before its rates are judged
    latency-p99=budget|1.5x|25ms|off   p99 over the profile's budget (× F) or a fixed bound
    errors=0|N|off              more than N inference errors during the soak
    drift=on|off                the agent's health reports drift (agents that report it)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "DEFAULT_GATES",
    "Breach",
    "CanaryEvidence",
    "Counts",
    "GateError",
    "Gates",
    "StageEvidence",
    "Verdict",
    "drift_flag",
    "evaluate_gates",
    "parse_gates",
]


class GateError(ValueError):
    """A ``--gates`` string does not parse."""


@dataclass(frozen=True)
class Counts:
    """Inference, anomaly and error counters (cumulative, or the difference of two readings)."""

    inferences: int = 0
    anomalies: int = 0
    errors: int = 0

    def since(self, start: Counts, *, restarted: bool = False) -> Counts:
        """The counts between ``start`` and ``self``; an agent that restarted since ``start``
        (``restarted``: its health's ``started_at`` changed; for agents that do not report it,
        counters that went down) counts from zero."""
        if restarted or self.inferences < start.inferences or self.anomalies < start.anomalies:
            return self
        return Counts(
            self.inferences - start.inferences,
            self.anomalies - start.anomalies,
            max(0, self.errors - start.errors),
        )

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.inferences + other.inferences,
            self.anomalies + other.anomalies,
            self.errors + other.errors,
        )

    @property
    def rate(self) -> float:
        """Anomalies per inference (0 without inferences)."""
        return self.anomalies / self.inferences if self.inferences else 0.0

    def to_json(self) -> dict[str, int]:
        return {"inferences": self.inferences, "anomalies": self.anomalies, "errors": self.errors}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Counts:
        return cls(int(obj["inferences"]), int(obj["anomalies"]), int(obj.get("errors", 0)))


@dataclass(frozen=True)
class Gates:
    """The gate settings of one rollout; ``None`` disables a gate.

    Defaults and why: any ``failed`` deployment report stops a rollout (the candidate did not
    even load); an anomaly rate three times its reference is a flood of false alarms, not
    noise, while a 2 % floor keeps a fleet that saw no anomalies from turning one alarm into a
    breach; 50 inferences before judging a rate; the profile's own p99 budget; no inference
    error at all (a healthy model never errs); drift alarms count where agents report drift.
    """

    failures: bool = True
    anomaly_factor: float | None = 3.0
    anomaly_floor: float = 0.02
    min_inferences: int = 50
    latency: str | None = "budget"  # "budget", "1.5x" (budget × F) or "25ms"
    errors: int | None = 0
    drift: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "failures": self.failures,
            "anomaly_factor": self.anomaly_factor,
            "anomaly_floor": self.anomaly_floor,
            "min_inferences": self.min_inferences,
            "latency": self.latency,
            "errors": self.errors,
            "drift": self.drift,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Gates:
        return cls(**{k: obj[k] for k in cls().to_json() if k in obj})

    def describe(self) -> str:
        """The settings in ``--gates`` syntax (what ``rollout status`` shows)."""
        def opt(v: Any, fmt: str) -> str:
            return "off" if v is None else fmt.format(v)

        return ",".join([
            f"failures={'on' if self.failures else 'off'}",
            f"anomaly-rate={opt(self.anomaly_factor, '{:g}x')}",
            f"anomaly-floor={self.anomaly_floor * 100:g}%",
            f"min-inferences={self.min_inferences}",
            f"latency-p99={self.latency or 'off'}",
            f"errors={opt(self.errors, '{}')}",
            f"drift={'on' if self.drift else 'off'}",
        ])

    def latency_limit(self, budget_ms: float | None) -> float | None:
        """The p99 bound in ms for a profile whose budget is ``budget_ms`` (``None``: no bound)."""
        if self.latency is None:
            return None
        if self.latency.endswith("ms"):
            return float(self.latency[:-2])
        if budget_ms is None:
            return None
        factor = 1.0 if self.latency == "budget" else float(self.latency[:-1])
        return budget_ms * factor


DEFAULT_GATES = Gates()

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_FACTOR = re.compile(rf"^({_NUMBER})x$")
_PERCENT = re.compile(rf"^({_NUMBER})%$")
_MS = re.compile(rf"^({_NUMBER})ms$")
_ON_OFF = {"on": True, "off": False}


def parse_gates(text: str, base: Gates = DEFAULT_GATES) -> Gates:
    """Apply a ``--gates`` string (see the module docstring) to ``base``.

    Raises:
        GateError: an unknown gate, a malformed value, or a gate given twice.
    """
    gates = base
    seen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise GateError(f"empty item in --gates {text!r}")
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or not value:
            raise GateError(f"--gates item {item!r} is not NAME=VALUE")
        if name in seen:
            raise GateError(f"--gates names {name} twice")
        seen.add(name)
        gates = _apply(gates, name, value)
    return gates


def _apply(gates: Gates, name: str, value: str) -> Gates:
    def bad(expected: str) -> GateError:
        return GateError(f"--gates {name}={value}: expected {expected}")

    if name in ("failures", "drift"):
        if value not in _ON_OFF:
            raise bad("on or off")
        if name == "failures":
            return replace(gates, failures=_ON_OFF[value])
        return replace(gates, drift=_ON_OFF[value])
    if name == "anomaly-rate":
        if value == "off":
            return replace(gates, anomaly_factor=None)
        m = _FACTOR.match(value)
        if not m or float(m[1]) < 1:
            raise bad("a factor of at least 1 like 3x, or off")
        return replace(gates, anomaly_factor=float(m[1]))
    if name == "anomaly-floor":
        m = _PERCENT.match(value)
        if not m or not 0 < float(m[1]) <= 100:
            raise bad("a percentage in (0, 100] like 2%")
        return replace(gates, anomaly_floor=float(m[1]) / 100)
    if name == "min-inferences":
        if not value.isdigit() or int(value) < 1:
            raise bad("a whole number of at least 1")
        return replace(gates, min_inferences=int(value))
    if name == "latency-p99":
        if value in ("off", "budget"):
            return replace(gates, latency=None if value == "off" else value)
        m = _FACTOR.match(value) or _MS.match(value)
        if not m or float(m[1]) <= 0:
            raise bad("budget, a factor of the budget like 1.5x, a bound like 25ms, or off")
        return replace(gates, latency=value)
    if name == "errors":
        if value == "off":
            return replace(gates, errors=None)
        if not value.isdigit():
            raise bad("the number of errors tolerated (0 or more), or off")
        return replace(gates, errors=int(value))
    known = "failures, anomaly-rate, anomaly-floor, min-inferences, latency-p99, errors, drift"
    raise GateError(f"unknown gate {name!r} in --gates (known: {known})")


# -- evidence and verdict ----------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryEvidence:
    """What one canary reported since its soak began, and its own reference.

    ``baseline``: its cumulative counters under the previous version, read before the stage
    (``None`` if it reported none). ``window``: its counters since the soak began.
    ``failure``: the reason of a ``failed`` deployment report for the candidate.
    ``drifted``: ``None`` when its health carries no drift information.
    """

    agent: str
    window: Counts
    baseline: Counts | None = None
    p99_ms: float | None = None
    latency_budget_ms: float | None = None
    drifted: bool | None = None
    failure: str | None = None


@dataclass(frozen=True)
class StageEvidence:
    """A stage's canaries and the agents still on the previous version (``peers``: their
    summed counters over the soak so far; ``None`` when every agent runs the candidate)."""

    canaries: tuple[CanaryEvidence, ...]
    peers: Counts | None = None


@dataclass(frozen=True)
class Breach:
    """One gate one canary failed, with the figures that failed it."""

    gate: str
    agent: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"gate": self.gate, "agent": self.agent, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.gate} on {self.agent}: {self.detail}"


@dataclass(frozen=True)
class Verdict:
    """The gates' answer: breaches (roll back), and canaries without enough data yet."""

    breaches: tuple[Breach, ...] = ()
    waiting: tuple[str, ...] = field(default=())

    @property
    def breached(self) -> bool:
        return bool(self.breaches)

    @property
    def judged(self) -> bool:
        """Every canary had enough data for every gate (and none was breached)."""
        return not self.breaches and not self.waiting


def evaluate_gates(gates: Gates, evidence: StageEvidence) -> Verdict:
    """Judge a stage's evidence. Pure and deterministic; the same evidence, the same verdict.

    A canary with fewer than ``gates.min_inferences`` inferences in its window cannot breach
    the rate or latency gates yet and is listed in ``waiting``; failures, errors and drift
    breach at once.
    """
    breaches: list[Breach] = []
    waiting: list[str] = []
    peers = evidence.peers
    for c in evidence.canaries:
        if gates.failures and c.failure is not None:
            breaches.append(Breach("failures", c.agent, c.failure))
        if gates.errors is not None and c.window.errors > gates.errors:
            breaches.append(Breach(
                "errors", c.agent, f"{c.window.errors} inference error(s), {gates.errors} tolerated"
            ))
        if gates.drift and c.drifted:
            breaches.append(Breach("drift", c.agent, "the agent reports input drift"))
        if c.window.inferences < gates.min_inferences:
            waiting.append(c.agent)
            continue
        if gates.anomaly_factor is not None:
            refs = {"floor": gates.anomaly_floor}
            if c.baseline is not None and c.baseline.inferences >= gates.min_inferences:
                refs["previous version"] = c.baseline.rate
            if peers is not None and peers.inferences >= gates.min_inferences:
                refs["agents on the previous version"] = peers.rate
            ref_name = max(refs, key=lambda k: refs[k])
            bound = gates.anomaly_factor * refs[ref_name]
            if c.window.rate > bound:
                breaches.append(Breach(
                    "anomaly-rate", c.agent,
                    f"{c.window.anomalies}/{c.window.inferences} = {c.window.rate:.1%} anomalies, "
                    f"over {gates.anomaly_factor:g}x {refs[ref_name]:.1%} ({ref_name})",
                ))
        limit = gates.latency_limit(c.latency_budget_ms)
        if limit is not None and c.p99_ms is not None and c.p99_ms > limit:
            breaches.append(Breach(
                "latency-p99", c.agent, f"p99 {c.p99_ms:.2f} ms over {limit:.2f} ms"
            ))
    return Verdict(tuple(breaches), tuple(waiting))


def drift_flag(health: Mapping[str, Any] | None, slot: str, version: int | None = None) -> bool | None:
    """Whether a health report (its JSON object) says the model in ``slot`` sees drift;
    ``None`` when the report carries no drift figures for that slot (agents that do not
    measure drift, a bundle without a drift reference, another version than ``version``).

    The agent's health ``drift`` is an object per slot, each with ``available`` and, when
    available, a boolean ``drifted`` and the ``version`` it measured (edge_agent/drift.py).
    """
    if health is None or not isinstance(health.get("drift"), Mapping):
        return None
    d = health["drift"].get(slot)
    if not isinstance(d, Mapping) or not d.get("available") or not isinstance(d.get("drifted"), bool):
        return None
    if version is not None and d.get("version") != version:
        return None
    return bool(d["drifted"])
