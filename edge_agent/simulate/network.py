"""One thread driving the MQTT connections of every simulated agent: :class:`NetworkLoop`.

A real agent runs paho's network thread (``loop_start``), which waits on its socket with
``select()``. ``select()`` cannot watch a file descriptor numbered 1024 or above, and five
hundred agents in one process hold several thousand (MQTT sockets, outbox databases): paho's
thread then loses its connection at every attempt. So the simulated agents' clients are
driven by paho's external-loop interface instead (``on_socket_open`` /
``on_socket_register_write`` … with ``loop_read`` / ``loop_write`` / ``loop_misc``) from a
single thread waiting on ``epoll``, which has no such limit. It also saves a thread per
connection. Its sockets disable Nagle's algorithm (``TCP_NODELAY``), see ``_on_socket_open``.

paho only reconnects inside its own loop; here :class:`NetworkLoop` reconnects a client that
lost its connection, after a jittered backoff, until :meth:`NetworkLoop.forget` is called for
it (before a clean ``disconnect()``). paho's ``reconnect()`` blocks (TCP connect, TLS
handshake), so connects run on a small thread pool, never on the loop thread: a broker restart
under hundreds of agents does not stall the traffic of those already connected.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from edge_agent.daemon import Backoff
from edge_agent.mqtt import (
    BrokerAuthError,
    BrokerError,
    BrokerSettings,
    new_client,
    parse_broker_url,
)

__all__ = ["NetworkLoop"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_MISC_PERIOD = 1.0  # seconds between loop_misc() calls (keepalive pings, timeouts)
_CONNECT_WORKERS = 4  # connects (TCP + TLS handshake, blocking) running at once
_AUTH_FAILURES = {134, 135}


@dataclass
class _Managed:
    client: mqtt.Client
    host: str
    port: int
    keepalive: int
    reconnect: bool = True
    retry_at: float | None = 0.0  # when to (re)connect; None while connected or connecting
    connecting: bool = False  # a connect attempt is running on the connect pool
    fd: int | None = None  # the socket registered with epoll
    watch_write: bool = False  # whether epoll watches ``fd`` for writing (see _sync_write)
    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=30.0))


class NetworkLoop:
    """Drives many paho clients from one thread (epoll). Thread safe: clients are added and
    used (publish, subscribe, disconnect) from any thread.

    Start with :meth:`start`, end with :meth:`close` (after the clients disconnected).
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._socket_closed = threading.Condition(self._lock)  # notified when a socket closes
        self._by_fd: dict[int, _Managed] = {}
        self._managed: dict[int, _Managed] = {}  # id(client) -> state
        self._stop = threading.Event()
        self._calls: list[Callable[[], None]] = []  # to run on the loop thread (_on_loop)
        self._wake_r, self._wake_w = _pipe()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="mqtt network loop", daemon=True)
        self._connects = ThreadPoolExecutor(_CONNECT_WORKERS, thread_name_prefix="mqtt connect")

    def start(self) -> None:
        self._thread.start()

    # -- clients -------------------------------------------------------------------------------

    def add(self, client: mqtt.Client, url: str, *, keepalive: int = 30) -> None:
        """Connect ``client`` in the background and keep it connected (like
        :func:`edge_agent.mqtt.connect_in_background`).

        Raises:
            BrokerError: bad URL.
        """
        _scheme, host, port = parse_broker_url(url)
        client.suppress_exceptions = True
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        # Every connect starts a clean session, as edge_agent.mqtt does: paho's default
        # starts clean on the first connect only, and a reconnect would resume a session.
        client.connect_async(host, port, keepalive, clean_start=True)
        with self._lock:
            self._managed[id(client)] = _Managed(client, host, port, keepalive)
        self._wake()

    def forget(self, client: mqtt.Client) -> None:
        """Stop reconnecting ``client``; its I/O is still driven until its socket closes (call
        this before ``disconnect()``)."""
        with self._lock:
            managed = self._managed.get(id(client))
            if managed is not None:
                managed.reconnect = False
                managed.retry_at = None
                if client.socket() is None:  # no socket to close: nothing more to drive
                    del self._managed[id(client)]

    def connect(self, settings: BrokerSettings, client_id: str, timeout: float) -> mqtt.Client:
        """A connected client driven by this loop (like :func:`edge_agent.mqtt.connect`); it
        is not reconnected: :meth:`forget` and ``disconnect()`` it when done.

        Raises:
            BrokerAuthError: bad credentials.
            BrokerError: no CONNACK within ``timeout``, or the broker refused.
        """
        client = new_client(settings.url, client_id=client_id, username=settings.username,
                            password=settings.password, ca_file=settings.ca_file,
                            cert_file=settings.cert_file, key_file=settings.key_file)
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
            outcome.setdefault("reason", reason)
            done.set()

        client.on_connect = on_connect
        self.add(client, settings.url)
        if not done.wait(timeout):
            self._drop(client)
            raise BrokerError(f"no CONNACK from {settings.url} within {timeout:g} s")
        reason = outcome["reason"]
        if getattr(reason, "is_failure", False):
            self._drop(client)
            if getattr(reason, "value", None) in _AUTH_FAILURES:
                raise BrokerAuthError(f"broker {settings.url} refused the credentials: {reason}")
            raise BrokerError(f"broker {settings.url} refused the connection: {reason}")
        self.forget(client)  # a pass's connection: not reconnected
        return client

    def _drop(self, client: mqtt.Client) -> None:
        self.forget(client)
        client.disconnect()

    # -- paho's socket callbacks (any thread) --------------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, _u: object, sock: Any) -> None:
        fd = sock.fileno()
        # Neither paho nor Mosquitto's default disable Nagle's algorithm: a small packet (the
        # retained-read marker, a SUBSCRIBE) then waits for the delayed ACK of the previous
        # one, ~90 ms per retained read on loopback; a reconcile pass makes a dozen of them.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not a TCP socket (a proxy or a test double): only latency is lost
        with self._lock:
            managed = self._managed.get(id(client))
            if managed is not None:
                try:
                    self._epoll.register(fd, select.EPOLLIN)
                except (OSError, ValueError):  # the loop is closed
                    managed = None
                else:
                    self._by_fd[fd] = managed
                    managed.fd = fd
                    managed.watch_write = False
        if managed is None:
            # Forgotten while this connect ran (or the loop closed): nothing would drive or
            # close the socket. paho queues its CONNECT for it, which nothing sends.
            sock.close()

    def _on_socket_close(self, client: mqtt.Client, _u: object, sock: Any) -> None:
        fd = sock.fileno()
        with self._lock:
            self._by_fd.pop(fd, None)
            managed = self._managed.get(id(client))
            if managed is not None:
                managed.fd = None
                managed.watch_write = False
                if managed.connecting:
                    pass  # reconnect() closes the old socket first; _reconnect decides
                elif managed.reconnect:
                    managed.retry_at = time.monotonic() + managed.backoff.next()
                else:
                    del self._managed[id(client)]
            self._socket_closed.notify_all()
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def _on_register_write(self, client: mqtt.Client, _u: object, _sock: Any) -> None:
        """A hint: a packet was queued (from any thread). Whether to watch for writing is
        decided from the queue itself (:meth:`_sync_write`), not from paho's bookkeeping."""
        with self._lock:
            managed = self._managed.get(id(client))
            if managed is not None:
                self._sync_write(managed)

    def _on_unregister_write(self, _client: mqtt.Client, _u: object, _sock: Any) -> None:
        """Ignored: paho calls it when its queue looked empty, which a packet queued by another
        thread at that moment makes untrue; the loop decides after each write
        (:meth:`_sync_write`)."""

    def _sync_write(self, managed: _Managed) -> None:
        """Watch ``managed``'s socket for writing iff its client has something to write.

        paho's own register/unregister-write callbacks track a flag that a packet queued by
        another thread while ``loop_write`` ends can leave wrong: the write interest then
        stays off with a packet waiting, or on with nothing to write (the writable socket
        wakes the loop on every poll). So the queue decides, checked again after every
        change (a packet queued meanwhile is seen). Called with ``self._lock`` held.
        """
        client = managed.client
        while managed.fd is not None:
            want = client.want_write()
            if want == managed.watch_write:
                return
            try:
                self._epoll.modify(managed.fd, select.EPOLLIN | (select.EPOLLOUT if want else 0))
            except (OSError, ValueError):
                return  # closed meanwhile: the socket's close forgets it
            managed.watch_write = want

    def write_interest(self) -> dict[str, tuple[bool, bool]]:
        """For each client with an open socket: ``(watched for writing, has data to
        write)``, checked on the loop thread between two polls. Once traffic has settled the
        two agree for every client (the loop never spins on a writable socket)."""
        def check() -> dict[str, tuple[bool, bool]]:
            with self._lock:
                return {m.client._client_id.decode(): (m.watch_write, m.client.want_write())
                        for m in self._managed.values() if m.fd is not None}

        return self._on_loop(check).result(10)

    def _on_loop(self, call: Callable[[], T]) -> Future[T]:
        """Run ``call`` on the loop thread, between two polls."""
        future: Future[T] = Future()
        with self._lock:
            self._calls.append(lambda: _settle(future, call))
        self._wake()
        return future

    # -- the thread ----------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            import os

            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        import os

        next_misc = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [m for m in self._managed.values()
                       if m.retry_at is not None and m.retry_at <= now and not m.connecting]
                for m in due:
                    m.retry_at = None
                    m.connecting = True
                pending = [m.retry_at for m in self._managed.values() if m.retry_at is not None]
                calls, self._calls = self._calls, []
            for call in calls:
                call()
            for m in due:
                try:
                    self._connects.submit(self._reconnect, m)
                except RuntimeError:  # closing: the pool takes no more work
                    return
            timeout = max(0.0, min([next_misc - time.monotonic(), *(t - time.monotonic() for t in pending)]))
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                with self._lock:
                    managed = self._by_fd.get(fd)
                if managed is None:
                    continue
                client = managed.client
                try:
                    if mask & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                        client.loop_read()
                        sock = client.socket()
                        while sock is not None and getattr(sock, "pending", lambda: 0)():  # TLS
                            client.loop_read()
                            sock = client.socket()
                    if mask & select.EPOLLOUT and client.socket() is not None:
                        client.loop_write()
                except Exception:
                    log.exception("MQTT client %s: network loop error", client._client_id)
                with self._lock:
                    self._sync_write(managed)
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + _MISC_PERIOD
                self._housekeeping()

    def _housekeeping(self) -> None:
        """Keepalive pings and timeouts of every client, once a second. One client's error is
        logged and the others carry on."""
        with self._lock:
            clients = list(self._managed.values())
        for m in clients:
            try:
                if m.client.socket() is not None:
                    m.client.loop_misc()  # may queue a PINGREQ
                    if m.client.is_connected():
                        m.backoff.reset()
                with self._lock:
                    self._sync_write(m)
            except Exception:
                log.exception("MQTT client %s: keepalive error", m.client._client_id)

    def _flushed(self) -> bool:
        """No forgotten client has a socket any more (called with ``self._lock`` held)."""
        return not any(not m.reconnect and m.fd is not None for m in self._managed.values())

    def _reconnect(self, managed: _Managed) -> None:
        """One connect attempt (on the connect pool); schedules the next one if it failed.
        Never raises: an error is logged and retried after the backoff."""
        client = managed.client
        rc = MQTTErrorCode.MQTT_ERR_NO_CONN
        try:
            rc = client.reconnect()
        except OSError as e:
            log.debug("connect to %s:%d failed: %s", managed.host, managed.port, e)
            on_fail = client.on_connect_fail
            if on_fail is not None:
                try:
                    on_fail(client, None)
                except Exception:
                    log.exception("on_connect_fail failed")
        except Exception:
            log.exception("MQTT client %s: connect to %s:%d failed", client._client_id, managed.host,
                          managed.port)
        with self._lock:
            managed.connecting = False
            # Retry unless connecting (a socket is open and driven): a socket already closed
            # again (the broker hung up during the attempt) is retried too.
            if managed.reconnect and (rc != MQTTErrorCode.MQTT_ERR_SUCCESS or managed.fd is None):
                managed.retry_at = time.monotonic() + managed.backoff.next()
            else:
                managed.retry_at = None
                if not managed.reconnect and managed.fd is None:  # forgotten, nothing to drive
                    self._managed.pop(id(client), None)
        self._wake()  # the loop's poll timeout takes the new retry time into account

    def close(self, timeout: float = 10.0, *, flush: float = 5.0) -> None:
        """Stop the thread, after waiting up to ``flush`` seconds for the clients that were
        forgotten (disconnecting) to send what they queued, their ``DISCONNECT`` last, and
        close their socket: the process ending first would drop their connections, and the
        broker would publish their Last Will over the ``stopped`` state they had just
        announced. Clients still connected are left as they are."""
        import os

        with self._socket_closed:
            if not self._socket_closed.wait_for(self._flushed, flush):
                left = sorted(m.client._client_id.decode() for m in self._managed.values()
                              if not m.reconnect and m.fd is not None)
                log.warning("%d MQTT client(s) still disconnecting after %g s: %s", len(left), flush,
                            ", ".join(left[:5]))
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._connects.shutdown(wait=True, cancel_futures=True)  # a connect ends within its timeout
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


def _settle(future: Future[T], call: Callable[[], T]) -> None:
    try:
        future.set_result(call())
    except Exception as e:  # handed to the caller
        future.set_exception(e)


def _pipe() -> tuple[int, int]:
    import os

    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w
