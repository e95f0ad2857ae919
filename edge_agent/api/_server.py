"""The local HTTP server: stdlib ``http.server`` on a loopback port or a Unix socket.

No web framework: the agent's memory budget is tens of megabytes and the API is four routes.
Every answer but ``/metrics`` is JSON, errors included (``{"error": "..."}``): a bad request
gets a 4xx with one line saying what is wrong, never a traceback.

Routes:

- ``GET /healthz`` — 200 ``{"status": "ok", ...}`` when at least one slot serves a model and
  the source delivered a sample within ``stale_after_seconds``; otherwise 503 with
  ``"reason"``.
- ``GET /metrics`` — Prometheus text exposition (:mod:`edge_agent.api._metrics`).
- ``GET /v1/slots/{slot}`` — the slot's model, window and feature order.
- ``POST /v1/slots/{slot}/predict`` — see :mod:`edge_agent.api._predict` for the contract.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edge_agent.activation import ActiveRecord
from edge_agent.api._base import AgentView
from edge_agent.api._metrics import AgentMetrics
from edge_agent.api._predict import PredictError, model_description, predict
from edge_agent.config import ApiConfig
from edge_agent.detector import Detector

__all__ = ["LocalApi", "health_check"]

log = logging.getLogger(__name__)

_SLOT = re.compile(r"^/v1/slots/([A-Za-z0-9._-]{1,64})(/predict)?$")
READ_TIMEOUT = 10.0  # seconds a client may take to send a whole request (line, headers, body)
DISCARD_MAX = 64 * 1024 * 1024  # bytes of a too-large body read and dropped before closing
CONCURRENT_PREDICTS = 2  # predicts scored at once; one more is answered 503
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also accepts "²", which int() refuses
_BUSY = b'{"error": "the local API is serving too many connections; retry later"}\n'


def health_check(agent: AgentView, stale_after: float) -> tuple[bool, dict[str, Any]]:
    """``(ok, body)`` of ``/healthz``: ok when a model serves and samples flow."""
    serving = agent.serving()
    age = agent.last_sample_age()
    body: dict[str, Any] = {
        "models": {slot: f"{r.model}@{r.version}" for slot, (_d, r) in sorted(serving.items())},
        "last_sample_age_s": None if age is None else round(age, 3),
    }
    if not serving:
        reason = "no model is active (waiting for a deployment)"
    elif age is None:
        reason = "no sample has come from the source yet"
    elif age > stale_after:
        reason = f"no sample from the source for {age:.0f} s (stale after {stale_after:g} s)"
    else:
        return True, {"status": "ok", **body}
    return False, {"status": "unavailable", "reason": reason, **body}


class _DeadlineReader(io.RawIOBase):
    """A connection's input that fails with :class:`TimeoutError` once the request's deadline
    has passed: the socket timeout alone bounds each ``recv``, and a client sending a byte
    now and then would hold its thread forever. (``http.server`` has no whole-request
    timeout, hence this small wrapper.)"""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self.deadline = time.monotonic() + timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not received in time")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout)  # sending the answer has its own timeout


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edgefleet-agent"
    protocol_version = "HTTP/1.1"  # keep-alive: every reply has a Content-Length
    sys_version = ""
    timeout = READ_TIMEOUT
    # One buffered write per answer (the base class flushes after each request): headers and
    # body in separate small sends wait on the client's delayed ACK (Nagle), 40 ms a request
    # on a kept-alive connection.
    wbufsize = 64 * 1024
    _reader: _DeadlineReader
    _body_read = False  # whether this request's body (if any) was read to its end

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._read_timeout = self.server.read_timeout
        self.connection.settimeout(self._read_timeout)
        self._reader = _DeadlineReader(self.connection, self._read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """One request, which must arrive whole within the read timeout."""
        self._reader.deadline = time.monotonic() + self._read_timeout
        self._body_read = False
        super().handle_one_request()

    def finish(self) -> None:
        """Flush the answer; when input was left unread, end our side first and drop what
        the client still sends (bounded): closing with unread input resets the connection,
        and the client could lose the answer."""
        if self._unread_body():
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self._reader.deadline = time.monotonic() + self._read_timeout
                left = DISCARD_MAX
                while left > 0 and (chunk := self.rfile.read1(65536)):
                    left -= len(chunk)
            except OSError:
                pass
        super().finish()

    def _unread_body(self) -> bool:
        """Whether the request announced a body that was not read to its end."""
        headers = getattr(self, "headers", None)
        if headers is None or self._body_read:
            return False
        length = headers.get("Content-Length", "0").strip()
        return bool(headers.get("Transfer-Encoding")) or length != "0"

    def address_string(self) -> str:  # a Unix socket's peer has no address
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the base class raises itself (bad request line, unknown method) as JSON too."""
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _json(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(body).encode() + b"\n", "application/json", headers)

    def _send(self, code: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        if self._unread_body():  # the body would be read as the next request
            self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:  # the rest of the request was not read: say so to a keep-alive client
            self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _guard(self, route: Any) -> None:
        try:
            route()
        except PredictError as e:
            self._json(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception:
            log.exception("local API: %s %s failed", self.command, self.path)
            self.close_connection = True  # where the request ended is not known
            self._json(500, {"error": "internal error (logged by the agent)"})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _not_allowed(self, allow: str) -> None:
        self._json(405, {"error": f"{self.command} is not allowed on {self.path}; use {allow}"},
                   {"Allow": allow})

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        api = self.server.api
        if path == "/healthz":
            ok, body = health_check(api.agent, api.config.stale_after_seconds)
            self._json(200 if ok else 503, body)
        elif path == "/metrics":
            data, content_type = api.metrics.exposition()
            self._send(200, data, content_type)
        elif (m := _SLOT.match(path)) is not None:
            if m.group(2):
                return self._not_allowed("POST")
            detector, record = api.slot(m.group(1))
            self._json(200, model_description(m.group(1), detector, record))
        else:
            raise PredictError(404, f"no such route {path}; see GET /healthz, GET /metrics, "
                                    "GET /v1/slots/SLOT, POST /v1/slots/SLOT/predict")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        m = _SLOT.match(path)
        if path in ("/healthz", "/metrics") or (m is not None and not m.group(2)):
            return self._not_allowed("GET")
        if m is None:
            raise PredictError(404, f"no such route {path}; predict is POST /v1/slots/SLOT/predict")
        api = self.server.api
        if not api.predicting.acquire(blocking=False):
            raise PredictError(503, f"{CONCURRENT_PREDICTS} predicts are being scored; retry later")
        try:
            body = self._body(api.config.max_body_bytes)
            detector, record = api.slot(m.group(1))
            result = predict(m.group(1), detector, record, body, max_windows=api.config.max_windows)
        finally:
            api.predicting.release()
        api.metrics.api_windows.inc(len(result["results"]))
        self._json(200, result)

    def _discard(self, length: int) -> None:
        """Read and drop up to :data:`DISCARD_MAX` bytes of a refused body, a chunk at a time
        (never held): closing a socket with unread input resets the connection, and the
        client would lose the 413 it is owed."""
        left = min(length, DISCARD_MAX)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:
            return

    def _body(self, limit: int) -> bytes:
        """The request body, refused (not kept) when it is too large or not JSON."""
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            self.close_connection = True
            raise PredictError(415, "the body must be JSON (Content-Type: application/json)")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise PredictError(411, "send the body with a Content-Length (no chunked encoding)")
        length = self.headers.get("Content-Length")
        if length is None or not _DIGITS.fullmatch(length):
            self.close_connection = True
            raise PredictError(411, "a Content-Length header is required")
        if int(length) > limit:
            self.close_connection = True
            self._discard(int(length))
            self._body_read = int(length) <= DISCARD_MAX
            raise PredictError(413, f"the body is {length} bytes; at most {limit} (api.max_body_bytes)")
        data = self.rfile.read(int(length))
        if len(data) != int(length):
            self.close_connection = True
            raise PredictError(400, "the body ended before Content-Length bytes")
        self._body_read = True
        return data


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``api.config.max_connections`` at once: one more is
    answered 503 and closed by the accepting thread."""

    daemon_threads = True
    api: LocalApi
    read_timeout = READ_TIMEOUT
    connections: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            try:
                request.settimeout(1.0)  # a new connection's send buffer is empty: never waits
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY), _BUSY))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class _UnixServer(_Server):
    """The same server on a Unix socket (``AF_UNIX``): no host name, no port."""

    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        path = Path(str(self.server_address))
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):  # left by a killed agent; anything else stays
                if _answers(path):
                    raise OSError(f"{path}: another process answers on this socket or may "
                                  "(is an agent already running?)")
                path.unlink()
        except FileNotFoundError:
            pass
        # Linux creates the socket file with the socket's own mode less the umask: never more
        # open than 0660, not even between bind and chmod (os.umask would be process-wide).
        os.fchmod(self.socket.fileno(), 0o660)
        # Not HTTPServer.server_bind, which resolves a host name and a port.
        self.socket.bind(str(path))
        os.chmod(path, 0o660)
        self.server_address = str(path)  # type: ignore[assignment]  # AF_UNIX: a path
        self.server_name, self.server_port = "localhost", 0


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):  # nobody listens: a stale file
            return False
        except OSError:  # not ours to connect to, or busy: never remove it
            return True
    return True


class LocalApi:
    """The agent's local HTTP API (see the module docstring), served by a thread of its own
    and one short-lived thread per connection."""

    def __init__(self, config: ApiConfig, agent: AgentView, metrics: AgentMetrics,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self.config = config
        self.agent = agent
        self.metrics = metrics
        self.read_timeout = read_timeout
        self.predicting = threading.BoundedSemaphore(CONCURRENT_PREDICTS)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return self.config.listen

    def slot(self, slot: str) -> tuple[Detector, ActiveRecord]:
        """The slot's ``(detector, record)``; raises :class:`PredictError` 404 if it serves none."""
        serving = self.agent.serving()
        if slot not in serving:
            names = ", ".join(sorted(serving)) or "none yet"
            raise PredictError(404, f"slot {slot!r} serves no model (serving: {names})")
        return serving[slot]

    def start(self) -> None:
        """Bind and serve in the background.

        Raises:
            OSError: the address cannot be bound (in use, no permission, no such directory).
        """
        path = self.config.unix_path
        server: _Server
        if path is not None:
            server = _UnixServer(str(path), _Handler)  # type: ignore[arg-type]  # AF_UNIX: a path
        else:
            host, port = self.config.host_port
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server_class = type("_Server6", (_Server,), {"address_family": family})
            server = server_class((host, port), _Handler)
        server.api = self
        server.read_timeout = self.read_timeout
        server.connections = threading.BoundedSemaphore(self.config.max_connections)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="local-api", daemon=True)
        self._thread.start()
        log.info("local API listening on %s", self.address)

    def close(self) -> None:
        """Stop serving and release the address (a Unix socket file is removed)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        path = self.config.unix_path
        if path is not None:
            try:
                path.unlink()
            except OSError:
                pass
