"""Rollouts in the registry (schema v4): the controller's resumable state and its log.

One ``rollouts`` row per rollout holds everything a restarted controller needs: the plan
(stages, soak, gates, the eligible agents), where it is (``stage``, ``progress``: the current
stage's phase, participants, their counters and the soak's start) and the operator's requests
(``paused``, ``abort_requested``). ``rollout_events`` is its append-only log. Every write is one
``BEGIN IMMEDIATE`` transaction, so a controller killed at any point leaves a consistent row.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trainer.fleet.rollout.gates import Gates
from trainer.registry import Registry, RegistryError

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "RolloutRecord",
    "RolloutStore",
    "check_rollout_id",
    "new_rollout_id",
]

#: A rollout in one of these is finished: nothing resumes it.
TERMINAL_STATES = ("completed", "rolled_back", "aborted")
#: A rollout in one of these holds its group (no second rollout may start on it).
ACTIVE_STATES = ("running",)
_ID = re.compile(r"^ro-[0-9a-f]{8}$")


def new_rollout_id() -> str:
    return f"ro-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout as stored. ``progress`` is the controller's per-stage state (JSON)."""

    id: str
    created_at: str
    updated_at: str
    model: str
    version: int
    previous_version: int
    group: str
    slot: str
    stages: tuple[str, ...]
    soak_s: float
    gates: Gates
    agents: tuple[str, ...]
    state: str
    stage: int
    paused: bool
    abort_requested: bool
    progress: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    finished_at: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.version}"

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "model": self.model,
            "version": self.version,
            "previous_version": self.previous_version,
            "group": self.group,
            "slot": self.slot,
            "stages": list(self.stages),
            "soak_s": self.soak_s,
            "gates": self.gates.describe(),
            "agents": list(self.agents),
            "state": self.state,
            "stage": self.stage,
            "paused": self.paused,
            "abort_requested": self.abort_requested,
            "progress": self.progress,
            "message": self.message,
            "finished_at": self.finished_at,
        }


