"""``edgefleet-agent simulate``: many agents in one process, each its own agent on the wire and
on disk.

The fleet is the real CLI in a subprocess against the ``broker`` fixture's Mosquitto; the
deployment is ``edgefleet deploy`` of a trained model through the TUF repository. What is
asserted is what a subscriber received and what each agent wrote in its own state directory.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from helpers_delivery import REPO_ROOT, Agents, Watch, bundle_bytes, bundle_sha, cli
from paho.mqtt.enums import MQTTErrorCode

from edge_agent.config import parse_config
from edge_agent.mqtt import Will, new_client
from edge_agent.simulate import FleetError, fleet_configs
from edge_agent.simulate.network import NetworkLoop
from edge_agent.simulate.runtimes import SharedRuntimes
from shared.bundle import read_bundle
from trainer.fleet.deploy import repository_path

COUNT = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic host-metrics CSV and a registry with host@1 and a TUF repository."""
    base = tmp_path_factory.mktemp("simulate")
    csv = base / "host.csv"
    cli("data", "synth", "--out", str(csv), "--rows", "3000", "--seed", "1")
    registry = base / "registry"
    cli("train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host", "--registry", str(registry),
        "--epochs", "3", "--train-fraction", "0.3", "--json", "-q")
    cli("repo", "init", "--registry", str(registry), "--json")
    return csv, registry


