"""``distill[:WIDTHS|:front][:alpha=A][:epochs=N]``: knowledge distillation.

The teacher is the registered version being compressed (the parent, never modified). The
student is, with ``WIDTHS`` (``distill:64-16``), a fresh model of the teacher's family and
input (window, season, metrics) with those hidden widths (the conv family takes dilations
1, 2, 4, … for its blocks, the attention family one width for every block), starting from
the teacher's normalisation; with ``front`` the widths of the smallest member of the search
front the teacher came from (:func:`smallest_front_widths`); without widths (``distill``,
``distill:alpha=0.7``) it is the model the steps before left, e.g. a pruned one, which the
teacher then fine-tunes. It trains
on ``--data`` for ``N`` epochs (default: the parent's recipe) with

    loss = (1 - α) · task + α · match(teacher)

where ``task`` is the usual training loss (mean squared per-metric error against the data)
and ``match`` the mean squared difference between the student's and the teacher's
per-metric errors, the terms the score is the maximum of: for a forecaster, how far each
forecast is from the data, so the student learns what the teacher finds predictable and
what it does not. ``α`` (default 0.5) in [0, 1]. Early stopping watches the validation score
as in ``edgefleet train``. Written out rather than taken from a library: it is a few lines of
torch, and the libraries target classifiers' logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trainer.compress._base import (
    CompressError,
    CompressionStep,
    ModelState,
    RecipeError,
    StepData,
    parse_options,
    positive,
)
from trainer.models import ArchitectureSpec, SpecError, build_network, fit

__all__ = ["Distillation"]


class Distillation(CompressionStep):
    name = "distill"
    trains = True

    def __init__(self, hidden: tuple[int, ...] | None, alpha: float = 0.5, epochs: int | None = None,
                 front: bool = False) -> None:
        self.hidden, self.alpha, self.epochs, self.front = hidden, alpha, epochs, front

    @classmethod
    def parse(cls, args: Sequence[str]) -> Distillation:
        hidden: tuple[int, ...] | None = None
        front = bool(args) and args[0] == "front"
        if front:
            args = args[1:]
        elif args and "=" not in args[0]:
            try:
                hidden = tuple(int(w) for w in args[0].split("-"))
            except ValueError:
                raise RecipeError(f"distill: widths must be integers joined by '-', got {args[0]!r}") from None
            if min(hidden) < 1:
                raise RecipeError(f"distill: widths must be positive, got {args[0]!r}")
            args = args[1:]
        options = parse_options("distill", args, {"alpha": (), "epochs": ()})
        try:
            alpha = float(options.get("alpha", 0.5))
        except ValueError:
            raise RecipeError(f"distill: alpha must be a number in [0, 1], got {options['alpha']!r}") from None
        if not 0 <= alpha <= 1:
            raise RecipeError(f"distill: alpha must be in [0, 1], got {alpha:g}")
        epochs = positive("distill", options["epochs"], "epochs") if "epochs" in options else None
        return cls(hidden, alpha, epochs, front)

    @property
    def token(self) -> str:
        epochs = f":epochs={self.epochs}" if self.epochs is not None else ""
        widths = f"{'-'.join(map(str, self.hidden))}:" if self.hidden else "front:" if self.front else ""
        return f"distill:{widths}alpha={self.alpha:g}{epochs}"

    def with_front(self, lineage: Mapping[str, Any], profiles: Sequence[str], teacher: ArchitectureSpec
                   ) -> tuple[Distillation, str]:
        """``distill:front`` resolved: the same step with the widths of
        :func:`smallest_front_widths`, and a note saying where they come from."""
        hidden, source = smallest_front_widths(lineage, profiles, teacher)
        return Distillation(hidden, self.alpha, self.epochs), f"distill:front took widths {'-'.join(map(str, hidden))} from {source}"

    def student_spec(self, teacher: ArchitectureSpec) -> ArchitectureSpec:
        """The student's spec (``teacher`` itself without widths). Raises
        :class:`CompressError` when the widths do not fit the family."""
        if self.hidden is None and not self.front:
            return teacher
        if teacher.family == "linear":
            raise CompressError("distill: the linear family has no hidden widths to shrink")
        if self.hidden is None:  # front: the widths come later (with_front)
            return teacher
        dilations = tuple(2**i for i in range(len(self.hidden))) if teacher.family == "conv" else ()
        try:
            return dataclasses.replace(teacher, hidden=self.hidden, dilations=dilations, layers=())
        except SpecError as e:
            raise CompressError(f"distill: {e}") from None

    def check(self, spec: ArchitectureSpec) -> None:
        self.student_spec(spec)

    def apply(self, state: ModelState, data: StepData) -> ModelState:
        if state.sparsity and self.hidden is not None:
            raise CompressError("distill: a new student replaces the masked model; put sparsify after distill")
        if self.front:
            raise CompressError("distill:front is resolved from the parent's search before the recipe runs")
        spec = self.student_spec(state.spec)
        teacher = data.teacher
        student: Any
        if self.hidden is None:
            student = state.model
        else:
            student = build_network(spec)
            student.mean.copy_(teacher.mean)
            student.std.copy_(teacher.std)
        alpha = self.alpha

        def loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = teacher.feature_errors(batch)
            task = model.feature_errors(batch, squared=True).mean()
            match = ((model.feature_errors(batch) - target) ** 2).mean()
            return (1 - alpha) * task + alpha * match

        recipe = dataclasses.replace(data.recipe, epochs=self.epochs or data.recipe.epochs)
        result = fit(spec, data.train, data.validation, data.rows, recipe, start=student, loss_fn=loss)
        return state.replace(model=result.model, spec=spec, notes=[
            *state.notes, f"{self.token}: student {spec.family} {list(spec.hidden) if self.hidden else '(the model so far)'}, "
            f"best epoch {result.best_epoch}"])


def smallest_front_widths(lineage: Mapping[str, Any], profiles: Sequence[str], teacher: ArchitectureSpec
                          ) -> tuple[tuple[int, ...], str]:
    """The hidden widths of the smallest member of the search front ``teacher`` came from.

    ``lineage`` is the teacher's (its ``search`` part names the Optuna study and storage). The
    members are the Pareto front of the study's trials that meet every budget of each of
    ``profiles`` (as ``edgefleet search --register front`` chooses), of the teacher's family;
    the smallest is the one with the fewest artifact bytes on those profiles. The student keeps
    the teacher's input (window, season, metrics) and takes only the widths: it learns from the
    teacher on the teacher's windows. Raises :class:`CompressError` when the teacher did not
    come from a search, the study is gone, or no front member fits.
    """
    from trainer.search.errors import SearchError
    from trainer.search.space import Candidate
    from trainer.search.study import OBJECTIVES, feasible_trials, load_study, pareto_front

    search = lineage.get("search")
    if not search:
        raise CompressError("distill:front: the model was not registered by edgefleet search, so there is no "
                            "front to take a student from: give widths (distill:64-16)")
    try:
        study = load_study(search["study"], search["storage"])
    except SearchError as e:
        raise CompressError(f"distill:front: {e}") from None
    names = list(study.user_attrs.get("profiles", []))
    missing = [p for p in profiles if p not in names]
    if missing:
        raise CompressError(f"distill:front: study {study.study_name!r} did not measure profile(s) {missing}")
    feasible: list[Any] | None = None
    for p in profiles:
        ok = feasible_trials(study, names.index(p))
        feasible = ok if feasible is None else [t for t in feasible if any(t is o for o in ok)]
    directions = [OBJECTIVES[o] for o in study.user_attrs["objectives"]]
    members = []
    for t in pareto_front(feasible or [], directions):
        spec = Candidate.from_json(t.user_attrs["candidate"]).architecture
        if spec.family == teacher.family and spec.hidden:
            size = max(h["artifact_bytes"] for h in t.user_attrs["hardware"] if h["profile"] in profiles)
            members.append((size, t.number, spec.hidden))
    if not members:
        raise CompressError(f"distill:front: no {teacher.family} member of study {study.study_name!r}'s front "
                            f"meets {', '.join(profiles)}")
    size, number, hidden = min(members)
    return tuple(hidden), f"trial {number} of study {study.study_name!r} ({size} bytes)"
