"""Fleet benchmark: a rollout to N simulated agents, a rollback, and the agent's local API.

Run with ``make bench`` (or ``.venv/bin/python benchmarks/bench_fleet.py [--parts LIST]``). Three
parts, each writing its own section of docs/benchmarks.md, so one can run alone and leave the
others' figures as they are:

- ``rollout`` (section ``fleet``, only for the default N; described below);
- ``rollback`` (section ``fleet-rollback``): a candidate that floods false alarms, rolled back
  by the rollout controller at its defaults (:mod:`_fleet_rollback`);
- ``api`` (section ``fleet-api``): ``POST /v1/slots/SLOT/predict`` of one real agent against
  the bare onnxruntime session, at batch 1 and 32 (:mod:`_fleet_api`).

The rollout part.

Setup, as an operator would: a trained model (a random forest of 250 trees, ONNX fp32: its
only variant, 1.03 MB, so every agent fetches exactly that bundle), ``edgefleet repo init``, a
private Mosquitto with ``sys_interval 1``, and ``edgefleet-agent simulate --count N`` in its
own process. Once every simulated agent is connected and through its first reconcile pass,
the deployment is published (``trainer.fleet.deploy.deploy``, in this process); the wall time
runs from the start of that call to the retained ``active`` status of the last agent, as a
subscriber receives it. Wire bytes: Mosquitto's ``$SYS/broker/bytes/sent`` read before the
deployment and after the last activation (each a fresh value, published once a second),
compared to N × the bundle size. Each repeat starts a new fleet (new agent ids, new state
directories) on a new group, so every agent downloads and verifies the artifact once; the
bundle's chunks are retained on the broker from the first repeat on, as in a fleet where the
artifact was published once. Then SIGTERM stops the fleet; every agent must announce
``stopped``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _broker import Broker  # noqa: E402
from _report import machine_line, markdown_table, median, print_table, update_benchmarks_doc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAB = REPO.parent / "shared" / "data" / "nab" / "data" / "realAWSCloudwatch" / "ec2_cpu_utilization_24ae8d.csv"
COUNT = 500
REPEATS = 3
TREES = 250  # random forest size: its ONNX fp32 bundle is ~1 MB
GOAL_S = 30.0
GOAL_WIRE = 1.05
COMMAND = ".venv/bin/python benchmarks/bench_fleet.py"


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def train(registry: Path) -> tuple[str, int]:
    """The ~1 MB model; returns its reference and bundle size."""
    from trainer.pipeline import TrainRequest, prepare
    from trainer.pipeline import train as train_model

    request = TrainRequest(data=[NAB], profiles=["x86-64-v3"], name="forest", train_fraction=0.15,
                           family="trees", n_estimators=TREES)
    outcome = train_model(prepare(request), registry, lambda _stage, _info: None)
    (artifact,) = outcome.version.artifacts
    return outcome.version.ref, artifact.size_bytes


class Watch:
    """What the broker sends a subscriber: deployment statuses, agent states, bytes sent."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from shared.messages import decode_agent_state, decode_deployment_status
        from shared.topics import Topics

        self.topics = Topics()
        self.cond = threading.Condition()
        self.active: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.states: dict[str, str] = {}
        self.bytes_sent: list[tuple[float, int]] = []

        def on_message(_c, _u, msg) -> None:
            now = time.monotonic()
            with self.cond:
                if msg.topic == "$SYS/broker/bytes/sent":
                    self.bytes_sent.append((now, int(msg.payload)))
                elif msg.payload:
                    parsed = self.topics.parse_agent_topic(msg.topic)
                    if parsed is None:
                        return
                    agent, kind = parsed[0], parsed[1]
                    if kind == "deployments":
                        status = decode_deployment_status(msg.payload)
                        if status.state == "active":
                            self.active.setdefault(agent, now)
                        elif status.state == "failed":  # "unavailable: …" is retried by the agent
                            self.failed[agent] = status.reason or "?"
                    elif kind == "state":
                        self.states[agent] = decode_agent_state(msg.payload).status
                self.cond.notify_all()

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        root = self.topics.root
        self.client.subscribe([(f"{root}/agents/+/deployments", 1), (f"{root}/agents/+/state", 1),
                               ("$SYS/broker/bytes/sent", 0)])
        self.client.loop_start()

    def wait(self, predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (result := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
                self.cond.wait(left)
            return result

    def fresh_bytes_sent(self, after: float) -> int:
        """The first ``$SYS/broker/bytes/sent`` value received after ``after`` (monotonic)."""
        def found():  # type: ignore[no-untyped-def]
            return next((v for t, v in self.bytes_sent if t > after), None)
        return int(self.wait(lambda: found() is not None, 10, "$SYS/broker/bytes/sent") and found())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def template(work: Path, broker: Broker, registry: Path, group: str, state: Path) -> Path:
    text = run("-m", "edge_agent.cli", "init-config", "--agent-id", "sim", "--group", group,
               "--profile", "x86-64-v3", "--broker", broker.url,
               "--trust", str(registry / "tuf/metadata/root.json"), "--state-dir", str(state),
               "--source", "host?period=60")
    path = work / f"{group}.toml"
    path.write_text(text)
    return path


def one_rollout(work: Path, broker: Broker, registry: Path, ref: str, size: int, count: int,
                concurrency: int, repeat: int, logs: Path | None = None) -> dict:
    import paho.mqtt.client as mqtt  # noqa: F401  (loaded before timing)

    from edge_agent.mqtt import connect
    from shared.topics import Topics
    from trainer.fleet.deploy import deploy

    group, prefix = f"bench{repeat}", f"r{repeat}"
    state = work / f"state{repeat}"
    config = template(work, broker, registry, group, state)
    watch = Watch(broker.port)
    log = work / f"simulate{repeat}.log"
    started = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "simulate", "--count", str(count), "--config", str(config),
             "--prefix", prefix, "--concurrency", str(concurrency), "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise SystemExit(f"simulate did not get ready:\n{log.read_text(errors='replace')[-3000:]}")
        ready_s = time.monotonic() - started
        ready = proc_status(proc.pid)
        mine = lambda: {a: t for a, t in watch.active.items() if a.startswith(prefix + "-")}  # noqa: E731
        before = watch.fresh_bytes_sent(time.monotonic())
        client = connect(broker.url, client_id=f"bench-deploy-{repeat}")
        with watch.cond:
            watch.failed.clear()
        load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.monotonic()
        report = deploy(registry, ref, group=group, client=client, topics=Topics())
        published = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
        permanent = lambda: {a: r for a, r in watch.failed.items() if not r.startswith("unavailable")}  # noqa: E731
        watch.wait(lambda: len(mine()) >= count or permanent(), 600, f"{count} activations")
        if permanent():
            raise SystemExit(f"activations failed: {dict(list(permanent().items())[:5])}")
        retried = len(watch.failed)  # agents that reported a transient failure and retried
        last = max(mine().values())
        wall = last - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        after = watch.fresh_bytes_sent(time.monotonic())
        active = proc_status(proc.pid)
        on_disk = sum(1 for p in state.glob(f"{prefix}-*/bundles/*.zip"))
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(300)
        stop_s = time.monotonic() - t_stop
        n_stopped = lambda: sum(1 for a, s in watch.states.items() if a.startswith(prefix + "-") and s == "stopped")  # noqa: E731
        try:
            watch.wait(lambda: n_stopped() >= count, 60, "every agent's 'stopped' state")
        except SystemExit:
            raise SystemExit(f"{n_stopped()} of {count} agents announced 'stopped'; simulate exited {code}") from None
        if code != 0:
            raise SystemExit(f"simulate exited {code}:\n{log.read_text(errors='replace')[-3000:]}")
        return {
            "count": count, "size": size, "wall_s": wall, "publish_s": published,
            "bytes": after - before, "ratio": (after - before) / (count * size), "ready_s": ready_s,
            "threads": active["Threads"], "rss_ready_mb": ready["VmRSS"] / 1024,
            "hwm_mb": active["VmHWM"] / 1024, "cpu_s": cpu, "bundles_on_disk": on_disk,
            "stop_s": stop_s, "published_bytes": report.publish.bytes, "retried": retried, "load": load,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watch.close()
        shutil.rmtree(state, ignore_errors=True)
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, logs / log.name)


PARTS = ("rollout", "rollback", "api")


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(","))
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    return parts


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main() -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=_parts, default=PARTS, metavar="LIST",
                        help="comma-separated parts to run, each writing its own section: rollout "
                        "(`fleet`), rollback (`fleet-rollback`), api (`fleet-api`); default: all")
    parser.add_argument("--count", type=int, default=COUNT, help="agents of the rollout part")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="repeats of the rollout and rollback parts")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument("--logs", type=Path, help="keep the simulate logs in this directory")
    args = parser.parse_args()
    if "rollout" in args.parts and rollout_part(args) != 0:
        return 1
    if "rollback" in args.parts or "api" in args.parts:
        host_parts(args)
    return 0


