"""``edgefleet demo``: a small fleet end to end on one machine, and nothing left running.

Steps: private Mosquitto (or ``--broker``) → synthetic host metrics for three hosts with
labelled anomalies → train on their clean history for two profiles → TUF repository →
deploy to the group → three agent processes (two x86-64-v3 on ONNX, one rpi4-arm64 on TFLite)
replay their held-back streams → a second version goes to one agent only (canary) → a table
of what each agent did. Every process it starts is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.messages import SCHEMA_DRIFT_EVENT, SCHEMA_EVENT

__all__ = ["DemoError", "DemoOptions", "run_demo"]

MARKER = ".edgefleet-demo"
GROUP = "demo"
AGENTS = (("edge-1", "x86-64-v3"), ("edge-2", "x86-64-v3"), ("edge-3", "rpi4-arm64"))
CANARY = "edge-2"
STEP_SECONDS = 300  # one synthetic sample every five minutes
WARM_ROWS = 86_400 // STEP_SECONDS + 8  # one day and the seasonal half-width (trainer/pipeline.py)


class DemoError(RuntimeError):
    """The demo could not run (one line for the user)."""


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    broker: str | None = None
    fast: bool = False
    keep: bool = False

    @property
    def rows(self) -> int:
        return 2400 if self.fast else 5000

    @property
    def rate(self) -> int:
        return 250 if self.fast else 150

    @property
    def epochs(self) -> int:
        return 4 if self.fast else 20


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _private_broker(workdir: Path) -> Iterator[str]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise DemoError("mosquitto is not installed (make setup installs it), or pass --broker URL")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"log_dest file {workdir / 'mosquitto.log'}\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise DemoError("the private Mosquitto did not start") from None
                time.sleep(0.05)  # polling a port
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(f"`edgefleet {' '.join(args[:2])}` failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


@dataclass
class FleetWatch:
    """A subscriber that keeps what agents report: events, deployment states, health, state."""

    events: dict[str, dict[int, dict]] = field(default_factory=lambda: defaultdict(dict))
    deployments: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    health: dict[str, dict] = field(default_factory=dict)
    state: dict[str, dict] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, _client, _userdata, msg) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 5 or not msg.payload:
            return
        agent, kind = parts[3], parts[4]
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        with self.changed:
            if kind == "events":
                self.events[agent][obj["seq"]] = obj  # de-duplicated by seq
            elif kind == "deployments":
                self.deployments[agent].append(obj)
            elif kind == "health":
                self.health[agent] = obj
            elif kind == "state":
                self.state[agent] = obj
            self.changed.notify_all()

    def wait(self, predicate, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


def _watch(broker: str) -> tuple[Any, FleetWatch]:
    from edge_agent.mqtt import connect

    watch = FleetWatch()
    client = connect(broker, client_id=f"edgefleet-demo-{os.getpid()}")
    client.on_message = watch.on_message
    client.subscribe("edgefleet/v1/agents/+/#", qos=1)
    return client, watch


def _prepare_data(opts: DemoOptions) -> tuple[list[Path], dict[str, Path], dict[str, list[dict]], int]:
    from trainer.data import generate_host_metrics, write_host_metrics

    data = opts.workdir / "data"
    data.mkdir()
    train_files, streams, labels = [], {}, {}
    split = int(opts.rows * 0.3)  # the history the trainer sees; the rest is replayed
    for i, (agent, _) in enumerate(AGENTS):
        # Anomalies only after 35%: clean history, and a stream that starts normal (an agent
        # needs one window of samples before its first score).
        m = generate_host_metrics(opts.rows, seed=100 + i, anomalies=6 if opts.fast else 10,
                                  clean_prefix=0.35, step_seconds=STEP_SECONDS)
        full = data / f"{agent}.csv"
        write_host_metrics(m, full, data / f"{agent}.labels.json")
        lines = full.read_text().splitlines(keepends=True)
        history, stream = data / f"{agent}.history.csv", data / f"{agent}.stream.csv"
        history.write_text("".join(lines[: split + 1]))
        # The agent has been running on its host all along: its stream starts with the last
        # day of that history, as the rows a restarted agent resumes with (a model that reads
        # a day back scores from the first new row instead of a day later).
        stream.write_text(lines[0] + "".join(lines[split + 1 - WARM_ROWS :]))
        train_files.append(history)
        streams[agent] = stream
        labels[agent] = [a.__dict__ for a in m.anomalies]
    return train_files, streams, labels, split


def _train(opts: DemoOptions, files: list[Path], registry: Path, seed: int) -> dict:
    from trainer.pipeline import TrainRequest, prepare, train
    from trainer.progress import ProgressBar

    request = TrainRequest(data=files, profiles=["x86-64-v3", "rpi4-arm64"], name="host",
                           epochs=opts.epochs, seed=seed)
    bar = ProgressBar(f"  training host (seed {seed})", total=opts.epochs)

    def progress(stage: str, info: dict) -> None:
        if stage == "epoch":
            bar.update(info["epoch"], f"val {info['val_loss']:.3f}")
        elif stage == "export":
            bar.finish()
            _say(f"  exporting {info['format']}/{info['quantization']}")

    outcome = train(prepare(request), registry, progress)
    bar.finish()
    return outcome.version.to_json()


def _score(events: dict[int, dict], anomalies: list[dict], window: int) -> tuple[int, int, float, float]:
    """(found, false alarms, precision, recall) of events against injected anomalies.

    An event counts for an anomaly if its window-end timestamp lies between the anomaly's
    start and ``window`` samples after its end (the window still holds the anomaly then).
    """
    step = STEP_SECONDS
    spans = [
        (datetime.fromisoformat(a["start_time"]).timestamp(),
         datetime.fromisoformat(a["end_time"]).timestamp() + window * step)
        for a in anomalies
    ]
    hit = [False] * len(spans)
    true_events = 0
    for e in events.values():
        t = datetime.fromisoformat(e["timestamp"]).timestamp()
        inside = [i for i, (s, end) in enumerate(spans) if s <= t <= end]
        for i in inside:
            hit[i] = True
        true_events += bool(inside)
    n = len(events)
    precision = true_events / n if n else 0.0
    recall = sum(hit) / len(spans) if spans else 0.0
    return sum(hit), n - true_events, precision, recall


def run_demo(opts: DemoOptions) -> list[dict]:
    """Run the demo; returns the final table rows. Raises :class:`DemoError`."""
    # Absolute from here on: every path the demo hands to a process or writes into a config
    # then means the same thing whatever that process's working directory or file's folder.
    opts = dataclasses.replace(opts, workdir=Path(os.path.abspath(opts.workdir)))
    work = opts.workdir
    if work.exists():
        if not (work / MARKER).exists():
            raise DemoError(f"{work} exists and was not made by the demo: choose another --workdir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by `edgefleet demo`; removed by the next demo run\n")
    started = time.monotonic()
    with ExitStack() as stack:
        broker = opts.broker or stack.enter_context(_private_broker(work))
        _say(f"[1/6] broker {broker}" + ("" if opts.broker else " (private Mosquitto, stopped at the end)"))
        files, streams, labels, split = _prepare_data(opts)
        _say(f"[2/6] synthetic host metrics for {len(AGENTS)} hosts: {split} rows of history each, "
             f"{opts.rows - split} held back with {sum(len(v) for v in labels.values())} injected anomalies; "
             "each agent streams the last day of its history, then the rows held back")
        registry = work / "registry"
        _say("[3/6] training for x86-64-v3 (ONNX) and rpi4-arm64 (TFLite)")
        v1 = _train(opts, files, registry, seed=0)
        _say(f"  registered host@{v1['version']}: "
             + ", ".join(f"{a['format']}/{a['quantization']} {a['size_bytes'] // 1024} KiB" for a in v1["artifacts"]))
        v2 = _train(opts, files, registry, seed=1)  # the canary candidate: same data, new seed
        _say(f"  registered host@{v2['version']} (retrained with another seed, for the canary)")
        root = json.loads(_cli("repo", "init", "--registry", str(registry), "--json"))["root"]
        client, watch = _watch(broker)
        stack.callback(lambda: (client.disconnect(), client.loop_stop()))
        _cli("deploy", "host@1", "--group", GROUP, "--registry", str(registry), "--broker", broker)
        _say(f"[4/6] signed and published host@1 to group '{GROUP}' (TUF root {root})")
        agents: dict[str, subprocess.Popen] = {}
        for agent, profile in AGENTS:
            cfg = work / f"{agent}.toml"
            cfg.write_text(
                subprocess.run(
                    [sys.executable, "-m", "edge_agent.cli", "init-config", "--agent-id", agent, "--group", GROUP,
                     "--profile", profile, "--broker", broker, "--trust", root,
                     "--state-dir", str(work / "agents" / agent),
                     "--source", f"csv:{streams[agent]}?rate={opts.rate}"],
                    capture_output=True, text=True, check=True,
                ).stdout.replace("period_seconds = 10", "period_seconds = 1")
            )
            log = open(work / f"{agent}.log", "w")
            stack.callback(log.close)
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg), "--exit-at-end"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            agents[agent] = proc
            stack.callback(_stop, proc)
        _say(f"[5/6] started agents {', '.join(f'{a} ({p})' for a, p in AGENTS)}; "
             "edge-3 emulates an ARM profile on this host")
        ready = watch.wait(lambda: all(watch.state.get(a, {}).get("active") for a, _ in AGENTS), 120)
        if not ready:
            raise DemoError(f"agents did not activate host@1 within 120 s; see {work}/*.log")
        for agent, _ in AGENTS:
            s = watch.state.get(agent, {})
            active = s["active"][0]
            _say(f"  {agent}: host@{active.get('version')} active, {active.get('format')}/{active.get('quantization')}")
        stream_rows = opts.rows - split
        watch.wait(lambda: watch.health.get(CANARY, {}).get("inferences", 0) >= stream_rows // 4, 120)
        _say(f"[6/6] canary: rolling host@2 out to {CANARY} only, a quarter into its stream")
        _cli("deploy", "host@2", "--agent", CANARY, "--registry", str(registry), "--broker", broker)
        if not watch.wait(lambda: any(d["state"] == "active" and d["version"] == 2
                                      for d in watch.deployments.get(CANARY, [])), 120):
            raise DemoError(f"{CANARY} did not switch to host@2 within 120 s; see {work}/{CANARY}.log")
        states = " → ".join(d["state"] for d in watch.deployments[CANARY] if d["version"] == 2)
        _say(f"  {CANARY}: {states} (host@2); edge-1 and edge-3 stay on host@1")
        for agent, proc in agents.items():
            try:
                proc.wait(600)
            except subprocess.TimeoutExpired:
                raise DemoError(f"{agent} did not finish its stream within 10 minutes") from None
        watch.wait(lambda: all(watch.state.get(a, {}).get("status") == "stopped" for a, _ in AGENTS), 15)
        window = v1["architecture"]["window"]
        rows = []
        for agent, profile in AGENTS:
            s, h = watch.state.get(agent, {}), watch.health.get(agent, {})
            active = (s.get("active") or [{}])[0]
            received = watch.events.get(agent, {}).values()
            anomalies = {e["seq"]: e for e in received if e.get("schema") == SCHEMA_EVENT}
            drift = sum(e.get("schema") == SCHEMA_DRIFT_EVENT for e in received)
            found, false_alarms, precision, recall = _score(anomalies, labels[agent], window)
            rows.append({
                "agent": agent, "profile": profile, "model": f"host@{active.get('version')}",
                "runtime": {"onnx": "onnxruntime", "tflite": "LiteRT"}.get(active.get("format"), "?"),
                "artifact": f"{active.get('format')}/{active.get('quantization')}",
                "inferences": h.get("inferences", 0),
                "p50_ms": (h.get("latency_ms") or {}).get("p50"), "p99_ms": (h.get("latency_ms") or {}).get("p99"),
                "injected": len(labels[agent]), "found": found, "false_alarms": false_alarms,
                "precision": precision, "recall": recall, "events": len(anomalies), "drift_events": drift,
                "emulated": s.get("emulated", False),
            })
    _say(f"\nedgefleet demo finished in {time.monotonic() - started:.0f} s; everything it started is stopped.\n")
    _print_table(rows)
    return rows


def _print_table(rows: list[dict]) -> None:
    header = ["agent", "profile", "model", "runtime", "inferences", "p50 ms", "p99 ms",
              "found/injected", "precision", "recall", "events", "drift"]
    body = [
        [r["agent"], r["profile"] + (" (emulated)" if r["emulated"] else ""), r["model"], r["runtime"],
         str(r["inferences"]), f"{r['p50_ms']:.3f}" if r["p50_ms"] is not None else "-",
         f"{r['p99_ms']:.3f}" if r["p99_ms"] is not None else "-", f"{r['found']}/{r['injected']}",
         f"{r['precision']:.2f}", f"{r['recall']:.2f}", str(r["events"]), str(r["drift_events"])]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    sys.stdout.flush()
