"""The server side of a federated run: the round loop the ServerApp runs (imports flwr).

One round: wait for ``min_nodes`` connected nodes, sample (every node, or Poisson sampling at
``fraction``: :mod:`trainer.federated.accounting`), *charge the ledger first* (a round over
budget is refused before any message goes out), send the train messages through the strategy
(FedAvg, FedProx or FedAdam, wrapped by Flower's central-DP wrapper), wait at most
``round_timeout`` for replies, aggregate the replies that came. A node that declines (its own
budget is spent, it has no data) answers with an error reply and is not aggregated; a node that
dies does not answer and costs the round at most the timeout. Fewer than ``min_nodes``
contributions: the round is ``failed`` and the global model is left as it was.

Under central DP the noised sum of the clipped updates is divided by a denominator fixed at
round 1 (:func:`fixed_denominator_step`, :mod:`trainer.federated.accounting`), and the σ charged
is the one of the mechanism as run (:func:`charged_multiplier`). FedAdam is not offered with
central DP: Flower's wrapper would add its noise after the Adam step.

The loop is the strategy's own ``Strategy.start`` loop taken apart, so that the ledger sits
between sampling and sending; the strategies themselves are Flower's, unchanged.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from trainer.federated.accounting import adaptive_effective_multiplier, adaptive_wrapper_multiplier
from trainer.federated.ledger import BudgetRefused, PrivacyLedger
from trainer.federated.options import FederatedOptions

__all__ = ["DECLINED", "RoundsOutcome", "build_strategy", "charged_multiplier", "fixed_denominator_step",
           "poisson_sample", "run_rounds"]

log = logging.getLogger(__name__)
DECLINED = "edgefleet-declined"  # prefix of a node's error reason when it chose not to train
ARRAYS_KEY = "arrays"
UNIT_WEIGHT = "unit-weight"  # every contribution counts the same under central DP
COUNT_NOISE = 2.0  # adaptive clipping: the clipped count's noise, in units of σ (must exceed √¾)


class NodesUnavailable(RuntimeError):
    """Fewer than ``min_nodes`` nodes connected within ``node_wait`` seconds."""


@dataclass
class RoundsOutcome:
    arrays: ArrayRecord
    rounds_done: int = 0
    refused: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class _AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with two changes that the accounting needs: the
    clipped fraction is the noisy count over the round's fixed ``denominator`` (not over the
    realised number of replies), and the new clipping norm is applied *after* the round's noise
    is added (Flower updates the norm first and scales the noise with the new one, so a
    shrinking norm would leave the round under-noised)."""

    denominator: float = 1.0
    _pending_fraction: float | None = None

    def _noisy_fraction(self, count: int, total: int) -> float:
        return float(np.random.normal(count, self.clipped_count_stddev)) / float(self.denominator)

    def _geometric_update(self, clipped_fraction: float) -> None:
        self._pending_fraction = clipped_fraction

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        self._pending_fraction = None
        result = super().aggregate_train(server_round, replies)
        if self._pending_fraction is not None:
            super()._geometric_update(self._pending_fraction)
        return result


def charged_multiplier(strategy: Strategy, options: FederatedOptions) -> float:
    """σ of each round's Gaussian mechanism as ``strategy`` runs it (what both ledgers charge):
    with adaptive clipping, the combined σ of the update and clipped-count noise
    (:func:`~trainer.federated.accounting.adaptive_effective_multiplier`)."""
    if isinstance(strategy, DifferentialPrivacyServerSideAdaptiveClipping):
        return adaptive_effective_multiplier(strategy.noise_multiplier, strategy.clipped_count_stddev)
    return options.effective_noise


def fixed_denominator_step(current: ArrayRecord, averaged: ArrayRecord, contributions: int,
                           denominator: float) -> ArrayRecord:
    """The global model after a central-DP round whose noised sum is divided by ``denominator``.

    Flower's wrapper returns ``current + (S + Z)/m`` (S the sum of the m clipped updates, Z the
    noise σ·C); this returns ``current + (S + Z)/denominator``, the same noised sum over a
    denominator that does not depend on who contributed.
    """
    scale = contributions / denominator
    out = OrderedDict()
    for key, cur in current.items():
        c, a = cur.numpy(), averaged[key].numpy()
        out[key] = Array(np.ascontiguousarray((c + scale * (a.astype(np.float64) - c)).astype(a.dtype)))
    return ArrayRecord(out)


