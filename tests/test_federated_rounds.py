"""Federated rounds with real Flower processes on loopback: one SuperLink, SuperNodes started
here with node configs pointing at prefilled WindowStores, ``edgefleet fl start`` through the
real CLI, the global model registered with artifacts, both privacy ledgers checked.

Models are tiny (a linear forecaster over 16 rows) and hosts train one epoch per round.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import edgefleet
from helpers_federated import Fleet

from shared.series import read_series
from trainer.data import generate_host_metrics, make_windows, write_host_metrics
from trainer.federated.accounting import compose_epsilon
from trainer.models import ArchitectureSpec
from trainer.registry import Registry

pytestmark = pytest.mark.slow
PROFILE = "x86-64-v3"  # ONNX only: the quickest export


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """host@1 (linear, window 16, one epoch), its CSV, and the CSV's windows to share out."""
    folder = tmp_path_factory.mktemp("fl")
    csv = folder / "host.csv"
    metrics = generate_host_metrics(1200, seed=5)
    write_host_metrics(metrics, csv, folder / "host.labels.json")
    registry = folder / "reg"
    edgefleet("train", "--data", str(csv), "--profile", PROFILE, "--name", "host", "--family", "linear",
              "--window", "16", "--season", "off", "--registry", str(registry), "--epochs", "1", "-q")
    with Registry.open(registry) as reg:
        spec = ArchitectureSpec.from_json(reg.get("host", 1).architecture)
    values = read_series(csv).values.astype(np.float32)
    windows = make_windows(values, spec.input_rows)
    return registry, csv, windows


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet.start(tmp_path / "fleet")
    try:
        yield fleet
    finally:
        fleet.stop()


def fl_start(parent: tuple[Path, Path, np.ndarray], fleet: Fleet, *args: str, check: bool = True):
    registry, csv, _ = parent
    proc = edgefleet("fl", "start", "--model", "host@1", "--group", "lab", "--data", str(csv),
                     "--registry", str(registry), "--superlink", fleet.link.address, "--json",
                     "--round-timeout", "120", "--node-wait", "120", "--timeout", "600", *args,
                     check=False, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-3000:]}\n{fleet.logs()}")
    return proc


def shares(windows: np.ndarray, n: int) -> list[np.ndarray]:
    """Non-IID: each host holds one contiguous stretch of the series."""
    return [np.ascontiguousarray(part[:300]) for part in np.array_split(windows, n)]


def test_three_fedavg_rounds_with_central_dp_register_a_version_and_fill_both_ledgers(parent, fleet) -> None:
    registry, _, windows = parent
    nodes = [fleet.add_node(f"host-{i}", part, budget=12.0) for i, part in enumerate(shares(windows, 3))]
    proc = fl_start(parent, fleet, "--rounds", "3", "--min-nodes", "3", "--noise", "1.0", "--clip", "0.5",
                    "--epsilon-budget", "20", "--delta", "1e-5", "--run", "fl-three")
    out = json.loads(proc.stdout)
    run, version = out["run"], out["version"]
    expected = compose_epsilon([(1.0, 1.0)] * 3, 1e-5)
    assert run["state"] == "registered"
    assert [r["state"] for r in run["rounds"]] == ["done"] * 3
    assert run["epsilon"] == pytest.approx(expected)
    assert run["nodes"] == ["host-0", "host-1", "host-2"]
    assert all(sorted(r["nodes_contributed"]) == run["nodes"] for r in run["rounds"])
    assert version["ref"] == "host@2"
    fed = version["lineage"]["federated"]
    assert fed["run"] == "fl-three" and fed["rounds_done"] == 3 and fed["strategy"] == "fedavg"
    assert fed["nodes"] == run["nodes"] and fed["epsilon"] == pytest.approx(expected)
    assert version["artifacts"] and all(a["parity"]["passed"] for a in version["artifacts"])
    with Registry.open(registry) as reg:
        assert reg.get("host", 2).weights is not None
    for node in nodes:
        with node.ledger() as ledger:
            assert ledger.spent() == pytest.approx(expected)
            assert [r["round"] for r in ledger.rounds()] == [1, 2, 3]
    status = edgefleet("fl", "status", "fl-three", "--registry", str(registry))
    assert "fl-three  registered" in status.stdout and "host-0" in status.stdout
