"""The agent's local API and its systemd notices, end to end: a real agent process with a model
delivered over a private Mosquitto, queried with ``curl``.

What each test proves:

1. over TCP: ``/healthz`` is 503 with a reason until a model is active and samples flow, then
   200; ``/metrics`` parses as Prometheus exposition and carries the health report's figures
   (inferences > 0 once samples were scored, the active model, the deployment state, the
   inference histogram, memory); ``predict`` scores a batch of windows exactly as the bundle's
   model does in onnxruntime directly; bad requests get a 4xx JSON error, never a 500; once the
   replay has ended, ``/metrics`` and the MQTT health report carry the same counters;
2. the same API on a Unix socket (``curl --unix-socket``), removed at a clean stop; after a
   restart the model loaded from the state dir feeds the inference histogram;
3. under systemd's protocol (a real datagram socket as ``$NOTIFY_SOCKET``): ``READY=1``, then
   ``WATCHDOG=1`` with ``$WATCHDOG_USEC`` set, and ``STOPPING=1`` on SIGTERM;
4. an address that cannot be bound stops the agent with one error line and exit 1;
5. a shadow candidate's comparison is in ``/metrics``: the serving model as its own shadow
   scores with a correlation of 1 (both score the very same windows); after a
   restart the shadow is loaded from the state dir, not downloaded again.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_delivery import AgentProcess, Agents, Watch, bundle_bytes, bundle_sha, cli, poll_until
from prometheus_client.parser import text_string_to_metric_families

from shared.bundle import read_bundle
from shared.series import read_series
from trainer.fleet.deploy import repository_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic host-metrics CSV and a registry with host@1 and a TUF repository."""
    base = tmp_path_factory.mktemp("api")
    csv = base / "host.csv"
    cli("data", "synth", "--out", str(csv), "--rows", "3000", "--seed", "1")
    registry = base / "registry"
    cli("train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host", "--registry",
        str(registry), "--epochs", "3", "--train-fraction", "0.3", "--seed", "0", "--json", "-q")
    cli("repo", "init", "--registry", str(registry), "--json")
    return csv, registry


@dataclass
class Env:
    csv: Path
    registry: Path
    broker_url: str
    agents: Agents
    tmp: Path

    @property
    def root(self) -> Path:
        return repository_path(self.registry) / "metadata" / "root.json"

    def config(self, agent_id: str, listen: str | None, rate: float = 100,
               drift_window: int | None = None) -> Path:
        """An ``init-config`` config with ``[api]`` enabled on ``listen`` (``None``: left off)."""
        path = self.agents.config(agent_id, trust=self.root, source=f"csv:{self.csv}?rate={rate:g}",
                                  drift_window=drift_window)
        if listen is not None:
            text, n = re.subn(r"(?m)^\[api\]\nenabled = false",
                              f'[api]\nenabled = true\nlisten = "{listen}"', path.read_text())
            assert n == 1, "init-config no longer writes [api] enabled = false"
            path.write_text(text)
        return path

    def deploy(self, ref: str) -> None:
        cli("deploy", ref, "--group", "lab", "--registry", str(self.registry), "--broker",
            self.broker_url, "--json")


@pytest.fixture
def env(trained, broker, tmp_path: Path) -> Iterator[Env]:
    csv, registry = trained
    copy = Path(shutil.copytree(registry, tmp_path / "registry"))
    agents = Agents(tmp_path / "agents", broker.url)
    try:
        yield Env(csv, copy, broker.url, agents, tmp_path)
    finally:
        agents.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Reply:
    status: int
    content_type: str
    body: str

    def json(self) -> Any:
        assert self.content_type.startswith("application/json"), self
        return json.loads(self.body)


