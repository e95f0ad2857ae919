"""Federated training end to end: real agents join a run that ``edgefleet fl start`` announces.

Everything is a real process: a private Mosquitto, two ``edgefleet-agent run`` processes with
``[federated] enabled`` (profile x86-64-v3, ``may_train = true``) serving a deployed model
from a replayed CSV, so that their window stores fill through the serving loop; then
``edgefleet fl start --broker …`` starts its own SuperLink, signs the run document
``federated/runs/{run}.json`` into the TUF repository and publishes it. The agents learn of the
run only from that signed document, start their SuperNodes, train two rounds with central DP,
and stop their SuperNodes when the document says ``finished``.

Checked: the new version and its lineage (the run, both agents as nodes), that it deploys to the
agents, the trainer's ε, and each agent's own ledger (read through :class:`edge_agent.federated.LocalLedger` and from its
health report) against ε computed here with dp-accounting for the rounds it trained.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import cli_env
from helpers_delivery import Agents, Watch, cli, poll_until, process_alive, process_group_members

from edge_agent.federated.supernode import end_leftover
from trainer.federated.flower import free_port, stop_process
from trainer.fleet.deploy import repository_path

BIN = Path(sys.executable).parent
SUPERNODE = BIN / "flower-supernode"
REPO_ROOT = Path(__file__).resolve().parents[1]
AGENTS = ("edge-a", "edge-b")
RUN = "fl-e2e"
ROUNDS = 2
NOISE = 1.0
DELTA = 1e-5  # the trainer's default and the agents' configured δ
MIN_WINDOWS = 30  # per agent before the run starts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SUPERNODE.exists() or not (BIN / "flower-superlink").exists(),
                       reason="flwr (the fl extra) is not installed in this environment"),
]


def rdp_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """ε(δ) of ``rounds`` plain Gaussian mechanisms (every host in every round: q = 1), RDP."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A short synthetic CSV and a registry with host@1 (tiny linear model) and a TUF repository."""
    base = tmp_path_factory.mktemp("fl-e2e")
    csv = base / "host.csv"
    cli("data", "synth", "--out", str(csv), "--rows", "1200", "--seed", "3")
    registry = base / "registry"
    cli("train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host", "--family", "linear",
        "--window", "16", "--season", "off", "--epochs", "1", "--registry", str(registry), "-q")
    cli("repo", "init", "--registry", str(registry), "--json")
    return csv, registry


@pytest.fixture
def agents(broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agents]:
    # The agents' SuperNodes pass PYTHONPATH on to their ClientApps, which import the repository.
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    group = Agents(tmp_path / "agents", broker.url)
    try:
        yield group
    finally:
        for agent in group.started:  # a clean stop stops each SuperNode (SIGTERM, then SIGKILL)
            agent.signal(signal.SIGTERM)
        for agent in group.started:
            try:
                agent.proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        group.close()
        for agent in group.started:  # an agent that had to be killed leaves its SuperNode's pid
            end_leftover(agent.state_dir / "federated" / "supernode", stop_timeout=10)


def federated_config(agents: Agents, agent_id: str, csv: Path, trust: Path) -> Path:
    config = agents.config(agent_id, trust=trust, source=f"csv:{csv}?rate=200")
    text = config.read_text()
    assert "[federated]\nenabled = false" in text, "init-config no longer writes [federated] enabled"
    config.write_text(text.replace(
        "[federated]\nenabled = false",
        f'[federated]\nenabled = true\nmax_windows = 400\nsample_every = 1\nepsilon_budget = 20.0\n'
        f'delta = {DELTA}\nsupernode = "{SUPERNODE}"'))
    return config


def last_health(watch: Watch, agent_id: str) -> dict[str, Any] | None:
    """The ``federated`` object of ``agent_id``'s latest health report (``None``: none yet)."""
    with watch.cond:
        reports = [m.body for m in watch.messages if m.kind == "health" and m.agent == agent_id]
    return reports[-1].federated if reports and reports[-1].federated else None


def supernode_pid(state_dir: Path) -> int | None:
    try:
        return int((state_dir / "federated" / "supernode" / "supernode.pid").read_text())
    except (OSError, ValueError):
        return None


