"""sd_notify over a real datagram socket: the notices, and a watchdog paced by the serving loop
(an injected clock decides when a beat is due)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.systemd import Notifier, Watchdog


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        yield sock, str(path)


def test_notices_reach_the_socket_and_nothing_is_sent_without_one(listener) -> None:
    sock, path = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled and notifier.notify("READY=1")
    assert sock.recv(100) == b"READY=1"
    off = Notifier.from_environ({})
    assert not off.enabled and not off.notify("READY=1")
    gone = Notifier(path + ".missing")
    assert not gone.notify("READY=1")  # logged, never raised


def test_beats_ping_once_per_interval_of_the_injected_clock(listener) -> None:
    sock, path = listener
    now = [100.0]
    dog = Watchdog(Notifier(path), 5.0, clock=lambda: now[0])
    dog.beat()
    assert sock.recv(100) == b"WATCHDOG=1"
    sock.setblocking(False)
    for t in (101.0, 104.9):  # not due yet
        now[0] = t
        dog.beat()
        with pytest.raises(BlockingIOError):
            sock.recv(100)
    sock.setblocking(True)
    now[0] = 105.0
    dog.beat()
    assert sock.recv(100) == b"WATCHDOG=1"


def test_a_loop_waiting_on_its_source_is_pinged_for(listener) -> None:
    sock, path = listener
    now = [0.0]
    dog = Watchdog(Notifier(path), 0.05, clock=lambda: now[0])
    dog.start()
    try:
        dog.waiting()  # due at once: the loop's own ping
        assert sock.recv(100) == b"WATCHDOG=1"
        now[0] = 1.0
        assert sock.recv(100) == b"WATCHDOG=1"  # sent by the watchdog thread
    finally:
        dog.stop()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(environ: dict[str, str], interval: float | None) -> None:
    assert Watchdog.from_environ(Notifier(None), environ).interval == interval