def host_parts(args: argparse.Namespace) -> None:
    """The rollback and API parts: one registry of host models and one broker for both."""
    from _fleet_api import api_markdown, api_rounds
    from _fleet_rollback import COUNT as ROLLBACK_COUNT
    from _fleet_rollback import rollback_markdown, rollback_repeat
    from _host_model import host_models

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv, registry = host_models(work, rows=20000)
        broker = Broker(work)
        try:
            rollback_runs, api = [], None
            if "rollback" in args.parts:
                for repeat in range(args.repeats):
                    r = rollback_repeat(work, broker, registry, csv, repeat, ROLLBACK_COUNT)
                    print(json.dumps(r), flush=True)
                    rollback_runs.append(r)
            if "api" in args.parts:
                api = api_rounds(work, broker, registry, csv)
                print(json.dumps(api), flush=True)
        finally:
            broker.close()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in work.glob("*.log"):
                    shutil.copy(log, args.logs / log.name)
    machine = machine_line()
    doc = REPO / "docs" / "benchmarks.md"
    if rollback_runs:
        md = rollback_markdown(rollback_runs, machine)
        if not args.no_doc:
            update_benchmarks_doc("fleet-rollback", md, command=f"{COMMAND} --parts rollback", path=doc)
    if api is not None:
        md = api_markdown(api, machine)
        if not args.no_doc:
            update_benchmarks_doc("fleet-api", md, command=f"{COMMAND} --parts api", path=doc)