def test_agents_join_a_run_announced_over_the_broker_train_and_both_ledgers_agree(
    trained: tuple[Path, Path], broker, agents: Agents, tmp_path: Path
) -> None:
    csv, registry = trained
    registry = Path(shutil.copytree(registry, tmp_path / "registry"))
    root = repository_path(registry) / "metadata" / "root.json"
    watch = Watch(broker.url, agents.tail)
    fl: subprocess.Popen[str] | None = None
    out_path, err_path = tmp_path / "fl.out", tmp_path / "fl.err"

    def diag() -> str:
        logs = [f"--- fl start stderr ---\n{err_path.read_text(errors='replace')[-3000:]}"
                if err_path.exists() else "(fl start not run)"]
        for agent in agents.started:
            log = agent.state_dir / "federated" / "supernode" / "supernode.log"
            if log.exists():
                logs.append(f"--- {log} ---\n{log.read_text(errors='replace')[-2000:]}")
        link = registry / "federated" / "superlink" / "superlink.log"
        if link.exists():
            logs.append(f"--- superlink ---\n{link.read_text(errors='replace')[-2000:]}")
        return "\n".join([agents.tail(), *logs])

    watch.diag = diag
    try:
        started = [agents.start(federated_config(agents, a, csv, root)) for a in AGENTS]
        cli("deploy", "host@1", "--group", "lab", "--registry", str(registry), "--broker", broker.url, "--json")
        for a in AGENTS:  # the serving loop fills each agent's window store
            watch.wait_for(lambda a=a: (h := last_health(watch, a)) and h["can_join"]
                           and h["windows"] >= MIN_WINDOWS, 180, f"{a}'s window store to fill")

        port = free_port()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            fl = subprocess.Popen(
                [sys.executable, "-m", "trainer.cli", "fl", "start", "--model", "host@1", "--group", "lab",
                 "--rounds", str(ROUNDS), "--min-nodes", "2", "--dp", "central", "--noise", str(NOISE),
                 "--clip", "1.0", "--epsilon-budget", "20", "--broker", broker.url, "--port", str(port),
                 "--data", str(csv), "--registry", str(registry), "--run", RUN, "--json",
                 "--round-timeout", "300", "--node-wait", "300", "--timeout", "1200"],
                cwd=REPO_ROOT, env=cli_env(), stdout=out, stderr=err, start_new_session=True)

        # The agents learn of the run from the signed document and start their SuperNodes.
        nodes = {}
        for agent in started:
            aid = agent.config.parent.name
            watch.wait_for(lambda aid=aid: (h := last_health(watch, aid)) and h["run"] == RUN
                           and h["supernode"] == "running", 180, f"{aid} to run a SuperNode for {RUN}")
            nodes[aid] = pid = poll_until(lambda agent=agent: supernode_pid(agent.state_dir), 30,
                                          f"{aid}'s SuperNode pid file", diag)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[cmdline.index(b"--superlink") + 1] == f"127.0.0.1:{port}".encode()
            # the run document names no keys (flwr 1.42 cannot sign a self-submitted app)
            assert b"--trusted-entities" not in cmdline
            assert b"app-sha256=" in cmdline[cmdline.index(b"--node-config") + 1]

        try:
            code = fl.wait(1500)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"fl start still running after 1500 s\n{diag()}") from None
        assert code == 0, f"fl start exited {code}\n{diag()}"
        result = json.loads(out_path.read_text())
        run, version = result["run"], result["version"]

        # the trainer: a new version whose lineage names the run and both agents
        expected = rdp_epsilon(ROUNDS, NOISE, DELTA)
        assert run["state"] == "registered" and [r["state"] for r in run["rounds"]] == ["done"] * ROUNDS
        assert all(sorted(r["nodes_contributed"]) == list(AGENTS) for r in run["rounds"]), run["rounds"]
        assert version["ref"] == "host@2"
        fed = version["lineage"]["federated"]
        assert fed["run"] == RUN and fed["nodes"] == list(AGENTS) and fed["rounds_done"] == ROUNDS
        assert run["epsilon"] == pytest.approx(expected, rel=1e-6)
        assert fed["epsilon"] == pytest.approx(expected, rel=1e-6)
        status = json.loads(cli("fl", "status", RUN, "--registry", str(registry), "--json").stdout)
        assert status["epsilon"] == pytest.approx(expected, rel=1e-6)

        # the run is over: each agent stops its SuperNode and the processes it started
        for aid, pid in nodes.items():
            watch.wait_for(lambda aid=aid: (h := last_health(watch, aid)) and h["run"] is None
                           and h["supernode"] == "stopped", 120, f"{aid} to stop its SuperNode")
            poll_until(lambda pid=pid: not process_alive(pid) and not process_group_members(pid), 30,
                       f"{aid}'s SuperNode (pid {pid}) and its ClientApps to end", diag)

        # each agent's own ledger: ε for the rounds it trained, computed here with dp-accounting
        from edge_agent.federated import LocalLedger

        for agent in started:
            aid = agent.config.parent.name
            with LocalLedger(agent.state_dir / "federated" / "ledger.sqlite", 20.0, DELTA) as ledger:
                rows = ledger.rounds()
                assert [(r["run"], r["round"]) for r in rows] == [(RUN, n) for n in range(1, ROUNDS + 1)], rows
                local = rdp_epsilon(len(rows), NOISE, DELTA)
                assert ledger.spent() == pytest.approx(local, rel=1e-6)
            watch.wait_for(lambda aid=aid, local=local: (h := last_health(watch, aid))
                           and h["epsilon_spent"] is not None
                           and math.isclose(h["epsilon_spent"], local, rel_tol=1e-6),
                           30, f"{aid}'s health report to show ε {local:.4g} spent")

        # the global model deploys like a centrally trained one
        cli("deploy", "host@2", "--group", "lab", "--registry", str(registry), "--broker", broker.url, "--json")
        for aid in AGENTS:
            watch.wait_for(lambda aid=aid: any(
                m.kind == "deployments" and m.agent == aid and (m.body.model, m.body.version, m.body.state)
                == ("host", 2, "active") for m in watch.messages), 60, f"{aid} to activate host@2")
        assert all(agent.alive() for agent in started), agents.tail()
    finally:
        if fl is not None and fl.poll() is None:
            stop_process(fl)  # with its SuperLink and the ServerApp
        watch.close()
