"""Many simulated agents in one process, for fleet-scale tests on one machine.

``edgefleet-agent simulate --count N --config template.toml`` runs :class:`SimulatedFleet`;
so can Python code (tests, benchmarks). See :mod:`edge_agent.simulate.fleet` for what a
simulated agent shares and what it keeps to itself.
"""

from edge_agent.simulate.fleet import (
    DEFAULT_CONCURRENCY,
    FleetError,
    SimulatedAgent,
    SimulatedFleet,
    agent_ids,
    fleet_configs,
    fleet_summary,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "FleetError",
    "SimulatedAgent",
    "SimulatedFleet",
    "agent_ids",
    "fleet_configs",
    "fleet_summary",
]
