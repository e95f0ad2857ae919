"""Search spaces: a JSON-able description of what a search may try, and :func:`suggest`, which
turns one Optuna trial into a :class:`Candidate` (architecture + training recipe).

A candidate rebuilds the same model anywhere: :meth:`Candidate.to_json` holds the
:class:`~trainer.models.ArchitectureSpec` (family, window, hidden widths, centring, seasonal
context) and the :class:`~trainer.models.Recipe` (learning rate, weight decay, batch size,
epoch cap with early stopping, seed), and :meth:`Candidate.from_json` reads them back.

The families are those :mod:`trainer.models` builds: MLP forecasters and autoencoders, linear
(ridge) forecasters, convolutional (TCN) forecasters, self-attention forecasters, random-forest
forecasters (``trees``) and isolation forests. The default space holds the two MLP families; a
space names the others in ``families`` to try them. The tree families export to ONNX fp32
only (:mod:`trainer.export.targets`): :func:`for_profiles` leaves them out of a search whose
profiles include one that allows no such artifact (a TFLite-only profile), and says why.

Parameters and their conditions (Optuna names):

- ``family`` — one of ``families``;
- ``window`` — one of ``windows``; ``layers`` — an int in ``layers``; ``width`` — one of
  ``widths``; ``centering`` — one of ``centerings``;
- forecaster and autoencoder (the MLP families) only: ``activation`` — one of
  ``activations`` (``relu``, the default space's only one, ``gelu``, ``tanh``);
- forecaster only: ``forecaster.season`` — ``auto`` (one day of seasonal context when the
  data allows, see :func:`trainer.pipeline.seasonal_lag`) or ``off``; with ``layers`` of 2
  or more, ``forecaster.taper`` — one of ``tapers``: each hidden layer is that many times
  narrower than the one before (``width`` 512, taper 8: the default forecaster's
  ``(512, 64)``; taper 1: every layer ``width`` wide);
- autoencoder only: ``autoencoder.bottleneck`` — one of ``bottlenecks`` (the last hidden
  width; the others are ``width``);
- linear only: ``linear.season`` — as ``forecaster.season``; the linear family has no hidden
  layers, so ``layers`` and ``width`` do not change its model;
- conv only: ``conv.season`` — as ``forecaster.season``; ``conv.kernel`` — one of
  ``kernels``; ``conv.levels`` — an int in ``conv_levels``: that many causal blocks of
  ``width`` channels with dilations 1, 2, 4, … (``layers`` does not change its model);
- attention only: ``attention.season`` — as ``forecaster.season``; ``attention.heads`` — one
  of ``heads`` that divides ``attention.width``; ``attention.width`` — one of
  ``attention_widths`` (the model width; ``width`` does not change its model, as attention
  widths of an MLP's size would make it far larger); ``layers`` blocks. Where the suggested
  head count does not divide the width, the model takes the largest of ``heads`` that does
  (the candidate's architecture records it); a width none of ``heads`` divides is refused
  when the space is built;
- trees only: ``trees.season`` — as ``forecaster.season``; ``trees.n_estimators`` — one of
  ``tree_estimators``; ``trees.max_depth`` — one of ``tree_depths`` (``layers`` and ``width``
  do not change its model);
- isolation_forest only: ``isolation_forest.n_estimators`` — one of ``tree_estimators``;
  ``isolation_forest.max_samples`` — one of ``isolation_samples`` (no season: it is not a
  forecaster);
- ``learning_rate`` — log-uniform in its range; ``weight_decay`` — log-uniform in its
  range; ``batch_size`` — one of ``batch_sizes``; ``epochs`` and ``patience`` are fixed. The
  tree families are fitted in one pass and are not asked for these three: their candidates'
  recipes keep the defaults (and the seed), so two tree candidates that differ in nothing
  else are one candidate (trained once).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from shared.profiles import FirmwareProfile
from trainer.export.targets import refusal
from trainer.models import ArchitectureSpec, Recipe, SpecError
from trainer.models.spec import (
    ACTIVATIONS,
    ATTENTION_HEADS,
    CENTERINGS,
    CONV_KERNEL,
    FAMILIES,
    ISOLATION_SAMPLES,
    MLP_FAMILIES,
    TREE_DEPTH,
    TREE_ESTIMATORS,
    TREE_FAMILIES,
)
from trainer.search.errors import SearchError

__all__ = ["Candidate", "LeftOut", "SearchSpace", "default_params", "for_profiles", "suggest"]

SEASON_CHOICES = ("auto", "off")
_RANGES = ("layers", "conv_levels", "learning_rate", "weight_decay")


@dataclass(frozen=True)
class SearchSpace:
    """What a search may try. Every field has a default; :meth:`from_json` is strict.

    Tuples of choices are categorical; ``layers`` and ``conv_levels`` are inclusive int ranges, and
    ``learning_rate`` and ``weight_decay`` are inclusive ranges sampled on a log scale.
    """

    families: tuple[str, ...] = ("forecaster", "autoencoder")
    windows: tuple[int, ...] = (16, 32, 64)
    layers: tuple[int, int] = (1, 2)
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    bottlenecks: tuple[int, ...] = (4, 8, 16)
    tapers: tuple[int, ...] = (1, 2, 4, 8)
    activations: tuple[str, ...] = ("relu",)
    kernels: tuple[int, ...] = (3,)
    conv_levels: tuple[int, int] = (2, 4)
    heads: tuple[int, ...] = (1, 2, 4)
    attention_widths: tuple[int, ...] = (16, 32, 64)
    tree_estimators: tuple[int, ...] = (25, 50, 100)
    tree_depths: tuple[int, ...] = (4, 6, 8)
    isolation_samples: tuple[int, ...] = (64, 128, 256)
    centerings: tuple[str, ...] = ("window", "train")
    seasons: tuple[str, ...] = SEASON_CHOICES
    learning_rate: tuple[float, float] = (1e-4, 1e-2)
    weight_decay: tuple[float, float] = (1e-7, 1e-3)
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    epochs: int = 40
    patience: int = 6

    def __post_init__(self) -> None:
        def choices(name: str, allowed: tuple[str, ...] | None = None) -> None:
            value = getattr(self, name)
            if not value or len(set(value)) != len(value):
                raise SearchError(f"search space {name!r}: needs distinct choices, got {list(value)}")
            if allowed is not None and not set(value) <= set(allowed):
                raise SearchError(f"search space {name!r}: {list(value)} not all in {list(allowed)}")

        choices("families", FAMILIES)
        choices("centerings", CENTERINGS)
        choices("activations", ACTIVATIONS)
        choices("seasons", SEASON_CHOICES)
        for name in ("windows", "widths", "bottlenecks", "tapers", "kernels", "heads", "attention_widths",
                     "tree_estimators", "tree_depths", "isolation_samples", "batch_sizes"):
            choices(name)
            if min(getattr(self, name)) < (2 if name in ("windows", "isolation_samples") else 1):
                raise SearchError(f"search space {name!r}: values must be positive (windows and "
                                  "isolation_samples >= 2)")
        for name, low in (("layers", 1), ("conv_levels", 1), ("learning_rate", 0), ("weight_decay", 0)):
            lo, hi = getattr(self, name)
            if not low <= lo <= hi or (low == 0 and lo <= 0):
                raise SearchError(f"search space {name!r}: needs 0 < low <= high, got [{lo}, {hi}]")
        undivided = [w for w in self.attention_widths if not any(w % h == 0 for h in self.heads)]
        if undivided:
            raise SearchError(f"search space 'attention_widths': {undivided} not divisible by any of heads {list(self.heads)}")
        if self.epochs < 1 or self.patience < 1:
            raise SearchError("search space: epochs and patience must be at least 1")

    def to_json(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SearchSpace:
        """A space from JSON; missing keys take the defaults. Raises :class:`SearchError` for
        unknown keys, wrong types or out-of-range values (one line)."""
        if not isinstance(obj, Mapping):
            raise SearchError("a search space must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise SearchError(f"unknown search space key(s) {unknown}; known: {', '.join(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in obj.items():
            default = getattr(cls, key)
            try:
                if isinstance(default, tuple):
                    if not isinstance(value, list) or (key in _RANGES and len(value) != 2):
                        raise TypeError
                    kind = type(default[0])
                    if any(isinstance(v, bool) or not isinstance(v, (kind, int)) for v in value):
                        raise TypeError
                    kwargs[key] = tuple(kind(v) for v in value)
                else:
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise TypeError
                    kwargs[key] = value
            except TypeError:
                example = json.dumps(cls.__dataclass_fields__[key].default)
                raise SearchError(f"search space {key!r}: expected a value like {example}, got {value!r}") from None
        return cls(**kwargs)


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a buildable architecture and the recipe to train it."""

    architecture: ArchitectureSpec
    recipe: Recipe

    def to_json(self) -> dict[str, Any]:
        return {"architecture": self.architecture.to_json(), "recipe": self.recipe.to_json()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Candidate:
        """Read back :meth:`to_json`. Raises :class:`SearchError` when it is malformed."""
        try:
            return cls(ArchitectureSpec.from_json(dict(obj["architecture"])), Recipe.from_json(dict(obj["recipe"])))
        except (KeyError, TypeError, ValueError, SpecError) as e:
            raise SearchError(f"bad candidate {dict(obj)!r}: {e}") from e


def suggest(
    trial: Any,
    space: SearchSpace,
    *,
    features: int,
    season_lag: Callable[[int], int] = lambda window: 0,
    seed: int = 0,
) -> Candidate:
    """Ask ``trial`` (an ``optuna.Trial``) for every parameter of ``space``: a :class:`Candidate`.

    ``features`` is the number of metrics of the data; ``season_lag(window)`` resolves a
    forecaster's ``auto`` season to rows (0 when the data does not allow one). The recipe's
    seed is ``seed``: candidates differ by their parameters, not by their luck.
    """
    family = trial.suggest_categorical("family", list(space.families))
    window = trial.suggest_categorical("window", list(space.windows))
    layers = trial.suggest_int("layers", *space.layers)
    width = trial.suggest_categorical("width", list(space.widths))
    centering = trial.suggest_categorical("centering", list(space.centerings))
    season, kernel, dilations, heads = 0, CONV_KERNEL, (), ATTENTION_HEADS
    n_estimators, max_depth, max_samples = TREE_ESTIMATORS, TREE_DEPTH, ISOLATION_SAMPLES
    hidden: tuple[int, ...]
    activation = "relu"
    if family in MLP_FAMILIES:
        activation = trial.suggest_categorical("activation", list(space.activations))
    if family == "autoencoder":
        bottleneck = trial.suggest_categorical("autoencoder.bottleneck", list(space.bottlenecks))
        hidden = (width,) * (layers - 1) + (bottleneck,)
    elif family == "isolation_forest":
        hidden = ()
        n_estimators = trial.suggest_categorical("isolation_forest.n_estimators", list(space.tree_estimators))
        max_samples = trial.suggest_categorical("isolation_forest.max_samples", list(space.isolation_samples))
    else:
        if trial.suggest_categorical(f"{family}.season", list(space.seasons)) == "auto":
            season = season_lag(window)
        if family == "forecaster":
            taper = trial.suggest_categorical("forecaster.taper", list(space.tapers)) if layers > 1 else 1
            hidden = tuple(max(1, width // taper**i) for i in range(layers))
        elif family == "linear":
            hidden = ()
        elif family == "trees":
            hidden = ()
            n_estimators = trial.suggest_categorical("trees.n_estimators", list(space.tree_estimators))
            max_depth = trial.suggest_categorical("trees.max_depth", list(space.tree_depths))
        elif family == "attention":
            attention_width = trial.suggest_categorical("attention.width", list(space.attention_widths))
            heads = trial.suggest_categorical("attention.heads", list(space.heads))
            if attention_width % heads:
                # a head count that does not divide the width: the largest of the space's that does
                heads = max(h for h in space.heads if attention_width % h == 0)
            hidden = (attention_width,) * layers
        else:
            kernel = trial.suggest_categorical("conv.kernel", list(space.kernels))
            levels = trial.suggest_int("conv.levels", *space.conv_levels)
            hidden, dilations = (width,) * levels, tuple(2**i for i in range(levels))
    if family in TREE_FAMILIES:  # fitted in one pass: no gradient descent to tune
        recipe = Recipe(epochs=space.epochs, patience=space.patience, seed=seed)
    else:
        recipe = Recipe(
            epochs=space.epochs,
            patience=space.patience,
            batch_size=trial.suggest_categorical("batch_size", list(space.batch_sizes)),
            learning_rate=trial.suggest_float("learning_rate", *space.learning_rate, log=True),
            weight_decay=trial.suggest_float("weight_decay", *space.weight_decay, log=True),
            seed=seed,
        )
    from trainer.pipeline import SEASON_HALFWIDTH

    spec = ArchitectureSpec(family, window, features, hidden, centering, season=season,
                            season_halfwidth=SEASON_HALFWIDTH, kernel=kernel, dilations=dilations,
                            heads=heads, n_estimators=n_estimators, max_depth=max_depth,
                            max_samples=max_samples, activation=activation)
    return Candidate(spec, recipe)


def default_params(space: SearchSpace) -> dict[str, Any] | None:
    """The Optuna parameters under which :func:`suggest` proposes what ``edgefleet train``
    builds by default (:data:`trainer.pipeline.DEFAULT_ARCHITECTURE` with the default
    :class:`~trainer.models.Recipe`'s batch size, learning rate and weight decay; epochs and
    patience are the space's, as for every candidate), or ``None`` when ``space`` cannot
    express it.

    A new study tries this candidate first (:func:`trainer.search.study.open_study`): a search
    then never registers something worse, by its own objective, than plain ``train``.
    """
    from trainer.pipeline import DEFAULT_ARCHITECTURE

    d, recipe = DEFAULT_ARCHITECTURE, Recipe()
    first, layers = d.hidden[0], len(d.hidden)
    taper = first // d.hidden[1] if layers > 1 else None
    if taper is not None and d.hidden != tuple(max(1, first // taper**i) for i in range(layers)):
        return None  # widths no taper of the space reproduces
    fits = (
        d.family in space.families and d.window in space.windows and first in space.widths
        and space.layers[0] <= layers <= space.layers[1] and d.centering in space.centerings
        and "auto" in space.seasons and (taper is None or taper in space.tapers)
        and "relu" in space.activations
        and recipe.batch_size in space.batch_sizes
        and space.learning_rate[0] <= recipe.learning_rate <= space.learning_rate[1]
        and space.weight_decay[0] <= recipe.weight_decay <= space.weight_decay[1]
    )
    if not fits:
        return None
    return {
        "family": d.family, "window": d.window, "layers": layers, "width": first,
        "centering": d.centering, "activation": "relu", f"{d.family}.season": "auto",
        **({f"{d.family}.taper": taper} if taper is not None else {}),
        "batch_size": recipe.batch_size, "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
    }


@dataclass(frozen=True)
class LeftOut:
    """Families a search leaves out of its space, and why (one line)."""

    families: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"families": list(self.families), "reason": self.reason}


def for_profiles(space: SearchSpace, profiles: Sequence[FirmwareProfile]) -> tuple[SearchSpace, LeftOut | None]:
    """``space`` without the families that cannot be exported to an artifact every profile of
    ``profiles`` allows (the tree families and a TFLite-only profile,
    :func:`trainer.export.targets.refusal`), and what was left out (``None``: nothing).

    Raises :class:`SearchError` when no family of the space is left.
    """
    why = refusal(space.families, profiles)
    if why is None:
        return space, None
    left_out = tuple(f for f in space.families if refusal([f], profiles) is not None)
    kept = tuple(f for f in space.families if f not in left_out)
    if not kept:
        raise SearchError(f"no family of the search space can serve every profile: {why}")
    return replace(space, families=kept), LeftOut(left_out, why)
