"""Federated training with differential privacy against central training, on real Flower processes.

Data: a non-IID split of the team's NAB data (``../shared/data/nab``): each of :data:`HOSTS`
is one EC2 instance's CPU series, and one SuperNode holds that host's windows from its
probationary rows (NAB's 15%) in its window store, as an agent would. Four trainings of the
same architecture (the default ``edgefleet train`` model, hidden widths :data:`HIDDEN`):

- **central**: ``edgefleet train`` on every host's probationary rows at once;
- **federated**: ``edgefleet fl start`` FedAvg, :data:`ROUNDS` rounds, every host every round,
  no DP;
- **DP-FedAvg ε≈8** and **ε≈3**: the same with central DP, the noise multiplier chosen with
  dp-accounting so the run spends that ε at δ = 1e-5, and a fixed clipping norm set to the
  median update norm the hosts reported in the run without DP (the usual choice: clipping
  well above the updates' norm only adds noise, well below it biases the average).

The federated runs start from a model trained on the first host alone (the trainer's own
reference data; the threshold and int8 calibration use it too). Every resulting model is
scored with ``edgefleet evaluate --model`` on the hosts' whole series (NAB standard profile,
threshold optimized, and its own decisions). Also reported: wall time per round, and the
SuperNodes' RSS while idle and the peak of a node's process tree (SuperNode + ClientApp)
while training.

Run: ``.venv/bin/python benchmarks/bench_federated.py`` (skips when the NAB data is absent).
Writes the ``federated`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from _report import markdown_table, print_table, update_benchmarks_doc

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
NAB = REPO.parent / "shared" / "data" / "nab"
HOSTS = ("ec2_cpu_utilization_24ae8d", "ec2_cpu_utilization_53ea38", "ec2_cpu_utilization_5f5533",
         "ec2_cpu_utilization_77c1ca", "ec2_cpu_utilization_825cc2", "ec2_cpu_utilization_ac20cd",
         "ec2_cpu_utilization_c6585a", "ec2_cpu_utilization_fe7f93")
PROFILE = "x86-64-v3"
HIDDEN = (64, 16)
ROUNDS = 5
EPOCHS = 2
DELTA = 1e-5
NODE_WAIT = 600.0  # seconds for all SuperNodes to connect: eight of them start slowly on a loaded 2-core machine


def noise_for(epsilon: float, rounds: int) -> float:
    """The smallest noise multiplier (to 0.01) whose ``rounds`` full-participation rounds cost ≤ ε."""
    from trainer.federated.accounting import compose_epsilon

    lo, hi = 0.1, 100.0
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        if compose_epsilon([(mid, 1.0)] * rounds, DELTA) > epsilon:
            lo = mid
        else:
            hi = mid
    return round(hi, 2)


def tree_rss(proc: psutil.Process) -> int:
    """RSS of ``proc`` and its descendants (bytes); processes that vanish meanwhile count 0."""
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the root itself has gone
        return 0
    total = 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRss(threading.Thread):
    """Samples the process trees of ``pids`` until stopped; ``peak`` is the largest single tree."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for p in self.procs:
                self.peak = max(self.peak, tree_rss(p))


def start_node(name: str, state: Path, link: object, windows: np.ndarray) -> subprocess.Popen:
    from edge_agent.federated import WindowStore
    from trainer.federated.flower import _exe, flower_env, free_port

    state.mkdir(parents=True)
    with WindowStore(state / "windows.sqlite") as store:
        store.add(windows, "bench")
    node_config = f'state-dir="{state}" node-name="{name}" epsilon-budget="inf" delta={DELTA}'
    log = (state / "supernode.log").open("ab")
    proc = subprocess.Popen(
        [_exe("flower-supernode"), "--insecure", "--superlink", link.address,  # type: ignore[attr-defined]
         "--port", str(free_port()), "--node-config", node_config],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=flower_env(link.flwr_home, {"PYTHONPATH": str(REPO)}))  # type: ignore[attr-defined]
    log.close()
    return proc


def _node_metrics(metrics: object) -> list[dict]:
    """The per-node metric dicts in a ledger round's ``metrics`` (a dict, or a dict of dicts)."""
    if isinstance(metrics, dict):
        nested = [v for v in metrics.values() if isinstance(v, dict)]
        return nested or [metrics]
    return []