def build_strategy(options: FederatedOptions) -> Strategy:
    """Flower's strategy for ``options``, sampling nothing itself (the loop hands it the
    sampled nodes) and skipping federated evaluation; wrapped for central DP."""
    weight = UNIT_WEIGHT if options.dp == "central" else "num-examples"
    common: dict[str, Any] = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=0,
                                  min_evaluate_nodes=0, min_available_nodes=0, weighted_by_key=weight)
    base: Strategy
    if options.strategy == "fedprox":
        base = FedProx(**common, proximal_mu=options.proximal_mu)
    elif options.strategy == "fedadam":
        base = FedAdam(**common, eta=options.eta)  # eta_l is the clients' rate: Flower's FedAdam does not use it
    else:
        base = FedAvg(**common)
    if options.dp != "central":
        return base
    if options.adaptive_clipping:
        # Flower's default count noise, num_sampled/20, is far too small for a few nodes; with
        # σ_b = 2σ and the multiplier handed to Flower adjusted for its raw (uncentred) count,
        # the update and count noise together are a Gaussian mechanism of σ (accounting.py).
        count_stddev = COUNT_NOISE * options.noise_multiplier
        return _AdaptiveClipping(
            base, adaptive_wrapper_multiplier(options.noise_multiplier, count_stddev), num_sampled_clients=1,
            initial_clipping_norm=options.clipping_norm, clipped_count_stddev=count_stddev)
    return DifferentialPrivacyServerSideFixedClipping(
        base, options.noise_multiplier, options.clipping_norm, num_sampled_clients=1)


def poisson_sample(nodes: Sequence[int], rate: float, rng: random.Random) -> list[int]:
    """Each node independently with probability ``rate`` (every node when ``rate == 1``)."""
    if rate >= 1:
        return list(nodes)
    return [n for n in nodes if rng.random() < rate]


class _SampledGrid(Grid):
    """The run's grid, showing the strategy only the nodes sampled for this round."""

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        self._grid = grid
        self._nodes = list(nodes)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # type: ignore[override]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def _wait_for_nodes(grid: Grid, minimum: int, wait: float, clock: Callable[[], float]) -> list[int]:
    deadline = clock() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if clock() >= deadline:
            raise NodesUnavailable(f"{len(nodes)} node(s) connected after {wait:g} s; the run needs {minimum}")
        time.sleep(1.0)  # the SuperLink has no "node joined" event to wait on


def _node_name(reply: Message) -> str:
    node = reply.content.config_records.get("node")
    name = node.get("node-name") if node is not None else None
    return str(name) if name else f"node-{reply.metadata.src_node_id}"


