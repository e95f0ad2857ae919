"""Architecture and hyperparameter search on Optuna: samplers, and the errors of the layer."""

from trainer.search.errors import SearchError
from trainer.search.samplers import (
    SAMPLERS,
    EvolutionSampler,
    ReinforceSampler,
    make_sampler,
)

__all__ = [
    "SAMPLERS",
    "EvolutionSampler",
    "ReinforceSampler",
    "SearchError",
    "make_sampler",
]
