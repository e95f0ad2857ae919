"""Where a federated run starts: a registered version (``--model NAME@V``) or an architecture
spec (``--spec SPEC.json``), as the run and the registration of its global model need it.

From a version, the initial weights, feature names, score pipeline, threshold policy, params
and lineage are that version's. From a spec, the network is built fresh from the spec with its
weights initialised from the run's seed (deterministic), its input normalisation taken from the
trainer's reference rows, the feature names from those rows' header, and the score pipeline and
threshold policy are ``edgefleet train``'s defaults. The result's lineage then says it started
from the spec (no parent version) and records the spec's hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.bundle import read_bundle
from shared.score_pipeline import LikelihoodPipeline, ScorePipeline
from trainer.registry import Registry, VersionRecord
from trainer.scoring import ThresholdPolicy

if TYPE_CHECKING:  # torch loads with trainer.models: only when a run starts
    from trainer.models import ArchitectureSpec

__all__ = ["SPEC_PARENT", "Origin", "origin_from_spec", "origin_from_version", "spec_sha256"]

SPEC_PARENT = 0
"""``fl_runs.parent_version`` of a run started from a spec (the column is NOT NULL; versions
start at 1): the ledger row's ``params["start"]`` then holds the spec, its hash and the blob of
the initial weights."""

_NOT_INHERITED = ("parent_version", "software", "compression", "search", "federated", "started_from")


@dataclass(frozen=True)
class Origin:
    """The starting model of a federated run and what its result inherits.

    ``version`` is ``None`` for a spec (then ``spec_sha256`` is set). ``lineage`` is what the
    registered result inherits before the run's own entries are added.
    """

    model: str
    version: int | None
    architecture: dict[str, Any]
    weights: bytes
    features: tuple[str, ...]
    pipeline: ScorePipeline
    threshold: ThresholdPolicy
    params: dict[str, Any]
    lineage: dict[str, Any]
    spec_sha256: str | None = None

    @property
    def ref(self) -> str:
        """``NAME@V``, or ``NAME from spec <hash prefix>``."""
        if self.version is None:
            return f"{self.model} from spec {(self.spec_sha256 or '')[:12]}"
        return f"{self.model}@{self.version}"


def spec_sha256(spec: ArchitectureSpec) -> str:
    """sha256 of the spec's canonical JSON (sorted keys, no spaces): the same for any file
    that parses to the same spec."""
    text = json.dumps(spec.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def origin_from_version(reg: Registry, parent: VersionRecord) -> Origin:
    """``parent`` as a starting point. Raises :class:`~trainer.registry.RegistryError` when its
    weights or its first artifact's bundle are missing."""
    weights = reg.weights(parent)
    bundle_spec, _ = read_bundle(reg.bundle(parent.artifacts[0].sha256))
    return Origin(
        model=parent.model, version=parent.version, architecture=dict(parent.architecture), weights=weights,
        features=tuple(bundle_spec.features), pipeline=bundle_spec.score.pipeline,
        threshold=ThresholdPolicy(**parent.lineage.get("threshold_policy", {})), params=dict(parent.params),
        lineage={k: v for k, v in parent.lineage.items() if k not in _NOT_INHERITED},
    )


def origin_from_spec(name: str, spec: ArchitectureSpec, features: Sequence[str], series: Sequence[np.ndarray],
                     datasets: list[dict[str, Any]], seed: int) -> Origin:
    """A fresh network for ``spec`` named ``name``, initialised from ``seed``, normalised on the
    training rows of ``series`` (the reference data, split as ``edgefleet train`` splits it).
    Raises ``ValueError`` for a tree family."""
    from trainer.models import initial_network, weights_bytes
    from trainer.pipeline import DEFAULT_SCORE_PIPELINE, training_windows, with_seasonal_repeats

    _, _, rows = training_windows(spec, list(series))
    model = initial_network(spec, rows, seed)
    pipeline: ScorePipeline = DEFAULT_SCORE_PIPELINE.with_value_range(np.concatenate(list(series)))
    if spec.season and isinstance(pipeline, LikelihoodPipeline):  # as `train` declares it
        pipeline = with_seasonal_repeats(pipeline, spec.season)
    threshold = ThresholdPolicy()
    digest = spec_sha256(spec)
    return Origin(
        model=name, version=None, architecture=spec.to_json(), weights=weights_bytes(model),
        features=tuple(features), pipeline=pipeline, threshold=threshold, params={},
        lineage={"datasets": datasets, "threshold_policy": threshold.to_json(),
                 "started_from": {"spec": spec.to_json(), "spec_sha256": digest, "seed": seed}},
        spec_sha256=digest,
    )
