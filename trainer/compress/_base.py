"""The step contract of a compression recipe, and the model state the steps pass along.

A recipe is a sequence of :class:`CompressionStep`; each takes the :class:`ModelState` the
previous one left (a torch module, its architecture and how it will be exported) and returns
the next. Steps never touch the registry, files or the network: :mod:`trainer.compress.run`
measures and exports what they produce, and registers the result.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import nn

from trainer.models import ArchitectureSpec, Recipe

__all__ = [
    "CompressError",
    "CompressionStep",
    "ExportChoice",
    "ModelState",
    "RecipeError",
    "StepData",
    "output_layers",
]


class CompressError(ValueError):
    """Compression cannot go on: one line for the user (exit 2 at the command line)."""


class RecipeError(CompressError):
    """A recipe that does not parse, or whose steps do not fit together."""


@dataclass(frozen=True)
class ExportChoice:
    """How the artifacts of the compressed model are quantized.

    ``quantization`` ``None`` ships every variant a profile allows (as ``edgefleet train``
    does); ``"int8"`` or ``"fp32"`` only that one. ``scheme`` is an int8 scheme of
    :data:`trainer.export.SCHEMES`.
    """

    quantization: str | None = None
    scheme: str = "static"


@dataclass(frozen=True)
class StepData:
    """What a step may train on: windows and rows of ``--data`` for the model's spec, the
    parent's training recipe (fine-tuning reuses its learning rate, batch and patience) and
    the parent model itself (a distillation teacher; never modified)."""

    train: np.ndarray
    validation: np.ndarray
    rows: np.ndarray
    recipe: Recipe
    teacher: Any  # a network of trainer.models, in eval mode


@dataclass
class ModelState:
    """A model between steps. ``spec`` is the architecture it was built from (``layers`` is
    filled in from the module when it is saved); ``sparsity`` is the fraction of weights an
    unstructured mask holds at zero (the masks stay on the module until :meth:`finalized`)."""

    model: Any  # a network of trainer.models (an nn.Module with feature_errors, mean, std)
    spec: ArchitectureSpec
    export: ExportChoice = field(default_factory=ExportChoice)
    sparsity: float = 0.0
    notes: list[str] = field(default_factory=list)

    def finalized(self) -> nn.Module:
        """A copy of the model with pruning masks made permanent (zeros in the weights), in
        eval mode: what is exported, measured and stored.

        Rebuilt from its spec and state rather than deep-copied: a masked weight is computed
        from ``weight_orig`` and ``weight_mask``, and torch cannot deep-copy such a tensor.
        """
        from trainer.models import build_network, compressed_layers

        state = self.model.state_dict()
        weights = {}
        for key, value in state.items():
            if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
                weights[key[: -len("_orig")]] = value * state[key[: -len("_orig")] + "_mask"]
            elif not (key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state):
                weights[key] = value.clone()
        model = build_network(compressed_layers(self.model, self.spec))
        model.load_state_dict(weights, strict=True)
        return model.eval()

    def replace(self, **changes: Any) -> ModelState:
        return dataclasses.replace(self, **changes)


class CompressionStep(ABC):
    """One step of a recipe, parsed from ``NAME[:ARG[:OPTION...]]``.

    Subclasses set :attr:`name`, parse their arguments in :meth:`parse` (raising
    :class:`RecipeError`), say up front whether a model fits them (:meth:`check`, called
    before any work so a refusal writes nothing) and transform the model in :meth:`apply`.
    """

    name: ClassVar[str]
    #: whether the step can change the runtime latency of the artifact (masks cannot)
    changes_latency: ClassVar[bool] = True
    #: whether the step trains the model (a fine-tuning pass right after a step is judged with it)
    trains: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def parse(cls, args: Sequence[str]) -> CompressionStep:
        """The step from its arguments (the text after ``NAME:``, split on ``:``)."""

    @property
    @abstractmethod
    def token(self) -> str:
        """The step as written in a canonical recipe (parses back to an equal step)."""

    def check(self, spec: ArchitectureSpec) -> None:  # noqa: B027 - most steps fit every family
        """Raise :class:`CompressError` when the step cannot apply to a model of ``spec``."""

    @abstractmethod
    def apply(self, state: ModelState, data: StepData) -> ModelState:
        """The model after this step. Raises :class:`CompressError` when it cannot be done."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.token == self.token

    def __hash__(self) -> int:
        return hash(self.token)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.token}>"


def output_layers(model: Any, spec: ArchitectureSpec) -> list[nn.Module]:
    """The layers that produce the model's prediction (their outputs are the metrics: never
    pruned). For the conv family with seasonal context also the last block, whose channels
    are concatenated with the seasonal rows before the head (torch-pruning 1.6 maps a pruned
    channel wrongly through that select-and-concatenate)."""
    if spec.family in ("conv", "attention"):
        layers: list[nn.Module] = [model.head]
        if spec.family == "conv" and spec.season:
            last = model.body[-1]
            layers += [m for m in (last.conv, last.project) if m is not None]
        return layers
    body = model.body
    return [body[-1] if isinstance(body, nn.Sequential) else body]


def parse_options(step: str, args: Sequence[str], allowed: dict[str, Sequence[str]]) -> dict[str, str]:
    """Options written ``key=value`` or as a bare value that names its key (``taylor`` for
    ``importance=taylor``). Raises :class:`RecipeError` for anything else."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            matches = [k for k, values in allowed.items() if arg in values]
            if not matches:
                raise RecipeError(f"{step}: unknown option {arg!r}")
            key, value = matches[0], arg
        elif key not in allowed:
            raise RecipeError(f"{step}: unknown option {key!r}; known: {', '.join(allowed)}")
        elif allowed[key] and value not in allowed[key]:
            raise RecipeError(f"{step}: {key} must be one of {', '.join(allowed[key])}, got {value!r}")
        if key in out:
            raise RecipeError(f"{step}: {key} given twice")
        out[key] = value
    return out


def fraction(step: str, text: str, what: str) -> float:
    """A number in (0, 1) from recipe text. Raises :class:`RecipeError`."""
    try:
        value = float(text)
    except ValueError:
        raise RecipeError(f"{step}: {what} must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise RecipeError(f"{step}: {what} must be in (0, 1), got {text}")
    return value


def positive(step: str, text: str, what: str) -> int:
    """A positive integer from recipe text. Raises :class:`RecipeError`."""
    try:
        value = int(text)
    except ValueError:
        raise RecipeError(f"{step}: {what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise RecipeError(f"{step}: {what} must be at least 1, got {text}")
    return value