def rollout_part(args: argparse.Namespace) -> int:
    """The 500-agent rollout (section ``fleet``)."""
    if not NAB.exists():
        print(f"skipped: NAB data not found at {NAB}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registry = work / "registry"
        ref, size = train(registry)
        run("-m", "trainer.cli", "repo", "init", "--registry", str(registry))
        broker = Broker(work)
        try:
            run("-m", "trainer.cli", "repo", "publish", "--registry", str(registry), "--broker", broker.url)
            runs = []
            for repeat in range(args.repeats):
                r = one_rollout(work, broker, registry, ref, size, args.count, args.concurrency, repeat,
                                args.logs)
                print(json.dumps(r), flush=True)
                runs.append(r)
        finally:
            broker.close()
    header = ["repeat", "agents", "deploy → last active s", "broker bytes sent", "÷ (N × size)",
              "simulate CPU s", "threads", "RSS MiB ready", "VmHWM MiB", "retried", "load avg"]
    rows = [[str(i + 1), str(r["count"]), f"{r['wall_s']:.1f}", f"{r['bytes']:,}", f"{r['ratio']:.3f}",
             f"{r['cpu_s']:.1f}", str(r["threads"]), f"{r['rss_ready_mb']:.0f}", f"{r['hwm_mb']:.0f}",
             str(r["retried"]), f"{r['load']:.1f}"]
            for i, r in enumerate(runs)]
    wall, ratio = median(r["wall_s"] for r in runs), median(r["ratio"] for r in runs)
    rows.append(["**median**", str(args.count), f"**{wall:.1f}**", f"{median(r['bytes'] for r in runs):,.0f}",
                 f"**{ratio:.3f}**", f"{median(r['cpu_s'] for r in runs):.1f}", "", "", "", "", ""])
    print_table(header, rows)
    goals = (f"Goals: ≤ {GOAL_S:g} s — {'met' if wall <= GOAL_S else '**not met**'} ({wall:.1f} s); "
             f"wire bytes ≤ {GOAL_WIRE} × N × size — {'met' if ratio <= GOAL_WIRE else '**not met**'} "
             f"({ratio:.3f}).")
    print(goals)
    if args.no_doc or args.count != COUNT:
        return 0
    md = (
        f"{args.count} simulated agents (`edgefleet-agent simulate --count {args.count} --concurrency "
        f"{args.concurrency}`, one process) receive one artifact through TUF over MQTT, verify it and "
        f"activate it: a random forest of {TREES} trees, ONNX fp32 (its only variant), bundle "
        f"{size:,} bytes, published in retained chunks of 256 KiB. Each agent verifies with "
        "python-tuf on its own trusted metadata, over its own fetch connection, in the simulate "
        "process (at most `--concurrency` passes at once); agents share one onnxruntime session "
        "per artifact. *Deploy → last active*: from the start of the deploy call (signing, "
        "publishing the new metadata; the bundle's chunks are already retained from the first "
        "repeat on) to the last agent's retained `active` status received by a subscriber. "
        "*Broker bytes sent*: Mosquitto's `$SYS/broker/bytes/sent` (private broker, "
        "`sys_interval 1`) after the last activation minus before the deployment: everything the "
        "broker sent to every client, metadata, statuses and this benchmark's own subscription "
        "included. *Threads*: of the simulate process (an agent's own thread and its four workers; "
        "one thread drives every MQTT connection). *Retried*: agents that reported a transient "
        "failure (`unavailable: …`) and retried. *Load avg*: the machine's 1-minute load average "
        "just before the deployment (other work on the machine slows the figures). "
        f"State directories on the machine's disk. {len(runs)} repeats, each a new fleet "
        f"on a new group; medians in bold. Machine: {machine_line()}.\n\n"
        + markdown_table(header, rows) + "\n\n" + goals + "\n"
    )
    update_benchmarks_doc("fleet", md, command=f"{COMMAND} --parts rollout", path=REPO / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
