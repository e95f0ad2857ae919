"""The options of one federated run, validated without Flower or torch (pure)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DP_MODES", "STRATEGIES", "FederatedOptions", "OptionsError"]

STRATEGIES = ("fedavg", "fedprox", "fedadam")
DP_MODES = ("central", "local", "off")


class OptionsError(ValueError):
    """A federated run's options do not make sense together (one line for the user)."""


@dataclass(frozen=True)
class FederatedOptions:
    """What ``edgefleet fl start`` was asked for.

    ``clipping_norm`` is the fixed clipping norm, or with ``adaptive_clipping`` the initial
    one. ``fraction`` is the Poisson sampling rate of nodes per round (1 = every connected
    node, see :mod:`trainer.federated.accounting`). ``min_nodes`` connected nodes are waited
    for before each round (up to ``node_wait`` seconds) and must contribute for the round's
    aggregate to be applied. ``round_timeout`` bounds the wait for replies: a node that drops
    out costs at most that. ``epochs`` are the local epochs on each node.
    """

    group: str
    rounds: int
    strategy: str = "fedavg"
    dp: str = "central"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    adaptive_clipping: bool = False
    epsilon_budget: float | None = None
    delta: float = 1e-5
    fraction: float = 1.0
    min_nodes: int = 2
    proximal_mu: float = 0.01
    epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 64
    eta: float = 1e-2
    round_timeout: float = 300.0
    node_wait: float = 120.0
    seed: int = 0

    def check(self) -> FederatedOptions:
        """Return self if the options are consistent, else raise :class:`OptionsError`."""
        if self.strategy not in STRATEGIES:
            raise OptionsError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.dp not in DP_MODES:
            raise OptionsError(f"--dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.rounds < 1:
            raise OptionsError("--rounds must be at least 1")
        if not 0 < self.fraction <= 1:
            raise OptionsError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.min_nodes < 1:
            raise OptionsError("--min-nodes must be at least 1")
        if not 0 < self.delta < 1:
            raise OptionsError(f"--delta must be in (0, 1), got {self.delta}")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise OptionsError(f"--clip must be a positive number or 'adaptive', got {self.clipping_norm}")
        if self.dp == "off":
            if self.epsilon_budget is not None:
                raise OptionsError("--epsilon-budget needs differential privacy: not with --dp off")
            if self.fraction < 1:
                pass  # sampling without DP is just sampling
        else:
            if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
                raise OptionsError(f"--noise must be a positive number with --dp {self.dp}, got {self.noise_multiplier}")
            if self.epsilon_budget is not None and not self.epsilon_budget > 0:
                raise OptionsError(f"--epsilon-budget must be positive, got {self.epsilon_budget}")
        if self.strategy == "fedadam" and self.dp == "central":
            raise OptionsError("--strategy fedadam cannot run with --dp central (Flower's wrapper adds the noise after "
                               "the Adam step, whose sensitivity is not the clipping norm): use --dp local or fedavg")
        if self.adaptive_clipping and self.dp != "central":
            raise OptionsError("--clip adaptive is central DP's adaptive clipping: it needs --dp central")
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            raise OptionsError(f"--mu must be positive with fedprox, got {self.proximal_mu}")
        if self.epochs < 1:
            raise OptionsError("--local-epochs must be at least 1")
        if not self.round_timeout > 0 or not self.node_wait > 0:
            raise OptionsError("--round-timeout and --node-wait must be positive")
        return self

    @property
    def effective_noise(self) -> float:
        """σ of each round's Gaussian mechanism (0 without DP: ε = inf)."""
        return 0.0 if self.dp == "off" else self.noise_multiplier

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FederatedOptions:
        return cls(**{k: v for k, v in obj.items() if k in cls.__dataclass_fields__}).check()
