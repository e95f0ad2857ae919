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
from trainer.federated.ledger import PrivacyLedger
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
    edgefleet("repo", "init", "--registry", str(registry))  # runs are announced as signed targets
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
    from trainer.fleet.deploy import open_repository

    doc = json.loads(open_repository(registry).target_bytes("federated/runs/fl-three.json"))
    assert doc == {"schema": "edgefleet.federated-run/1", "run": "fl-three", "group": "lab",
                   "superlink": fleet.link.address, "state": "finished", "app_sha256": fed["app_sha256"],
                   "trusted_entities": {}, "epsilon_budget": 20.0, "delta": 1e-5, "insecure": True}
    status = edgefleet("fl", "status", "fl-three", "--registry", str(registry))
    assert "fl-three  registered" in status.stdout and "host-0" in status.stdout


def test_fedprox_round_goes_on_without_a_host_whose_local_budget_is_spent(parent, fleet) -> None:
    registry, _, windows = parent
    parts = shares(windows, 3)
    fleet.add_node("host-a", parts[0])
    fleet.add_node("host-b", parts[1])
    spent = fleet.add_node("host-c", parts[2], budget=1.0)  # one round at σ=1 costs ε 4.7
    proc = fl_start(parent, fleet, "--rounds", "1", "--min-nodes", "2", "--strategy", "fedprox", "--mu", "0.1",
                    "--run", "fl-prox")
    out = json.loads(proc.stdout)
    (rnd,) = out["run"]["rounds"]
    assert rnd["state"] == "done" and rnd["nodes_contributed"] == ["host-a", "host-b"]
    (declined,) = rnd["failures"]
    assert declined["declined"] and "host-c: local privacy budget exhausted" in declined["reason"]
    assert out["version"]["lineage"]["federated"]["strategy"] == "fedprox"
    with spent.ledger() as ledger:
        assert ledger.rounds() == [] and ledger.spent() == 0.0  # refused, nothing recorded


def test_fedadam_round_with_local_dp(parent, fleet) -> None:
    _, _, windows = parent
    for i, part in enumerate(shares(windows, 2)):
        fleet.add_node(f"host-{i}", part)
    proc = fl_start(parent, fleet, "--rounds", "1", "--strategy", "fedadam", "--dp", "local", "--noise", "1.0",
                    "--clip", "0.5", "--run", "fl-adam")
    out = json.loads(proc.stdout)
    assert [r["state"] for r in out["run"]["rounds"]] == ["done"]
    assert out["run"]["dp"] == "local" and out["run"]["epsilon"] == pytest.approx(compose_epsilon([(1.0, 1.0)], 1e-5))
    for node in fleet.nodes:
        with node.ledger() as ledger:
            assert ledger.spent() == pytest.approx(out["run"]["epsilon"])


def test_a_round_over_the_run_budget_is_refused_before_any_message(parent, fleet) -> None:
    registry, _, windows = parent
    for i, part in enumerate(shares(windows, 2)):
        fleet.add_node(f"host-{i}", part)
    # round 1 brings ε to 4.73, round 2 would bring it to 7.08 > 6
    proc = fl_start(parent, fleet, "--rounds", "3", "--epsilon-budget", "6", "--run", "fl-budget")
    run = json.loads(proc.stdout)["run"]
    assert [r["state"] for r in run["rounds"]] == ["done", "refused"]
    refused = run["rounds"][1]
    assert refused["message"].startswith("round 2 refused: it would bring ε to 7.077")
    assert run["epsilon"] == pytest.approx(compose_epsilon([(1.0, 1.0)], 1e-5))
    assert run["message"] == refused["message"]
    for node in fleet.nodes:
        with node.ledger() as ledger:
            assert [r["round"] for r in ledger.rounds()] == [1]  # round 2 never reached the hosts
    # A budget the first round already passes: refused before anything starts, one line, exit 2.
    proc = fl_start(parent, fleet, "--rounds", "1", "--epsilon-budget", "1", "--run", "fl-none", check=False)
    assert proc.returncode == 2
    first = compose_epsilon([(1.0, 1.0)], 1e-5)
    assert proc.stderr.strip().splitlines() == [
        f"edgefleet: error: one round costs ε {first:.4g} (δ=1e-05), more than --epsilon-budget 1: "
        "raise --noise or the budget"]
    with Registry.open(registry) as reg:
        assert "fl-none" not in [r.run for r in PrivacyLedger(reg).runs()]  # nothing written


