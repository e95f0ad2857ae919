"""The local API's connection handling on real sockets (the real server, in this process):

1. a request body the server did not read is never parsed as a next request: one answer,
   then the connection closes (no request smuggling over keep-alive);
2. one connection over ``api.max_connections`` gets 503 and is closed;
3. a client dribbling its request a byte at a time is cut off by the whole-request deadline;
4. a ``Content-Length`` of non-ASCII digits is a 411, not a 500;
5. a Unix socket path another live server answers on is refused, and the socket is 0660.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.activation import ActiveRecord
from edge_agent.api import AgentMetrics, LocalApi
from edge_agent.config import ApiConfig
from edge_agent.detector import Detector
from shared.messages import AgentHealth, DeploymentStatus


class _IdleAgent:
    """An agent that serves no model yet (the API's view of it)."""

    def health(self, *, cpu_share: bool = True) -> AgentHealth:
        return AgentHealth(agent="a1", ts="2026-01-01T00:00:00Z", inferences=0, anomalies=0, errors=0,
                           latency_ms={"p50": None, "p99": None}, outbox_depth=0, outbox_dropped=0,
                           rss_mb=None, cpu_percent=None)

    def serving(self) -> dict[str, tuple[Detector, ActiveRecord]]:
        return {}

    def deployments(self) -> list[DeploymentStatus]:
        return []

    def last_sample_age(self) -> float | None:
        return None


def _serve(config: ApiConfig, read_timeout: float = 10.0) -> LocalApi:
    agent = _IdleAgent()
    api = LocalApi(config, agent, AgentMetrics(agent), read_timeout=read_timeout)
    api.start()
    return api


@pytest.fixture
def tcp_api() -> Iterator[tuple[LocalApi, tuple[str, int]]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = _serve(ApiConfig(enabled=True, listen=f"127.0.0.1:{port}", max_connections=3), read_timeout=1.0)
    try:
        yield api, ("127.0.0.1", port)
    finally:
        api.close()


def _read_all(sock: socket.socket, limit: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (waits at most ``limit``)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _statuses(data: bytes) -> list[int]:
    """The status of each answer (every body ends with a newline: a status line starts a line)."""
    return [int(code) for code in re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", data)]


SMUGGLED = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("head", [
    b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",  # 405
    b"POST /metrics HTTP/1.1\r\nHost: x\r\n",  # 405
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\n",  # 404
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # a GET with a body
    b"POST /v1/slots/main/predict HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n",  # 415
])
def test_an_unread_body_is_never_the_next_request(tcp_api, head: bytes) -> None:
    _api, address = tcp_api
    with socket.create_connection(address) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED)
        data = _read_all(sock)
    assert len(_statuses(data)) == 1, data
    assert b"Connection: close" in data and b"edgefleet_agent" not in data


def test_a_chunked_body_closes_the_connection(tcp_api) -> None:
    _api, address = tcp_api
    with socket.create_connection(address) as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED))
        data = _read_all(sock)
    assert _statuses(data) == [405], data


def test_keep_alive_still_serves_requests_without_bodies(tcp_api) -> None:
    _api, address = tcp_api
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET /nowhere HTTP/1.1\r\n"
                     b"Host: x\r\nConnection: close\r\n\r\n")
        data = _read_all(sock)
    assert _statuses(data) == [503, 503, 404], data


def test_one_connection_too_many_gets_503_and_is_closed(tcp_api) -> None:
    api, address = tcp_api
    idle = [socket.create_connection(address) for _ in range(api.config.max_connections)]
    try:
        with socket.create_connection(address) as extra:
            data = _read_all(extra)
        assert _statuses(data) == [503], data
        assert "too many connections" in json.loads(data.partition(b"\r\n\r\n")[2])["error"]
    finally:
        for s in idle:
            s.close()
    # the slots are free again once those connections are gone
    deadline = time.monotonic() + 30
    while True:
        with socket.create_connection(address) as sock:
            sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = _statuses(_read_all(sock))
        if got == [404] or time.monotonic() > deadline:
            break
    assert got == [404]


def test_a_dribbling_client_is_cut_off_by_the_request_deadline(tcp_api) -> None:
    _api, address = tcp_api  # read timeout 1 s: each byte comes well within it, the request never does
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.settimeout(0.2)
        closed = False
        for _ in range(600):  # at most ~120 s, each step waits for the server to close
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                try:
                    sock.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            except ConnectionResetError:
                closed = True
                break
        assert closed


@pytest.mark.parametrize("length", ["\u00b2", "1\u0663", "-1", " "])
def test_a_content_length_that_is_not_ascii_digits_is_411(tcp_api, length: str) -> None:
    _api, address = tcp_api
    with socket.create_connection(address) as sock:
        sock.sendall(b"POST /v1/slots/main/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {length}\r\n\r\n".encode() + b"{}")
        data = _read_all(sock)
    assert _statuses(data) == [411], data


def test_a_live_unix_socket_is_never_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    config = ApiConfig(enabled=True, listen=f"unix:{path}")
    first = _serve(config)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        second = LocalApi(replace(config), _IdleAgent(), AgentMetrics(_IdleAgent()))
        with pytest.raises(OSError, match="another process answers on this socket"):
            second.start()
        with socket.socket(socket.AF_UNIX) as sock:  # the first still answers on its socket
            sock.connect(str(path))
            sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _statuses(_read_all(sock)) == [404]
    finally:
        first.close()
    # a socket file nobody answers on (a killed agent's) is replaced
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    third = _serve(config)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _statuses(_read_all(sock)) == [404]
    finally:
        third.close()
