"""Detection quality, measured the way published anomaly benchmarks measure it.

- :mod:`trainer.evaluation.nab` — a scorer compatible with the Numenta Anomaly Benchmark
  (windows, scaled sigmoid, cost profiles, threshold sweep, normalization) and event-level
  precision / recall / F1 with the time to detect.
- :mod:`trainer.evaluation.baselines` — reference detectors to compare models with.

numpy only: no torch, no pandas, so the agent-side score pipeline can be evaluated anywhere.
"""
