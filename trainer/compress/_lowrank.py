"""``lowrank:ENERGY`` or ``lowrank:rank=R``: low-rank factorization of the Linear layers.

Each ``nn.Linear(in, out)`` with weight ``W = U S Vᵀ`` (truncated SVD, ``torch.linalg.svd``)
becomes ``Linear(in, r, bias=False)`` with weight ``S_r V_rᵀ`` followed by ``Linear(r, out)``
with weight ``U_r`` and the original bias: the best rank-``r`` approximation of ``W``.
``r`` is the smallest rank that keeps ``ENERGY`` (in (0, 1)) of the squared singular values,
or ``R`` (capped at the layer's full rank). A layer is only factorized when that has fewer
parameters than the original (``r · (in + out) < in · out``). Convolutions are left as they
are. Fine-tune afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from trainer.compress._base import (
    CompressError,
    CompressionStep,
    ModelState,
    RecipeError,
    StepData,
    fraction,
    parse_options,
    positive,
)
from trainer.models import parameter_count
from trainer.models._networks import build_network, low_rank_pair
from trainer.models.spec import ArchitectureSpec

__all__ = ["LowRank"]


class LowRank(CompressionStep):
    name = "lowrank"

    def __init__(self, energy: float | None = None, rank: int | None = None) -> None:
        if (energy is None) == (rank is None):
            raise ValueError("give energy or rank")
        self.energy, self.rank = energy, rank

    @classmethod
    def parse(cls, args: Sequence[str]) -> LowRank:
        if len(args) != 1:
            raise RecipeError("lowrank takes one argument: the retained energy (lowrank:0.9) or rank=R")
        if args[0].startswith("rank="):
            options = parse_options("lowrank", args, {"rank": ()})
            return cls(rank=positive("lowrank", options["rank"], "rank"))
        return cls(energy=fraction("lowrank", args[0], "the retained energy"))

    @property
    def token(self) -> str:
        return f"lowrank:rank={self.rank}" if self.rank is not None else f"lowrank:{self.energy:g}"

    def check(self, spec: ArchitectureSpec) -> None:
        """Refuse before any work when no Linear layer of a ``spec`` model can get smaller: a
        factorization at rank ``r`` shrinks ``Linear(in, out)`` only when ``r·(in+out) < in·out``.
        (With a retained energy the rank comes from the trained weights, so only the bound
        over every possible rank is checked here.)"""

        shapes = [(m.in_features, m.out_features) for m in build_network(spec).modules() if isinstance(m, nn.Linear)]
        largest = max(((i * o - 1) // (i + o) for i, o in shapes), default=0)
        if largest < 1 or (self.rank is not None and self.rank > largest):
            layers = ", ".join(f"Linear({i}, {o})" for i, o in shapes) or "none"
            raise CompressError(
                f"{self.token}: no Linear layer of this {spec.family} model gets smaller at "
                f"{'that rank' if self.rank is not None else 'any rank'} (its layers: {layers}; "
                f"largest useful rank {largest})")

    def _rank_of(self, singular: torch.Tensor) -> int:
        if self.rank is not None:
            return min(self.rank, int(singular.numel()))
        energy = torch.cumsum(singular**2, 0) / torch.sum(singular**2)
        return int(torch.searchsorted(energy, torch.tensor(self.energy)).item()) + 1

    def apply(self, state: ModelState, data: StepData) -> ModelState:
        model = state.model
        before = parameter_count(model)
        done = []
        targets = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
        for path, layer in targets:
            parent_path, _, name = path.rpartition(".")
            parent: Any = model.get_submodule(parent_path) if parent_path else model
            if isinstance(parent, nn.Sequential) and len(parent) == 2 and parent[0].bias is None \
                    and all(isinstance(m, nn.Linear) for m in parent):
                continue  # already a factorized pair
            with torch.no_grad():
                u, s, vh = torch.linalg.svd(layer.weight, full_matrices=False)
                r = self._rank_of(s)
                if r * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
                    continue
                pair = low_rank_pair(layer.in_features, r, layer.out_features, bias=layer.bias is not None)
                first, second = cast(nn.Linear, pair[0]), cast(nn.Linear, pair[1])
                first.weight.copy_(s[:r, None] * vh[:r])
                second.weight.copy_(u[:, :r])
                if layer.bias is not None:
                    second.bias.copy_(layer.bias)
            setattr(parent, name, pair)
            done.append(f"{path} rank {r}")
        if not done:
            raise CompressError(f"{self.token}: no Linear layer of this model gets smaller at that rank")
        return state.replace(model=model.eval(), notes=[
            *state.notes, f"{self.token}: {', '.join(done)}; {before} -> {parameter_count(model)} parameters"])
