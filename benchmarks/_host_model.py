"""The host-metrics model of the fleet benchmark's rollback and API parts, and what the
agents say about it on the broker.

:func:`host_models` trains ``host@1`` on a synthetic host-metrics CSV (``edgefleet data
synth``, ``edgefleet train``, as an operator would) and registers ``host@2``: the same network
with a raw-score threshold of 1e-9, so that every window alarms — a candidate that floods
false alarms, a real bundle that passes the agent's smoke test. :class:`AgentLog` keeps every
agent message a subscriber receives, with its arrival time.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["FLOOD_THRESHOLD", "AgentLog", "Message", "cli", "host_models"]

REPO = Path(__file__).resolve().parents[1]
#: Every window of the flooding candidate alarms: its raw-score threshold is below any score.
FLOOD_THRESHOLD = 1e-9
T = TypeVar("T")


def cli(module: str, *args: str, timeout: float = 600) -> str:
    """Run ``python -m MODULE ARGS`` in the repository; its stdout, or exit with its stderr."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args[:2])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def host_models(work: Path, rows: int) -> tuple[Path, Path]:
    """A synthetic CSV of ``rows`` rows and a registry (with its TUF repository) holding
    ``host@1`` and the flooding ``host@2``; returns ``(csv, registry)``."""
    from shared.bundle import ScoreSpec, read_bundle, write_bundle
    from shared.score_pipeline import FixedThresholdPipeline
    from trainer.registry import NewArtifact, Registry

    csv, registry = work / "host.csv", work / "registry"
    cli("trainer.cli", "data", "synth", "--out", str(csv), "--rows", str(rows), "--seed", "3")
    cli("trainer.cli", "train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host",
        "--registry", str(registry), "--epochs", "3", "--train-fraction", "0.1", "--seed", "0",
        "--json", "-q")
    with Registry.open(registry) as reg:
        good = reg.get("host", 1)
        artifacts = []
        for art in good.artifacts:
            spec, model = read_bundle(reg.bundle(art.sha256))
            score = ScoreSpec(spec.score.kind, FLOOD_THRESHOLD, math.log(FLOOD_THRESHOLD),
                              spec.score.width, FixedThresholdPipeline())
            artifacts.append(NewArtifact(art.format, art.quantization,
                                         write_bundle(replace(spec, score=score), model),
                                         art.model_bytes, art.profiles, art.parity))
        flood = reg.register(
            "host", metrics=good.metrics, params=good.params,
            lineage={**good.lineage, "parent_version": 1,
                     "note": f"host@1 with score threshold {FLOOD_THRESHOLD:g}"},
            architecture=good.architecture, artifacts=artifacts,
        )
        if flood.version != 2:
            raise SystemExit(f"the flooding candidate is host@{flood.version}, expected host@2")
    cli("trainer.cli", "repo", "init", "--registry", str(registry), "--json")
    return csv, registry


@dataclass(frozen=True)
class Message:
    """One decoded agent message and when (``time.time()``) the subscriber received it."""

    at: float
    agent: str
    kind: str
    body: Any


class AgentLog:
    """Every ``state``, ``health``, ``deployments`` and ``events`` message of every agent, in
    arrival order; :meth:`wait` blocks until a predicate over the log holds."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from shared.messages import (
            decode_agent_health,
            decode_agent_state,
            decode_deployment_status,
            decode_event,
        )
        from shared.topics import Topics

        topics = Topics()
        decoders: dict[str, Callable[[bytes], Any]] = {
            "state": decode_agent_state, "health": decode_agent_health,
            "deployments": decode_deployment_status, "events": decode_event,
        }
        self.cond = threading.Condition()
        self.messages: list[Message] = []

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            now = time.time()
            parsed = topics.parse_agent_topic(msg.topic)
            if parsed is None or not msg.payload or parsed[1] not in decoders:
                return
            try:
                body = decoders[parsed[1]](bytes(msg.payload))
            except ValueError:
                return  # a drift event on the events topic: another schema
            with self.cond:
                self.messages.append(Message(now, parsed[0], parsed[1], body))
                self.cond.notify_all()

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        root = f"{topics.root}/agents/+"
        self.client.subscribe([(f"{root}/{kind}", 1) for kind in decoders])
        self.client.loop_start()

    def of(self, kind: str, agents: Callable[[str], bool] = lambda _a: True) -> list[Message]:
        with self.cond:
            return [m for m in self.messages if m.kind == kind and agents(m.agent)]

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (result := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
                self.cond.wait(left)
            return result

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
