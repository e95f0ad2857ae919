"""What the ServerApp does with a run (called from the Flower app's ``@app.main()``).

The run's options come from the registry (written by ``edgefleet fl start`` before the run
was submitted), not from Flower's run config, which only names the registry and the run: one
source of truth, and a resubmitted app cannot run with other options than the ledger shows.
The global model's weights go back into the registry as a blob named by the run; the export
and registration of the new version happen in ``edgefleet fl start``'s own process.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid

from trainer.federated.ledger import PrivacyLedger
from trainer.federated.options import FederatedOptions
from trainer.federated.rounds import NodesUnavailable, run_rounds
from trainer.registry import Registry

__all__ = ["arrays_from_weights", "serve", "weights_from_arrays"]

log = logging.getLogger(__name__)
_FORMAT = "edgefleet-weights/1"  # trainer.models.checkpoint's safetensors metadata


def arrays_from_weights(data: bytes) -> ArrayRecord:
    """A registered version's weights (safetensors) as Flower arrays, in their stored order."""
    from safetensors.numpy import load

    state = load(data)
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def weights_from_arrays(arrays: ArrayRecord, like: bytes) -> bytes:
    """Aggregated arrays as safetensors bytes that :func:`trainer.models.load_weights` reads,
    each tensor cast back to the dtype of the same tensor in ``like`` (aggregation may widen)."""
    from safetensors.numpy import load, save

    reference = load(like)
    state = {k: np.ascontiguousarray(a.numpy().astype(reference[k].dtype)) for k, a in arrays.items()}
    if set(state) != set(reference):
        raise ValueError("the aggregated model's tensors differ from the registered version's")
    return save(state, metadata={"format": _FORMAT})


def serve(grid: Grid, context: Context) -> None:
    """Run the rounds of the run named in the run config, recording everything in the ledger.

    Raises :class:`~trainer.federated.ledger.RunNotPending`, running nothing, when the run is
    not ``pending`` (its app was submitted again)."""
    registry_dir = Path(str(context.run_config["registry"]))
    run = str(context.run_config["edgefleet-run"])
    with Registry.open(registry_dir) as reg:
        ledger = PrivacyLedger(reg)
        record = ledger.get(run)
        options = FederatedOptions.from_json(record.params["options"])
        start = record.params.get("start")
        if start is not None:  # started from a spec: its freshly initialised weights
            weights, architecture = reg.bundle(start["weights"]), start["spec"]
        else:
            parent = reg.get(record.model, record.parent_version)
            weights, architecture = reg.weights(parent), parent.architecture
        ledger.claim_run(run)  # refuses a run that was started before (a resubmitted app)
        try:
            outcome = run_rounds(grid, run, options, arrays_from_weights(weights), ledger, architecture)
        except NodesUnavailable as e:
            ledger.update_run(run, state="failed", message=str(e))
            raise
        except BaseException as e:
            ledger.update_run(run, state="failed", message=f"{type(e).__name__}: {e}"[:500])
            raise
        if outcome.rounds_done == 0:
            ledger.update_run(run, state="refused" if outcome.refused else "failed",
                              message=outcome.refused or "no round produced an aggregate")
            return
        sha = reg.blobs.put(weights_from_arrays(outcome.arrays, weights))
        ledger.update_run(run, state="finished", weights=sha, message=outcome.refused)
