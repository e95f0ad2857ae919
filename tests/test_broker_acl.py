"""The ACL and password file that ``edgefleet broker acl`` / ``broker passwd`` write, enforced
by a real Mosquitto: an agent's credentials cannot publish to ``repo/`` nor to another agent's
topics, and the real agent process works under them (birth, Last Will, TUF fetch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.mqtt import RetainedReader, connect
from edge_agent.outbox import Outbox, OutboxPublisher
from shared.topics import Topics
from tests.conftest import REPO_ROOT
from tests.helpers_delivery import poll_until
from tests.helpers_security import SecureBroker, agent_config
from trainer.fleet.tuf_repository import TufRepository

AGENTS = ("agent-a", "agent-b")
TOPICS = Topics()
NOT_AUTHORIZED = 0x87


def _edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"edgefleet {' '.join(args)}: {proc.stderr}"
    return proc


@dataclass
class AclBroker:
    """A Mosquitto with the generated files; ``password(user)`` reads a generated password."""

    broker: SecureBroker
    credentials: dict[str, Path] = field(default_factory=dict)

    def password(self, user: str) -> str:
        return self.credentials[user].read_text().strip()


@pytest.fixture(params=["per-agent", "pattern"])
def acl_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AclBroker]:
    """A Mosquitto with the ACL file of ``broker acl`` (one block per agent, or ``--any-agent``
    patterns) and the password file of ``broker passwd``."""
    agents = [a for agent in AGENTS for a in ("--agent", agent)]
    who = ["--any-agent"] if request.param == "pattern" else agents
    acl = tmp_path / "acl"
    summary = json.loads(_edgefleet("broker", "acl", "--out", str(acl), *who, "--json").stdout)
    assert summary["mode"] == request.param and Path(summary["acl_file"]) == acl
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    made = json.loads(_edgefleet("broker", "passwd", "--out-dir", str(secrets), *agents, "--json").stdout)
    assert sorted(made["created"]) == sorted(["trainer", *AGENTS])
    b = SecureBroker(tmp_path / "broker", password_file=Path(made["password_file"]), acl_file=acl)
    b.start()
    try:
        yield AclBroker(b, {user: Path(path) for user, path in made["credentials"].items()})
    finally:
        b.stop()


class Recorder:
    """A paho client logged in as some user that records what it receives."""

    def __init__(self, acl: AclBroker, user: str, *, protocol: int = mqtt.MQTTv311) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self.subacks: dict[int, list[int]] = {}
        self.connected = threading.Event()
        self.changed = threading.Condition()
        self.client_id = f"{user}-test"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
        self.client.username_pw_set(user, acl.password(user))
        self.client.on_connect = lambda _c, _u, _f, reason, _p: not reason.is_failure and self.connected.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", acl.broker.port)
        self.client.loop_start()
        assert self.connected.wait(10), f"{user} could not connect:\n{acl.broker.log[-2000:]}"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.changed:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.changed.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: object, _p: object) -> None:
        with self.changed:
            self.acks[mid] = int(getattr(reason, "value", 0))
            self.changed.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, reasons: list[object], _p: object) -> None:
        with self.changed:
            self.subacks[mid] = [int(getattr(r, "value", 0)) for r in reasons]
            self.changed.notify_all()

    def wait(self, predicate: object, what: str, timeout: float = 10) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), f"timed out waiting for {what}"  # type: ignore[arg-type]

    def subscribe(self, *filters: str) -> list[int]:
        with self.changed:
            _rc, mid = self.client.subscribe([(f, 1) for f in filters])
        self.wait(lambda: mid in self.subacks, "SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code (0 under MQTT 3.1.1)."""
        with self.changed:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.wait(lambda: info.mid in self.acks, f"PUBACK for {topic}")
        return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_an_agent_cannot_publish_to_repo_or_to_another_agents_topics(acl_broker: AclBroker, protocol: int) -> None:
    trainer = Recorder(acl_broker, "trainer")
    agent = Recorder(acl_broker, "agent-a", protocol=protocol)
    try:
        assert trainer.subscribe(f"{TOPICS.root}/repo/#", f"{TOPICS.root}/agents/#") == [1, 1]
        forbidden = [
            TOPICS.repo_metadata("timestamp.json"),
            TOPICS.repo_index(),
            TOPICS.repo_target_index("deployments/groups/lab.json"),
            TOPICS.agent_events("agent-b"),
            TOPICS.agent_state("agent-b"),
            TOPICS.agent_deployments("agent-b"),
            TOPICS.agent_commands("agent-b"),
            TOPICS.agent_commands("agent-a"),  # commands come from the trainer only
        ]
        codes = {topic: agent.publish(topic, b'{"forged": true}', retain=True) for topic in forbidden}
        expected = NOT_AUTHORIZED if protocol == mqtt.MQTTv5 else 0  # 3.1.1: dropped silently
        assert codes == {topic: expected for topic in forbidden}
        # The broker handles one client's packets in order: once the allowed publish has reached
        # the trainer, any forbidden one that got through would have reached it before.
        allowed = TOPICS.agent_events("agent-a")
        assert agent.publish(allowed, b'{"seq": 1}') == 0
        trainer.wait(lambda: any(t == allowed for t, _, _ in trainer.messages), "agent-a's own event")
        assert [(t, p) for t, p, _ in trainer.messages] == [(allowed, b'{"seq": 1}')]
        # Nothing forged was kept as retained either.
        reader = connect(acl_broker.broker.url, client_id="trainer-reader", username="trainer",
                         password=acl_broker.password("trainer"), timeout=10)
        try:
            kept = RetainedReader(reader, TOPICS).read([f"{TOPICS.root}/repo/#", f"{TOPICS.root}/agents/#"])
        finally:
            reader.disconnect()
            reader.loop_stop()
        assert kept == {}
        # Reading: Mosquitto grants the subscription but delivers only what the ACL lets the
        # agent read, so another agent's commands never reach it; its own do.
        agent.subscribe(TOPICS.agent_commands("agent-b"), TOPICS.agent_commands("agent-a"))
        assert trainer.publish(TOPICS.agent_commands("agent-b"), b'{"for": "b"}') == 0
        assert trainer.publish(TOPICS.agent_commands("agent-a"), b'{"for": "a"}') == 0
        agent.wait(lambda: agent.messages, "agent-a's own command")
        assert [(t, p) for t, p, _ in agent.messages] == [(TOPICS.agent_commands("agent-a"), b'{"for": "a"}')]
    finally:
        agent.close()
        trainer.close()