def evaluate_model(folder: Path, registry: Path, ref: str) -> dict[str, float]:
    from trainer.evaluation.harness import EvaluateRequest, evaluate, summarize

    report = summarize(evaluate(EvaluateRequest(data=folder, labels=NAB / "labels" / "combined_windows.json",
                                                model=ref, registry=registry, profile=PROFILE)))
    std = report.nab["standard"]
    return {"optimized": std["optimized"], "own": std["own_decisions"],
            "detected": report.events["detected"], "windows": report.events["windows"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    if not (NAB / "data").is_dir():
        print(f"no NAB data at {NAB}: skipped")
        return 0
    from shared.series import read_series
    from trainer.data import make_windows
    from trainer.evaluation.nab import probation_rows
    from trainer.federated.flower import SuperLink, free_port, stop_process
    from trainer.federated.options import FederatedOptions
    from trainer.federated.run import StartRequest, prepare, start
    from trainer.models import ArchitectureSpec
    from trainer.pipeline import TrainRequest, train
    from trainer.pipeline import prepare as prepare_train
    from trainer.registry import Registry

    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-fl-") as tmp:
        root = Path(tmp)
        data = root / "data" / "realAWSCloudwatch"
        data.mkdir(parents=True)
        files = []
        for host in HOSTS:
            path = data / f"{host}.csv"
            path.write_bytes((NAB / "data" / "realAWSCloudwatch" / path.name).read_bytes())
            files.append(path)
        registry = root / "registry"
        common = {"profiles": [PROFILE], "probation": True, "hidden": HIDDEN}
        print("central training on every host's probationary rows …", flush=True)
        t0 = time.perf_counter()
        central = train(prepare_train(TrainRequest(data=files, name="central", **common)), registry).version
        central_s = time.perf_counter() - t0
        print("the federated runs' starting model, on the first host alone …", flush=True)
        start_model = train(prepare_train(TrainRequest(data=files[:1], name="fl", **common)), registry).version
        with Registry.open(registry) as reg:
            spec = ArchitectureSpec.from_json(reg.get("fl", start_model.version).architecture)
        windows = []
        for path in files:
            values = np.asarray(read_series(path).values, np.float32)
            windows.append(make_windows(values[: probation_rows(len(values))], spec.input_rows))
        results = [("central (all hosts' rows on the trainer)", central.ref, "-", "-", central_s, None),
                   ("starting model (the first host's rows)", start_model.ref, "-", "-", float("nan"), None)]
        clip = 1.0
        configs = [("federated, no DP", "off", 0.0), ("DP-FedAvg, ε≈8", "central", noise_for(8.0, args.rounds)),
                   ("DP-FedAvg, ε≈3", "central", noise_for(3.0, args.rounds))]
        idle = []
        for index, (label, dp, sigma) in enumerate(configs):
            print(f"{label}: σ={sigma} …", flush=True)
            link = SuperLink(root / f"run-{index}" / "superlink", free_port()).start()
            nodes = [start_node(host, link.state_dir.parent / host, link, w) for host, w in zip(HOSTS, windows)]
            try:
                peak = PeakRss([n.pid for n in nodes])
                peak.start()
                options = FederatedOptions(group="bench", rounds=args.rounds, strategy="fedavg", dp=dp,
                                           noise_multiplier=sigma, clipping_norm=clip, delta=DELTA,
                                           min_nodes=len(HOSTS), epochs=EPOCHS,
                                           node_wait=NODE_WAIT)
                t0 = time.perf_counter()
                outcome = start(prepare(StartRequest(ref=start_model.ref, options=options, registry=registry,
                                                     profiles=[PROFILE], data=files[:1], superlink=link.address)))
                wall = time.perf_counter() - t0
                peak.done.set()
                peak.join()
                # idle: connected, no run (the round's ClientApp processes have ended)
                idle.append(max(psutil.Process(n.pid).memory_info().rss for n in nodes))
            finally:
                for n in nodes:
                    stop_process(n)
                link.stop()
            eps = outcome.run.epsilon
            if dp == "off":  # the DP runs clip at the median update norm of this run
                norms = [m["update-norm"] for r in outcome.run.round_rows
                         for m in _node_metrics(r["metrics"]) if "update-norm" in m]
                clip = float(f"{np.median(norms):.2g}") if norms else 1.0
                print(f"  median update norm {clip:g}: the DP runs' clipping norm", flush=True)
            results.append((label, outcome.version.ref, f"{sigma:g}" if dp != "off" else "-",
                            f"{eps:.2f}" if np.isfinite(eps) else "∞ (no DP)", wall / args.rounds, peak.peak))
        header = ["training", "model", "σ", "ε (δ=1e-5)", "NAB standard opt / own", "windows", "s per round",
                  "node peak RSS (MiB)"]
        scored = []
        for label, ref, sigma_s, eps_s, seconds, peak_rss in results:
            print(f"evaluate --model {ref} …", flush=True)
            q = evaluate_model(root / "data", registry, ref)
            scored.append([label, ref, sigma_s, eps_s, f"{q['optimized']:.1f} / {q['own']:.1f}",
                           f"{q['detected']}/{q['windows']}",
                           ("-" if seconds != seconds else f"{seconds:.1f}") if peak_rss is not None
                           else ("-" if seconds != seconds else f"{seconds:.0f} (all training)"),
                           f"{peak_rss / 2**20:.0f}" if peak_rss is not None else "-"])
    print_table(header, scored)
    idle_mib = max(idle) / 2**20
    body = (f"{len(HOSTS)} hosts (NAB realAWSCloudwatch EC2 CPU series, one per SuperNode: non-IID), each "
            f"training on its own probationary rows; the default forecaster with hidden widths "
            f"{'-'.join(map(str, HIDDEN))}; {args.rounds} FedAvg rounds of {EPOCHS} local epochs, every host every "
            f"round (q = 1, no amplification claimed), DP clipping norm {clip:g} (the median update norm without DP). NAB standard profile over the "
            f"{len(HOSTS)} hosts' whole series (`edgefleet evaluate --model`). An idle SuperNode "
            f"(connected, after the run): {idle_mib:.0f} MiB RSS; peak RSS: the largest SuperNode + ClientApp process tree during the run.\n\n"
            f"{markdown_table(header, scored)}\n")
    doc = update_benchmarks_doc("federated", body, command=".venv/bin/python benchmarks/bench_federated.py", path=DOC)
    print(f"\nwrote section 'federated' of {doc.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
