"""``prune:RATIO[:magnitude|taylor][:layer|global]``: structured pruning with torch-pruning.

Channels (Conv1d) and neurons (Linear) are removed physically, with every layer that
depends on them (the next layer's inputs, a residual sum's other branch): the artifact has
fewer parameters and fewer operations, not masks. torch-pruning 1.6 builds that dependency
graph by tracing the model on an example window.

- ``RATIO`` in (0, 1): the fraction of channels removed. ``layer`` (the default) removes it
  from every prunable layer; ``global`` ranks all channels together, so some layers lose
  more than others (none more than :data:`MAX_LAYER_RATIO`).
- importance ``magnitude`` (default: the L2 norm of a channel's weights) or ``taylor``
  (|weight × gradient| of the training loss on up to :data:`TAYLOR_WINDOWS` training windows).
- The output layer (its outputs are the metrics) is never pruned.

Families: forecaster, autoencoder (MLPs) and conv (Conv1d, residual sums included). Refused:
linear (one layer, which is the output), attention (torch-pruning does not follow our
multi-head split of the projections) and any recurrent layer (torch-pruning 1.6 raises an
IndexError on LSTM and leaves GRU silently unpruned). Fine-tune afterwards (``finetune:N``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer.compress._base import (
    CompressError,
    CompressionStep,
    ModelState,
    RecipeError,
    StepData,
    fraction,
    output_layers,
    parse_options,
)
from trainer.models import ArchitectureSpec, parameter_count

__all__ = ["StructuredPruning"]

IMPORTANCES = ("magnitude", "taylor")
SCOPES = ("layer", "global")
MAX_LAYER_RATIO = 0.9
TAYLOR_WINDOWS = 256
PRUNABLE_FAMILIES = ("forecaster", "autoencoder", "conv")


class StructuredPruning(CompressionStep):
    name = "prune"

    def __init__(self, ratio: float, importance: str = "magnitude", scope: str = "layer") -> None:
        self.ratio, self.importance, self.scope = ratio, importance, scope

    @classmethod
    def parse(cls, args: Sequence[str]) -> StructuredPruning:
        if not args:
            raise RecipeError("prune needs a ratio, e.g. prune:0.5")
        options = parse_options("prune", args[1:], {"importance": IMPORTANCES, "scope": SCOPES})
        return cls(fraction("prune", args[0], "the ratio"), options.get("importance", "magnitude"),
                   options.get("scope", "layer"))

    @property
    def token(self) -> str:
        return f"prune:{self.ratio:g}:{self.importance}:{self.scope}"

    def check(self, spec: ArchitectureSpec) -> None:
        if spec.family == "linear":
            raise CompressError("prune: the linear family has one layer, its output layer: nothing to prune "
                                "(try lowrank or sparsify)")
        if spec.family not in PRUNABLE_FAMILIES:
            raise CompressError(f"prune: structured pruning of the {spec.family} family is not supported "
                                f"(torch-pruning handles {', '.join(PRUNABLE_FAMILIES)})")

    def apply(self, state: ModelState, data: StepData) -> ModelState:
        self.check(state.spec)
        model = state.model
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            raise CompressError("prune: recurrent layers (LSTM, GRU) cannot be pruned structurally: "
                                "torch-pruning fails on LSTM and leaves GRU unpruned")
        if state.sparsity:
            raise CompressError("prune: structured pruning after sparsify would drop its masks; put prune first")
        try:
            import torch_pruning as tp  # heavy: only when a recipe prunes
        except ImportError:
            raise CompressError("prune needs torch-pruning: install edgefleet's trainer extra "
                                "(pip install 'edgefleet[trainer]')") from None

        example = torch.from_numpy(data.train[:2])
        before = parameter_count(model)
        if self.importance == "taylor":
            importance: object = tp.importance.TaylorImportance()
            model.zero_grad()
            model.feature_errors(torch.from_numpy(data.train[:TAYLOR_WINDOWS]), squared=True).mean().backward()
        else:
            importance = tp.importance.MagnitudeImportance(p=2)
        pruner = tp.pruner.MetaPruner(
            model, example, importance=importance, pruning_ratio=self.ratio,
            ignored_layers=output_layers(model, state.spec), global_pruning=self.scope == "global",
            max_pruning_ratio=MAX_LAYER_RATIO,
        )
        pruner.step()
        model.zero_grad(set_to_none=True)
        after = parameter_count(model)
        if after >= before:
            raise CompressError(f"prune: nothing could be removed from this {state.spec.family} model "
                                "(its channels all feed the output layer)")
        with torch.no_grad():
            model(example)  # the pruned graph still runs end to end
        return state.replace(model=model.eval(), notes=[*state.notes, f"{self.token}: {before} -> {after} parameters"])
