"""Real Flower processes for the federated tests: a SuperLink and SuperNodes on loopback, each
SuperNode with its own state directory (a WindowStore prefilled with windows, a LocalLedger)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from helpers_cli import cli_env

from edge_agent.federated import LocalLedger, WindowStore
from trainer.federated.flower import SuperLink, _exe, flower_env, free_port, stop_process


@dataclass
class SuperNode:
    name: str
    state_dir: Path
    superlink: str
    budget: float = 8.0
    delta: float = 1e-5
    trusted_entities: Path | None = None
    app_sha256: str | None = None
    root_certificates: Path | None = None  # TLS to the SuperLink, verified with this CA bundle
    proc: subprocess.Popen | None = None

    def start(self, flwr_home: Path) -> SuperNode:
        budget = "inf" if self.budget == float("inf") else f"{self.budget}"
        node_config = (f'state-dir="{self.state_dir}" node-name="{self.name}" '
                       f'epsilon-budget="{budget}" delta={self.delta}')
        if self.app_sha256:
            node_config += f' app-sha256="{self.app_sha256}"'
        transport = ["--insecure"] if self.root_certificates is None else [
            "--root-certificates", str(self.root_certificates)]
        cmd = [_exe("flower-supernode"), *transport, "--superlink", self.superlink,
               "--port", str(free_port()), "--node-config", node_config]
        if self.trusted_entities is not None:
            cmd += ["--trusted-entities", str(self.trusted_entities)]
        log = (self.state_dir / "supernode.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=flower_env(flwr_home, {"PYTHONPATH": cli_env()["PYTHONPATH"]}))
        log.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def ledger(self) -> LocalLedger:
        return LocalLedger(self.state_dir / "ledger.sqlite", self.budget, self.delta)

    def log(self) -> str:
        path = self.state_dir / "supernode.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Fleet:
    """One SuperLink and its SuperNodes; :meth:`stop` ends every process it started."""

    root: Path
    link: SuperLink
    nodes: list[SuperNode] = field(default_factory=list)

    @classmethod
    def start(cls, root: Path) -> Fleet:
        env_path = cli_env()["PYTHONPATH"]
        import os

        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = env_path  # the ServerApp process inherits the SuperLink's environment
        try:
            link = SuperLink(root / "superlink", free_port()).start()
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
        return cls(root, link)

    def add_node(self, name: str, windows: np.ndarray, budget: float = 8.0, delta: float = 1e-5,
                 trusted_entities: Path | None = None, app_sha256: str | None = None) -> SuperNode:
        state = self.root / name
        state.mkdir(parents=True)
        with WindowStore(state / "windows.sqlite") as store:
            if len(windows):
                store.add(windows, "host@1")
        node = SuperNode(name, state, self.link.address, budget, delta, trusted_entities, app_sha256)
        node.start(self.link.flwr_home)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.link.stop()

    def logs(self) -> str:
        return "\n".join([f"== superlink\n{self.link.log_tail(4000)}"]
                         + [f"== {n.name}\n{n.log()[-3000:]}" for n in self.nodes])
