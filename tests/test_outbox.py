"""The durable outbox and its MQTT publisher, against real SQLite files and a real Mosquitto."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import pytest

from edge_agent.outbox import Outbox, OutboxError, OutboxPublisher
from shared.messages import decode_event, encode_event

TOPIC = "edgefleet/v1/agents/a1/events"


def test_append_pending_ack_depth(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        seqs = [ob.append(TOPIC, f"e{i}".encode()) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        assert ob.depth() == 5
        items = ob.pending(3)
        assert [i.seq for i in items] == [1, 2, 3]
        assert items[0].topic == TOPIC and items[0].payload == b"e0"
        assert [i.seq for i in ob.pending(10, after_seq=3)] == [4, 5]
        assert ob.ack(2) is True
        assert ob.ack(2) is False  # idempotent
        assert [i.seq for i in ob.pending(10)] == [1, 3, 4, 5]
        assert ob.ack_many([1, 3, 99]) == 2
        assert ob.depth() == 2
        assert ob.pending_bytes() == 2 * (len(TOPIC) + 2)
        assert ob.dropped() == 0


def test_seq_survives_reopen_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        assert [ob.append(TOPIC, b"x") for _ in range(3)] == [1, 2, 3]
        ob.ack_many([1, 2, 3])  # empty again: the counter must not restart
    with Outbox(path) as ob:  # a restarted agent
        assert ob.depth() == 0
        assert ob.append(TOPIC, b"y") == 4
        ob.ack(4)
    with Outbox(path) as ob:
        assert ob.next_seq() == 5
        assert ob.append(TOPIC, b"z") == 5
        assert [i.payload for i in ob.pending()] == [b"z"]


def test_append_with_seq_builds_payload_and_failed_build_consumes_nothing(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as ob:
        assert ob.append_with_seq(TOPIC, lambda s: f"seq={s}".encode()) == 1

        def boom(_seq: int) -> bytes:
            raise RuntimeError("encoder failed")

        with pytest.raises(RuntimeError):
            ob.append_with_seq(TOPIC, boom)
        assert ob.append_with_seq(TOPIC, lambda s: f"seq={s}".encode()) == 2
        assert [i.payload for i in ob.pending()] == [b"seq=1", b"seq=2"]


def test_bounded_drop_oldest_counter_persists(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    item = len(TOPIC) + 100
    with Outbox(path, max_bytes=3 * item) as ob:
        for _ in range(3):
            ob.append(TOPIC, b"p" * 100)
        assert ob.dropped() == 0
        assert ob.append(TOPIC, b"p" * 100) == 4  # one too many: drops seq 1
        assert [i.seq for i in ob.pending()] == [2, 3, 4]
        ob.append(TOPIC, b"p" * 250)  # needs the room of two and a half: drops 2, 3, 4
        assert [i.seq for i in ob.pending()] == [5]
        assert ob.dropped() == 4
        assert ob.pending_bytes() <= ob.max_bytes
        with pytest.raises(OutboxError):
            ob.append(TOPIC, b"p" * (4 * item))  # larger than the whole bound
        assert [i.seq for i in ob.pending()] == [5]
    with Outbox(path, max_bytes=3 * item) as ob:
        assert ob.dropped() == 4
        assert ob.pending_bytes() == len(TOPIC) + 250
        assert ob.append(TOPIC, b"q") == 6


def test_a_full_disk_fails_appends_cleanly_and_the_outbox_recovers(tmp_path: Path) -> None:
    from helpers_delivery import SmallDisks

    disks = SmallDisks()
    disk = disks.mount(tmp_path / "disk", size="1m")
    try:
        with Outbox(disk / "o.sqlite") as ob:
            assert ob.append(TOPIC, b"before") == 1
            SmallDisks.fill(disk)
            for _ in range(3):  # every append fails, none half-done
                with pytest.raises(OutboxError, match="full"):
                    ob.append(TOPIC, b"x" * 5000)
            assert [i.seq for i in ob.pending()] == [1] and ob.next_seq() == 2
            SmallDisks.free(disk)
            assert ob.append(TOPIC, b"after") == 2  # no seq was consumed by the failures
            assert ob.ack(1) and [i.payload for i in ob.pending()] == [b"after"]
        with Outbox(disk / "o.sqlite") as ob:  # and what was stored is on disk
            assert [i.seq for i in ob.pending()] == [2] and ob.dropped() == 0
    finally:
        disks.close()


def test_concurrent_append_and_ack(tmp_path: Path) -> None:
    """The main thread appends while another (the MQTT network thread) acks what it sees."""
    n = 400
    with Outbox(tmp_path / "o.sqlite") as ob:
        done = threading.Event()
        acked: list[int] = []
        errors: list[BaseException] = []

        def acker() -> None:
            try:
                while True:
                    finished = done.is_set()  # read before draining: nothing is missed
                    items = ob.pending(50)
                    for it in items:
                        assert ob.ack(it.seq)
                        acked.append(it.seq)
                    if finished and not items:
                        return
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)

        t = threading.Thread(target=acker)
        t.start()
        seqs = [ob.append(TOPIC, str(i).encode()) for i in range(n)]
        done.set()
        t.join(30)
        assert not t.is_alive() and not errors
        assert seqs == list(range(1, n + 1))
        assert sorted(acked) == seqs  # each acked exactly once
        assert ob.depth() == 0 and ob.pending_bytes() == 0


# -- over a real broker -------------------------------------------------------------------------


class _Ev:
    """A Detection-shaped record for encode_event."""

    def __init__(self, i: int) -> None:
        self.timestamp = f"2024-01-01T00:00:{i:02d}Z"
        self.values = (float(i),)
        self.score = 1.0 + i
        self.anomaly_score = 0.9
        self.threshold = 0.5
        self.is_anomaly = True
        self.model_version = 3
        self.slot = "default"


def _hostport(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or 1883


def _connected_client(client_id: str, url: str, *, clean: bool) -> tuple[mqtt.Client, threading.Event]:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    host, port = _hostport(url)
    c.connect_async(host, port, keepalive=10)
    c.loop_start()
    return c, connected


@pytest.mark.slow
def test_events_appended_while_broker_down_are_all_delivered(tmp_path: Path, broker) -> None:
    total, first = 60, 10
    lock = threading.Lock()
    received: dict[int, dict] = {}
    copies = {"n": 0}
    first_in, all_in = threading.Event(), threading.Event()
    sub_ready = threading.Event()  # the subscriber is (re)connected and (re)subscribed

    # A subscriber with a persistent session (QoS 1, clean_session=False) that also
    # resubscribes on every connect.
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="subscriber", clean_session=False)
    sub.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
    sub.on_connect = lambda c, *_: c.subscribe(TOPIC, qos=1)
    sub.on_subscribe = lambda *_: sub_ready.set()
    sub.on_disconnect = lambda *_: sub_ready.clear()

    def on_message(client, userdata, msg) -> None:
        ev = decode_event(msg.payload)
        with lock:
            copies["n"] += 1
            received[ev["seq"]] = ev
            if len(received) >= first:
                first_in.set()
            if len(received) == total:
                all_in.set()

    sub.on_message = on_message
    host, port = _hostport(broker.url)
    sub.connect_async(host, port, keepalive=10)
    sub.loop_start()
    assert sub_ready.wait(10)

    # The agent's client, with paho's own reconnect. Its on_connect holds the network thread
    # until the subscriber is back: Mosquitto 2.0 may drop messages that reach a restored
    # persistent session before that client reconnects (eclipse-mosquitto/mosquitto#769),
    # which is the broker's business, not the outbox's.
    agent_up = threading.Event()
    agent = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="agent-a1")
    agent.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
    agent.on_connect = lambda *_: (agent_up.set(), sub_ready.wait(20))
    agent.connect_async(host, port, keepalive=10)
    agent.loop_start()
    assert agent_up.wait(10)

    outbox = Outbox(tmp_path / "outbox.sqlite")
    publisher = OutboxPublisher(outbox, agent, max_inflight=7)
    publisher.start()
    try:
        for i in range(first):  # while the broker is up
            outbox.append_with_seq(TOPIC, lambda seq, i=i: encode_event(_Ev(i), "a1", seq))
            publisher.wake()
        assert first_in.wait(20) and publisher.wait_idle(20)
        assert outbox.depth() == 0

        broker.stop()
        for i in range(first, total):  # while it is down: kept on disk
            outbox.append_with_seq(TOPIC, lambda seq, i=i: encode_event(_Ev(i), "a1", seq))
            publisher.wake()
        assert outbox.depth() == total - first  # nothing can have been acknowledged
        broker.start()

        assert all_in.wait(30), (
            f"received {len(received)} of {total}; missing "
            f"{sorted(set(range(1, total + 1)) - set(received))}; outbox depth {outbox.depth()}"
        )
        assert publisher.wait_idle(30)
        assert outbox.depth() == 0 and outbox.dropped() == 0
        assert sorted(received) == list(range(1, total + 1))  # none lost; duplicates merged by seq
        assert copies["n"] >= total
        assert [received[s]["values"] for s in range(1, total + 1)] == [[float(i)] for i in range(total)]
        assert all(ev["agent"] == "a1" and ev["schema"] == "edgefleet.event/1" for ev in received.values())
        assert publisher.acked == total
    finally:
        publisher.stop()
        for c in (agent, sub):
            c.disconnect()
            c.loop_stop()
        outbox.close()


def test_publisher_restores_callbacks_and_keeps_existing_ones(tmp_path: Path, broker) -> None:
    calls: list[str] = []
    agent, connected = _connected_client("agent-cb", broker.url, clean=True)
    assert connected.wait(10)
    mine = lambda *a: calls.append("publish")  # noqa: E731
    agent.on_publish = mine
    outbox = Outbox(tmp_path / "o.sqlite")
    pub = OutboxPublisher(outbox, agent)
    pub.start()
    try:
        outbox.append(TOPIC, json.dumps({"x": 1}).encode())
        pub.wake()
        assert pub.wait_idle(10)
        assert calls == ["publish"]  # the agent's own callback still ran
    finally:
        pub.stop()
        agent.disconnect()
        agent.loop_stop()
        outbox.close()
    assert agent.on_publish is mine


def test_event_codec_round_trip_keeps_unknown_fields() -> None:
    from shared.messages import MessageError

    data = encode_event(_Ev(3), "a1", 42)
    ev = decode_event(data)
    assert ev["seq"] == 42 and ev["agent"] == "a1" and ev["values"] == [3.0] and ev["is_anomaly"] is True
    ev["added_by_a_newer_agent"] = {"x": 1}
    assert decode_event(json.dumps(ev).encode())["added_by_a_newer_agent"] == {"x": 1}
    nan_ev = _Ev(1)
    nan_ev.score = float("nan")
    assert decode_event(encode_event(nan_ev, "a1", 1))["score"] is None
    for bad in (b"not json", b"[]", json.dumps({**ev, "schema": "edgefleet.event/2"}).encode(),
                json.dumps({**ev, "seq": True}).encode(), json.dumps({k: v for k, v in ev.items() if k != "agent"}).encode()):
        with pytest.raises(MessageError):
            decode_event(bad)



def test_drop_deletes_and_counts_persistently(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        a = ob.append(TOPIC, b'{"a": 1}')
        b = ob.append(TOPIC, b'{"b": 2}')
        assert ob.drop([a, 999]) == 1  # an unknown seq is no drop
        assert ob.ack_many([b]) == 1  # delivered: not a drop
        assert (ob.depth(), ob.dropped(), ob.pending_bytes()) == (0, 1, 0)
    with Outbox(path) as ob:
        assert ob.dropped() == 1
