"""What the agent runs, on disk: activated bundles and ``state.json``, switched atomically.

Layout under the state dir::

    bundles/{sha256}.zip     bundles that are or were active (current + previous per slot)
                             and each slot's shadow candidate
    state.json               {"bdseq": N, "slots": {slot: {"current": {...}, "previous": {...},
                                                          "shadow": {...}}}}

Every write is temp file + fsync + ``os.replace``: a crash leaves either the old or the new
state, never a mix. :meth:`ActivationStore.recover` removes what a crash left behind (temp
files, bundles nothing references) before the agent serves.

``bdseq`` in ``state.json`` is a *reservation*: the highest birth/death sequence number this
agent may have used. Numbers are handed out from memory (:meth:`ActivationStore.next_bdseq`,
callable from a paho callback: no I/O) and the reservation is topped up on disk by another
thread (:meth:`ActivationStore.reserve_bdseq`), so a restarted agent starts above every number
an earlier run could have announced, even one that crashed before saving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.files import write_atomically

__all__ = ["ActivationStore", "ActiveRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveRecord:
    """One activated artifact of a slot."""

    model: str
    version: int
    format: str
    quantization: str
    sha256: str
    target: str
    serial: int

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ActiveRecord:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


class ActivationStore:
    """The activated bundles and the slot pointers.

    Thread safe: the reconcile thread activates while the MQTT network thread reads the slots
    and takes birth/death sequence numbers. ``_lock`` guards the in-memory state and is held
    only for memory operations, never across disk I/O, so the network thread may take it;
    ``_save_lock`` serialises the writes of ``state.json`` (always taken before ``_lock``).
    """

    #: How many birth/death sequence numbers are reserved on disk ahead of use.
    BDSEQ_RESERVE = 16

    def __init__(self, state_dir: Path) -> None:
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self.state_dir = state_dir
        self.bundles = state_dir / "bundles"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "state.json"
        self._state = self._load()
        # The last number handed out: an earlier run may have used anything up to the reservation.
        self._bdseq = int(self._state["bdseq"])

    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"bdseq": 0, "slots": {}}
        except (OSError, ValueError) as e:
            # A state.json that cannot be read is set aside, not silently overwritten.
            broken = self.path.with_suffix(".corrupt")
            os.replace(self.path, broken)
            log.error("state.json unreadable (%s); moved to %s, starting without a model", e, broken)
            return {"bdseq": 0, "slots": {}}
        state.setdefault("bdseq", 0)
        state.setdefault("slots", {})
        return state

    def _save(self) -> None:
        """Write the newest state (raises ``OSError``). Never call it while holding ``_lock``."""
        with self._save_lock:
            # Serialised under _save_lock: whoever writes last writes the newest state.
            with self._lock:
                data = (json.dumps(self._state, indent=2, sort_keys=True) + "\n").encode()
            write_atomically(self.path, data)

    def next_bdseq(self) -> int:
        """A new birth/death sequence number, from memory: no I/O, never raises.

        Safe from a paho callback. The number is covered by the reservation on disk unless
        :meth:`reserve_bdseq` has been failing (disk full) for a long while; call that soon
        after, from a thread that may do I/O.
        """
        with self._lock:
            self._bdseq += 1
            if self._bdseq > int(self._state["bdseq"]):
                log.warning("birth/death sequence %d is not reserved on disk yet", self._bdseq)
            return self._bdseq

    def reserve_bdseq(self) -> None:
        """Persist a reservation of :data:`BDSEQ_RESERVE` numbers beyond the last one handed out.

        Raises:
            OSError: ``state.json`` cannot be written (the reservation stays as it was).
        """
        with self._lock:
            wanted = self._bdseq + self.BDSEQ_RESERVE
            if int(self._state["bdseq"]) >= wanted:
                return
            old, self._state["bdseq"] = self._state["bdseq"], wanted
        try:
            self._save()
        except OSError:
            with self._lock:
                if self._state["bdseq"] == wanted:
                    self._state["bdseq"] = old
            raise

    def current(self, slot: str) -> ActiveRecord | None:
        with self._lock:
            entry = self._state["slots"].get(slot, {}).get("current")
        return ActiveRecord.from_json(entry) if entry else None

    def previous(self, slot: str) -> ActiveRecord | None:
        with self._lock:
            entry = self._state["slots"].get(slot, {}).get("previous")
        return ActiveRecord.from_json(entry) if entry else None

    def slots(self) -> list[str]:
        with self._lock:
            return sorted(s for s, v in self._state["slots"].items() if v.get("current"))

    def active(self) -> list[tuple[str, ActiveRecord]]:
        """``(slot, current record)`` of every slot that has one, as one consistent snapshot."""
        with self._lock:
            entries = [(s, v["current"]) for s, v in sorted(self._state["slots"].items()) if v.get("current")]
        return [(s, ActiveRecord.from_json(e)) for s, e in entries]

    def shadow(self, slot: str) -> ActiveRecord | None:
        """The shadow candidate installed beside the slot's model, if any."""
        with self._lock:
            entry = self._state["slots"].get(slot, {}).get("shadow")
        return ActiveRecord.from_json(entry) if entry else None

    def shadows(self) -> list[tuple[str, ActiveRecord]]:
        """``(slot, shadow record)`` of every slot that has one, as one consistent snapshot."""
        with self._lock:
            entries = [(s, v["shadow"]) for s, v in sorted(self._state["slots"].items()) if v.get("shadow")]
        return [(s, ActiveRecord.from_json(e)) for s, e in entries]

    def set_shadow(self, slot: str, record: ActiveRecord | None) -> None:
        """Install ``record`` (its bundle must be staged) as the slot's shadow, or with ``None``
        remove the shadow (its bundle goes unless something else uses it).

        Raises:
            FileNotFoundError: the bundle is not staged.
            OSError: ``state.json`` cannot be written (nothing changed).
        """
        if record is not None and not self.bundle_path(record.sha256).exists():
            raise FileNotFoundError(f"bundle {record.sha256} is not staged")
        with self._lock:
            entry = self._state["slots"].setdefault(slot, {})
            before = dict(entry)
            if record is None:
                entry.pop("shadow", None)
            else:
                entry["shadow"] = asdict(record)
        try:
            self._save()
        except OSError:
            with self._lock:
                self._state["slots"][slot] = before
            raise
        self._prune()

    def bundle_path(self, sha256: str) -> Path:
        return self.bundles / f"{sha256}.zip"

    def stage(self, sha256: str, bundle: bytes) -> Path:
        """Write a verified bundle (idempotent)."""
        path = self.bundle_path(sha256)
        if not path.exists():
            write_atomically(path, bundle)
        return path

    def activate(self, slot: str, record: ActiveRecord) -> None:
        """Make ``record`` current (its bundle must be staged); the old current becomes previous."""
        if not self.bundle_path(record.sha256).exists():
            raise FileNotFoundError(f"bundle {record.sha256} is not staged")
        with self._lock:
            entry = self._state["slots"].setdefault(slot, {})
            before = dict(entry)
            old = entry.get("current")
            if old and old["sha256"] != record.sha256:
                entry["previous"] = old
            entry["current"] = asdict(record)
        try:
            self._save()
        except OSError:
            with self._lock:  # not saved: not active either (the caller reports the failure)
                self._state["slots"][slot] = before
            raise
        self._prune()

    def recover(self) -> list[str]:
        """Remove a crash's leftovers: temp files and unreferenced bundles. Returns what went."""
        removed = []
        for tmp in list(self.state_dir.glob(".*.tmp")) + list(self.bundles.glob(".*.tmp")):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
        cleared = False
        with self._lock:
            for slot in list(self._state["slots"]):
                current = self.current(slot)
                if current and not self.bundle_path(current.sha256).exists():
                    log.error("slot %s: active bundle %s is missing; slot cleared", slot, current.sha256)
                    self._state["slots"][slot] = {}
                    cleared = True
                shadow = self.shadow(slot)
                if shadow and not self.bundle_path(shadow.sha256).exists():
                    log.error("slot %s: shadow bundle %s is missing; shadow removed", slot, shadow.sha256)
                    self._state["slots"][slot].pop("shadow", None)
                    cleared = True
        if cleared:
            self._save()
        removed += self._prune()
        return removed

    def _prune(self) -> list[str]:
        keep = set()
        with self._lock:
            for slot in self._state["slots"]:
                for rec in (self.current(slot), self.previous(slot), self.shadow(slot)):
                    if rec:
                        keep.add(f"{rec.sha256}.zip")
        removed = []
        for path in self.bundles.glob("*.zip"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed
