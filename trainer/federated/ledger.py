"""The trainer's privacy ledger: federated runs and their rounds, in the model registry.

Tables ``fl_runs`` and ``fl_rounds`` (registry schema v3). A round is *charged* when its
messages go out: ``begin_round`` composes it with the run's charged rounds
(:func:`trainer.federated.accounting.compose_epsilon`) and, when the total would pass the
run's budget, records the round as ``refused`` and raises :class:`BudgetRefused` — nothing
is sent. A charged round stays charged whatever happens next (a failed or timed-out round
still released noise-free information as far as the ledger knows), so ε only grows.

Every write is one ``BEGIN IMMEDIATE`` transaction; the check and the insert of a round are
the same transaction. ε is stored as the run's composed total after each round (RDP, the
figure enforced; PLD beside it for reference), at the run's δ.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from trainer.federated.accounting import compose_epsilon
from trainer.registry import Registry, RegistryError

__all__ = ["BudgetRefused", "FederatedRunRecord", "PrivacyLedger", "RunNotFound", "RunNotPending"]

RUN_STATES = ("pending", "running", "finished", "failed", "refused", "registered")


class BudgetRefused(Exception):  # noqa: N818 - a refusal, not a failure of the code
    """The next round would spend more ε than the run's budget allows (one line)."""


class RunNotPending(RegistryError):
    """The run has already been started (its app was submitted again): it is not run twice."""