class Fleet:
    """``edgefleet-agent simulate`` as a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, config: Path, count: int, log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "simulate", "--count", str(count),
                 "--config", str(config), "--json"],
                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float) -> dict:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no line from simulate within {timeout:g} s\n{self.tail()}") from None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def test_five_simulated_agents_each_verify_activate_and_stop(trained, broker, tmp_path: Path) -> None:
    csv, registry = trained
    registry = Path(cli("repo", "publish", "--registry", str(registry), "--broker", broker.url) and registry)
    agents = Agents(tmp_path / "agents", broker.url)
    template = agents.config("sim", trust=repository_path(registry) / "metadata" / "root.json",
                             source=f"csv:{csv}?rate=20")
    state = template.parent / "state"
    ids = [f"sim-{i:04d}" for i in range(COUNT)]
    watch = Watch(broker.url, lambda: fleet.tail())
    fleet = Fleet(template, COUNT, tmp_path / "simulate.log")
    try:
        ready = fleet.next_line(120)
        assert ready == {"agents": COUNT, "first": ids[0], "last": ids[-1], "state_dirs": str(state),
                         "ready": True}
        watch.wait_for(lambda: {s.agent for s in watch.of("state") if s.status == "online"} >= set(ids),
                       60, "every simulated agent online")
        cli("deploy", "host@1", "--group", "lab", "--registry", str(registry), "--broker", broker.url)
        sha = bundle_sha(registry, "host", 1)
        watch.wait_for(
            lambda: {d.agent for d in watch.of("deployments") if (d.model, d.version, d.state) == ("host", 1, "active")}
            >= set(ids), 120, f"{COUNT} agents reporting host@1 active")
        births = {}
        for agent_id in ids:
            home = state / agent_id
            record = json.loads((home / "state.json").read_text())["slots"]["default"]["current"]
            assert record["sha256"] == sha
            assert (home / "bundles" / f"{sha}.zip").is_file()
            assert (home / "metadata" / "targets.json").is_file()  # its own trusted TUF metadata
            assert (home / "outbox.sqlite").is_file()
            online = watch.wait_for(  # announced right after the deployment status
                lambda a=agent_id: [s for s in watch.of("state") if s.agent == a and s.status == "online"
                                    and [m.sha256 for m in s.active] == [sha]],
                30, f"{agent_id} announcing host@1 in its state")
            births[agent_id] = online[-1].bdseq
        fleet.proc.send_signal(signal.SIGTERM)
        assert fleet.proc.wait(120) == 0, fleet.tail()
        assert fleet.next_line(10) == {"stopped": COUNT, "exit_code": 0}
        stopped = watch.wait_for(
            lambda: {s.agent: s for s in watch.of("state") if s.status == "stopped"}.keys() >= set(ids) and
            {s.agent: s for s in watch.of("state") if s.status == "stopped"}, 30, "every agent's 'stopped' state")
        for agent_id in ids:
            assert stopped[agent_id].bdseq == births[agent_id]  # each its own session's sequence
            assert [a.sha256 for a in stopped[agent_id].active] == [sha]
        # Each agent disconnected cleanly before the process ended: no Last Will replaced the
        # retained 'stopped' (a subscriber arriving now reads it for every agent).
        after = Watch(broker.url, lambda: fleet.tail())
        try:
            retained = after.wait_for(
                lambda: {s.agent: s for s in after.of("state")}.keys() >= set(ids)
                and {s.agent: s for s in after.of("state")}, 30, "every agent's retained state")
        finally:
            after.close()
        assert {a: (s.status, s.bdseq) for a, s in retained.items() if a in ids} == {
            a: ("stopped", births[a]) for a in ids}
    finally:
        fleet.kill()
        watch.close()


def _template(tmp_path: Path, source: str = "host", federated: bool = False) -> str:
    (tmp_path / "root.json").write_text("{}")
    return (f'[agent]\nid = "edge"\ngroup = "g"\nprofile = "x86-64-v3"\nstate_dir = "{tmp_path}/st"\n'
            f'[broker]\nurl = "mqtt://127.0.0.1:1"\n[trust]\nroot = "{tmp_path}/root.json"\n'
            f'[source]\nspec = "{source}"\n' + ("[federated]\nenabled = true\n" if federated else ""))


def test_fleet_configs_derive_ids_and_state_dirs(tmp_path: Path) -> None:
    template = parse_config(_template(tmp_path))
    configs = fleet_configs(template, 3)
    assert [c.agent_id for c in configs] == ["edge-0000", "edge-0001", "edge-0002"]
    assert [c.state_dir for c in configs] == [tmp_path / "st" / c.agent_id for c in configs]
    assert {(c.broker, c.group, c.profile.name, c.source, c.trust_root) for c in configs} == {
        (template.broker, "g", "x86-64-v3", "host", template.trust_root)}
    assert [c.agent_id for c in fleet_configs(template, 2, "lab")] == ["lab-0000", "lab-0001"]


@pytest.mark.parametrize(("source", "federated", "count", "prefix", "needle"), [
    ("stdin", False, 2, None, "stdin cannot feed"),
    ("host", True, 2, None, "[federated] enabled"),
    ("host", False, 0, None, "--count must be between"),
    ("host", False, 2, "a/b", "--prefix"),
])
def test_fleet_configs_refuse(tmp_path: Path, source: str, federated: bool, count: int,
                              prefix: str | None, needle: str) -> None:
    with pytest.raises(FleetError, match=None) as e:
        fleet_configs(parse_config(_template(tmp_path, source, federated)), count, prefix)
    assert needle in str(e.value)


def test_shared_runtimes_key_on_model_spec_and_threads(trained) -> None:
    """One session per (model, spec, threads): agents asking for the same get the same one;
    a different spec or thread count is its own session (a session is built from both)."""
    _csv, registry = trained
    spec, model = read_bundle(bundle_bytes(registry, bundle_sha(registry, "host", 1)))
    runtimes = SharedRuntimes()
    try:
        window = np.zeros((spec.window, len(spec.features)), dtype=np.float32)
        first = runtimes.open(spec, model, threads=1)
        again = runtimes.open(spec, model, threads=1)
        assert len(runtimes) == 1 and first.score_one(window) == again.score_one(window)
        runtimes.open(spec, model, threads=2)
        assert len(runtimes) == 2
        runtimes.open(dataclasses.replace(spec, lineage={**spec.lineage, "variant": "b"}), model, threads=1)
        assert len(runtimes) == 3
    finally:
        runtimes.close()


class Inbox:
    """A real subscriber's received payloads on one topic filter."""

    def __init__(self, client: mqtt.Client, topic: str) -> None:
        self.cond = threading.Condition()
        self.payloads: list[bytes] = []
        subscribed = threading.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe(topic, qos=1)
        assert subscribed.wait(10), f"not subscribed to {topic} within 10 s"

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.payloads.append(msg.payload)
            self.cond.notify_all()

    def wait_for(self, expected: set[bytes], timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: expected <= set(self.payloads), timeout):
                raise AssertionError(f"received {sorted(self.payloads)}, missing {sorted(expected - set(self.payloads))}")


def _loop_client(network: NetworkLoop, url: str, client_id: str) -> mqtt.Client:
    client = new_client(url, client_id=client_id)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    network.add(client, url)
    assert connected.wait(10), f"{client_id} not connected within 10 s"
    return client


