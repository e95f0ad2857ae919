"""Staged rollouts with automatic rollback (``edgefleet rollout …``).

- :mod:`~trainer.fleet.rollout.plan`: stages and soak times as users write them;
- :mod:`~trainer.fleet.rollout.gates`: the pure rules that judge a stage;
- :mod:`~trainer.fleet.rollout.store`: the resumable state in the registry (schema v4);
- :mod:`~trainer.fleet.rollout.documents`: the TUF documents a stage, a promotion and a
  rollback write;
- :mod:`~trainer.fleet.rollout.observer`: what the agents report, from MQTT;
- :mod:`~trainer.fleet.rollout.controller`: the state machine;
- :mod:`~trainer.fleet.rollout.launch`: checking and recording a new rollout.
"""

from trainer.fleet.rollout.controller import RolloutController, StageView
from trainer.fleet.rollout.gates import DEFAULT_GATES, GateError, Gates, evaluate_gates, parse_gates
from trainer.fleet.rollout.launch import RolloutRequest, check_request, create_rollout
from trainer.fleet.rollout.observer import FleetObserver
from trainer.fleet.rollout.plan import DEFAULT_STAGES, PlanError, parse_duration, parse_stages
from trainer.fleet.rollout.store import RolloutRecord, RolloutStore, check_rollout_id

__all__ = [
    "DEFAULT_GATES",
    "DEFAULT_STAGES",
    "FleetObserver",
    "GateError",
    "Gates",
    "PlanError",
    "RolloutController",
    "RolloutRecord",
    "RolloutRequest",
    "RolloutStore",
    "StageView",
    "check_request",
    "check_rollout_id",
    "create_rollout",
    "evaluate_gates",
    "parse_duration",
    "parse_gates",
    "parse_stages",
]
