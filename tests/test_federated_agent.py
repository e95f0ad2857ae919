"""The agent's federated state: the bounded window store and the local privacy ledger.

Real SQLite files under ``tmp_path``, real dp-accounting; a second process charges the same
ledger to check that the budget holds across processes.

The expected ε figures were computed with dp-accounting's RDP accountant directly (a
``GaussianDpEvent(σ)`` per round, self-composed, ``get_epsilon(δ)``): the ledger composes the
rounds a host took part in without amplification by subsampling.
"""

from __future__ import annotations

import math
import selectors
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.federated import BudgetExhausted, FederatedStateError, LocalLedger, WindowStore
from edge_agent.federated.ledger import compose_epsilon

REPO_ROOT = Path(__file__).resolve().parents[1]


def _windows(n: int, rows: int = 4, features: int = 2, start: int = 0) -> np.ndarray:
    # window i is filled with the value start + i: order is visible in the data
    return np.repeat(np.arange(start, start + n, dtype=np.float64), rows * features).reshape(n, rows, features)


# -- WindowStore --------------------------------------------------------------------------------


def test_store_keeps_the_newest_windows_in_order_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "windows.sqlite"
    with WindowStore(path, max_windows=10) as store:
        assert len(store) == 0
        assert store.windows().shape == (0, 0, 0)
        store.add(_windows(6), "host@1")
        store.add(_windows(7, start=6), "host@1")  # 13 > 10: the 3 oldest go
        assert len(store) == 10
        got = store.windows()
        assert got.dtype == np.float32 and got.shape == (10, 4, 2)
        assert got[:, 0, 0].tolist() == list(range(3, 13))
        assert store.windows(limit=4)[:, 0, 0].tolist() == [9, 10, 11, 12]  # newest, oldest first
    with WindowStore(path, max_windows=10) as store:
        assert len(store) == 10
        assert store.windows()[:, 0, 0].tolist() == list(range(3, 13))
        store.add(_windows(25, start=100), "host@1")  # larger than the bound on its own
        assert store.windows()[:, 0, 0].tolist() == list(range(115, 125))


def test_store_keeps_shapes_apart(tmp_path: Path) -> None:
    with WindowStore(tmp_path / "w.sqlite", max_windows=100) as store:
        store.add(_windows(5, rows=4, features=2), "host@1")
        store.add(_windows(3, rows=8, features=1, start=50), "host@2")
        assert store.windows().shape == (3, 8, 1)  # the most recent shape by default
        old = store.windows(shape=(4, 2))
        assert old.shape == (5, 4, 2) and old[:, 0, 0].tolist() == [0, 1, 2, 3, 4]
        assert store.windows(shape=(16, 3)).shape == (0, 16, 3)
        assert store.shapes() == {(4, 2): 5, (8, 1): 3}
        store.add(_windows(1, rows=4, features=2, start=9), "host@1")
        assert store.windows().shape == (6, 4, 2)
        with pytest.raises(ValueError, match="rows, features"):
            store.add(np.zeros((3, 4)), "host@1")
        assert len(store) == 9


def test_store_values_round_trip_as_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 16, 3))
    with WindowStore(tmp_path / "w.sqlite") as store:
        store.add(data, "m@1")
        np.testing.assert_array_equal(store.windows(), data.astype(np.float32))


# -- LocalLedger --------------------------------------------------------------------------------


def test_compose_matches_the_checked_figures() -> None:
    # Gaussian σ=1.0, 10 rounds, δ=1e-5 → ε 19.05 (the same 10 rounds discounted by q=0.1
    # would claim 3.44); σ=10, 100 rounds → 4.73 (= σ=1 once: RDP scales with rounds/σ²)
    assert compose_epsilon([1.0] * 10, 1e-5) == pytest.approx(19.05, abs=0.005)
    assert compose_epsilon([10.0] * 100, 1e-5) == pytest.approx(4.73, abs=0.005)
    assert compose_epsilon([4.0, 4.0], 1e-5) == pytest.approx(1.478, abs=0.0005)
    assert compose_epsilon([], 1e-5) == 0.0
    assert compose_epsilon([1.0, 0.0], 1e-5) == math.inf


def test_ledger_records_q_but_composes_without_amplification(tmp_path: Path) -> None:
    # a SuperLink claiming a tiny sampling rate buys nothing on the host's own ledger
    with LocalLedger(tmp_path / "a.sqlite", epsilon_budget=8.0, delta=1e-5) as a, \
            LocalLedger(tmp_path / "b.sqlite", epsilon_budget=8.0, delta=1e-5) as b:
        claimed = a.charge("fl-a", 1, noise_multiplier=1.0, sampling_rate=1e-6, clipping_norm=1.0)
        plain = b.charge("fl-a", 1, noise_multiplier=1.0, sampling_rate=1.0, clipping_norm=1.0)
        assert claimed == plain == pytest.approx(4.73, abs=0.005)
        assert a.rounds()[0]["sampling_rate"] == 1e-6  # kept as information