def test_the_agent_process_works_under_the_generated_acl(acl_broker: AclBroker, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    root = Path(json.loads(_edgefleet("repo", "init", "--registry", str(registry), "--json").stdout)["root"])
    _edgefleet("repo", "publish", "--registry", str(registry), "--broker", acl_broker.broker.url,
               "--username", "trainer", "--password-file", str(acl_broker.credentials["trainer"]))
    trainer = Recorder(acl_broker, "trainer")
    agent_proc = None
    try:
        state = TOPICS.agent_state("agent-a")
        assert trainer.subscribe(state) == [1]
        cfg = agent_config(tmp_path / "agent-a", "agent-a", acl_broker.broker.url, root, username="agent-a",
                           password_file=str(acl_broker.credentials["agent-a"]))
        log = tmp_path / "agent-a.log"
        with open(log, "wb") as err:
            agent_proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)],
                                          cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=err)

        def statuses() -> list[str]:
            return [json.loads(p)["status"] for t, p, _ in trainer.messages if t == state and p]

        trainer.wait(lambda: "online" in statuses(), "agent-a's birth")
        # The TUF fetch (as agent-a.fetch, same user) read repo/: the trusted timestamp is on disk.
        poll_until(lambda: (tmp_path / "agent-a" / "state" / "metadata" / "timestamp.json").exists(), 60,
                   "agent-a's TUF refresh", lambda: log.read_text(errors="replace")[-3000:])
        # The Last Will goes to agent-a's own state topic, which the ACL lets it write (Mosquitto
        # checks a Will against the ACL only when it sends it, not at connect).
        os.kill(agent_proc.pid, signal.SIGKILL)
        agent_proc.wait(10)
        trainer.wait(lambda: "offline" in statuses(), "agent-a's Last Will")
        password = acl_broker.password("agent-a")
        assert password not in log.read_text(errors="replace")
    finally:
        if agent_proc is not None and agent_proc.poll() is None:
            agent_proc.kill()
            agent_proc.wait(10)
        trainer.close()


def test_passwd_keeps_existing_passwords_and_lists_exactly_the_users_given(tmp_path: Path) -> None:
    first = json.loads(_edgefleet("broker", "passwd", "--out-dir", str(tmp_path), "--agent", "agent-a",
                                  "--json").stdout)
    before = {u: Path(p).read_text() for u, p in first["credentials"].items()}
    assert all((Path(p).stat().st_mode & 0o777) == 0o600 for p in first["credentials"].values())
    assert (Path(first["password_file"]).stat().st_mode & 0o777) == 0o600
    names = tmp_path / "agents.txt"
    names.write_text("# the lab\nagent-a\nagent-c  # new\n\n")
    again = json.loads(_edgefleet("broker", "passwd", "--out-dir", str(tmp_path), "--agents-file", str(names),
                                  "--json").stdout)
    assert again["created"] == ["agent-c"] and sorted(again["kept"]) == ["agent-a", "trainer"]
    assert {u: Path(again["credentials"][u]).read_text() for u in before} == before
    hashed = Path(again["password_file"]).read_text().splitlines()
    assert [line.split(":", 1)[0] for line in hashed] == ["trainer", "agent-a", "agent-c"]
    assert not any(before[u].strip() in line for u in before for line in hashed)  # hashed, not plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agents.txt", "credentials", "passwd"]


