"""MQTT over TLS against a real Mosquitto TLS listener with generated certificates: the agent
process and the trainer's publishing commands connect with the configured CA (and client
certificate), and a CA that does not vouch for the broker stops them with one clear line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.mqtt import RetainedReader, connect
from edge_agent.recent import RECENT_SAMPLES, load_recent
from shared.topics import Topics
from tests.conftest import REPO_ROOT
from tests.helpers_delivery import AgentProcess, poll_until
from tests.helpers_security import CertificateAuthority, SecureBroker, agent_config
from trainer.fleet.tuf_repository import TufRepository


@pytest.fixture
def pki(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "pki")


@pytest.fixture(params=[False, True], ids=["server-cert", "mutual-tls"])
def tls_broker(request: pytest.FixtureRequest, pki: CertificateAuthority, tmp_path: Path) -> Iterator[SecureBroker]:
    """A Mosquitto TLS listener; with ``mutual-tls`` it also requires a client certificate."""
    b = SecureBroker(tmp_path / "broker", server_cert=pki.issue("broker", server=True), ca_file=pki.ca_file,
                     require_client_cert=request.param)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _client_tls(broker: SecureBroker, pki: CertificateAuthority, name: str) -> dict[str, str]:
    """The TLS settings of a client of ``broker``: the CA, plus a client certificate if required."""
    tls = {"ca_file": str(pki.ca_file)}
    if broker.require_client_cert:
        cert, key = pki.issue(name, server=False)
        tls |= {"cert_file": str(cert), "key_file": str(key)}
    return tls


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_the_agent_connects_over_tls_with_its_ca(tls_broker: SecureBroker, pki: CertificateAuthority,
                                                 tmp_path: Path) -> None:
    root = TufRepository.init(tmp_path / "tuf").root_json_path
    cfg = agent_config(tmp_path / "agent", "tls-1", tls_broker.url, root,
                       **_client_tls(tls_broker, pki, "tls-1"))
    online = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2)
    tls = _client_tls(tls_broker, pki, "watcher")
    sub.tls_set(ca_certs=tls["ca_file"], certfile=tls.get("cert_file"), keyfile=tls.get("key_file"))
    sub.on_message = lambda _c, _u, m: json.loads(m.payload)["status"] == "online" and online.set()
    sub.connect("127.0.0.1", tls_broker.port)
    sub.subscribe("edgefleet/v1/agents/tls-1/state", 1)
    sub.loop_start()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)],
                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert online.wait(60), "the agent did not announce itself over TLS"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        sub.disconnect()
        sub.loop_stop()
    assert proc.returncode == 0, err[-2000:]


def test_a_wrong_ca_stops_the_agent_with_one_line_and_exit_3(tls_broker: SecureBroker, pki: CertificateAuthority,
                                                             tmp_path: Path) -> None:
    other = CertificateAuthority(tmp_path / "other-pki", name="some other CA")
    root = TufRepository.init(tmp_path / "tuf").root_json_path
    tls = _client_tls(tls_broker, pki, "tls-2") | {"ca_file": str(other.ca_file)}
    cfg = agent_config(tmp_path / "agent", "tls-2", tls_broker.url, root, **tls)
    proc = _run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)], timeout=60)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "WARNING" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "TLS certificate failed verification" in errors[0] and str(other.ca_file) in errors[0]
    assert "Traceback" not in proc.stderr


def test_the_trainer_publishes_over_tls_with_its_ca(tls_broker: SecureBroker, pki: CertificateAuthority,
                                                    tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    edgefleet = [sys.executable, "-m", "trainer.cli"]
    assert _run([*edgefleet, "repo", "init", "--registry", str(registry), "--json"]).returncode == 0
    tls = _client_tls(tls_broker, pki, "trainer")
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in tls.items()]
    proc = _run([*edgefleet, "repo", "publish", "--registry", str(registry), "--broker", tls_broker.url, *flags,
                 "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["published_metadata"]
    reader_tls = _client_tls(tls_broker, pki, "reader")
    client = connect(tls_broker.url, client_id="tls-reader", timeout=10, **reader_tls)
    try:
        topics = Topics()
        got = RetainedReader(client, topics).read([topics.repo_metadata("timestamp.json")])
    finally:
        client.disconnect()
        client.loop_stop()
    assert json.loads(got[topics.repo_metadata("timestamp.json")] or b"")["signed"]["_type"] == "timestamp"

    other = CertificateAuthority(tmp_path / "other-pki", name="some other CA")
    flags = [f"--{key.replace('_', '-')}={other.ca_file if key == 'ca_file' else value}"
             for key, value in tls.items()]
    proc = _run([*edgefleet, "repo", "publish", "--registry", str(registry), "--broker", tls_broker.url, *flags])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "TLS certificate failed verification" in proc.stderr, proc.stderr


def _utc_now() -> str:
    """Now as the host source stamps its samples."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


