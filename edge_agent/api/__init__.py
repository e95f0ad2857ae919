"""The agent's local HTTP API: ad-hoc predictions, a health check and Prometheus metrics.

Off by default (``[api] enabled``); importing this package loads ``http.server`` and
``prometheus_client``, so the agent imports it only when the API is enabled.
"""

from edge_agent.api._base import AgentView
from edge_agent.api._metrics import AgentMetrics
from edge_agent.api._predict import PredictError, parse_windows, predict
from edge_agent.api._server import LocalApi, health_check

__all__ = ["AgentMetrics", "AgentView", "LocalApi", "PredictError", "health_check", "parse_windows", "predict"]
