"""The server side of a federated run: the round loop the ServerApp runs (imports flwr).

One round: wait for ``min_nodes`` connected nodes, sample (every node, or Poisson sampling at
``fraction``: :mod:`trainer.federated.accounting`), *charge the ledger first* (a round over
budget is refused before any message goes out), send the train messages through the strategy
(FedAvg, FedProx or FedAdam, wrapped by Flower's central-DP wrapper), wait at most
``round_timeout`` for replies, aggregate the replies that came. A node that declines (its own
budget is spent, it has no data) answers with an error reply and is not aggregated; a node that
dies does not answer and costs the round at most the timeout. Fewer than ``min_nodes``
contributions: the round is ``failed`` and the global model is left as it was.

The loop is the strategy's own ``Strategy.start`` loop taken apart, so that the ledger sits
between sampling and sending; the strategies themselves are Flower's, unchanged.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from trainer.federated.ledger import BudgetRefused, PrivacyLedger
from trainer.federated.options import FederatedOptions

__all__ = ["DECLINED", "RoundsOutcome", "build_strategy", "poisson_sample", "run_rounds"]

log = logging.getLogger(__name__)
DECLINED = "edgefleet-declined"  # prefix of a node's error reason when it chose not to train
ARRAYS_KEY = "arrays"
UNIT_WEIGHT = "unit-weight"  # every contribution counts the same under central DP


class NodesUnavailable(RuntimeError):
    """Fewer than ``min_nodes`` nodes connected within ``node_wait`` seconds."""


@dataclass
class RoundsOutcome:
    arrays: ArrayRecord
    rounds_done: int = 0
    refused: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


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
        base = FedAdam(**common, eta=options.eta, eta_l=options.learning_rate)
    else:
        base = FedAvg(**common)
    if options.dp != "central":
        return base
    if options.adaptive_clipping:
        # The clipped-count noise must exceed σ/2 (Andrew et al. 2019); Flower's default,
        # num_sampled/20, does not for a fleet of a few nodes. Flower raises the update noise
        # so that the two together are a Gaussian mechanism of exactly σ.
        return DifferentialPrivacyServerSideAdaptiveClipping(
            base, options.noise_multiplier, num_sampled_clients=1,
            initial_clipping_norm=options.clipping_norm, clipped_count_stddev=options.noise_multiplier)
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

    Stops early, with ``outcome.refused`` set, at the first round the ledger refuses.
    Raises :class:`NodesUnavailable` when too few nodes connect.
    """
    strategy = build_strategy(options)
    rng = random.Random(options.seed)
    outcome = RoundsOutcome(arrays=arrays)
    for rnd in range(1, options.rounds + 1):
        nodes = _wait_for_nodes(grid, options.min_nodes, options.node_wait, clock)
        sampled = poisson_sample(nodes, options.fraction, rng)
        clip = float(getattr(strategy, "clipping_norm", options.clipping_norm))
        try:
            epsilon = ledger.begin_round(run, rnd, sampling_rate=options.fraction,
                                         noise_multiplier=options.effective_noise, clipping_norm=clip,
                                         nodes_sampled=[str(n) for n in sampled])
        except BudgetRefused as e:
            log.warning("%s", e)
            outcome.refused = str(e)
            break
        config = ConfigRecord({
            "run": run, "server-round": rnd, "noise-multiplier": options.effective_noise,
            "sampling-rate": options.fraction, "clipping-norm": clip, "epochs": options.epochs,
            "proximal-mu": options.proximal_mu if options.strategy == "fedprox" else 0.0,
            "dp": options.dp, "delta": options.delta, "learning-rate": options.learning_rate,
            "batch-size": options.batch_size, "seed": options.seed + rnd,
            "architecture": json.dumps(architecture, sort_keys=True),
        })
        if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyServerSideAdaptiveClipping):
            strategy.num_sampled_clients = max(1, len(sampled))
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
            if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyServerSideAdaptiveClipping):
                # Noise σ·C over the updates actually averaged (a declined or lost node is not in the sum).
                strategy.num_sampled_clients = len(good)
            new_arrays, train_metrics = strategy.aggregate_train(rnd, good)
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
