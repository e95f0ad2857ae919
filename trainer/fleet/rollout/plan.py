"""Rollout stages and soak times as a user writes them (``--stages 1,10%,50%,100%``,
``--soak 10m``), and how many agents each stage covers. Pure functions."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "DEFAULT_STAGES",
    "PlanError",
    "check_stage_counts",
    "parse_duration",
    "parse_stages",
    "stage_sizes",
]

DEFAULT_STAGES = ("1", "10%", "50%", "100%")

_DURATION = re.compile(r"^(\d+(?:\.\d*)?)(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?)%$")


class PlanError(ValueError):
    """Stages or a duration that do not parse or do not make sense."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1.5h``, ``500ms`` → seconds (> 0).

    Raises:
        PlanError: anything else.
    """
    m = _DURATION.match(text.strip())
    if not m or float(m[1]) <= 0:
        raise PlanError(f"bad duration {text!r}: expected a positive number with s, m or h (e.g. 10m)")
    return float(m[1]) * _UNIT_S[m[2] or "s"]


def parse_stages(text: str) -> tuple[str, ...]:
    """Check ``1,10%,50%,100%``: agent counts or percentages of the eligible agents, growing,
    the last one ``100%`` (the whole group, written as the group's document).

    Raises:
        PlanError: an item that is neither a count ≥ 1 nor a percentage in (0, 100], stages
            that do not grow, or a last stage that is not 100%.
    """
    items = tuple(s.strip() for s in text.split(","))
    last_count, last_pct = 0, 0.0
    for item in items:
        if (m := _PERCENT.match(item)) is not None:
            pct = float(m[1])
            if not 0 < pct <= 100:
                raise PlanError(f"bad stage {item!r} in --stages: a percentage must be in (0, 100]")
            if pct <= last_pct:
                raise PlanError(f"--stages must grow: {item} after {last_pct:g}%")
            last_pct = pct
        elif item.isdigit() and int(item) >= 1:
            if int(item) <= last_count:
                raise PlanError(f"--stages must grow: {item} after {last_count}")
            last_count = int(item)
        else:
            raise PlanError(
                f"bad stage {item!r} in --stages: expected an agent count (1) or a percentage (10%)"
            )
    if items[-1] != "100%" and not (_PERCENT.match(items[-1]) and float(items[-1][:-1]) == 100):
        raise PlanError(f"--stages must end with 100% (the whole group), not {items[-1]}")
    return items


def _resolve(item: str, eligible: int) -> int:
    if item.endswith("%"):
        return math.ceil(float(item[:-1]) * eligible / 100 - 1e-9)
    return int(item)


def check_stage_counts(stages: Sequence[str], eligible: int) -> None:
    """Check that stages mixing counts and percentages (``10,5%,100%``) still grow once
    resolved against ``eligible`` agents (:func:`parse_stages` can only check each kind on
    its own). A stage resolving to as many agents as the one before (rounding: 10 % of 4 is
    1) is allowed and left out by :func:`stage_sizes`; one resolving to fewer is refused.

    Raises:
        PlanError: a stage covers fewer agents than an earlier one.
    """
    biggest, after = 0, ""
    for item in stages:
        n = _resolve(item, eligible)
        if n < biggest:
            raise PlanError(
                f"--stages must grow: {item} is {n} of {eligible} agent(s), after {after} "
                f"({biggest})"
            )
        if n > biggest:
            biggest, after = n, item


def stage_sizes(stages: Sequence[str], eligible: int, members: int | None = None) -> list[int]:
    """How many agents each stage covers (cumulative) when ``eligible`` agents take part.

    Percentages round up (10 % of 4 agents is 1 agent); counts are capped at ``eligible``;
    a stage that adds no agent to the one before it is left out, except the last (100 %).
    A group of more than one agent (``members``, default ``eligible``) always gets a canary
    stage of one agent before the last stage (which writes the group's document), even when
    the stages would resolve to the last one alone.
    """
    sizes: list[int] = []
    for i, item in enumerate(stages):
        n = max(1, min(_resolve(item, eligible), eligible))
        last = i == len(stages) - 1
        if last:
            n = eligible
        if sizes and n <= sizes[-1]:
            if last:
                sizes[-1] = n
            continue
        sizes.append(n)
    if len(sizes) == 1 and max(members or 0, eligible) > 1:
        sizes.insert(0, 1)  # [1, 1]: one canary, then the group's document for the others
    return sizes
