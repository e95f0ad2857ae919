"""Many agents in one process: :class:`SimulatedFleet` and its :class:`SimulatedAgent`.

Each simulated agent is a real :class:`~edge_agent.daemon.Agent` (the same reconcile,
activation, outbox, state, health and Last Will code) with its own configuration derived from
one template (:func:`fleet_configs`): its own agent id, state directory, MQTT session,
birth/death sequence and outbox. Two things differ, both so that hundreds fit on one machine:

- TUF verification runs in this process (:class:`~edge_agent.simulate.repository.InProcessRepository`),
  each agent on its own trusted metadata, a bounded number of passes at a time;
- agents that activate the same artifact share one runtime session
  (:class:`~edge_agent.simulate.runtimes.SharedRuntimes`).

Every agent runs in its own thread plus the worker threads a real agent has (outbox publisher,
reconcile, health, state writer); one :class:`~edge_agent.simulate.network.NetworkLoop` thread
drives every MQTT connection instead of one paho thread per connection.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.daemon import Agent
from edge_agent.reconcile import Repository
from edge_agent.runtime import ModelRuntime
from edge_agent.simulate.network import NetworkLoop
from edge_agent.simulate.repository import InProcessRepository
from edge_agent.simulate.runtimes import SharedRuntimes
from edge_agent.sources import parse_source
from shared.bundle import BundleSpec
from shared.topics import TopicError, validate_agent_id

__all__ = ["FleetError", "SimulatedAgent", "SimulatedFleet", "agent_ids", "fleet_configs", "fleet_summary"]

log = logging.getLogger(__name__)

MAX_AGENTS = 10000
DEFAULT_CONCURRENCY = 16  # reconcile passes (TUF verification + download) at once


class FleetError(ValueError):
    """The template or the fleet's parameters cannot make a fleet (one line)."""


def agent_ids(prefix: str, count: int) -> list[str]:
    """``{prefix}-{i:04d}`` for ``i`` in ``0 … count-1``.

    Raises:
        FleetError: ``count`` out of range, or the ids are not valid agent ids.
    """
    if not 1 <= count <= MAX_AGENTS:
        raise FleetError(f"--count must be between 1 and {MAX_AGENTS}, got {count}")
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    try:
        validate_agent_id(ids[-1])
        validate_agent_id(ids[0])
    except TopicError as e:
        raise FleetError(f"--prefix {prefix!r}: {e}") from e
    return ids


def fleet_configs(template: AgentConfig, count: int, prefix: str | None = None) -> list[AgentConfig]:
    """The configurations of ``count`` simulated agents made from ``template``.

    Agent ``i`` (from 0) is ``{prefix}-{i:04d}`` (``prefix`` defaults to the template's
    ``agent.id``) with state directory ``{agent.state_dir}/{agent id}``; everything else
    (broker, trust root, profile, group, source, health period, outbox size) is the
    template's.

    Raises:
        FleetError: bad count or prefix; a ``stdin`` source (one stream cannot feed many
            agents); ``[federated] enabled`` (one SuperNode per agent is not simulated);
            ``[api] enabled`` (one listen address cannot serve many agents).
    """
    ids = agent_ids(template.agent_id if prefix is None else prefix, count)
    if parse_source(template.source).kind == "stdin":
        raise FleetError("source.spec: stdin cannot feed many simulated agents; use host or csv:")
    if template.federated.enabled:
        raise FleetError("[federated] enabled is not supported by simulate; set enabled = false")
    if template.api.enabled:
        raise FleetError("[api] enabled is not supported by simulate (the agents would share one "
                         "listen address); set enabled = false")
    return [dataclasses.replace(template, agent_id=i, state_dir=template.state_dir / i) for i in ids]


class SimulatedAgent(Agent):
    """An :class:`Agent` that verifies with python-tuf in this process and shares runtimes.

    ``passes_done`` counts finished reconcile passes (the fleet's readiness).
    """

    def __init__(self, config: AgentConfig, *, runtimes: SharedRuntimes, passes: threading.Semaphore,
                 on_pass: threading.Condition, network: NetworkLoop) -> None:
        super().__init__(config)
        self._network = network
        self._runtimes = runtimes
        self._passes = passes
        self._on_pass = on_pass
        self.passes_done = 0

    def _repository(self, metadata: Path) -> Repository:
        c = self.config
        return InProcessRepository(
            metadata, c.state_dir / "targets", c.state_dir / "chunks", broker=c.broker,
            client_id=f"{c.agent_id}.fetch", topics=self.topics, passes=self._passes,
            network=self._network, timeout=15,
        )

    def start_connections(self) -> None:
        """Connect in the background, driven by the fleet's network loop (not a paho thread)."""
        assert self._session is not None
        self._network.add(self._session, self.config.broker.url)

    def shutdown(self) -> None:
        if self._session is not None:
            self._network.forget(self._session)  # the clean disconnect is not reconnected
        super().shutdown()

    def _open_model(self, spec: BundleSpec, model: bytes, *, threads: int) -> ModelRuntime:
        return self._runtimes.open(spec, model, threads=threads)

    def _reconcile_once(self) -> bool:
        try:
            return super()._reconcile_once()
        finally:
            with self._on_pass:
                self.passes_done += 1
                self._on_pass.notify_all()


