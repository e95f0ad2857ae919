"""What the agent's federated state can fail with (no optional dependency imported here)."""

from __future__ import annotations

__all__ = ["BudgetExhausted", "FederatedStateError"]


class FederatedStateError(RuntimeError):
    """A federated state file (window store, privacy ledger) cannot be opened, read or written."""


class BudgetExhausted(Exception):  # noqa: N818 - the contract's name
    """Training this round would spend more privacy than the host's local budget allows.

    The message is one line: what was spent, the budget, and what the round asked for.
    ``spent``, ``budget`` and ``would_be`` carry the figures (ε at the ledger's δ).
    """

    def __init__(self, spent: float, budget: float, would_be: float, asked: str) -> None:
        super().__init__(
            f"local privacy budget exhausted: spent ε={spent:.4g} of ε={budget:.4g}; "
            f"{asked} would bring it to ε={would_be:.4g}"
        )
        self.spent = spent
        self.budget = budget
        self.would_be = would_be