def run_rounds(grid: Grid, run: str, options: FederatedOptions, arrays: ArrayRecord,
               ledger: PrivacyLedger, architecture: dict[str, Any],
               clock: Callable[[], float] = time.monotonic) -> RoundsOutcome:
    """Run ``options.rounds`` rounds from ``arrays``; returns the global model and history.

    Stops early, with ``outcome.refused`` set, at the first round the ledger refuses, and in
    the same way when too few nodes connect once a round has been aggregated (the rounds done
    and the ε they spent are kept). Raises :class:`NodesUnavailable` when too few nodes
    connect before any round was aggregated.
    """
    strategy = build_strategy(options)
    rng = random.Random(options.seed)
    outcome = RoundsOutcome(arrays=arrays)
    sigma = charged_multiplier(strategy, options)
    # local DP: the server drew the sample and sees every reply, so no amplification for it
    charged_rate = 1.0 if options.dp == "local" else options.fraction
    central = isinstance(strategy, DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyServerSideAdaptiveClipping)
    denominator = 1.0
    for rnd in range(1, options.rounds + 1):
        try:
            nodes = _wait_for_nodes(grid, options.min_nodes, options.node_wait, clock)
        except NodesUnavailable as e:
            if outcome.rounds_done == 0:
                raise
            log.warning("round %d not started: %s", rnd, e)
            outcome.refused = f"round {rnd} not started: {e}"
            break
        if rnd == 1 and options.fraction * len(nodes) < options.min_nodes:
            log.warning("--fraction %g of %d node(s) samples %.3g a round on average, fewer than --min-nodes %d: "
                        "many rounds will be charged and fail", options.fraction, len(nodes),
                        options.fraction * len(nodes), options.min_nodes)
        if rnd == 1:  # fixed for the run: the expected number of sampled nodes
            denominator = max(1.0, options.fraction * len(nodes))
            if isinstance(strategy, _AdaptiveClipping):
                strategy.denominator = denominator
        sampled = poisson_sample(nodes, options.fraction, rng)
        clip = float(getattr(strategy, "clipping_norm", options.clipping_norm))
        try:
            epsilon = ledger.begin_round(run, rnd, sampling_rate=charged_rate,
                                         noise_multiplier=sigma, clipping_norm=clip,
                                         nodes_sampled=[str(n) for n in sampled])
        except BudgetRefused as e:
            log.warning("%s", e)
            outcome.refused = str(e)
            break
        config = ConfigRecord({
            "run": run, "server-round": rnd, "noise-multiplier": sigma,
            "sampling-rate": options.fraction, "clipping-norm": clip, "epochs": options.epochs,
            "proximal-mu": options.proximal_mu if options.strategy == "fedprox" else 0.0,
            "dp": options.dp, "delta": options.delta, "learning-rate": options.learning_rate,
            "batch-size": options.batch_size, "seed": options.seed + rnd,
            "architecture": json.dumps(architecture, sort_keys=True),
        })
        if central:
            strategy.num_sampled_clients = max(1, len(sampled))  # type: ignore[attr-defined]  # the DP wrapper
        started = clock()
        messages = list(strategy.configure_train(rnd, outcome.arrays, config, _SampledGrid(grid, sampled)))
        replies = list(grid.send_and_receive(messages, timeout=options.round_timeout)) if messages else []
        good = [r for r in replies if not r.has_error()]
        answered = {r.metadata.src_node_id for r in replies}
        failures = [{"node": str(r.metadata.src_node_id), "reason": (r.error.reason or "")[:300],
                     "declined": (r.error.reason or "").startswith(DECLINED)} for r in replies if r.has_error()]
        failures += [{"node": str(n), "reason": f"no reply within {options.round_timeout:g} s", "declined": False}
                     for n in sampled if n not in answered]
        contributed = [_node_name(r) for r in good]
        metrics: dict[str, Any] = {"seconds": round(clock() - started, 2), "sampled": len(sampled),
                                   "connected": len(nodes), "contributions": len(good)}
        state, message = "done", None
        if len(good) < options.min_nodes:
            state = "failed"
            message = f"{len(good)} contribution(s), fewer than --min-nodes {options.min_nodes}: model unchanged"
        else:
            if central:
                # Flower: mean of the m replies + σ·C/m; rescaled below to (sum + noise)/denominator
                strategy.num_sampled_clients = len(good)  # type: ignore[attr-defined]  # the DP wrapper
                metrics["denominator"] = denominator
            previous = outcome.arrays
            new_arrays, train_metrics = strategy.aggregate_train(rnd, good)
            if central and new_arrays is not None:
                new_arrays = fixed_denominator_step(previous, new_arrays, len(good), denominator)
            if new_arrays is None:
                state, message = "failed", "the strategy aggregated nothing: model unchanged"
            else:
                outcome.arrays = new_arrays
                outcome.rounds_done += 1
            if train_metrics is not None:
                metrics.update({k: v for k, v in train_metrics.items() if isinstance(v, int | float)})
        ledger.finish_round(run, rnd, state=state, nodes_contributed=contributed, failures=failures,
                            metrics=metrics, message=message)
        outcome.history.append({"round": rnd, "state": state, "epsilon": epsilon, "nodes": contributed,
                                "failures": failures, "metrics": metrics})
        log.info("round %d %s: %d contribution(s), ε=%.4g", rnd, state, len(good), epsilon)
    return outcome