def test_the_acl_names_only_the_rules_of_protocol_v1(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    _edgefleet("broker", "acl", "--out", str(acl), "--agent", "edge-1", "--topic-root", "plant/v1",
               "--trainer-user", "ops")
    rules = [line for line in acl.read_text().splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern readwrite plant/v1/probe/%c/#",
        "user ops",
        "topic readwrite plant/v1/repo/#",
        "topic write plant/v1/agents/+/commands",
        "topic read plant/v1/agents/#",
        "user edge-1",
        "topic write plant/v1/agents/edge-1/state",
        "topic write plant/v1/agents/edge-1/health",
        "topic write plant/v1/agents/edge-1/events",
        "topic write plant/v1/agents/edge-1/deployments",
        "topic read plant/v1/agents/edge-1/commands",
        "topic read plant/v1/repo/#",
    ]
    assert (acl.stat().st_mode & 0o777) == 0o644
    help_text = " ".join(_edgefleet("broker", "acl", "--help").stdout.split())
    assert "--any-agent" in help_text and "%u" in help_text


@pytest.mark.parametrize("mistake", ["another-user-name", "another-topic-root"])
def test_an_agent_the_acl_does_not_authorize_stops_with_one_line_and_exit_3(
        acl_broker: AclBroker, tmp_path: Path, mistake: str) -> None:
    """Mosquitto accepts the connection (and the Last Will) of a user whose rights do not cover
    the agent's topics; the agent's birth is then refused (PUBACK 0x87 under MQTT 5), and the
    agent stops instead of taking its refused events for delivered."""
    root = TufRepository.init(tmp_path / "tuf").root_json_path
    user, extra = ("agent-b", {}) if mistake == "another-user-name" else ("agent-a", {"topic_root": "plant/v1"})
    cfg = agent_config(tmp_path / "agent-a", "agent-a", acl_broker.broker.url, root, username=user,
                       password_file=str(acl_broker.credentials[user]), **extra)
    proc = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"does not authorize user {user!r}" in errors[0] and "/agents/agent-a/state" in errors[0]
    assert "Traceback" not in proc.stderr and acl_broker.password(user) not in proc.stderr


def test_an_event_the_acl_refuses_stays_in_the_outbox(acl_broker: AclBroker, tmp_path: Path) -> None:
    """Under MQTT 5 a refused event is not taken for delivered: it stays pending while the
    allowed one after it is delivered and deleted."""
    trainer = Recorder(acl_broker, "trainer")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    client = connect(acl_broker.broker.url, client_id="agent-a", username="agent-a",
                     password=acl_broker.password("agent-a"), timeout=10)
    publisher = OutboxPublisher(outbox, client)
    try:
        assert trainer.subscribe(f"{TOPICS.root}/agents/#") == [1]
        outbox.append(TOPICS.agent_events("agent-b"), b'{"seq": 1}')  # another agent's topic
        outbox.append(TOPICS.agent_events("agent-a"), b'{"seq": 2}')
        publisher.start()
        publisher.wake()
        trainer.wait(lambda: trainer.messages, "agent-a's own event")
        poll_until(lambda: publisher.refused == 1 and outbox.depth() == 1, 10, "the refusal",
                   lambda: f"refused={publisher.refused} depth={outbox.depth()}")
        assert [(i.seq, i.topic) for i in outbox.pending(10)] == [(1, TOPICS.agent_events("agent-b"))]
        assert [(t, p) for t, p, _ in trainer.messages] == [(TOPICS.agent_events("agent-a"), b'{"seq": 2}')]
    finally:
        publisher.stop()
        client.disconnect()
        client.loop_stop()
        outbox.close()
        trainer.close()


def test_an_agent_reads_neither_another_agents_reports_nor_its_probe_topics(acl_broker: AclBroker) -> None:
    trainer = Recorder(acl_broker, "trainer")
    spy = Recorder(acl_broker, "agent-a", protocol=mqtt.MQTTv5)
    other = Recorder(acl_broker, "agent-b", protocol=mqtt.MQTTv5)
    try:
        spy.subscribe(TOPICS.agent_events("agent-b"), TOPICS.agent_health("agent-b"),
                      TOPICS.agent_state("agent-b"), f"{TOPICS.root}/probe/#",
                      f"{TOPICS.root}/probe/{other.client_id}/#", TOPICS.agent_commands("agent-a"))
        assert other.subscribe(TOPICS.probe(other.client_id, "t")) == [1]
        for topic in (TOPICS.agent_events("agent-b"), TOPICS.agent_health("agent-b"), TOPICS.agent_state("agent-b")):
            assert other.publish(topic, b'{"from": "b"}') < 0x80
        assert other.publish(TOPICS.probe(other.client_id, "t"), b"marker") < 0x80
        other.wait(lambda: other.messages, "agent-b's own marker")
        # Another client's marker topic is not agent-b's to write.
        assert other.publish(TOPICS.probe(spy.client_id, "t"), b"junk") == NOT_AUTHORIZED
        # Mosquitto routes each publish before acknowledging it, and delivers to one client in
        # order: once the trainer's command has reached agent-a, anything routed to it earlier has.
        assert trainer.publish(TOPICS.agent_commands("agent-a"), b'{"for": "a"}') == 0
        spy.wait(lambda: spy.messages, "agent-a's own command")
        assert [t for t, _, _ in spy.messages] == [TOPICS.agent_commands("agent-a")]
    finally:
        other.close()
        spy.close()
        trainer.close()


def test_passwd_keeps_the_owner_and_mode_of_the_password_file_it_replaces(tmp_path: Path) -> None:
    made = json.loads(_edgefleet("broker", "passwd", "--out-dir", str(tmp_path), "--agent", "agent-a",
                                 "--json").stdout)
    passwd = Path(made["password_file"])
    passwd.chmod(0o640)  # as deployed: readable by Mosquitto's group
    if os.geteuid() == 0:
        os.chown(passwd, 4242, 4243)  # as deployed: `chown mosquitto`
    before = passwd.stat()
    _edgefleet("broker", "passwd", "--out-dir", str(tmp_path), "--agent", "agent-a", "--agent", "agent-b")
    after = passwd.stat()
    assert after.st_ino != before.st_ino  # replaced, not edited in place
    assert (after.st_mode & 0o7777, after.st_uid, after.st_gid) == (0o640, before.st_uid, before.st_gid)
    assert [line.split(":", 1)[0] for line in passwd.read_text().splitlines()] == ["trainer", "agent-a", "agent-b"]


def test_a_trainer_user_without_write_on_repo_gets_one_clear_publish_error(
        acl_broker: AclBroker, tmp_path: Path) -> None:
    """Under MQTT 5 the broker's PUBACK 0x87 fails the publish, naming the code and the topic,
    and nothing after the refused phase is published (never timestamp.json)."""
    from trainer.fleet.publisher import PublishError, publish_repository

    repo = TufRepository.init(tmp_path / "tuf")
    client = connect(acl_broker.broker.url, client_id="agent-a-publisher", username="agent-a",
                     password=acl_broker.password("agent-a"), timeout=10)
    try:
        with pytest.raises(PublishError, match=r"refused the publish to .*/repo/.*[Nn]ot authorized.*0x87"):
            publish_repository(repo, client, TOPICS, timeout=10, collect=False)
    finally:
        client.disconnect()
        client.loop_stop()
    reader = connect(acl_broker.broker.url, client_id="trainer-reader", username="trainer",
                     password=acl_broker.password("trainer"), timeout=10)
    try:
        kept = RetainedReader(reader, TOPICS).read([f"{TOPICS.root}/repo/#"])
    finally:
        reader.disconnect()
        reader.loop_stop()
    assert kept == {}


@pytest.mark.parametrize("limit", ["max_packet_size", "message_size_limit"])
def test_a_publish_over_the_brokers_size_limit_is_one_clear_error(tmp_path: Path, limit: str) -> None:
    """Mosquitto closes the connection over a too-large publish (``max_packet_size``) or
    answers PUBACK 0x95, which paho takes for a malformed packet and disconnects
    (``message_size_limit``): the trainer gets one PublishError saying so, at once."""
    from tests.conftest import Broker
    from tests.helpers_security import free_port
    from trainer.fleet.publisher import PublishError, publish_repository

    broker = Broker(port=free_port(), workdir=tmp_path / "mosquitto", extra_config=f"{limit} 512\n")
    broker.workdir.mkdir()
    broker.start()
    repo = TufRepository.init(tmp_path / "tuf")
    client = connect(broker.url, client_id="trainer-big", timeout=10)
    try:
        with pytest.raises(PublishError, match=r"connection to the broker was lost.*message size limit") as e:
            publish_repository(repo, client, TOPICS, chunk_size=64 * 1024, timeout=60, collect=False)
        assert "within" not in str(e.value)  # not a PUBACK timeout
    finally:
        client.disconnect()
        client.loop_stop()
        broker.stop()