class SimulatedFleet:
    """``count`` simulated agents from one template config, in this process.

    Usage from Python (also a context manager: ``with SimulatedFleet(…) as fleet:``)::

        fleet = SimulatedFleet(load_config("template.toml"), 50)
        fleet.start()
        fleet.wait_ready(60)   # every agent connected and through its first reconcile pass
        ...
        fleet.stop()           # each agent announces ``stopped`` and disconnects cleanly

    Args:
        template: the template configuration (see :func:`fleet_configs`).
        count: how many agents.
        prefix: agent id prefix (default: the template's ``agent.id``).
        concurrency: reconcile passes running at once across the fleet.

    Raises:
        FleetError: as :func:`fleet_configs`, or ``concurrency`` < 1.
    """

    def __init__(self, template: AgentConfig, count: int, *, prefix: str | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if concurrency < 1:
            raise FleetError(f"--concurrency must be at least 1, got {concurrency}")
        self.configs = fleet_configs(template, count, prefix)
        self.runtimes = SharedRuntimes()
        self._passes = threading.BoundedSemaphore(concurrency)
        self._on_pass = threading.Condition()
        self.network = NetworkLoop()
        self.agents: list[SimulatedAgent] = []
        self._threads: list[threading.Thread] = []
        self.exit_codes: dict[str, int] = {}

    @property
    def ids(self) -> list[str]:
        return [c.agent_id for c in self.configs]

    def start(self) -> None:
        """Start every agent in its own thread; returns at once (connections are made in the
        background, as a real agent's)."""
        self.network.start()
        for config in self.configs:
            agent = SimulatedAgent(config, runtimes=self.runtimes, passes=self._passes,
                                   on_pass=self._on_pass, network=self.network)
            thread = threading.Thread(target=self._run, args=(agent,), name=f"agent {config.agent_id}",
                                      daemon=True)
            self.agents.append(agent)
            self._threads.append(thread)
            thread.start()

    def _run(self, agent: SimulatedAgent) -> None:
        try:
            code = agent.run()
        except Exception:
            log.exception("simulated agent %s failed", agent.config.agent_id)
            code = 1
        self.exit_codes[agent.config.agent_id] = code
        with self._on_pass:
            self._on_pass.notify_all()

    def running(self) -> int:
        """How many agents have not stopped."""
        return sum(t.is_alive() for t in self._threads)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every agent has finished at least one reconcile pass (it was connected:
        a pass runs only while connected), or one has stopped; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._on_pass:
            while True:
                if all(a.passes_done > 0 for a in self.agents) or self.exit_codes:
                    return not self.exit_codes
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._on_pass.wait(left)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until every agent has stopped (by :meth:`stop`, or by itself, e.g. refused
        credentials); ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 120.0) -> bool:
        """Stop every agent as SIGTERM stops a real one (each announces ``stopped``, retained,
        and disconnects cleanly), then close the shared runtimes. ``False`` if some agent did
        not stop within ``timeout``."""
        for agent in self.agents:
            agent.stop()
        stopped = self.wait_stopped(timeout)
        if stopped:
            self.runtimes.close()
        # Waits (bounded) for the stopped agents' DISCONNECTs to go out: ending the process
        # with them queued would have the broker publish their Last Will over ``stopped``.
        self.network.close()
        return stopped

    def exit_code(self) -> int:
        """The first non-zero exit code among the agents (by agent id), else 0."""
        return next((self.exit_codes[i] for i in sorted(self.exit_codes) if self.exit_codes[i]), 0)

    def __enter__(self) -> SimulatedFleet:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def fleet_summary(fleet: SimulatedFleet) -> dict[str, object]:
    """What ``simulate --json`` prints once the fleet is up."""
    ids: Sequence[str] = fleet.ids
    return {"agents": len(ids), "first": ids[0], "last": ids[-1],
            "state_dirs": str(fleet.configs[0].state_dir.parent)}