class _TlsWatch:
    """A subscriber over TLS (the agent's own client code) that keeps what it receives."""

    def __init__(self, broker: SecureBroker, ca_file: Path, *filters: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = connect(broker.url, client_id="tls-watch", ca_file=str(ca_file), timeout=10)
        self.client.on_message = self._on_message
        self.client.subscribe([(f, 1) for f in filters])

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def wait_for(self, topic: str, predicate: Callable[[dict[str, Any]], bool], what: str,
                 diag: Callable[[], str]) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for t, payload in self.messages:
                if t == topic and payload and predicate(doc := json.loads(payload)):
                    return doc
            return None

        with self.cond:
            if not self.cond.wait_for(lambda: found() is not None, 90):
                raise AssertionError(f"timed out waiting for {what}\n{diag()}")
            doc = found()
        assert doc is not None
        return doc

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connection_attempts(broker_log: str) -> int:
    """TLS connection attempts a Mosquitto log shows, accepted or failed at the handshake."""
    return broker_log.count("New connection from") + broker_log.count("Client connection from")


def test_a_certificate_refused_after_the_first_connection_is_retried_not_fatal(
        pki: CertificateAuthority, tmp_path: Path) -> None:
    """The agent connected once; then its broker presents a certificate from another CA (an
    impostor, or a rotation gone wrong). The agent keeps running and reading its source, says
    so once, and reconnects when the right certificate is back, reporting it in health."""
    cert = pki.issue("broker", server=True)
    broker = SecureBroker(tmp_path / "broker", server_cert=cert, ca_file=pki.ca_file).start()
    root = TufRepository.init(tmp_path / "tuf").root_json_path
    home = tmp_path / "agent"
    cfg = agent_config(home, "tls-3", broker.url, root, ca_file=str(pki.ca_file))
    text = cfg.read_text().replace('spec = "stdin"', 'spec = "host?period=0.2"')
    cfg.write_text(text.replace("period_seconds = 10 ", "period_seconds = 0.5 "))
    agent = AgentProcess(cfg, home / "state", tmp_path / "agent.log", exit_at_end=False)
    topics = Topics()
    state, health = topics.agent_state("tls-3"), topics.agent_health("tls-3")
    impostor = None
    try:
        watch = _TlsWatch(broker, pki.ca_file, state)
        try:
            watch.wait_for(state, lambda d: d["status"] == "online", "the first birth", agent.tail)
        finally:
            watch.close()
        broker.stop()
        other = CertificateAuthority(tmp_path / "other-pki", name="some other CA")
        impostor = SecureBroker(tmp_path / "impostor", server_cert=other.issue("broker", server=True),
                                ca_file=other.ca_file, port=broker.port).start()
        poll_until(lambda: "TLS certificate failed verification" in agent.log.read_text(), 90,
                   "the agent refusing the impostor's certificate", agent.tail)
        refused_at = _utc_now()
        # Retries (the agent's connection and its TUF fetch's), none of them logged again. Mosquitto
        # logs a handshake that fails on its first read as "Client connection from … failed"
        # instead of "New connection from", so both count as an attempt.
        poll_until(lambda: _connection_attempts(impostor.log) >= 4, 90,
                   "the agent retrying the impostor", lambda: impostor.log[-2000:] + agent.tail())
        assert agent.alive(), agent.tail()
        impostor.stop()
        restored_at = _utc_now()
        broker.start()
        watch = _TlsWatch(broker, pki.ca_file, state, health)
        try:
            watch.wait_for(state, lambda d: d["status"] == "online", "the birth after the restore", agent.tail)
            report = watch.wait_for(health, lambda d: "broker_tls_rejected" in d, "the rejection in health",
                                    agent.tail)
        finally:
            watch.close()
        assert report["broker_tls_rejected"]["count"] >= 1
        assert "failed verification" in report["broker_tls_rejected"]["reason"]
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0, agent.tail()
    finally:
        agent.kill()
        broker.stop()
        if impostor is not None:
            impostor.stop()
    log = agent.log.read_text()
    # Said once by the agent (its TUF fetch reports its own failed pass as a deployment warning).
    refusals = [line for line in log.splitlines() if "ERROR" in line]
    assert len(refusals) == 1 and "TLS certificate failed verification" in refusals[0], log[-3000:]
    assert "Traceback" not in log
    # Detection went on: the source was read while the broker's certificate was refused.
    samples = load_recent(home / "state" / RECENT_SAMPLES, limit=100_000)
    during = [s.timestamp for s in samples if refused_at <= s.timestamp <= restored_at]
    assert during, f"no sample read between {refused_at} and {restored_at}"


@pytest.mark.parametrize("problem", ["another-host-name", "expired"])
def test_a_broker_certificate_for_another_host_or_expired_stops_the_agent(
        pki: CertificateAuthority, tmp_path: Path, problem: str) -> None:
    """Signed by the agent's CA, but issued for another host name, or no longer valid."""
    cert = (pki.issue("broker", server=True, hosts=("broker.example",)) if problem == "another-host-name"
            else pki.issue("broker", server=True, expired=True))
    broker = SecureBroker(tmp_path / "broker", server_cert=cert, ca_file=pki.ca_file).start()
    try:
        root = TufRepository.init(tmp_path / "tuf").root_json_path
        cfg = agent_config(tmp_path / "agent", "tls-4", broker.url, root, ca_file=str(pki.ca_file))
        proc = _run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)], timeout=60)
    finally:
        broker.stop()
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "WARNING" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    why = "mismatch" if problem == "another-host-name" else "expired"
    assert "TLS certificate failed verification" in errors[0] and why in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