def test_network_loop_watches_writes_only_while_a_client_has_data(broker, clients) -> None:
    """A packet queued by another thread while ``loop_write`` ends (after paho found its queue
    empty, before it withdrew the write interest) is sent, and once everything is sent no
    socket is left watched for writing (a writable socket would wake the loop on every poll).

    The other thread's publish is made to land in that window every time: the client's
    ``want_write`` publishes right after answering "nothing to write" inside ``loop_write``."""
    inbox = Inbox(clients(), "race/#")
    network = NetworkLoop()
    network.start()
    try:
        client = _loop_client(network, broker.url, "race-client")
        injected: list[mqtt.MQTTMessageInfo] = []
        inside = threading.local()
        want_write, loop_write = client.want_write, client.loop_write

        def racing_want_write() -> bool:
            wants = want_write()
            if not wants and getattr(inside, "loop_write", False) and len(injected) < 5:
                injected.append(client.publish(f"race/late/{len(injected)}", b"late%d" % len(injected), qos=1))
            return wants

        def tracked_loop_write() -> MQTTErrorCode:
            inside.loop_write = True
            try:
                return loop_write()
            finally:
                inside.loop_write = False

        client.want_write = racing_want_write  # type: ignore[method-assign]
        client.loop_write = tracked_loop_write  # type: ignore[method-assign]
        first = client.publish("race/first", b"first", qos=1)
        first.wait_for_publish(10)
        inbox.wait_for({b"first"} | {b"late%d" % i for i in range(5)}, 10)
        for info in injected:
            info.wait_for_publish(10)
        assert len(injected) == 5
        interest = network.write_interest()
        assert interest == {"race-client": (False, False)}, interest
        network.forget(client)
        client.disconnect()
    finally:
        network.close()



def test_simulated_fleet_reconnects_after_a_broker_restart(trained, broker, tmp_path: Path) -> None:
    """The broker goes away under a running fleet and comes back on the same port: every agent
    connects again (its connects run beside the others', off the network loop) and announces
    a new session."""
    csv, registry = trained
    cli("repo", "publish", "--registry", str(registry), "--broker", broker.url)
    agents = Agents(tmp_path / "agents", broker.url)
    template = agents.config("sim", trust=repository_path(registry) / "metadata" / "root.json",
                             source=f"csv:{csv}?rate=20")
    ids = [f"sim-{i:04d}" for i in range(COUNT)]
    fleet = Fleet(template, COUNT, tmp_path / "simulate.log")
    watch = Watch(broker.url, lambda: fleet.tail())
    try:
        assert fleet.next_line(120)["ready"] is True
        online = watch.wait_for(
            lambda: {s.agent: s.bdseq for s in watch.of("state") if s.status == "online"}.keys() >= set(ids)
            and {s.agent: s.bdseq for s in watch.of("state") if s.status == "online"},
            60, "every simulated agent online")
        broker.stop()  # the subscriber reconnects by itself (paho's loop)
        mark = watch.mark()
        broker.start()
        watch.wait_for(
            lambda: {s.agent for s in watch.of("state", mark) if s.status == "online" and s.bdseq != online[s.agent]}
            >= set(ids), 90, "every agent online again in a new session")
        fleet.proc.send_signal(signal.SIGTERM)
        assert fleet.proc.wait(120) == 0, fleet.tail()
    finally:
        fleet.kill()
        watch.close()


def test_network_loop_closes_the_socket_of_a_client_forgotten_while_connecting(broker) -> None:
    """``forget()`` while the connect runs (on the connect pool): the socket it opens is
    closed at once, not left open and undriven."""
    network = NetworkLoop()
    network.start()
    try:
        client = new_client(broker.url, client_id="forgotten")
        opened = threading.Event()

        def forget_now(_c: object, _u: object) -> None:  # inside reconnect(), before the socket
            network.forget(client)
            on_open = client.on_socket_open
            assert on_open is not None

            def then_signal(c: mqtt.Client, u: object, sock: object) -> None:
                on_open(c, u, sock)  # the loop's handler first
                opened.set()

            client.on_socket_open = then_signal

        client.on_pre_connect = forget_now
        network.add(client, broker.url)
        assert opened.wait(10), "no socket opened within 10 s"
        sock = client.socket()
        assert sock is not None and sock.fileno() == -1  # closed by the loop
        assert network.write_interest() == {}
        assert not client.is_connected()
    finally:
        network.close()


def test_network_loop_close_lets_disconnecting_clients_finish(broker, clients) -> None:
    """``close()`` returns once a client that was forgotten and told to disconnect has sent
    everything, its DISCONNECT last: the broker keeps its last retained message, not its
    Last Will."""
    network = NetworkLoop()
    network.start()
    client = new_client(broker.url, client_id="leaving", will=Will("leave/state", b"gone", qos=1, retain=True))
    try:
        connected = threading.Event()
        client.on_connect = lambda *_: connected.set()
        network.add(client, broker.url)
        assert connected.wait(10)
        client.publish("leave/state", b"stopped", qos=1, retain=True)  # not waited for
        network.forget(client)
        client.disconnect()
    finally:
        network.close()
    assert client.socket() is None  # DISCONNECT sent, socket closed
    inbox = Inbox(clients(), "leave/state")
    inbox.wait_for({b"stopped"}, 10)
    assert inbox.payloads == [b"stopped"]
