"""ε(δ) of a federated run's rounds, with dp-accounting. Pure: no I/O, no Flower.

Each round is one Gaussian mechanism on the sum of the clipped updates (noise multiplier σ,
the noise standard deviation over the clipping norm), applied to the nodes sampled for it.

**The mechanism the figure is for.** Central DP: each contribution is clipped to C and counts
the same (no weighting by example counts), N(0, σ²C²) is added to the *sum*, and the sum is
divided by a *fixed* denominator m₀ chosen when the run starts (q × the nodes connected at
round 1, at least 1), not by the number m of contributions that came: a node that declines or
is lost is a zero update. Flower's wrapper averages over m and adds σ·C/m; the round loop
rescales that average's step by m/m₀, which gives exactly (sum + noise)/m₀
(:func:`trainer.federated.rounds.fixed_denominator_step`). Then adding or removing one node
moves the noised sum by at most C and each round is ``GaussianDpEvent(σ)`` (Poisson-subsampled
at q < 1); with the realised m as denominator it would not be. With adaptive clipping the
clipped-update noise and the clipped-count noise together are one Gaussian mechanism of
:func:`adaptive_effective_multiplier`, which is what is charged. Local DP: two datasets on a
host give clipped updates up to 2C apart, so the ClientApp adds noise σ·2C (sensitivity 2C) and
each round is ``GaussianDpEvent(σ)`` for the host; the server drew the sample and sees every
reply, so no amplification is claimed (q = 1) on either ledger.

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

__all__ = ["ACCOUNTANTS", "adaptive_effective_multiplier", "adaptive_wrapper_multiplier", "compose_epsilon",
           "local_dp_epsilon"]

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


def adaptive_effective_multiplier(update_multiplier: float, count_stddev: float) -> float:
    """σ of the one Gaussian mechanism that Flower's server-side adaptive clipping runs.

    The wrapper adds σ_z·C to the clipped updates' sum (``update_multiplier``, its
    ``noise_multiplier`` attribute) and N(0, σ_b²) to the *raw* clipped count Σbᵢ, bᵢ ∈ {0, 1}
    (``count_stddev``, its ``clipped_count_stddev``): sensitivities C and 1, so the pair is a
    Gaussian mechanism of σ = (σ_z⁻² + σ_b⁻²)^-½. (Flower sizes σ_z for a count centred at ½,
    sensitivity ½, i.e. (σ_z⁻² + (2σ_b)⁻²)^-½, which over-states σ.)
    """
    if update_multiplier <= 0 or count_stddev <= 0:
        return 0.0
    return float((update_multiplier ** -2 + count_stddev ** -2) ** -0.5)


def adaptive_wrapper_multiplier(sigma: float, count_stddev: float) -> float:
    """The ``noise_multiplier`` to hand Flower's adaptive wrapper so that
    :func:`adaptive_effective_multiplier` of what it then adds is ``sigma``: Flower turns s
    into σ_z = (s⁻² − (2σ_b)⁻²)^-½, and σ_z⁻² + σ_b⁻² = σ⁻² needs s⁻² = σ⁻² − ¾σ_b⁻².
    Raises ``ValueError`` unless ``count_stddev`` > σ·√¾."""
    rest = sigma ** -2 - 0.75 * count_stddev ** -2
    if not rest > 0:
        raise ValueError(f"the clipped-count noise {count_stddev} is too small for σ = {sigma}")
    return float(rest ** -0.5)


def local_dp_epsilon(noise_multiplier: float, delta: float) -> float:
    """The per-round ε that makes Flower's ``LocalDpMod`` add noise of standard deviation
    ``noise_multiplier × sensitivity`` (the ClientApp sets the sensitivity to twice the
    clipping norm: two clipped updates of one host are up to 2C apart).

    ``LocalDpMod`` takes (ε, δ) and adds the classic Gaussian mechanism's noise,
    ``sensitivity · sqrt(2 ln(1.25/δ)) / ε``; inverting that keeps one parameter, σ, for both
    modes, and the ledgers account the noise actually added (RDP of a Gaussian of σ), not the
    classic bound (which holds only for ε < 1).
    """
    if noise_multiplier <= 0:
        raise ValueError("local DP needs a noise multiplier > 0")
    return math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier
