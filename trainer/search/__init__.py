"""Hardware-aware model search on Optuna: spaces, objectives, budgets, samplers.

- :mod:`trainer.search.space` — the JSON-able search space and :func:`suggest`;
- :mod:`trainer.search.objective` — detection quality of a candidate (labelled or not);
- :mod:`trainer.search.hardware` — a candidate's artifact measured against a profile's budget;
- :mod:`trainer.search.samplers` — samplers by name (:func:`make_sampler`), among them a
  regularized-evolution sampler and a REINFORCE controller.
"""

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
