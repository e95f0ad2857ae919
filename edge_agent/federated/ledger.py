"""The host's own record of the privacy it spent on its data, and its refusal to overspend.

Each training round the host takes part in is one Gaussian mechanism on its data: noise
multiplier σ (noise standard deviation over the clipping norm). :class:`LocalLedger` composes
every recorded round with dp-accounting's RDP accountant and reports ε at the ledger's δ.

**No amplification by subsampling.** The ledger records only rounds this host took part in
(the ClientApp charges it when the host was selected), so from the host's view its data was
used in each recorded round with certainty: each is composed as a plain ``GaussianDpEvent(σ)``.
Discounting each recorded round by the server's sampling rate q (``PoissonSampledDpEvent``)
would count the sampling twice — the rounds the host was not selected for are already absent —
and would trust a figure the server chooses (a SuperLink could claim q = 1e-6). q is kept in
each row as information only; the server-side ("central") ε, which may use amplification, is
the trainer's figure.

**σ is the server's word under central DP.** With central DP the noise is added to the
aggregate by the ServerApp, so σ comes from the round's config and this host cannot check it;
the host's own defences are its budget (here) and the signed run document (which SuperLink,
which app by hash; apps themselves cannot be signed on flwr 1.42, see docs/federated.md).

Guarantees:

* **Refuse before spending.** :meth:`LocalLedger.charge` composes the new round with the
  recorded ones *before* recording it; if the total would exceed the budget it raises
  :class:`BudgetExhausted` and records nothing. The check and the insert are one
  ``BEGIN IMMEDIATE`` transaction, so two processes charging at once cannot both slip under
  the budget. dp-accounting is imported before that transaction begins (the import takes
  about a second; the write lock is not held meanwhile).
* **Every charge counts.** A round charged twice (a retried message) is recorded twice: the
  ledger errs on the side of spending, never of forgetting.
* **No DP is infinite ε.** ``noise_multiplier == 0`` composes to ε = inf; it is refused unless
  the budget itself is ``math.inf`` (no local budget).
* **Durable.** One SQLite file (WAL); a reopened ledger holds every committed round.
* **Cheap to read.** Each row keeps the composed total after it, so :meth:`LocalLedger.spent`
  and :meth:`LocalLedger.rounds` do not load dp-accounting (the agent reports them in its
  health without paying for the import); only :meth:`LocalLedger.charge`, or reading at
  another δ than the one recorded, composes again.

dp-accounting is imported on first use, so this module imports on an agent without the
``fl`` extra.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_agent.federated._errors import BudgetExhausted, FederatedStateError
from edge_agent.federated._sqlite import open_state, transaction

__all__ = ["BudgetExhausted", "LocalLedger", "compose_epsilon"]

_SCHEMA_VERSION = 1
_FIELDS = ("run", "round", "noise_multiplier", "sampling_rate", "clipping_norm", "epsilon",
           "delta", "recorded_at")


def _dp_accounting() -> Any:
    """The dp-accounting module; ``ModuleNotFoundError`` with an install hint when missing."""
    try:
        import dp_accounting
        import dp_accounting.rdp
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the local privacy ledger needs dp-accounting: install the agent's 'fl' extra "
            "(pip install 'edgefleet[edge,fl]')") from e
    return dp_accounting


def compose_epsilon(noise_multipliers: Iterable[float], delta: float) -> float:
    """ε(δ) of composing one Gaussian mechanism per noise multiplier (RDP accountant).

    No amplification by subsampling (see the module docstring). Identical multipliers are
    grouped into one self-composed event, so thousands of rounds cost what a handful of
    distinct settings cost. Returns 0.0 for no rounds and ``math.inf`` when any round has no
    noise. Raises ``ModuleNotFoundError`` with an install hint when dp-accounting is missing.
    """
    counts = Counter(float(s) for s in noise_multipliers)
    if not counts:
        return 0.0
    if any(sigma == 0.0 for sigma in counts):
        return math.inf
    dp = _dp_accounting()
    events = [dp.SelfComposedDpEvent(dp.GaussianDpEvent(sigma), n)
              for sigma, n in sorted(counts.items())]
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(dp.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


class LocalLedger:
    """The host's own record of the privacy it spent on its data (one SQLite file).

    ``epsilon_budget`` may be ``math.inf`` (no local budget); ``delta`` is in (0, 1). Raises
    :class:`FederatedStateError` when the file cannot be opened, read or written. Thread safe;
    several processes may share the file. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path, epsilon_budget: float, delta: float) -> None:
        if not (epsilon_budget >= 0):  # also rejects NaN
            raise ValueError(f"epsilon_budget must be >= 0 (or inf); got {epsilon_budget}")
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1); got {delta}")
        self.path = Path(path)
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self._lock = threading.Lock()
        try:
            # epsilon: the composed total after this round, at `delta`
            self._conn = open_state(self.path, "ledger", _SCHEMA_VERSION, [
                "CREATE TABLE IF NOT EXISTS rounds (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " run TEXT NOT NULL, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL,"
                " sampling_rate REAL NOT NULL, clipping_norm REAL NOT NULL, epsilon REAL NOT NULL,"
                " delta REAL NOT NULL, recorded_at REAL NOT NULL)"])
        except sqlite3.Error as e:
            raise FederatedStateError(f"cannot open privacy ledger {self.path}: {e}") from e

    def spent(self) -> float:
        """Composed ε(δ) over every recorded round; 0.0 when none."""
        with self._lock:
            try:
                last = self._conn.execute(
                    "SELECT epsilon, delta FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
                if last is None:
                    return 0.0
                if last[1] == self.delta:
                    return float(last[0])
                params = self._conn.execute("SELECT noise_multiplier FROM rounds").fetchall()
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot read privacy ledger {self.path}: {e}") from e
        return compose_epsilon((s for (s,) in params), self.delta)

    def recorded_total(self) -> tuple[float, float] | None:
        """``(epsilon, delta)`` as the last charge recorded them, ``None`` when nothing was
        charged. Never composes (no dp-accounting): for reports by the agent process."""
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT epsilon, delta FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot read privacy ledger {self.path}: {e}") from e
        return None if row is None else (float(row[0]), float(row[1]))

    def charge(self, run: str, round: int, noise_multiplier: float, sampling_rate: float,
               clipping_norm: float) -> float:
        """Record one round on this host's data and return the new total ε(δ).

        The round is composed as a Gaussian mechanism of ``noise_multiplier`` without
        amplification; ``sampling_rate`` is recorded as information (module docstring).
        Raises :class:`BudgetExhausted` — recording nothing — when the total would exceed
        the budget, ``ValueError`` for parameters out of range (σ < 0, q outside (0, 1],
        clipping norm <= 0).
        """
        sigma, q, clip = float(noise_multiplier), float(sampling_rate), float(clipping_norm)
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier}")
        if not (0.0 < q <= 1.0):
            raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate}")
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clipping_norm must be a finite number > 0; got {clipping_norm}")
        if sigma > 0:
            _dp_accounting()  # imported now, not while holding the write lock below
        with self._lock:
            try:
                with transaction(self._conn) as c:
                    rows = c.execute(
                        "SELECT noise_multiplier, epsilon, delta FROM rounds ORDER BY id").fetchall()
                    sigmas = [s for s, _, _ in rows]
                    if not rows:
                        before = 0.0
                    elif rows[-1][2] == self.delta:
                        before = rows[-1][1]
                    else:
                        before = compose_epsilon(sigmas, self.delta)
                    after = compose_epsilon([*sigmas, sigma], self.delta)
                    if after > self.epsilon_budget:
                        raise BudgetExhausted(
                            before, self.epsilon_budget, after,
                            f"run {run} round {round} (σ={sigma:g}, q={q:g})")
                    c.execute(
                        "INSERT INTO rounds (run, round, noise_multiplier, sampling_rate, clipping_norm,"
                        " epsilon, delta, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (str(run), int(round), sigma, q, clip, after, self.delta, time.time()),
                    )
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot charge privacy ledger {self.path}: {e}") from e
        return after

    def rounds(self) -> list[dict]:
        """Every recorded round, oldest first: the fields of ``charge`` plus ``epsilon`` (the
        total after that round), ``delta`` and ``recorded_at`` (Unix seconds)."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    f"SELECT {', '.join(_FIELDS)} FROM rounds ORDER BY id").fetchall()
            except sqlite3.Error as e:
                raise FederatedStateError(f"cannot read privacy ledger {self.path}: {e}") from e
        return [dict(zip(_FIELDS, row)) for row in rows]

    def close(self) -> None:
        """Close the database; idempotent."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LocalLedger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
