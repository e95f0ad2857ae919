"""Compression recipes: ``"prune:0.5,finetune:5,quantize:int8"`` ↔ a sequence of steps.

Grammar: steps separated by ``,``; each step ``NAME[:ARG[:OPTION...]]`` (whitespace around
steps is ignored). The steps (one module each):

=================================================  ==========================================
``prune:RATIO[:magnitude|taylor][:layer|global]``  structured pruning (:mod:`._prune`)
``finetune:EPOCHS``                                 further training (:mod:`._finetune`)
``lowrank:ENERGY`` / ``lowrank:rank=R``             SVD factorization of Linear layers (:mod:`._lowrank`)
``sparsify:AMOUNT``                                 unstructured magnitude pruning (:mod:`._sparsify`)
``distill[:WIDTHS|:front][:alpha=A][:epochs=N]``    knowledge distillation (:mod:`._distill`)
``quantize:int8|fp32|dynamic[:per-channel|per-tensor]``  artifact quantization, last (:mod:`._quantize`)
=================================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.compress._base import CompressionStep, ExportChoice, RecipeError
from trainer.compress._distill import Distillation
from trainer.compress._finetune import FineTune
from trainer.compress._lowrank import LowRank
from trainer.compress._prune import StructuredPruning
from trainer.compress._quantize import Quantization
from trainer.compress._sparsify import Sparsify

__all__ = ["STEPS", "CompressionRecipe", "parse_recipe"]

STEPS: dict[str, type[CompressionStep]] = {
    cls.name: cls for cls in (StructuredPruning, FineTune, LowRank, Sparsify, Distillation, Quantization)
}


@dataclass(frozen=True)
class CompressionRecipe:
    """A parsed recipe: its steps in order."""

    steps: tuple[CompressionStep, ...]

    @property
    def text(self) -> str:
        """The canonical recipe (every option written out); parses back to an equal recipe."""
        return ",".join(step.token for step in self.steps)

    @property
    def export(self) -> ExportChoice:
        """The quantization its last step asks for (every allowed variant without one)."""
        last = self.steps[-1]
        return last.choice if isinstance(last, Quantization) else ExportChoice()

    def judged_steps(self) -> list[int]:
        """Indexes of the steps the quality gate judges: every step, except that one followed by
        a training step (``finetune``, ``distill``) is judged after that training."""
        return [i for i, _ in enumerate(self.steps)
                if i + 1 == len(self.steps) or not self.steps[i + 1].trains]

    def gate_label(self, index: int) -> str:
        """How the quality gate names judged step ``index``: with the steps judged together with it."""
        first = max((j for j in self.judged_steps() if j < index), default=-1) + 1
        tokens = [s.token for s in self.steps[first : index + 1]]
        return tokens[0] if len(tokens) == 1 else f"{tokens[0]} (with {', '.join(tokens[1:])})"


def parse_recipe(text: str) -> CompressionRecipe:
    """Parse ``text``. Raises :class:`RecipeError` (one line) for an empty recipe, an unknown
    step, bad arguments, or a ``quantize`` that is not the last step or comes twice."""
    tokens = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in tokens):
        raise RecipeError(f"empty step in recipe {text!r}: write steps separated by ',' such as "
                          "prune:0.5,finetune:5,quantize:int8")
    steps: list[CompressionStep] = []
    for token in tokens:
        name, *args = token.split(":")
        cls = STEPS.get(name)
        if cls is None:
            raise RecipeError(f"unknown step {name!r} in recipe; known: {', '.join(STEPS)}")
        steps.append(cls.parse(args))
    _check_order(steps)
    return CompressionRecipe(tuple(steps))


def _check_order(steps: Sequence[CompressionStep]) -> None:
    quantize = [i for i, s in enumerate(steps) if isinstance(s, Quantization)]
    if len(quantize) > 1:
        raise RecipeError("quantize may appear once in a recipe")
    if quantize and quantize[0] != len(steps) - 1:
        raise RecipeError("quantize must be the last step of a recipe (it chooses how the result is exported)")
    sparse = [i for i, s in enumerate(steps) if isinstance(s, Sparsify)]
    for i, s in enumerate(steps):
        if sparse and i > sparse[0] and isinstance(s, (StructuredPruning, LowRank)):
            raise RecipeError(f"{s.token} after {steps[sparse[0]].token}: masks do not survive reshaping; "
                              "put sparsify after prune and lowrank")
        if sparse and i > sparse[0] and isinstance(s, Distillation) and (s.hidden is not None or s.front):
            raise RecipeError(f"{s.token} after {steps[sparse[0]].token}: a new student replaces the masked "
                              "model; put sparsify after distill")