def curl(base: list[str], path: str, *, data: str | None = None, content_type: str = "application/json",
         method: str | None = None, data_file: Path | None = None) -> Reply:
    """One request with the real curl; ``base`` is the URL prefix args (TCP or --unix-socket)."""
    *opts, url = base
    cmd = ["curl", "-sS", "--max-time", "30", *opts, "-o", "-", "-w", "\n%{http_code} %{content_type}"]
    if method:
        cmd += ["-X", method]
    if data is not None or data_file is not None:  # the body on stdin: it may be large
        cmd += ["-H", f"Content-Type: {content_type}", "--data-binary", f"@{data_file or '-'}"]
    proc = subprocess.run([*cmd, url + path], input=data if data_file is None else None,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    body, _, trailer = proc.stdout.rpartition("\n")
    status, _, ctype = trailer.partition(" ")
    return Reply(int(status), ctype, body)


def metrics(base: list[str]) -> dict[str, list[Any]]:
    reply = curl(base, "/metrics")
    assert reply.status == 200 and reply.content_type.startswith("text/plain"), reply
    return {f.name: f.samples for f in text_string_to_metric_families(reply.body)}


def value(families: dict[str, list[Any]], family: str, sample: str | None = None, **labels: str) -> float:
    [v] = [s.value for s in families[family]
           if s.name == (sample or family) and all(s.labels.get(k) == x for k, x in labels.items())]
    return float(v)


def onnxruntime_scores(model: bytes, windows: np.ndarray) -> np.ndarray:
    """The bundle's model run by onnxruntime itself, one window per call (any batch layout)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    assert inp.type == "tensor(float)", inp.type
    dims = [d if isinstance(d, int) else -1 for d in inp.shape[1:]]
    out = []
    for w in windows:
        (y,) = session.run(None, {inp.name: w.reshape(1, *dims)})
        out.append(float(np.asarray(y).reshape(-1)[0]))
    return np.asarray(out)


def wait_healthy(agent: AgentProcess, base: list[str], agents: Agents) -> dict[str, Any]:
    def healthy() -> dict[str, Any] | None:
        reply = curl(base, "/healthz")
        return reply.json() if reply.status == 200 else None

    return poll_until(healthy, 60, "GET /healthz to answer 200", agents.tail, interval=0.2)


def wait_listening(agent: AgentProcess, base: list[str], agents: Agents) -> Reply:
    def answered() -> Reply | None:
        assert agent.alive(), agents.tail()
        *opts, url = base
        proc = subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "5", *opts, url + "/healthz"],
                              capture_output=True, timeout=30)
        return curl(base, "/healthz") if proc.returncode == 0 else None

    return poll_until(answered, 60, "the local API to listen", agents.tail, interval=0.1)


# -- 1. TCP --------------------------------------------------------------------------------------


def test_api_over_tcp_healthz_metrics_predict_and_bad_requests(env: Env) -> None:
    port = _free_port()
    base = [f"http://127.0.0.1:{port}"]
    watch = Watch(env.broker_url, env.agents.tail)
    agent = env.agents.start(env.config("api-1", f"127.0.0.1:{port}", rate=300, drift_window=100))

    first = wait_listening(agent, base, env.agents)
    assert first.status == 503 and "no model is active" in first.json()["reason"]

    env.deploy("host@1")
    health = wait_healthy(agent, base, env.agents)
    assert health["status"] == "ok" and health["models"] == {"default": "host@1"}

    # metrics: the health report's figures, once samples were scored
    fams = poll_until(lambda: (m := metrics(base)) and value(m, "edgefleet_agent_inferences",
                                                             "edgefleet_agent_inferences_total") > 0 and m,
                      30, "inferences > 0 in /metrics", env.agents.tail, interval=0.2)
    assert value(fams, "edgefleet_agent_model_info", slot="default", model="host", version="1",
                 format="onnx") == 1
    assert value(fams, "edgefleet_agent_deployment_state", slot="default", model="host",
                 version="1", state="active") == 1
    assert value(fams, "edgefleet_agent_inference_duration_seconds",
                 "edgefleet_agent_inference_duration_seconds_count") > 0
    assert value(fams, "edgefleet_agent_resident_memory_bytes") > 10e6
    assert value(fams, "edgefleet_agent_errors", "edgefleet_agent_errors_total") == 0
    assert value(fams, "edgefleet_agent_inference_latency_milliseconds", quantile="0.5") > 0
    assert "edgefleet_agent_outbox_depth" in fams and "edgefleet_agent_outbox_dropped" in fams
    # the health report's drift figures, per slot and per series
    assert value(fams, "edgefleet_agent_drift_available", slot="default") == 1
    assert 0 < value(fams, "edgefleet_agent_drift_fill", slot="default") <= 100
    assert value(fams, "edgefleet_agent_drift_series_psi", slot="default", kind="score", series="score") >= 0

    # predict: a batch of windows from the CSV, scored as onnxruntime scores them
    model = curl(base, "/v1/slots/default").json()
    assert (model["model"], model["version"]) == ("host", 1)
    series = read_series(env.csv)
    cols = [series.features.index(f) for f in model["features"]]
    w = model["window"]
    starts = [0, 100, 700, 1500, 2200, 2900 - w]
    windows = np.stack([series.values[s:s + w, cols] for s in starts]).astype(np.float32)
    reply = curl(base, "/v1/slots/default/predict", data=json.dumps({"windows": windows.tolist()}))
    assert reply.status == 200, reply
    result = reply.json()
    assert len(result["results"]) == len(starts) and result["reference"] in ("prior", "threshold")
    _spec, model_bytes = read_bundle(bundle_bytes(env.registry, bundle_sha(env.registry, "host", 1)))
    want = onnxruntime_scores(model_bytes, windows)
    got = np.asarray([r["score"] for r in result["results"]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for r in result["results"]:
        assert 0.0 <= r["anomaly_score"] <= 1.0 and isinstance(r["is_anomaly"], bool)
        assert r["is_anomaly"] == (r["anomaly_score"] >= 0.5)
    assert value(metrics(base), "edgefleet_agent_api_predicted_windows",
                 "edgefleet_agent_api_predicted_windows_total") == len(starts)

    # bad requests: a 4xx JSON error each, and the agent keeps serving
    one = windows[0].tolist()
    bad_row = [one[0][:-1], *one[1:]]
    big = env.tmp / "big.json"
    big.write_text(json.dumps({"windows": [one] * 2000}))
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("wrong window length", dict(data=json.dumps({"windows": [one[1:]]})), 400),
        ("wrong feature count", dict(data=json.dumps({"windows": [bad_row]})), 400),
        ("a string value", dict(data=json.dumps({"windows": [[["1"] * len(cols)] * w]})), 400),
        ("a boolean value", dict(data=json.dumps({"windows": [[[True] * len(cols)] * w]})), 400),
        ("NaN", dict(data=json.dumps({"windows": [[[float("nan")] * len(cols)] * w]})), 400),
        ("no windows", dict(data=json.dumps({"windows": []})), 400),
        ("an unknown key", dict(data=json.dumps({"windows": [one], "x": 1})), 400),
        ("not JSON", dict(data="{windows"), 400),
        ("not a JSON content type", dict(data=json.dumps({"windows": [one]}), content_type="text/plain"), 415),
        ("too large a body", dict(data_file=big), 413),
    ]
    for what, kwargs, status in cases:
        reply = curl(base, "/v1/slots/default/predict", **kwargs)
        assert reply.status == status, (what, reply)
        assert reply.json()["error"], what
    for path, kwargs, status in [
        ("/v1/slots/nope/predict", dict(data=json.dumps({"windows": [one]})), 404),
        ("/v1/slots/default/predict", {}, 405),  # GET
        ("/healthz", dict(data="{}"), 405),  # POST
        ("/nowhere", {}, 404),
        ("/v1/slots/default", dict(method="DELETE"), 501),
    ]:
        reply = curl(base, path, **kwargs)
        assert reply.status == status, (path, reply)
        assert reply.json()["error"], path
    assert agent.alive() and "Traceback" not in agent.log.read_text()

    # once the replay has ended the counters stand still: /metrics and the MQTT health report
    # carry the same figures
    try:
        poll_until(lambda: "source ended" in agent.log.read_text(), 60, "the replay to end",
                   env.agents.tail, interval=0.2)
        final = metrics(base)
        inferences = value(final, "edgefleet_agent_inferences", "edgefleet_agent_inferences_total")
        anomalies = value(final, "edgefleet_agent_anomalies", "edgefleet_agent_anomalies_total")
        assert inferences > 0
        mark = watch.mark()
        report = watch.wait_for(lambda: next(iter(watch.of("health", mark)), None), 10, "a health report")
        assert (report.inferences, report.anomalies, report.errors) == (inferences, anomalies, 0)
        assert value(final, "edgefleet_agent_drift_drifted", slot="default") == \
            report.drift["default"]["drifted"]
        assert value(final, "edgefleet_agent_inference_duration_seconds",
                     "edgefleet_agent_inference_duration_seconds_count") == inferences
    finally:
        watch.close()

    agent.signal(signal.SIGTERM)
    assert agent.wait(30) == 0


# -- 2. Unix socket ------------------------------------------------------------------------------


def test_api_on_a_unix_socket(env: Env) -> None:
    sock = env.tmp / "api.sock"
    base = ["--unix-socket", str(sock), "http://localhost"]
    agent = env.agents.start(env.config("api-2", f"unix:{sock}"))
    wait_listening(agent, base, env.agents)
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o660
    env.deploy("host@1")
    wait_healthy(agent, base, env.agents)
    model = curl(base, "/v1/slots/default").json()
    window = np.zeros((model["window"], len(model["features"])), np.float32).tolist()
    reply = curl(base, "/v1/slots/default/predict", data=json.dumps({"windows": [window, window]}))
    assert reply.status == 200, reply
    scores = [r["score"] for r in reply.json()["results"]]
    assert len(scores) == 2 and scores[0] == scores[1]
    agent.signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    assert not sock.exists()  # removed at a clean stop

    # restarted, the agent serves the model from its state dir: metrics observe it from the start
    again = env.agents.start(env.agents.started[0].config)
    wait_listening(again, base, env.agents)
    wait_healthy(again, base, env.agents)

    def histogram_count() -> float:
        return value(metrics(base), "edgefleet_agent_inference_duration_seconds",
                     "edgefleet_agent_inference_duration_seconds_count")

    poll_until(lambda: histogram_count() > 0, 60, "the restarted agent's inference histogram",
               env.agents.tail, interval=0.2)
    again.signal(signal.SIGTERM)
    assert again.wait(30) == 0


# -- 3. systemd notices --------------------------------------------------------------------------


def test_systemd_ready_watchdog_and_stopping(env: Env) -> None:
    path = env.tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(60)
        agent = env.agents.start(env.config("api-3", None),
                                 env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})

        def receive(until: str) -> list[str]:
            seen: list[str] = []
            while until not in seen:
                try:
                    seen += notify.recv(4096).decode().splitlines()
                except TimeoutError:
                    raise AssertionError(f"no {until} from the agent; got {seen}\n{env.agents.tail()}") from None
            return seen

        assert receive("READY=1")[-1] == "READY=1"
        # no model yet: the serving loop waits for one, and is alive
        receive("WATCHDOG=1")
        receive("WATCHDOG=1")
        agent.signal(signal.SIGTERM)
        assert "STOPPING=1" in receive("STOPPING=1")
        assert agent.wait(30) == 0


# -- 4. an address in use --------------------------------------------------------------------------


def test_an_address_in_use_stops_the_agent_with_one_line(env: Env) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = env.agents.start(env.config("api-4", f"127.0.0.1:{port}"))
        assert agent.wait(60) == 1
    log = agent.log.read_text()
    assert f"cannot serve the local API on 127.0.0.1:{port}" in log and "Traceback" not in log


# -- 5. shadow figures ---------------------------------------------------------------------------


def test_shadow_figures_in_metrics_and_a_restarted_agent_keeps_its_shadow(env: Env) -> None:
    port = _free_port()
    base = [f"http://127.0.0.1:{port}"]
    watch = Watch(env.broker_url, env.agents.tail)
    try:
        agent = env.agents.start(env.config("api-shadow", f"127.0.0.1:{port}", rate=300))
        wait_listening(agent, base, env.agents)
        env.deploy("host@1")
        wait_healthy(agent, base, env.agents)
        cli("deploy", "host@1", "--shadow", "--group", "lab", "--registry", str(env.registry),
            "--broker", env.broker_url, "--json")
        labels = dict(slot="default", model="host", version="1")
        fams = poll_until(
            lambda: (m := metrics(base)) and "edgefleet_agent_shadow_samples" in m
            and m["edgefleet_agent_shadow_samples"] and value(m, "edgefleet_agent_shadow_samples", **labels) > 1 and m,
            60, "shadow samples in /metrics", env.agents.tail, interval=0.2)
        assert value(fams, "edgefleet_agent_shadow_info", **labels, state="active") == 1
        assert value(fams, "edgefleet_agent_shadow_latency_milliseconds", **labels, quantile="0.99") > 0
        # the same model on the very same windows: the raw scores correlate fully. (Decisions
        # may still differ while the shadow's streaming score pipeline, which starts at its
        # install, warms up: the agreement is what the counts say.)
        poll_until(lambda: "source ended" in agent.log.read_text(), 60, "the replay to end",
                   env.agents.tail, interval=0.2)
        final = metrics(base)
        assert value(final, "edgefleet_agent_shadow_correlation", **labels) == pytest.approx(1.0, abs=1e-9)
        samples = value(final, "edgefleet_agent_shadow_samples", **labels)
        one_sided = sum(value(final, f"edgefleet_agent_shadow_{k}", **labels) for k in ("active_only", "shadow_only"))
        assert value(final, "edgefleet_agent_shadow_agreement", **labels) == pytest.approx(1 - one_sided / samples)
        assert value(final, "edgefleet_agent_shadow_errors", **labels) == 0
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0

        mark = watch.mark()
        again = env.agents.start(agent.config)
        wait_listening(again, base, env.agents)
        poll_until(lambda: (m := metrics(base)) and "edgefleet_agent_shadow_info" in m
                   and m["edgefleet_agent_shadow_info"] and m, 60, "the shadow after the restart",
                   env.agents.tail, interval=0.2)
        health = watch.wait_for(lambda: next((h for h in watch.of("health", mark) if h.shadow), None), 30,
                                "health with the shadow after the restart")
        assert (health.shadow["default"]["model"], health.shadow["default"]["version"]) == ("host", 1)
        assert [d for d in watch.of("deployments", mark) if d.role == "shadow"] == []  # not downloaded
        again.signal(signal.SIGTERM)
        assert again.wait(30) == 0
    finally:
        watch.close()
