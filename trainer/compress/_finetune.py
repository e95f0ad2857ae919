"""``finetune:EPOCHS``: train the current model further on ``--data``.

The parent's training recipe (learning rate, batch size, weight decay, patience, seed) with
``EPOCHS`` epochs, early-stopping on the validation windows as ``edgefleet train`` does, so
the result is never worse on them than the best epoch. Pruning masks stay in place (pruned
weights stay zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from trainer.compress._base import CompressionStep, ModelState, RecipeError, StepData, positive
from trainer.models import fit

__all__ = ["FineTune"]


class FineTune(CompressionStep):
    name = "finetune"
    trains = True

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    @classmethod
    def parse(cls, args: Sequence[str]) -> FineTune:
        if len(args) != 1:
            raise RecipeError("finetune takes one argument, the epochs: finetune:5")
        return cls(positive("finetune", args[0], "the epochs"))

    @property
    def token(self) -> str:
        return f"finetune:{self.epochs}"

    def apply(self, state: ModelState, data: StepData) -> ModelState:
        recipe = dataclasses.replace(data.recipe, epochs=self.epochs)
        result = fit(state.spec, data.train, data.validation, data.rows, recipe, start=state.model)
        return state.replace(model=result.model, notes=[
            *state.notes, f"{self.token}: best epoch {result.best_epoch}, validation loss {result.best_val_loss:.4g}"])
