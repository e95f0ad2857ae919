"""ε(δ) of a federated run's rounds, with dp-accounting. Pure: no I/O, no Flower.

Each round is one Gaussian mechanism on the sum of the clipped updates (noise multiplier σ,
the noise standard deviation over the clipping norm), applied to the nodes sampled for it.

**Which figure is reported, and why.** The ledger reports and enforces the RDP accountant's
ε (dp-accounting ``RdpAccountant``), the same accountant as the agents' own ledgers
(:mod:`edge_agent.federated.ledger`), so a run's figure on the trainer and on a host that took
part in every round agree. The PLD accountant's figure (tighter; 7.05 instead of 7.90 for
q=0.1, σ=1.0, 100 rounds, δ=1e-5) is recorded beside it for reference only.

**Amplification by subsampling only where the sampling is random.** Flower's strategies sample
a *fixed number* of nodes *without replacement* (``random.sample`` in
``flwr.serverapp.strategy.strategy_utils.sample_nodes``), and Flower's own accountant
(``flwr[dp]``) therefore accepts only ``no-amplification``. The Poisson amplification theorem
does not describe that sampling. So the trainer does not use Flower's node sampling when
``--fraction`` is below 1: it draws each connected node independently with probability q
(Poisson sampling, :func:`trainer.federated.rounds.poisson_sample`) and hands the strategy only
the drawn nodes; then ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` is the mechanism that
ran. With ``--fraction 1`` every node takes part and each round is a plain Gaussian mechanism
(q = 1, no amplification claimed).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["ACCOUNTANTS", "compose_epsilon", "local_dp_epsilon"]

ACCOUNTANTS = ("rdp", "pld")


def compose_epsilon(rounds: Iterable[tuple[float, float]], delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of composing rounds given as ``(noise_multiplier, sampling_rate)``.

    ``sampling_rate < 1`` is a Poisson-subsampled Gaussian, ``== 1`` a plain Gaussian. Equal
    rounds are self-composed as one event (hundreds of rounds cost what one does). Returns 0.0
    for no rounds and ``math.inf`` when a round has no noise (σ = 0: no DP). Raises
    ``ValueError`` for an unknown accountant or parameters out of range.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    counts = Counter((float(s), float(q)) for s, q in rounds)
    if not counts:
        return 0.0
    for sigma, q in counts:
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"noise multiplier must be a finite number >= 0, got {sigma}")
        if not 0 < q <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {q}")
    if any(sigma == 0 for sigma, _ in counts):
        return math.inf
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    events = []
    for (sigma, q), n in sorted(counts.items()):
        event: Any = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        events.append(dp_accounting.SelfComposedDpEvent(event, n))
    acc: Any = RdpAccountant() if accountant == "rdp" else PLDAccountant()
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def local_dp_epsilon(noise_multiplier: float, delta: float) -> float:
    """The per-round ε that makes Flower's ``LocalDpMod`` add noise of standard deviation
    ``noise_multiplier × clipping_norm`` (its sensitivity set to the clipping norm).

    ``LocalDpMod`` takes (ε, δ) and adds the classic Gaussian mechanism's noise,
    ``sensitivity · sqrt(2 ln(1.25/δ)) / ε``; inverting that keeps one parameter, σ, for both
    modes, and the ledgers account the noise actually added (RDP of a Gaussian of σ), not the
    classic bound (which holds only for ε < 1).
    """
    if noise_multiplier <= 0:
        raise ValueError("local DP needs a noise multiplier > 0")
    return math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier
