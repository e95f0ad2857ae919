"""What the ClientApp does on an edge host (called from the Flower app's handlers).

Train: read this host's windows from its :class:`~edge_agent.federated.WindowStore`
(node config ``state-dir``; the count decides only whether to decline), charge its
:class:`~edge_agent.federated.LocalLedger` *before* training on them, rebuild the model from the architecture spec in the message and the global
weights, train a few local epochs (:func:`trainer.models.fit`, with FedProx's proximal term
when asked), and reply with the new weights. The windows never leave the host.

A host declines — an error reply whose reason starts with
:data:`trainer.federated.rounds.DECLINED`, which the ServerApp counts as no contribution — when
its own budget is spent (the ledger refuses and records nothing), when it holds no windows of
the model's shape, or when training did not change the model: a zero update must never be
sent, because clipping divides by the update's norm.

The host's ledger composes σ without amplification for each round it trains in (the round's
sampling rate is recorded as information only, :mod:`edge_agent.federated.ledger`): the host
sees only the rounds it was sampled for, and a round it was not sampled for touches none of its
data, so the Gaussian mechanism of each round it took part in is the bound that holds on its
side (the trainer's ledger, which sees every round, may claim Poisson amplification instead).

When the node config names ``app-sha256`` (the app's hash from the signed run document), the
handler first checks that the app it runs is that one — Flower installs each FAB in a folder of
its own, and the FAB is rebuilt from it byte for byte — and declines a different (e.g. an
older run's) app before touching the ledger or the windows. This catches a wrong app, not a
malicious one: a malicious app's code would not run this check. On flwr 1.42 it is the only app
check a host has (an app submitted to a self-hosted SuperLink cannot be signed, see
docs/federated.md).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.mod import LocalDpMod

from trainer.federated.accounting import local_dp_epsilon

__all__ = ["evaluate_handler", "local_dp_mod", "train_handler"]

DECLINED = "edgefleet-declined"  # trainer.federated.rounds.DECLINED (not imported: no serverapp here)
DECLINE_CODE = 100
VALIDATION_FRACTION = 0.2


class _Decline(Exception):
    pass


def _f(config: ConfigRecord, key: str, default: float | None = None) -> float:
    """A number from the round's config (Flower types its values as a wide union)."""
    value = config.get(key, default)
    if not isinstance(value, int | float | str):
        raise _Decline(f"the round's config has no number {key!r}")
    return float(value)


def _node(context: Context, config: ConfigRecord) -> tuple[str, Path, float, float]:
    nc = context.node_config
    name = str(nc.get("node-name") or f"node-{context.node_id}")
    if "state-dir" not in nc:
        raise _Decline(f"{name}: no state-dir in the SuperNode's node config")
    budget = float(str(nc.get("epsilon-budget", "inf")))
    delta = float(str(nc.get("delta", _f(config, "delta", 1e-5))))
    return name, Path(str(nc["state-dir"])), budget, delta


def _running_app_sha256() -> str:
    """sha256 of the FAB this process runs, rebuilt from the folder Flower installed it in."""
    import hashlib
    import importlib

    from flwr.cli.build import build_fab_from_disk

    app = importlib.import_module("edgefleet_flower")
    return hashlib.sha256(build_fab_from_disk(Path(str(app.__file__)).parent.parent)).hexdigest()


def _check_app(context: Context, name: str) -> None:
    expected = context.node_config.get("app-sha256")
    if not expected:
        return
    try:
        running = _running_app_sha256()
    except (ImportError, OSError, ValueError) as e:
        raise _Decline(f"{name}: cannot tell which app runs here ({e}); the run document names "
                       f"{str(expected)[:12]}…") from e
    if running != str(expected):
        raise _Decline(f"{name}: this app is {running[:12]}…, the signed run document names {str(expected)[:12]}…")


def _decline(msg: Message, reason: str) -> Message:
    return Message(Error(code=DECLINE_CODE, reason=f"{DECLINED}: {reason}"), reply_to=msg)


def _windows(state_dir: Path, rows: int, features: int) -> np.ndarray:
    from edge_agent.federated import WindowStore

    with WindowStore(state_dir / "windows.sqlite") as store:
        return store.windows(shape=(rows, features))


def train_handler(msg: Message, context: Context) -> Message:
    """Handle one train message (see the module docstring)."""
    config = msg.content.config_records["config"]
    try:
        name, state_dir, budget, delta = _node(context, config)
        _check_app(context, name)
        return _train(msg, config, name, state_dir, budget, delta)
    except _Decline as e:
        return _decline(msg, str(e))


def _train(msg: Message, config: ConfigRecord, name: str, state_dir: Path, budget: float,
           delta: float) -> Message:
    from edge_agent.federated import BudgetExhausted, LocalLedger
    from trainer.models import ArchitectureSpec, build_network, fit
    from trainer.models.fit import Recipe

    spec = ArchitectureSpec.from_json(json.loads(str(config["architecture"])))
    windows = _windows(state_dir, spec.input_rows, spec.features)
    if len(windows) < 2:
        raise _Decline(f"{name}: {len(windows)} stored window(s) of {spec.input_rows}x{spec.features}: nothing to train on")
    run, rnd = str(config["run"]), int(_f(config, "server-round"))
    sigma, clip = _f(config, "noise-multiplier"), _f(config, "clipping-norm")
    try:
        with LocalLedger(state_dir / "ledger.sqlite", budget, delta) as ledger:
            spent = ledger.charge(run, rnd, sigma, _f(config, "sampling-rate", 1.0), clip)
    except BudgetExhausted as e:
        raise _Decline(f"{name}: {e}") from e

    import torch

    received = msg.content.array_records["arrays"]
    model = build_network(spec)
    model.load_state_dict(received.to_torch_state_dict(), strict=True)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_val = max(1, int(len(windows) * VALIDATION_FRACTION))
    train, validation = windows[:-n_val], windows[-n_val:]
    if len(train) == 0:
        train = windows
    mu = _f(config, "proximal-mu", 0.0)
    loss_fn = None
    if mu > 0:
        anchors = [p.detach().clone() for p in model.parameters()]

        def loss_fn(m: Any, batch: Any) -> Any:  # FedProx: stay near the global model
            base = m.feature_errors(batch, squared=True).mean()
            prox = sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchors))
            return base + mu / 2 * prox

    epochs = int(_f(config, "epochs"))
    recipe = Recipe(epochs=epochs, batch_size=int(_f(config, "batch-size", 64)),
                    learning_rate=_f(config, "learning-rate", 1e-3), patience=epochs,
                    seed=int(_f(config, "seed", 0)))
    result = fit(spec, train, validation, train.reshape(-1, spec.features), recipe, start=model, loss_fn=loss_fn)
    trained = result.model
    assert isinstance(trained, torch.nn.Module)  # a torch family (the trainer refuses tree families)
    state = trained.state_dict()
    norm = math.sqrt(sum(float(((state[k].float() - start[k].float()) ** 2).sum()) for k in start))
    if not norm > 0:
        raise _Decline(f"{name}: training left the model unchanged (a zero update cannot be clipped)")
    with torch.no_grad():
        arrays = ArrayRecord(OrderedDict((k, Array(state[k].detach().cpu().numpy())) for k in received.keys()))
    metrics = MetricRecord({"num-examples": int(len(train)), "unit-weight": 1,
                            "train-loss": float(result.history[-1]["train_loss"]),
                            "val-loss": float(result.best_val_loss), "local-epsilon": float(spent),
                            "update-norm": float(norm)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics,
                               "node": ConfigRecord({"node-name": name})}), reply_to=msg)


def evaluate_handler(msg: Message, context: Context) -> Message:
    """Mean anomaly score of the received model on this host's windows (no privacy charged:
    metrics are outside the DP guarantee, as in Flower)."""
    from trainer.models import ArchitectureSpec, build_network, score_windows

    config = msg.content.config_records["config"]
    try:
        name, state_dir, _, _ = _node(context, config)
        _check_app(context, name)
        spec = ArchitectureSpec.from_json(json.loads(str(config["architecture"])))
        windows = _windows(state_dir, spec.input_rows, spec.features)
        if len(windows) == 0:
            raise _Decline(f"{name}: no windows to evaluate on")
    except _Decline as e:
        return _decline(msg, str(e))
    model = build_network(spec)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict(), strict=True)
    model.eval()
    loss = float(score_windows(model, windows).mean())
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": int(len(windows)), "eval-loss": loss})}),
                   reply_to=msg)


def local_dp_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``LocalDpMod`` when the round asks for local DP (``dp = "local"``), built from
    the round's σ, clipping norm and δ (:func:`~trainer.federated.accounting.local_dp_epsilon`);
    otherwise the handler's reply as it is."""
    config = msg.content.config_records.get("config")
    if config is None or config.get("dp") != "local":
        return call_next(msg, context)
    sigma, clip, delta = _f(config, "noise-multiplier"), _f(config, "clipping-norm"), _f(config, "delta")
    # sensitivity 2C: two datasets on this host give clipped updates up to 2C apart, so the noise
    # is σ·2C and the round is a Gaussian mechanism of σ, the figure the host's ledger charges
    mod = LocalDpMod(clip, 2 * clip, local_dp_epsilon(sigma, delta), delta)
    return mod(msg, context, call_next)
