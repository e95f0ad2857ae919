"""Agent benchmarks: RSS of a running agent, and per-sample latency agent path vs bare runtime.

Run with ``make bench`` (or ``.venv/bin/python benchmarks/bench_agent.py``). Writes the
``agent`` section of docs/benchmarks.md. ``--latency-only --samples N`` times only the first
``N`` samples of each round, prints the latency table and writes nothing (a quick check).

1. Latency: the same int8 model, the same samples, in one process, interleaved rounds:
   the agent's per-sample path (``Detector.push``: ring buffer → runtime → score → threshold
   → Detection, then the slot's ``DriftMonitor.observe``, as the serve loop does) vs a bare
   ``session.run`` / ``interpreter.invoke`` on a preallocated window.
2. Memory: real ``edgefleet-agent run`` processes against a private Mosquitto, one per
   profile (onnxruntime: x86-64-v3; LiteRT only: rpi4-arm64), the int8 artifact deployed
   through TUF, a CSV replayed at 50 rows/s; VmRSS and VmHWM read from ``/proc/PID/status``
   60 s after the process started, with a breakdown by owner from ``/proc/PID/smaps`` and the
   import cost of each dependency in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _broker import Broker  # noqa: E402
from _report import markdown_table, median, percentile_us, print_table, update_benchmarks_doc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAB = REPO.parent / "shared" / "data" / "nab" / "data" / "realAWSCloudwatch" / "ec2_cpu_utilization_24ae8d.csv"
ROUNDS = 5
RATE = 50  # CSV rows per second fed to the agent
SETTLE_S = 60.0  # memory is read this long after the agent process starts
RUNS = 2  # agent runs per profile
HISTORY = 4096  # samples the agent keeps to pre-fill a new model (edge_agent.daemon.Agent)
PROFILES = ("x86-64-v3", "rpi4-arm64")
SERVED = {"x86-64-v3": "onnx/int8 (onnxruntime)", "rpi4-arm64": "tflite/int8 (LiteRT)"}
TARGET_MB = {"x86-64-v3": 80, "rpi4-arm64": 60}  # resident memory targets, MB = 10^6 bytes
COMMAND = ".venv/bin/python benchmarks/bench_agent.py"


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def train(registry: Path) -> dict:
    return json.loads(run("-m", "trainer.cli", "train", "--data", str(NAB), "--profile", "x86-64-v3",
                          "--profile", "rpi4-arm64", "--name", "cpu", "--registry", str(registry),
                          "--train-fraction", "0.15", "--json", "-q"))


# -- latency ----------------------------------------------------------------------------------


def _bare(spec, model: bytes):
    if spec.format == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda window: session.run(None, {name: window})
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model, num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]

    def call(window):
        interp.set_tensor(inp, window)
        interp.invoke()
        return interp.get_tensor(out)

    return call


def latency(registry: Path, version: dict, samples_per_round: int | None = None) -> list[list[str]]:
    from edge_agent.detector import Detector
    from edge_agent.drift import DriftMonitor, DriftSettings, monitor_for
    from edge_agent.runtime import open_runtime
    from shared.bundle import read_bundle
    from shared.series import read_series
    from trainer.registry import Registry

    series = read_series(NAB)
    values = series.values
    rows = []
    with Registry.open(registry) as reg:
        bundles = {
            (a["format"], a["quantization"]): read_bundle(reg.bundle(a["sha256"]))
            for a in version["artifacts"]
            if a["quantization"] == "int8"
        }
    for (fmt, quant), (spec, model) in sorted(bundles.items()):
        w = spec.window
        window = np.zeros((1, w, len(spec.features)), np.float32)
        bare = _bare(spec, model)
        runtime = open_runtime(spec, model, threads=1)
        p50s = {"agent": [], "bare": []}
        p99s = {"agent": [], "bare": []}
        end = len(values) if samples_per_round is None else min(len(values), w + samples_per_round)
        for _ in range(ROUNDS):
            detector = Detector(runtime, spec, model_version=1)
            monitor = monitor_for(spec, DriftSettings(), slot="default", model="cpu", model_version=1)
            if not isinstance(monitor, DriftMonitor):
                raise SystemExit(f"the bundle has no drift monitor: {monitor.reason}")
            for i in range(w - 1):  # fill the ring so every timed push scores
                detector.push(series.timestamps[i], values[i].tolist())
            for path in ("bare", "agent"):
                samples = np.empty(end - w, np.int64)
                for k, i in enumerate(range(w, end)):
                    if path == "bare":
                        t0 = time.perf_counter_ns()
                        window[0] = values[i - w + 1 : i + 1]
                        bare(window)
                    else:
                        row = values[i].tolist()
                        t0 = time.perf_counter_ns()
                        detection = detector.push(series.timestamps[i], row)
                        if detection is not None:  # what Agent._serve does per scored sample
                            monitor.observe(detection.timestamp, detection.values, detection.score)
                    samples[k] = time.perf_counter_ns() - t0
                p50s[path].append(percentile_us(samples, 50))
                p99s[path].append(percentile_us(samples, 99))
        a50, b50 = median(p50s["agent"]), median(p50s["bare"])
        rows.append([
            f"{fmt}/{quant}", "onnxruntime" if fmt == "onnx" else "LiteRT",
            f"{b50:.1f}", f"{median(p99s['bare']):.1f}", f"{a50:.1f}", f"{median(p99s['agent']):.1f}",
            f"{a50 / b50:.2f}×",
        ])
    return rows


# -- memory -----------------------------------------------------------------------------------

ANON = "anonymous memory: Python objects, malloc heaps, thread stacks"
_SYSTEM_LIBS = {
    "libssl": "OpenSSL (libssl, libcrypto; ssl module)",
    "libcrypto": "OpenSSL (libssl, libcrypto; ssl module)",
    "libsqlite3": "libsqlite3",
}


def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of ``/proc/PID/status``, in kB (what ``top`` and ``ps`` report)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def _owner(path: str) -> str:
    """Who a mapping of ``/proc/PID/smaps`` belongs to (a package, a library, anonymous)."""
    if not path.startswith("/"):  # "", [heap], [stack], [anon:…], [vdso]…
        return ANON
    if "/site-packages/" in path:
        top = path.split("/site-packages/", 1)[1].split("/", 1)[0]
        return f"package {top.removesuffix('.libs')}"  # numpy.libs is numpy's OpenBLAS
    if "/lib-dynload/" in path:
        return "Python standard-library extensions (_ssl, _sqlite3, …)"
    name = Path(path).name
    if name.startswith(("python3", "libpython")):
        return "Python interpreter"
    for prefix, label in _SYSTEM_LIBS.items():
        if name.startswith(prefix):
            return label
    if name.startswith(("libc.", "libm.", "libstdc++", "libgcc", "ld-linux", "libz", "libffi")):
        return "libc, libm, libstdc++, zlib, …"
    return "other files"


def smaps_by_owner(pid: int) -> dict[str, int]:
    """Resident kB of process ``pid``, summed per owner (see :func:`_owner`)."""
    totals: dict[str, int] = {}
    path = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping header
            path = head[5].strip() if len(head) == 6 else ""
        elif head and head[0] == "Rss:":
            owner = _owner(path)
            totals[owner] = totals.get(owner, 0) + int(head[1])
    return totals


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class _Activations:
    """Subscriber to the agents' retained deployment statuses: which agent has gone active."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from shared.messages import decode_deployment_status
        from shared.topics import Topics

        self._active: dict[str, threading.Event] = {}
        self.failed: dict[str, str] = {}
        self._lock = threading.Lock()
        topics = Topics()

        def on_message(_c, _u, msg) -> None:
            parsed = topics.parse_agent_topic(msg.topic)
            if parsed is None or not msg.payload:
                return
            status = decode_deployment_status(msg.payload)
            if status.state == "active":
                self.event(parsed[0]).set()
            elif status.state == "failed":
                self.failed[parsed[0]] = status.reason or "?"

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{topics.root}/agents/+/deployments", 1)
        self.client.loop_start()

    def event(self, agent: str) -> threading.Event:
        with self._lock:
            return self._active.setdefault(agent, threading.Event())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure_agent(registry: Path, work: Path, broker: Broker, watch: _Activations, profile: str,
                  run_no: int) -> dict:
    """Start ``edgefleet-agent run`` as a user would and read its memory :data:`SETTLE_S` later.

    The config is ``init-config``'s, unchanged (default health period, threads from the
    profile); the deployment is already retained on the broker, so the agent activates it on
    its first reconcile pass. Meanwhile the agent's children (the TUF worker of that pass) are
    watched for their peak RSS.
    """
    agent_id = f"bench-{profile}-{run_no}"
    cfg = work / f"{agent_id}.toml"
    cfg.write_text(run(
        "-m", "edge_agent.cli", "init-config", "--agent-id", agent_id, "--group", "bench",
        "--profile", profile, "--broker", broker.url, "--trust", str(registry / "tuf/metadata/root.json"),
        "--state-dir", str(work / agent_id), "--source", f"csv:{NAB}?rate={RATE:g}",
    ))
    log = work / f"{agent_id}.log"
    started = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    worker_hwm = 0
    try:
        activated = watch.event(agent_id)
        while time.monotonic() < started + SETTLE_S:
            if proc.poll() is not None:
                raise SystemExit(f"agent {agent_id} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            for child in _children(proc.pid):  # the TUF worker, while a pass runs
                try:
                    worker_hwm = max(worker_hwm, proc_status(child).get("VmHWM", 0))
                except OSError:
                    pass
            time.sleep(0.05)  # sampling a live process
        if not activated.is_set():
            raise SystemExit(f"agent {agent_id} did not activate cpu@1 within {SETTLE_S:g} s "
                             f"({watch.failed.get(agent_id, 'no failure reported')}):\n"
                             f"{log.read_text(errors='replace')[-2000:]}")
        status = proc_status(proc.pid)
        owners = smaps_by_owner(proc.pid)
        # Then until the replay ends: the agent's sample history is (nearly) full by then.
        deadline = started + _rows(NAB) / RATE + 60
        while "source ended" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"agent {agent_id}: the replay did not end:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)  # polling the agent's log
        rss_end = proc_status(proc.pid)["VmRSS"]
    finally:
        proc.terminate()
        proc.wait(20)
    return {"profile": profile, "rss": status["VmRSS"], "hwm": status["VmHWM"], "owners": owners,
            "worker_hwm": worker_hwm, "rss_end": rss_end}


def history_kib() -> float:
    """Python heap (KiB, tracemalloc) of the agent's sample history holding the NAB rows."""
    import tracemalloc
    from collections import deque

    from edge_agent.sources import open_source, parse_source

    samples = open_source(parse_source(f"csv:{NAB}"), threading.Event())
    tracemalloc.start()
    history = deque(samples, maxlen=HISTORY)
    kib = tracemalloc.get_traced_memory()[0] / 1024
    tracemalloc.stop()
    del history
    return kib


def _rows(csv: Path) -> int:
    with open(csv, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) - 1


def memory(registry: Path, work: Path) -> list[dict]:
    """Each profile's agent :data:`RUNS` times, interleaved, against one broker and deployment."""
    run("-m", "trainer.cli", "repo", "init", "--registry", str(registry))
    broker = Broker(work)
    try:
        run("-m", "trainer.cli", "deploy", "cpu@1", "--group", "bench", "--registry", str(registry),
            "--broker", broker.url)
        watch = _Activations(broker.port)
        try:
            return [measure_agent(registry, work, broker, watch, profile, i)
                    for i in range(RUNS) for profile in PROFILES]
        finally:
            watch.close()
    finally:
        broker.close()


# (label, modules) in the order the agent loads them; the runtimes and the TUF stack last.
IMPORT_GROUPS: list[tuple[str, list[str]]] = [
    ("numpy", ["numpy"]),
    ("paho-mqtt (imports ssl, urllib.request, uuid)", ["paho.mqtt.client"]),
    ("sqlite3, json, logging, argparse, tomllib, zipfile, subprocess", ["sqlite3", "json", "logging", "argparse", "tomllib", "zipfile", "subprocess"]),
    ("edgefleet (edge_agent, shared)", ["edge_agent.cli", "edge_agent.daemon", "edge_agent.sources", "edge_agent.usage"]),
    ("onnxruntime (only with an ONNX model)", ["onnxruntime"]),
    ("LiteRT (only with a TFLite model)", ["ai_edge_litert.interpreter"]),
    ("python-tuf client, securesystemslib, cryptography, urllib3 (TUF worker only)", ["tuf.ngclient", "securesystemslib.signer"]),
    ("psutil (host source only)", ["psutil"]),
]


def import_costs() -> list[tuple[str, int]]:
    """VmRSS growth (kB) of a fresh interpreter importing each group of modules in turn.

    A group pays nothing for what an earlier group loaded (paho's ssl is not counted again
    under python-tuf), so the rows add up to the interpreter's total.
    """
    code = (
        "import importlib, json, sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'): return int(line.split()[1])\n"
        "out = [['Python interpreter, site, encodings', rss()]]\n"
        "for label, mods in json.loads(sys.argv[1]):\n"
        "    before = rss()\n"
        "    for m in mods: importlib.import_module(m)\n"
        "    out.append([label, rss() - before])\n"
        "print(json.dumps(out))\n"
    )
    return [(label, kb) for label, kb in json.loads(run("-c", code, json.dumps(IMPORT_GROUPS)))]


def _mib(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def memory_report(runs: list[dict], imports: list[tuple[str, int]], history: float) -> tuple[str, list[list[str]]]:
    """The markdown of the memory part, and the summary rows (also printed)."""
    header = ["profile", "model served", "VmRSS MiB (each run)", "VmRSS MB (max)", "VmHWM MiB (max)",
              "TUF worker peak MiB", "target", "met", "VmRSS MB after the replay (max)"]
    rows = []
    for profile in PROFILES:
        mine = [r for r in runs if r["profile"] == profile]
        rss_max = max(r["rss"] for r in mine)
        mb = rss_max * 1024 / 1e6
        target = TARGET_MB[profile]
        rows.append([
            profile, SERVED[profile], ", ".join(_mib(r["rss"]) for r in mine), f"{mb:.1f}",
            _mib(max(r["hwm"] for r in mine)), _mib(max(r["worker_hwm"] for r in mine)),
            f"≤ {target} MB", "yes" if mb <= target else "**no**",
            f"{max(r['rss_end'] for r in mine) * 1024 / 1e6:.1f}",
        ])
    owners = sorted({o for r in runs for o in r["owners"]},
                    key=lambda o: -max(r["owners"].get(o, 0) for r in runs))
    last = {p: [r for r in runs if r["profile"] == p][-1] for p in PROFILES}
    where = [[o, *(_mib(last[p]["owners"].get(o, 0)) for p in PROFILES)] for o in owners
             if max(last[p]["owners"].get(o, 0) for p in PROFILES) >= 100]
    where.append(["**total (VmRSS)**", *(f"**{_mib(sum(last[p]['owners'].values()))}**" for p in PROFILES)])
    imp = [[label, _mib(kb)] for label, kb in imports]
    md = (
        f"Resident memory of real `edgefleet-agent run` processes, read from `/proc/PID/status` "
        f"{SETTLE_S:.0f} s after each process started, as a user would: config from `init-config` "
        f"unchanged, private Mosquitto, the int8 model `cpu@1` deployed through TUF before the "
        f"agent starts (it activates it on its first reconcile pass), CSV replay at {RATE} rows/s. "
        f"{RUNS} runs per profile, interleaved. MB = 10⁶ bytes, MiB = 2²⁰. The agent runs "
        f"python-tuf in a child process during each reconcile pass (`IsolatedRepository`); "
        f"*TUF worker peak* is that child's VmHWM, memory the host lends for the few seconds of "
        f"a pass. Resident memory still grows while the agent's history of its last {HISTORY} "
        f"samples (kept to pre-fill a newly activated model) fills, up to {history / 1024:.1f} MiB "
        f"for these rows (Python heap, tracemalloc): *after the replay* is read "
        f"once the {_rows(NAB)}-row CSV has been replayed, with the history "
        f"{min(1.0, _rows(NAB) / HISTORY):.0%} full; from there it is bounded.\n\n"
        + markdown_table(header, rows)
        + "\n\nWhere the resident memory goes (last run of each profile, from `/proc/PID/smaps`; "
        "MiB; file-backed pages of a package are its shared libraries' code and data):\n\n"
        + markdown_table(["owner", *(f"{p} ({SERVED[p]})" for p in PROFILES)], where)
        + "\n\nWhat each import adds to a fresh interpreter's VmRSS (MiB, in this order; a group "
        "does not pay again for what an earlier one loaded). The agent process loads the rows "
        "above onnxruntime, plus the runtime of its model; python-tuf's stack is only loaded by "
        "the TUF worker, psutil only by the `host` source:\n\n"
        + markdown_table(["imports", "MiB"], imp)
    )
    return md, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Agent latency and memory benchmarks (docs/benchmarks.md).")
    parser.add_argument("--latency-only", action="store_true",
                        help="measure latency only, print it and write nothing")
    parser.add_argument("--samples", type=int, default=None, metavar="N",
                        help="time only the first N samples of each round (with --latency-only)")
    args = parser.parse_args(argv)
    if args.samples is not None and (args.samples < 1 or not args.latency_only):
        parser.error("--samples must be a positive number and needs --latency-only")
    if not NAB.exists():
        print(f"skipped: NAB data not found at {NAB}")
        return 0
    lat_header = ["artifact", "runtime", "bare p50 µs", "bare p99 µs", "agent p50 µs", "agent p99 µs", "agent/bare p50"]
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        version = train(registry)
        lat = latency(registry, version, args.samples)
        if args.latency_only:
            print("Per-sample latency, agent path (detection + drift observe) vs bare runtime call:")
            print_table(lat_header, lat)
            return 0
        runs = memory(registry, Path(tmp))
    imports = import_costs()
    print("Per-sample latency, agent path (detection + drift observe) vs bare runtime call (same model, same run):")
    print_table(lat_header, lat)
    mem_md, mem_rows = memory_report(runs, imports, history_kib())
    print(f"\nAgent memory {SETTLE_S:.0f} s after start, one int8 model active:")
    print_table(["profile", "model", "VmRSS MiB", "MB max", "VmHWM MiB", "worker MiB", "target", "met",
                 "MB at end"], mem_rows)
    md = (
        "Per-sample inference latency on the NAB series `ec2_cpu_utilization_24ae8d` (model trained "
        f"on its first 15%), one thread, {ROUNDS} interleaved rounds, medians of per-round "
        "percentiles. *Agent path* is `Detector.push` (ring buffer → runtime → score → threshold → "
        "event object) followed by the drift monitor's `observe` of the scored sample, what the agent's "
        "serve loop does per sample; *bare* is one `session.run` / `invoke` on a preallocated window. Target: "
        "agent ≤ 1.2× bare.\n\n"
        + markdown_table(lat_header, lat)
        + "\n\n"
        + mem_md
    )
    update_benchmarks_doc("agent", md, command=COMMAND, path=REPO / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