@pytest.mark.slow
def test_ledger_charges_one_round_at_a_time_to_the_checked_figure(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with LocalLedger(path, epsilon_budget=8.0, delta=1e-5) as ledger:
        for r in range(1, 51):
            total = ledger.charge("fl-a", r, noise_multiplier=10.0, sampling_rate=0.1, clipping_norm=1.0)
    with LocalLedger(path, epsilon_budget=8.0, delta=1e-5) as ledger:  # reopened
        assert ledger.spent() == total
        for r in range(51, 101):
            total = ledger.charge("fl-a", r, noise_multiplier=10.0, sampling_rate=0.1, clipping_norm=1.0)
        assert total == pytest.approx(4.73, abs=0.005)
        assert ledger.spent() == total
        rounds = ledger.rounds()
        assert [r["round"] for r in rounds] == list(range(1, 101))
        assert rounds[-1] | {"recorded_at": 0} == {
            "run": "fl-a", "round": 100, "noise_multiplier": 10.0, "sampling_rate": 0.1,
            "clipping_norm": 1.0, "epsilon": total, "delta": 1e-5, "recorded_at": 0}
        assert all(a["epsilon"] < b["epsilon"] for a, b in zip(rounds, rounds[1:]))


def test_ledger_refuses_over_budget_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    # σ=4 at δ=1e-5: one round 1.013, two 1.478, three 1.847
    with LocalLedger(path, epsilon_budget=1.6, delta=1e-5) as ledger:
        e1 = ledger.charge("fl-a", 1, noise_multiplier=4.0, sampling_rate=0.1, clipping_norm=1.0)
        e2 = ledger.charge("fl-a", 2, noise_multiplier=4.0, sampling_rate=0.1, clipping_norm=1.0)
        assert e1 == pytest.approx(1.013, abs=0.0005) and e2 == pytest.approx(1.478, abs=0.0005)
        with pytest.raises(BudgetExhausted) as refused:  # a third round would pass 1.6
            ledger.charge("fl-a", 3, noise_multiplier=4.0, sampling_rate=0.1, clipping_norm=1.0)
        message = str(refused.value)
        assert "\n" not in message and "1.6" in message and "fl-a round 3" in message
        assert f"{e2:.4g}" in message and refused.value.would_be == pytest.approx(1.847, abs=0.0005)
        assert ledger.spent() == e2 and len(ledger.rounds()) == 2
        # a round with more noise still fits: refusing one round does not close the ledger
        e3 = ledger.charge("fl-b", 1, noise_multiplier=50.0, sampling_rate=0.1, clipping_norm=0.5)
        assert e3 == pytest.approx(1.481, abs=0.0005) and e2 < e3 <= 1.6
    with LocalLedger(path, epsilon_budget=1.4, delta=1e-5) as ledger:  # budget lowered in config
        assert ledger.spent() == e3
        with pytest.raises(BudgetExhausted):
            ledger.charge("fl-b", 2, noise_multiplier=50.0, sampling_rate=0.01, clipping_norm=1.0)
        assert [r["run"] for r in ledger.rounds()] == ["fl-a", "fl-a", "fl-b"]


def test_ledger_without_noise_is_infinite_and_needs_no_budget(tmp_path: Path) -> None:
    with LocalLedger(tmp_path / "a.sqlite", epsilon_budget=100.0, delta=1e-5) as ledger:
        with pytest.raises(BudgetExhausted, match="inf"):
            ledger.charge("fl-a", 1, noise_multiplier=0.0, sampling_rate=1.0, clipping_norm=1.0)
        assert ledger.rounds() == []
    with LocalLedger(tmp_path / "b.sqlite", epsilon_budget=math.inf, delta=1e-5) as ledger:
        assert ledger.charge("fl-a", 1, noise_multiplier=0.0, sampling_rate=1.0, clipping_norm=1.0) == math.inf
        assert ledger.spent() == math.inf
        assert ledger.charge("fl-a", 2, noise_multiplier=1.0, sampling_rate=0.5, clipping_norm=1.0) == math.inf
        assert [r["epsilon"] for r in ledger.rounds()] == [math.inf, math.inf]


def test_ledger_rejects_parameters_out_of_range(tmp_path: Path) -> None:
    with LocalLedger(tmp_path / "l.sqlite", epsilon_budget=8.0, delta=1e-5) as ledger:
        for sigma, q, clip in [(-1.0, 0.1, 1.0), (1.0, 0.0, 1.0), (1.0, 1.5, 1.0), (1.0, 0.1, 0.0),
                               (math.nan, 0.1, 1.0)]:
            with pytest.raises(ValueError):
                ledger.charge("fl-a", 1, sigma, q, clip)
        assert ledger.rounds() == []
    with pytest.raises(ValueError, match="delta"):
        LocalLedger(tmp_path / "l.sqlite", epsilon_budget=8.0, delta=0.0)


def test_ledger_reads_at_another_delta_by_composing_again(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with LocalLedger(path, epsilon_budget=8.0, delta=1e-5) as ledger:
        for r in range(3):
            ledger.charge("fl-a", r, 4.0, 0.1, 1.0)
        assert ledger.spent() == pytest.approx(1.847, abs=0.0005)
    with LocalLedger(path, epsilon_budget=8.0, delta=1e-3) as ledger:
        assert ledger.spent() == pytest.approx(1.306, abs=0.0005)  # σ=4, 3 rounds, δ=1e-3
        assert ledger.recorded_total() == (pytest.approx(1.847, abs=0.0005), 1e-5)  # as recorded


CHARGE = """
import sys
from pathlib import Path
import dp_accounting.rdp  # loaded before the start line: the race is over the ledger only
from edge_agent.federated import BudgetExhausted, LocalLedger
ledger = LocalLedger(Path(sys.argv[1]), epsilon_budget=1.6, delta=1e-5)
print("ready", flush=True)
sys.stdin.readline()  # the start barrier: both processes charge at once
ok = 0
for r in range(5):
    try:
        ledger.charge(sys.argv[2], r, 4.0, 0.1, 1.0)
        ok += 1
    except BudgetExhausted:
        pass
print(ok, flush=True)
"""


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    """The next line ``proc`` prints, waiting at most until ``deadline`` (monotonic)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            proc.kill()
            raise AssertionError("a charging process printed nothing before the deadline")
    return proc.stdout.readline().strip()


def test_two_processes_charging_one_ledger_stay_within_its_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    LocalLedger(path, epsilon_budget=1.6, delta=1e-5).close()
    procs = [subprocess.Popen([sys.executable, "-c", CHARGE, str(path), run], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
             for run in ("fl-a", "fl-b")]
    deadline = time.monotonic() + 120
    try:
        assert [_read_line(p, deadline) for p in procs] == ["ready", "ready"]
        for p in procs:  # release both together
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        accepted = [int(_read_line(p, deadline)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    assert sum(accepted) == 2  # σ=4: two rounds fit under 1.6, a third does not
    with LocalLedger(path, epsilon_budget=1.6, delta=1e-5) as ledger:
        assert len(ledger.rounds()) == 2 and ledger.spent() <= 1.6


# -- WindowFeed: the serving loop's side ---------------------------------------------------------


def test_feed_keeps_every_kth_normal_window_in_batches(tmp_path: Path) -> None:
    from test_edge_imports import _onnx_bundle

    from edge_agent.detector import Detector
    from edge_agent.federated.feed import WindowFeed
    from edge_agent.runtime import open_runtime
    from shared.bundle import read_bundle

    spec, model = read_bundle(_onnx_bundle())  # window 8, one feature, score = mean square
    detector = Detector(open_runtime(spec, model), spec, model_version=3)
    feed = WindowFeed(tmp_path / "windows.sqlite", max_windows=100, sample_every=5, batch=4,
                      max_pending_batches=64)  # this loop outpaces any writer
    scored, kept = 0, []
    for i in range(200):
        value = 5.0 if 100 <= i < 110 else float(i % 7) / 10  # a burst the model flags
        d = detector.push(str(i), [value])
        if d is None:
            continue
        if not d.is_anomaly:
            scored += 1
            if scored % 5 == 0:
                kept.append(detector.last_window())
        feed.offer(detector, d)
    assert detector.stats().anomalies > 0
    assert feed.flush(10)
    feed.close()
    with WindowStore(tmp_path / "windows.sqlite") as store:
        got = store.windows()
    assert got.shape == (len(kept), 8, 1) and len(kept) == scored // 5
    np.testing.assert_array_equal(got, np.stack(kept))
    assert (got < 5.0).all()  # no anomalous window was kept
    assert feed.dropped == 0 and feed.stored == len(kept)


@pytest.mark.parametrize("kind", ["ledger", "window store"])
def test_a_state_file_of_another_schema_is_refused_and_left_alone(tmp_path: Path, kind: str) -> None:
    import sqlite3

    path = tmp_path / "state.sqlite"
    opener = (lambda: LocalLedger(path, 8.0, 1e-5)) if kind == "ledger" else (lambda: WindowStore(path))
    opener().close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(FederatedStateError, match=f"{kind} schema 99, this agent reads 1"):
        opener()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == 99
    conn.close()