def _wait_for(predicate, timeout: float, what: str) -> None:
    from trainer.federated.flower import wait_until

    wait_until(predicate, timeout, what)


def test_killing_a_supernode_mid_round_still_completes_the_round(parent, fleet) -> None:
    import os
    import signal
    import subprocess
    import sys

    from helpers_cli import cli_env

    registry, csv, windows = parent
    for i, part in enumerate(shares(windows, 3)):
        fleet.add_node(f"host-{i}", part)
    victim = fleet.nodes[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "fl", "start", "--model", "host@1", "--group", "lab", "--data", str(csv),
         "--registry", str(registry), "--superlink", fleet.link.address, "--json", "--rounds", "1",
         "--min-nodes", "2", "--round-timeout", "40", "--node-wait", "120", "--timeout", "600", "--run", "fl-kill"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        # the victim has received its train message and started training it
        _wait_for(lambda: "Start `flwr-clientapp` process" in victim.log(), 300, "the round reaching host-2")
        os.killpg(victim.proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:] + fleet.logs()
    (rnd,) = json.loads(out)["run"]["rounds"]
    assert rnd["state"] == "done" and rnd["nodes_contributed"] == ["host-0", "host-1"]
    assert len(rnd["failures"]) == 1 and not rnd["failures"][0]["declined"]


def test_an_unsigned_app_is_refused_by_a_supernode_that_trusts_only_the_trainers_key(parent, fleet, tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    _, _, windows = parent
    public = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    trusted = tmp_path / "trusted-entities.yaml"
    trusted.write_text(f"fpk_edgefleet_trainer: '{public}'\n")
    from trainer.federated.run import app_sha256

    parts = shares(windows, 4)
    fleet.add_node("host-0", parts[0], app_sha256=app_sha256())  # the app the run document names
    fleet.add_node("host-1", parts[1])
    careful = fleet.add_node("careful", parts[2], trusted_entities=trusted)
    stale = fleet.add_node("stale", parts[3], app_sha256="0" * 64)  # a document naming another app
    proc = fl_start(parent, fleet, "--rounds", "1", "--min-nodes", "2", "--run", "fl-unsigned")
    (rnd,) = json.loads(proc.stdout)["run"]["rounds"]
    assert rnd["nodes_contributed"] == ["host-0", "host-1"]
    refused = next(f for f in rnd["failures"] if not f["declined"])
    assert "could not be verified" in refused["reason"]
    (declined,) = [f for f in rnd["failures"] if f["declined"]]
    assert "stale: this app is" in declined["reason"] and "names 000000000000" in declined["reason"]
    with stale.ledger() as ledger:
        assert ledger.rounds() == []
    assert "FAB verification failed" in careful.log() or "could not be verified" in careful.log()
    with careful.ledger() as ledger:
        assert ledger.rounds() == []  # the app never ran on that host


def test_poisson_sampled_hosts_are_accounted_with_amplification(parent, fleet) -> None:
    _, _, windows = parent
    for i, part in enumerate(shares(windows, 3)):
        fleet.add_node(f"host-{i}", part)
    # seed 0 draws 1 of the 3 hosts in round 1 and 2 in round 2 (random.Random(0) at q = 0.5)
    proc = fl_start(parent, fleet, "--rounds", "2", "--min-nodes", "1", "--fraction", "0.5", "--seed", "0",
                    "--run", "fl-poisson")
    run = json.loads(proc.stdout)["run"]
    assert [r["sampling_rate"] for r in run["rounds"]] == [0.5, 0.5]
    assert [r["metrics"]["sampled"] for r in run["rounds"]] == [1, 2]
    assert [len(r["nodes_contributed"]) for r in run["rounds"]] == [1, 2]
    assert run["epsilon"] == pytest.approx(compose_epsilon([(1.0, 0.5)] * 2, 1e-5))
    assert run["epsilon"] < compose_epsilon([(1.0, 1.0)] * 2, 1e-5)
    # each host charged σ (composed without amplification) for the rounds it trained in, and only those
    charged = 0
    for node in fleet.nodes:
        with node.ledger() as ledger:
            charged += len(ledger.rounds())
            assert all(r["sampling_rate"] == 0.5 for r in ledger.rounds())  # recorded, not amplified
    assert charged == 3


def test_fl_start_runs_its_own_superlink_and_stops_it_without_dp(parent, tmp_path) -> None:
    import psutil
    from helpers_federated import SuperNode

    from trainer.federated.flower import free_port, stop_process

    registry, csv, windows = parent
    port = free_port()
    nodes = []
    try:
        for i, part in enumerate(shares(windows, 2)):
            state = tmp_path / f"host-{i}"
            state.mkdir()
            from edge_agent.federated import WindowStore

            with WindowStore(state / "windows.sqlite") as store:
                store.add(part, "host@1")
            # started before the SuperLink: a SuperNode keeps retrying until it is there
            nodes.append(SuperNode(f"host-{i}", state, f"127.0.0.1:{port}", budget=float("inf"))
                         .start(tmp_path / "flwr-home"))
        proc = edgefleet("fl", "start", "--model", "host@1", "--group", "lab", "--data", str(csv),
                         "--registry", str(registry), "--port", str(port), "--json", "--rounds", "1",
                         "--dp", "off", "--node-wait", "120", "--round-timeout", "120", "--run", "fl-own",
                         check=False, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:] + "\n".join(n.log()[-2000:] for n in nodes)
        assert "warning: the SuperLink is plaintext, so only agents on this host can join" in proc.stderr
        run = json.loads(proc.stdout)["run"]
        assert run["state"] == "registered" and run["epsilon"] == "inf" and run["dp"] == "off"
        assert run["nodes"] == ["host-0", "host-1"]
        link_db = registry / "federated" / "superlink" / "superlink.db"
        assert link_db.exists()  # --database: a restarted SuperLink keeps its nodes
        leftovers = [p for p in psutil.process_iter(["cmdline"])
                     if any("flower-superlink" in part for part in (p.info["cmdline"] or []))
                     and any(str(link_db) in part for part in (p.info["cmdline"] or []))]
        assert leftovers == []
        for node in nodes:
            with node.ledger() as ledger:
                assert ledger.spent() == float("inf")  # no DP: recorded as such (the budget is inf)
    finally:
        for node in nodes:
            if node.proc is not None:
                stop_process(node.proc)


def test_fl_start_from_a_spec_registers_a_version_that_started_from_the_spec(fleet, tmp_path) -> None:
    import onnxruntime

    from shared.bundle import read_bundle
    from trainer.federated.origin import spec_sha256

    csv = tmp_path / "host.csv"
    write_host_metrics(generate_host_metrics(1200, seed=7), csv, tmp_path / "host.labels.json")
    series = read_series(csv)
    spec = ArchitectureSpec("linear", 16, len(series.features), ())
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_json()))
    registry = tmp_path / "reg"
    windows = make_windows(series.values.astype(np.float32), spec.input_rows)
    for i, part in enumerate(shares(windows, 2)):
        fleet.add_node(f"host-{i}", part, budget=float("inf"))  # no DP: ε = inf on the hosts too
    proc = edgefleet("fl", "start", "--spec", str(tmp_path / "spec.json"), "--name", "fresh", "--data", str(csv),
                     "--profile", PROFILE, "--group", "lab", "--rounds", "1", "--min-nodes", "2", "--dp", "off",
                     "--seed", "3", "--registry", str(registry), "--superlink", fleet.link.address, "--json",
                     "--round-timeout", "120", "--node-wait", "120", "--timeout", "600", "--run", "fl-spec",
                     check=False, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}\n{fleet.logs()}"
    out = json.loads(proc.stdout)
    assert out["run"]["state"] == "registered" and out["version"]["ref"] == "fresh@1"
    with Registry.open(registry) as reg:
        version = reg.get("fresh", 1)
        bundles = [reg.bundle(a.sha256) for a in version.artifacts]
    assert version.lineage["parent_version"] is None
    assert version.lineage["started_from"]["spec_sha256"] == spec_sha256(spec)
    assert version.lineage["started_from"]["spec"] == spec.to_json()
    assert version.lineage["federated"]["run"] == "fl-spec" and version.lineage["federated"]["rounds_done"] == 1
    assert ArchitectureSpec.from_json(version.architecture) == spec
    assert bundles
    for data in bundles:
        bundle_spec, model = read_bundle(data)
        assert tuple(bundle_spec.features) == tuple(series.features)
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        if inp.type == "tensor(float)":  # int8 input tensors need the bundle's quantization: loading is enough
            (scores,) = session.run(None, {inp.name: np.ascontiguousarray(windows[:1], dtype=np.float32)})
            assert np.isfinite(scores).all()
    status = edgefleet("fl", "status", "fl-spec", "--registry", str(registry))
    assert "fresh from spec" in status.stdout and "registered" in status.stdout
