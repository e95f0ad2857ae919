"""Seeded, reproducible training with early stopping on the validation loss."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainer.models._networks import build_network
from trainer.models._trees import TreeModel, build_tree_model
from trainer.models.spec import ArchitectureSpec

__all__ = ["FitResult", "Recipe", "fit", "score_windows"]

ProgressFn = Callable[[int, int, float, float], None]
LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters (recorded in lineage).

    The tree families (:data:`~trainer.models.spec.TREE_FAMILIES`) are fitted in one pass and
    read ``seed`` only (the forests' ``random_state``).
    """

    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 6
    seed: int = 0

    def to_json(self) -> dict[str, float | int]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Recipe:
        """The recipe :meth:`to_json` wrote; missing keys take the defaults. Raises
        ``ValueError`` for unknown keys or values of the wrong type."""
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe key(s) {sorted(unknown)}")
        floats = ("learning_rate", "weight_decay")
        try:
            values: dict[str, Any] = {k: (float(v) if k in floats else int(v)) for k, v in obj.items()}
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad recipe {obj!r}: {e}") from e


@dataclass
class FitResult:
    """The trained module (best validation epoch) and its loss history. A tree family's
    ``model`` is a :class:`~trainer.models._trees.TreeModel`, fitted in one "epoch"."""

    model: torch.nn.Module | TreeModel
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def _std_floor(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    # A flat training column (std 0) would divide by zero; use a floor relative to its level.
    floor = np.maximum(1e-3, 1e-3 * np.abs(mean))
    return np.maximum(std, floor)


def score_windows(model: torch.nn.Module | TreeModel, windows: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Scores of ``model`` on ``(n, window, features)`` windows, float32 ``(n,)``."""
    if isinstance(model, TreeModel):
        return model.score(windows)
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            out.append(model(torch.from_numpy(windows[i : i + batch])).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _normal_statistics(normal_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(normal_rows, axis=0).astype(np.float32)
    return mean, _std_floor(np.nanstd(normal_rows, axis=0), mean).astype(np.float32)


def initial_network(spec: ArchitectureSpec, normal_rows: np.ndarray, seed: int) -> Any:
    """A fresh torch network for ``spec``, its weights initialised from ``seed`` (the same
    network for the same spec, seed and machine) and its normalisation (per-feature mean and
    std) taken from ``normal_rows``, as :func:`fit` starts one. Raises ``ValueError`` for a
    tree family."""
    torch.manual_seed(seed)
    model = build_network(spec)
    mean, std = _normal_statistics(normal_rows)
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(mean))
        model.std.copy_(torch.from_numpy(std))
    return model


def _fit_trees(
    spec: ArchitectureSpec,
    train: np.ndarray,
    validation: np.ndarray,
    normal_rows: np.ndarray,
    recipe: Recipe,
    progress: ProgressFn | None,
) -> FitResult:
    """Fit a tree family in one pass (no epochs: a forest is grown, not iterated); reported
    as epoch 1 of 1 with the training loss and the validation loss (mean score), as the
    torch families report theirs."""
    mean, std = _normal_statistics(normal_rows)
    model = build_tree_model(spec, mean, std, recipe.seed)
    model.fit(train)
    train_loss = model.training_loss(train)
    val_loss = float(model.score(validation).mean())
    if progress is not None:
        progress(1, 1, train_loss, val_loss)
    return FitResult(model, 1, val_loss, [{"epoch": 1, "train_loss": train_loss, "val_loss": val_loss}])


def fit(
    spec: ArchitectureSpec,
    train: np.ndarray,
    validation: np.ndarray,
    normal_rows: np.ndarray,
    recipe: Recipe,
    progress: ProgressFn | None = None,
    start: torch.nn.Module | None = None,
    loss_fn: LossFn | None = None,
) -> FitResult:
    """Train a model of ``spec`` on ``train`` windows, early-stopping on ``validation``.

    ``normal_rows`` (the training rows) give the per-feature mean and std baked into the
    graph. Deterministic for the same inputs, recipe and machine: seeded generators,
    deterministic algorithms and one intra-op thread while training.

    A tree family is fitted once on ``train`` (:func:`_fit_trees`).

    ``start`` continues training that module (fine-tuning a trained or compressed model, of
    ``spec``'s shapes) instead of a fresh one: its normalisation (mean, std) is kept and
    ``normal_rows`` is not used. ``loss_fn(model, batch)`` replaces the training loss (the
    mean squared per-metric error); early stopping still watches the validation score.
    """
    if spec.tree_ensemble:
        return _fit_trees(spec, train, validation, normal_rows, recipe, progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(recipe.seed)
        gen = torch.Generator().manual_seed(recipe.seed)
        model: Any
        if start is None:
            model = build_network(spec)
            mean, std = _normal_statistics(normal_rows)
            model.mean.copy_(torch.from_numpy(mean))
            model.std.copy_(torch.from_numpy(std))
        else:
            model = start
        opt = torch.optim.Adam(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        x_train = torch.from_numpy(train)
        best_state, best_loss, best_epoch, stale = None, float("inf"), 0, 0
        history: list[dict[str, float]] = []
        for epoch in range(1, recipe.epochs + 1):
            model.train()
            order = torch.randperm(len(x_train), generator=gen)
            total = 0.0
            for i in range(0, len(order), recipe.batch_size):
                batch = x_train[order[i : i + recipe.batch_size]]
                opt.zero_grad()
                if loss_fn is None:
                    loss = model.feature_errors(batch, squared=True).mean()  # every metric's error teaches
                else:
                    loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
            model.eval()
            train_loss = total / len(x_train)
            val_loss = float(score_windows(model, validation).mean())
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
            if progress is not None:
                progress(epoch, recipe.epochs, train_loss, val_loss)
            if val_loss < best_loss - 1e-7:
                best_state, best_loss, best_epoch, stale = (
                    copy.deepcopy(model.state_dict()), val_loss, epoch, 0
                )
            else:
                stale += 1
                if stale >= recipe.patience:
                    break
        assert best_state is not None
        model.load_state_dict(best_state)
        model.eval()
        return FitResult(model, best_epoch, best_loss, history)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
