"""Federated learning on the edge host: local data, local privacy ledger, SuperNode lifecycle.

- :class:`WindowStore` — bounded on-disk store of windows the active model scored as normal
  (the ClientApp trains on them; they never leave the host);
- :class:`LocalLedger` — the host's own ε ledger, refusing rounds beyond its budget.

Importing this package loads neither flwr, torch nor dp-accounting: the ledger imports
dp-accounting when it composes, and training runs in the SuperNode's child processes. The
agent's normal path does not import this package at all unless ``[federated]`` is enabled.
"""

from __future__ import annotations

from edge_agent.federated._errors import BudgetExhausted, FederatedStateError
from edge_agent.federated.ledger import LocalLedger
from edge_agent.federated.store import WindowStore

__all__ = ["BudgetExhausted", "FederatedStateError", "LocalLedger", "WindowStore"]
