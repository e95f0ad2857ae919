"""Hardware-aware model search on Optuna: spaces, objectives, budgets, the study runner.

- :mod:`trainer.search.space` — the JSON-able search space and :func:`suggest`;
- :mod:`trainer.search.objective` — detection quality of a candidate (labelled or not);
- :mod:`trainer.search.hardware` — a candidate's artifact measured against a profile's budget;
- :mod:`trainer.search.samplers` — samplers by name.

Optuna is imported lazily (only when a study runs), so importing this package is cheap.
"""