class RolloutStore:
    """Reads and writes rollouts in an open :class:`~trainer.registry.Registry`.

    Safe for several processes (a controller, ``rollout pause`` …): each method is one
    transaction; :meth:`update` re-reads the row under the write lock.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def create(self, record: RolloutRecord) -> None:
        """Insert a new rollout (and its ``started`` log entry).

        Raises:
            RegistryError: another rollout of the group is still running.
        """
        with self.registry.transaction() as conn:
            marks = ",".join("?" * len(ACTIVE_STATES))
            busy = conn.execute(
                f"SELECT id FROM rollouts WHERE grp = ? AND state IN ({marks})",
                (record.group, *ACTIVE_STATES),
            ).fetchone()
            if busy:
                raise RegistryError(
                    f"rollout {busy[0]} of group {record.group} is still running: "
                    f"`edgefleet rollout resume {busy[0]}` or `edgefleet rollout abort {busy[0]}`"
                )
            conn.execute(
                "INSERT INTO rollouts (id, created_at, updated_at, model, version, "
                "previous_version, grp, slot, stages, soak_s, gates, agents, state, stage, paused, "
                "abort_requested, progress, message, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id, record.created_at, record.updated_at, record.model, record.version,
                    record.previous_version, record.group, record.slot, json.dumps(record.stages),
                    record.soak_s, json.dumps(record.gates.to_json()), json.dumps(record.agents),
                    record.state, record.stage, int(record.paused), int(record.abort_requested),
                    json.dumps(record.progress), record.message, record.finished_at,
                ),
            )
            self._log(conn, record.id, record.stage, "started", {
                "ref": record.ref, "previous_version": record.previous_version,
                "agents": list(record.agents), "stages": list(record.stages),
                "soak_s": record.soak_s, "gates": record.gates.describe(),
            })

    def get(self, rollout_id: str) -> RolloutRecord:
        """Raises :class:`RegistryError` for an unknown id."""
        rows = _dicts(self.registry.db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)))
        if not rows:
            raise RegistryError(f"no rollout {rollout_id!r} (see `edgefleet rollout status`)")
        return _record(rows[0])

    def holding(self, *, group: str | None = None, agent: str | None = None) -> RolloutRecord | None:
        """The unfinished rollout that holds ``group``, or the group ``agent`` was found in when
        the rollout started (taking part or skipped), if any."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        rows = _dicts(self.registry.db.execute(
            f"SELECT * FROM rollouts WHERE state IN ({marks}) ORDER BY created_at, id", ACTIVE_STATES
        ))
        for record in map(_record, rows):
            if group is not None and record.group == group:
                return record
            members = set(record.agents) | set(record.progress.get("skipped", {}))
            if agent is not None and agent in members:
                return record
        return None

    def all(self) -> list[RolloutRecord]:
        cursor = self.registry.db.execute("SELECT * FROM rollouts ORDER BY created_at, id")
        return [_record(r) for r in _dicts(cursor)]

    def update(
        self, rollout_id: str, *, event: tuple[str, dict[str, Any]] | None = None, **changes: Any
    ) -> RolloutRecord:
        """Change some columns (and log ``event`` = ``(kind, detail)``) in one transaction."""
        columns = {
            "state", "stage", "paused", "abort_requested", "progress", "message", "finished_at",
        }
        unknown = set(changes) - columns
        if unknown:
            raise ValueError(f"not rollout columns: {sorted(unknown)}")
        values = {
            k: (json.dumps(v) if k == "progress" else int(v) if isinstance(v, bool) else v)
            for k, v in changes.items()
        }
        values["updated_at"] = _now()
        with self.registry.transaction() as conn:
            row = conn.execute("SELECT stage FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                raise RegistryError(f"no rollout {rollout_id!r}")
            sets = ", ".join(f"{k} = ?" for k in values)
            conn.execute(f"UPDATE rollouts SET {sets} WHERE id = ?", (*values.values(), rollout_id))
            if event is not None:
                stage = changes.get("stage", row[0])
                self._log(conn, rollout_id, stage, event[0], event[1])
        return self.get(rollout_id)

    def request(self, rollout_id: str, what: str) -> RolloutRecord:
        """Record an operator's ``abort``, ``pause`` or ``resume`` in one transaction that also
        checks the rollout is not finished (a controller may finish it at the same moment).

        Raises:
            RegistryError: unknown id, or the rollout is already finished.
        """
        column, value, kind = {
            "abort": ("abort_requested", 1, "abort-requested"),
            "pause": ("paused", 1, "paused"),
            "resume": ("paused", 0, "resumed"),
        }[what]
        with self.registry.transaction() as conn:
            row = conn.execute(
                f"SELECT state, stage, {column} FROM rollouts WHERE id = ?", (rollout_id,)
            ).fetchone()
            if row is None:
                raise RegistryError(f"no rollout {rollout_id!r} (see `edgefleet rollout status`)")
            state, stage, current = row
            if state in TERMINAL_STATES:
                raise RegistryError(f"rollout {rollout_id} is {state}: nothing to {what}")
            if current != value:
                conn.execute(f"UPDATE rollouts SET {column} = ?, updated_at = ? WHERE id = ?",
                             (value, _now(), rollout_id))
                self._log(conn, rollout_id, stage, kind, {})
        return self.get(rollout_id)

    def log(self, rollout_id: str, stage: int, kind: str, detail: dict[str, Any]) -> None:
        with self.registry.transaction() as conn:
            self._log(conn, rollout_id, stage, kind, detail)

    def events(self, rollout_id: str) -> list[dict[str, Any]]:
        rows = self.registry.db.execute(
            "SELECT seq, ts, stage, kind, detail FROM rollout_events WHERE rollout = ? ORDER BY seq",
            (rollout_id,),
        ).fetchall()
        return [
            {"seq": s, "ts": ts, "stage": st, "kind": k, "detail": json.loads(d)}
            for s, ts, st, k, d in rows
        ]

    @staticmethod
    def _log(conn: Any, rollout_id: str, stage: int, kind: str, detail: dict[str, Any]) -> None:
        (seq,) = conn.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM rollout_events WHERE rollout = ?", (rollout_id,)
        ).fetchone()
        conn.execute(
            "INSERT INTO rollout_events (rollout, seq, ts, stage, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (rollout_id, seq, _now(), stage, kind, json.dumps(detail, sort_keys=True)),
        )


def check_rollout_id(text: str) -> str:
    """Return ``text`` if it looks like a rollout id (``ro-`` + 8 hex digits)."""
    if not _ID.match(text):
        raise RegistryError(f"bad rollout id {text!r}: expected ro- and 8 hex digits")
    return text


def _dicts(cursor: Any) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _record(r: dict[str, Any]) -> RolloutRecord:
    return RolloutRecord(
        id=r["id"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        model=r["model"],
        version=r["version"],
        previous_version=r["previous_version"],
        group=r["grp"],
        slot=r["slot"],
        stages=tuple(json.loads(r["stages"])),
        soak_s=r["soak_s"],
        gates=Gates.from_json(json.loads(r["gates"])),
        agents=tuple(json.loads(r["agents"])),
        state=r["state"],
        stage=r["stage"],
        paused=bool(r["paused"]),
        abort_requested=bool(r["abort_requested"]),
        progress=json.loads(r["progress"]),
        message=r["message"],
        finished_at=r["finished_at"],
    )
