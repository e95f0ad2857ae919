"""``sparsify:AMOUNT``: unstructured magnitude pruning (``torch.nn.utils.prune``).

The ``AMOUNT`` (in (0, 1)) of all Linear and Conv1d weights with the smallest magnitude,
ranked together, are held at zero by masks (kept through a following ``finetune``, made
permanent on export). The tensors keep their shapes: the parameter count, the operations and
the runtime latency do not change, and the raw model file is as large as before. Only the
deflated (zlib) size shrinks — zeros compress — which is what a download costs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.utils import prune

from trainer.compress._base import CompressionStep, ModelState, RecipeError, StepData, fraction

__all__ = ["Sparsify"]

NOTE = "unstructured zeros: parameters, operations and runtime latency unchanged; only the deflated size shrinks"


class Sparsify(CompressionStep):
    name = "sparsify"
    changes_latency = False

    def __init__(self, amount: float) -> None:
        self.amount = amount

    @classmethod
    def parse(cls, args: Sequence[str]) -> Sparsify:
        if len(args) != 1:
            raise RecipeError("sparsify takes one argument, the fraction of weights set to zero: sparsify:0.8")
        return cls(fraction("sparsify", args[0], "the amount"))

    @property
    def token(self) -> str:
        return f"sparsify:{self.amount:g}"

    def apply(self, state: ModelState, data: StepData) -> ModelState:
        model = state.model
        weights = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
        for module, name in weights:  # masks already there are folded in first
            if prune.is_pruned(module):
                prune.remove(module, name)
        prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=self.amount)
        return state.replace(model=model, sparsity=self.amount, notes=[*state.notes, f"{self.token}: {NOTE}"])
