"""Federated learning with differential privacy on Flower's deployment runtime (trainer side).

- :mod:`~trainer.federated.accounting` — ε(δ) with dp-accounting, and which figure is reported;
- :mod:`~trainer.federated.ledger` — the privacy ledger in the registry (runs, rounds);
- :mod:`~trainer.federated.options` — a run's options, validated;
- :mod:`~trainer.federated.rounds` — the ServerApp's round loop (strategies, DP, sampling);
- :mod:`~trainer.federated.client` — the ClientApp's training on a host's windows;
- :mod:`~trainer.federated.flower` — the SuperLink process, ``flwr run`` and ``flwr ls``;
- :mod:`~trainer.federated.publish` — the global model → a registered version;
- :mod:`~trainer.federated.run` — ``edgefleet fl start`` / ``status``.

Importing this package loads neither flwr, torch nor dp-accounting.
"""
