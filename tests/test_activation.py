"""The agent's activation store: slot pointers and birth/death sequence numbers on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.activation import ActivationStore, ActiveRecord


def test_bdseq_is_never_reused_by_a_restart_even_after_a_crash(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path)
    store.reserve_bdseq()
    first = store.next_bdseq()
    # The network thread hands out numbers without writing anything (as on each disconnect);
    # the process then dies before the reservation is topped up.
    used = [first] + [store.next_bdseq() for _ in range(ActivationStore.BDSEQ_RESERVE - 1)]
    assert json.loads((tmp_path / "state.json").read_text())["bdseq"] >= max(used)

    restarted = ActivationStore(tmp_path)
    restarted.reserve_bdseq()
    assert restarted.next_bdseq() > max(used)


def test_a_reservation_that_cannot_be_saved_changes_nothing(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path)
    store.reserve_bdseq()
    saved = (tmp_path / "state.json").read_bytes()
    (tmp_path / "state.json").unlink()
    (tmp_path / "state.json").mkdir()  # in the way of the atomic replace
    store.next_bdseq()
    with pytest.raises(OSError):
        store.reserve_bdseq()
    assert store.next_bdseq() == 2  # handing out goes on, from memory
    (tmp_path / "state.json").rmdir()
    (tmp_path / "state.json").write_bytes(saved)
    store.reserve_bdseq()
    assert json.loads((tmp_path / "state.json").read_text())["bdseq"] == 2 + ActivationStore.BDSEQ_RESERVE


def test_active_lists_current_records_and_a_failed_save_activates_nothing(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path)
    record = ActiveRecord("m", 1, "onnx", "int8", "ab" * 32, "artifacts/m.zip", 1)
    store.stage(record.sha256, b"bundle")
    store.activate("default", record)
    assert store.active() == [("default", record)]

    newer = ActiveRecord("m", 2, "onnx", "int8", "cd" * 32, "artifacts/m2.zip", 2)
    store.stage(newer.sha256, b"bundle 2")
    (tmp_path / "state.json").unlink()
    (tmp_path / "state.json").mkdir()
    with pytest.raises(OSError):
        store.activate("default", newer)
    assert store.active() == [("default", record)] and store.previous("default") is None