class RunNotFound(RegistryError):
    """No federated run of that name in the registry."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _finite(x: float | None) -> float | str | None:
    """JSON-safe ε: ``inf`` (no DP) as the string ``"inf"``."""
    if x is None or math.isfinite(x):
        return x
    return "inf"


@dataclass(frozen=True)
class FederatedRunRecord:
    """One federated run as the ledger keeps it (``params`` holds every option it ran with)."""

    run: str
    created_at: str
    model: str
    parent_version: int
    group: str
    strategy: str
    dp: str
    noise_multiplier: float
    clipping: str
    sampling_rate: float
    rounds: int
    epsilon_budget: float | None
    delta: float
    params: dict[str, Any]
    state: str = "pending"
    flower_run_id: str | None = None
    weights: str | None = None
    result_version: int | None = None
    message: str | None = None
    finished_at: str | None = None
    round_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        """ε(δ) spent so far (RDP): the total after the last charged round, 0 before any."""
        charged = [r for r in self.round_rows if r["state"] != "refused"]
        return float(charged[-1]["epsilon"]) if charged else 0.0

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["rounds_planned"] = obj.pop("rounds")
        obj["rounds"] = [{**r, "epsilon": _finite(r["epsilon"]), "epsilon_pld": _finite(r["epsilon_pld"])}
                         for r in obj.pop("round_rows")]
        obj["epsilon"] = _finite(self.epsilon)
        obj["nodes"] = sorted({n for r in self.round_rows for n in r["nodes_contributed"]})
        return obj


_RUN_COLUMNS = ("run", "created_at", "model", "parent_version", "grp", "strategy", "dp", "noise_multiplier",
                "clipping", "sampling_rate", "rounds", "epsilon_budget", "delta", "params", "state",
                "flower_run_id", "weights", "result_version", "message", "finished_at")


class PrivacyLedger:
    """The federated runs and per-round privacy ledger of one open :class:`Registry`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    # -- runs -------------------------------------------------------------------------------

    def create_run(self, record: FederatedRunRecord) -> None:
        """Record a new run (state ``pending``). Raises :class:`RegistryError` if it exists."""
        row = {
            "run": record.run, "created_at": record.created_at or _now(), "model": record.model,
            "parent_version": record.parent_version, "grp": record.group, "strategy": record.strategy,
            "dp": record.dp, "noise_multiplier": record.noise_multiplier, "clipping": record.clipping,
            "sampling_rate": record.sampling_rate, "rounds": record.rounds,
            "epsilon_budget": record.epsilon_budget, "delta": record.delta,
            "params": json.dumps(record.params, sort_keys=True), "state": "pending",
        }
        with self.registry.transaction() as conn:
            if conn.execute("SELECT 1 FROM fl_runs WHERE run = ?", (record.run,)).fetchone():
                raise RegistryError(f"a federated run {record.run!r} exists already")
            cols = ", ".join(row)
            conn.execute(f"INSERT INTO fl_runs ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def update_run(self, run: str, **fields: Any) -> None:
        """Set columns of a run (``state``, ``flower_run_id``, ``weights``, ``result_version``,
        ``message``); a final state also sets ``finished_at``."""
        unknown = set(fields) - {"state", "flower_run_id", "weights", "result_version", "message"}
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        if fields.get("state") in ("finished", "failed", "refused"):
            fields["finished_at"] = _now()
        with self.registry.transaction() as conn:
            sets = ", ".join(f"{k} = ?" for k in fields)
            cur = conn.execute(f"UPDATE fl_runs SET {sets} WHERE run = ?", (*fields.values(), run))
            if cur.rowcount == 0:
                raise RunNotFound(f"no federated run {run!r} in registry {self.registry.root}")

    def claim_run(self, run: str) -> None:
        """Move the run from ``pending`` to ``running`` in one transaction. Raises
        :class:`RunNotPending` when it is in any other state (an app submitted again for a run
        that started must not run its rounds again: they are charged already) and
        :class:`RunNotFound`."""
        with self.registry.transaction() as conn:
            row = conn.execute("SELECT state FROM fl_runs WHERE run = ?", (run,)).fetchone()
            if row is None:
                raise RunNotFound(f"no federated run {run!r} in registry {self.registry.root}")
            if row[0] != "pending":
                raise RunNotPending(f"federated run {run!r} is {row[0]}, not pending: it runs only once")
            conn.execute("UPDATE fl_runs SET state = 'running' WHERE run = ?", (run,))

    def get(self, run: str) -> FederatedRunRecord:
        """The run with its rounds. Raises :class:`RunNotFound`."""
        rows = list(self.registry.db.query(f"SELECT {', '.join(_RUN_COLUMNS)} FROM fl_runs WHERE run = ?", [run]))
        if not rows:
            raise RunNotFound(f"no federated run {run!r} in registry {self.registry.root}")
        return self._record(rows[0])

    def runs(self) -> list[FederatedRunRecord]:
        """Every run, oldest first."""
        rows = self.registry.db.query(f"SELECT {', '.join(_RUN_COLUMNS)} FROM fl_runs ORDER BY created_at, run")
        return [self._record(r) for r in rows]

    def _record(self, row: dict[str, Any]) -> FederatedRunRecord:
        values = dict(row)
        values["group"] = values.pop("grp")
        values["params"] = json.loads(values["params"])
        return FederatedRunRecord(**values, round_rows=self.rounds(row["run"]))

    # -- rounds -----------------------------------------------------------------------------

    def rounds(self, run: str) -> list[dict[str, Any]]:
        """The run's rounds in order (refused ones included, ``state == "refused"``)."""
        out = []
        for r in self.registry.db.query("SELECT * FROM fl_rounds WHERE run = ? ORDER BY round", [run]):
            r = dict(r)
            for key in ("nodes_sampled", "nodes_contributed", "failures", "metrics"):
                r[key] = json.loads(r[key])
            out.append(r)
        return out

    def begin_round(self, run: str, round: int, *, sampling_rate: float, noise_multiplier: float,
                    clipping_norm: float, nodes_sampled: list[str]) -> float:
        """Charge round ``round`` and return the run's ε after it.

        A round already recorded is never replaced (the insert fails with the registry's
        integrity error): a charged round stays charged.

        Raises :class:`BudgetRefused` (and records the round as ``refused``, uncharged) when
        that ε would pass the run's budget.
        """
        with self.registry.transaction() as conn:
            head = conn.execute("SELECT epsilon_budget, delta FROM fl_runs WHERE run = ?", (run,)).fetchone()
            if head is None:
                raise RunNotFound(f"no federated run {run!r} in registry {self.registry.root}")
            budget, delta = head
            charged = conn.execute(
                "SELECT noise_multiplier, sampling_rate FROM fl_rounds WHERE run = ? AND state != 'refused' "
                "ORDER BY round", (run,)).fetchall()
            events = [*map(tuple, charged), (noise_multiplier, sampling_rate)]
            before = compose_epsilon(charged, delta) if charged else 0.0
            after = compose_epsilon(events, delta)
            row = {"run": run, "round": round, "started_at": _now(), "sampling_rate": sampling_rate,
                   "noise_multiplier": noise_multiplier, "clipping_norm": clipping_norm,
                   "nodes_sampled": json.dumps(sorted(nodes_sampled)), "nodes_contributed": "[]",
                   "failures": "[]", "metrics": "{}"}
            if budget is not None and after > budget:
                message = (f"round {round} refused: it would bring ε to {after:.4g} (δ={delta:g}), over the run's "
                           f"budget {budget:g}; ε spent so far {before:.4g}")
                row.update(state="refused", epsilon=before, epsilon_pld=None, message=message)
                self._insert_round(conn, row)
                refused = BudgetRefused(message)
            else:
                pld = compose_epsilon(events, delta, "pld") if math.isfinite(after) else math.inf
                row.update(state="running", epsilon=after, epsilon_pld=pld)
                self._insert_round(conn, row)
                refused = None
        if refused is not None:
            raise refused
        return after

    @staticmethod
    def _insert_round(conn: Any, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        conn.execute(f"INSERT INTO fl_rounds ({cols}) VALUES ({', '.join('?' * len(row))})",
                     tuple(row.values()))

    def finish_round(self, run: str, round: int, *, state: str, nodes_contributed: list[str],
                     failures: list[dict[str, Any]], metrics: dict[str, Any], message: str | None = None) -> None:
        """Record how a charged round ended (``done`` or ``failed``); its ε stays charged."""
        if state not in ("done", "failed"):
            raise ValueError(f"a charged round ends done or failed, not {state!r}")
        with self.registry.transaction() as conn:
            conn.execute(
                "UPDATE fl_rounds SET state = ?, finished_at = ?, nodes_contributed = ?, failures = ?, metrics = ?, "
                "message = ? WHERE run = ? AND round = ?",
                (state, _now(), json.dumps(sorted(nodes_contributed)), json.dumps(failures),
                 json.dumps(metrics, sort_keys=True), message, run, round))
