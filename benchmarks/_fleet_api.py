"""The fleet benchmark's API part: the agent's local HTTP API (``POST
/v1/slots/default/predict``) against the bare runtime, at batch 1 and batch 32.

One real agent process (``edgefleet-agent run``) with ``[api]`` enabled on a free loopback
port, ``host@1`` delivered to it over TUF/MQTT, its stream running (the synthetic CSV replayed
at ``STREAM_RATE`` rows/s, as an agent in service scores its own source while it answers).
The client is this process: one ``http.client.HTTPConnection`` reused for every request (it
asks for keep-alive; what the server does is reported in the figures' notes). Each request's
body is encoded before the clock starts; the time runs from sending the request to the parsed
JSON answer. The bare runtime: an ``onnxruntime.InferenceSession`` in this process on the
model of the very bundle the agent activated, with the session options of the agent's own
runtime (``edge_agent/runtime/_onnx.py``: intra-op threads = the profile's budget, sequential,
no spinning, no arena), fed the same float32 windows, one ``run`` per request.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _broker import Broker
from _host_model import REPO, AgentLog, cli
from _report import markdown_table, median, print_table

__all__ = ["BATCHES", "api_markdown", "api_rounds"]

BATCHES = (1, 32)
#: Requests per batch size and round, and rounds (the reported figure is the median round's).
REQUESTS = {1: 400, 32: 60}
ROUNDS = 3
WARMUP = 20
STREAM_RATE = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _windows(csv_path: Path, features: list[str], window: int, n: int) -> np.ndarray:
    """``n`` windows (stride 1) of the CSV's columns ``features``, as the CSV's numbers (float64:
    JSON-encoded, they read as the CSV's text; the model takes them as float32)."""
    with open(csv_path, newline="") as f:
        rows = [[float(r[c]) for c in features] for _, r in zip(range(n + window), csv.DictReader(f), strict=False)]
    series = np.asarray(rows, np.float64)
    return np.stack([series[i:i + window] for i in range(n)])


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    # The options of the agent's runtime (edge_agent/runtime/_onnx.py), so the comparison is
    # the API's overhead, not a differently configured session.
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _figures(latencies_ns: list[int], wall_s: float, batch: int) -> dict[str, float]:
    return {"median_ms": float(np.median(latencies_ns)) / 1e6,
            "p99_ms": float(np.percentile(latencies_ns, 99)) / 1e6,
            "windows_per_s": len(latencies_ns) * batch / wall_s}


def _api_round(conn: http.client.HTTPConnection, bodies: list[bytes], batch: int) -> tuple[dict[str, float], int]:
    """Send every body once; figures, and how many TCP connections the client opened."""
    latencies: list[int] = []
    connects = 0
    t0 = time.perf_counter_ns()
    for body in bodies:
        start = time.perf_counter_ns()
        if conn.sock is None:
            connects += 1
        conn.request("POST", "/v1/slots/default/predict", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        latencies.append(time.perf_counter_ns() - start)
        if resp.status != 200 or len(answer["results"]) != batch:
            raise SystemExit(f"predict answered {resp.status}: {str(answer)[:300]}")
    return _figures(latencies, (time.perf_counter_ns() - t0) / 1e9, batch), connects


def _floor_ms(conn: http.client.HTTPConnection, n: int) -> float:
    """Median latency of ``GET /v1/slots/default`` (no model run, a small JSON answer): what
    the HTTP exchange alone costs this client."""
    latencies = []
    for _ in range(n):
        start = time.perf_counter_ns()
        conn.request("GET", "/v1/slots/default")
        resp = conn.getresponse()
        json.loads(resp.read())
        latencies.append(time.perf_counter_ns() - start)
    return float(np.median(latencies)) / 1e6


def _bare_round(sess: Any, batches: list[np.ndarray], batch: int) -> dict[str, float]:
    name = sess.get_inputs()[0].name
    latencies: list[int] = []
    t0 = time.perf_counter_ns()
    for x in batches:
        start = time.perf_counter_ns()
        (y,) = sess.run(None, {name: x})
        latencies.append(time.perf_counter_ns() - start)
        if len(y) != batch:
            raise SystemExit(f"the bare session returned {len(y)} scores for {batch} windows")
    return _figures(latencies, (time.perf_counter_ns() - t0) / 1e9, batch)


def api_rounds(work: Path, broker: Broker, registry: Path, csv_path: Path) -> dict[str, Any]:
    """Start the agent, measure API and bare runtime; the figures (medians over rounds)."""
    from shared.bundle import read_bundle
    from trainer.registry import Registry

    port = _free_port()
    text = cli("edge_agent.cli", "init-config", "--agent-id", "api-bench", "--group", "api",
               "--profile", "x86-64-v3", "--broker", broker.url,
               "--trust", str(registry / "tuf/metadata/root.json"), "--state-dir", str(work / "api-state"),
               "--source", f"csv:{csv_path}?rate={STREAM_RATE}")
    text, n = re.subn(r"(?m)^\[api\]\nenabled = false", f'[api]\nenabled = true\nlisten = "127.0.0.1:{port}"', text)
    if n != 1:
        raise SystemExit("init-config no longer writes [api] enabled = false")
    config = work / "api-agent.toml"
    config.write_text(text)
    log = AgentLog(broker.port)
    err_path = work / "api-agent.log"
    with open(err_path, "wb") as err:
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        cli("trainer.cli", "deploy", "host@1", "--group", "api", "--registry", str(registry),
            "--broker", broker.url)
        log.wait(lambda: [m for m in log.of("health", lambda a: a == "api-bench") if m.body.inferences > 0],
                 180, "the agent scoring under host@1")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/v1/slots/default")
        resp = conn.getresponse()
        slot = json.loads(resp.read())
        if resp.status != 200 or slot.get("version") != 1:
            raise SystemExit(f"GET /v1/slots/default answered {resp.status}: {slot}")
        keep_alive = resp.version == 11 and not resp.will_close
        with Registry.open(registry) as reg:
            art = next(a for a in reg.get("host", 1).artifacts
                       if (a.format, a.quantization) == (slot["format"], slot["quantization"]))
            _spec, model = read_bundle(reg.bundle(art.sha256))
        from shared.profiles import load_profile
        threads = load_profile("x86-64-v3").budget.threads  # the agent's default agent.threads
        sess = _session(model, threads)
        windows = _windows(csv_path, slot["features"], slot["window"], max(REQUESTS[b] * b for b in BATCHES))
        out: dict[str, Any] = {"model": f"host@1 {slot['format']} {slot['quantization']}",
                               "window": slot["window"], "features": len(slot["features"]),
                               "threads": threads, "keep_alive": keep_alive, "load": os.getloadavg()[0]}
        for batch in BATCHES:
            groups = [windows[i * batch:(i + 1) * batch] for i in range(REQUESTS[batch])]
            bodies = [json.dumps({"windows": g.tolist()}).encode() for g in groups]
            groups = [g.astype(np.float32) for g in groups]
            _api_round(conn, bodies[:WARMUP], batch)
            _bare_round(sess, groups[:WARMUP], batch)
            api_runs, bare_runs, connects = [], [], 0
            for _ in range(ROUNDS):
                figures, opened = _api_round(conn, bodies, batch)
                api_runs.append(figures)
                connects += opened
                bare_runs.append(_bare_round(sess, groups, batch))
            pick = lambda runs, key: median(r[key] for r in runs)  # noqa: E731
            out[f"b{batch}"] = {
                "requests": REQUESTS[batch] * ROUNDS, "body_bytes": int(np.median([len(b) for b in bodies])),
                "connections_per_request": connects / (REQUESTS[batch] * ROUNDS),
                **{f"api_{k}": pick(api_runs, k) for k in api_runs[0]},
                **{f"bare_{k}": pick(bare_runs, k) for k in bare_runs[0]},
            }
        out["floor_ms"] = _floor_ms(conn, REQUESTS[1])
        conn.close()
        out["load_after"] = os.getloadavg()[0]
        agent.send_signal(signal.SIGTERM)
        if agent.wait(60) != 0:
            raise SystemExit(f"the agent exited {agent.returncode}:\n{err_path.read_text(errors='replace')[-2000:]}")
        return out
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        log.close()


def api_markdown(r: dict[str, Any], machine: str) -> str:
    """The ``fleet-api`` section (also printed as a table)."""
    header = ["batch", "API median ms", "bare median ms", "API ÷ bare (latency)", "API p99 ms",
              "bare p99 ms", "API windows/s", "bare windows/s", "API ÷ bare (windows/s)", "body bytes"]
    rows = []
    for batch in BATCHES:
        b = r[f"b{batch}"]
        rows.append([str(batch), f"{b['api_median_ms']:.2f}", f"{b['bare_median_ms']:.2f}",
                     f"{b['api_median_ms'] / b['bare_median_ms']:.1f}×", f"{b['api_p99_ms']:.2f}",
                     f"{b['bare_p99_ms']:.2f}", f"{b['api_windows_per_s']:,.0f}", f"{b['bare_windows_per_s']:,.0f}",
                     f"{b['api_windows_per_s'] / b['bare_windows_per_s']:.2f}", f"{b['body_bytes']:,}"])
    print_table(header, rows)
    conns = r[f"b{BATCHES[0]}"]["connections_per_request"]
    reuse = ("kept the connection open between requests" if r["keep_alive"] and conns < 0.5 else
             f"answers HTTP/1.0 and closes the connection after every answer, so the client "
             f"opened {conns:.2f} TCP connections per request: each request's time includes a "
             f"loopback connect. The HTTP exchange alone (`GET /v1/slots/default`, no model run, "
             f"same client) takes {r['floor_ms']:.2f} ms (median)")
    return (
        f"The agent's local API (`[api]`, `POST /v1/slots/default/predict`) against the bare "
        f"runtime, on the same model: {r['model']} (the artifact the agent chose for its "
        f"profile), windows of {r['window']} rows × {r['features']} features from the synthetic "
        f"host-metrics CSV. API: one real agent process (`edgefleet-agent run`, loopback TCP), "
        f"its own stream running at {STREAM_RATE} rows/s; client: one `http.client` connection "
        f"in the benchmark process, asking for keep-alive — the server {reuse}. Request bodies "
        f"are encoded before the clock starts; a request's time runs to its parsed JSON answer. "
        f"Bare: `onnxruntime.InferenceSession` in the benchmark process on the same bundle's "
        f"model, with the agent runtime's session options ({r['threads']} intra-op threads, the "
        f"profile's budget; sequential; no spinning), the same float32 windows, one `run` per "
        f"request. {ROUNDS} rounds of {REQUESTS[1]} requests at batch 1 and {REQUESTS[32]} at "
        f"batch 32 after {WARMUP} warm-up requests, API and bare alternating round by round; "
        f"per round the median and p99 of per-request latency and the windows/s over the round; "
        f"each figure the median over the rounds. Load avg {r['load']:.1f} before, "
        f"{r['load_after']:.1f} after (1-minute; the machine is shared with other work, which "
        f"widens both columns). Machine: {machine}.\n\n"
        + markdown_table(header, rows) + "\n"
    )
