"""systemd integration: readiness (``Type=notify``), the watchdog and the stop notice.

The sd_notify protocol is one datagram per notice, ``KEY=VALUE`` lines, sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` is the abstract namespace).
It is written out here (:class:`Notifier`, a few lines of stdlib) rather than taken from the
python-systemd bindings, which build against the libsystemd headers and would put a C
toolchain and libsystemd-dev on every edge image for one datagram.

The watchdog (:class:`Watchdog`) is fed by the serving loop, not by a timer of its own: the
loop calls :meth:`Watchdog.beat` after each sample and each wait step, and a beat sends
``WATCHDOG=1`` once half of ``$WATCHDOG_USEC`` has passed since the last one. While the loop
is blocked waiting for the source (:meth:`Watchdog.waiting`) — an idle ``stdin``, a slow
``host`` period, a replay that has ended — it cannot beat, so a small thread pings for it,
and only then: a loop stuck in inference, in a lock or in the outbox stops the pings, and
systemd restarts the agent after ``WatchdogSec``. A source that produces nothing is not a
reason to restart (a restart cannot make it produce); ``/healthz`` reports it instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "Watchdog"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify notices to ``$NOTIFY_SOCKET``; does nothing when it is not set.

    Thread safe (one datagram per call). A notice that cannot be sent is logged once and
    dropped: systemd's notifications must never take the agent down.
    """

    def __init__(self, address: str | None) -> None:
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """The notifier for ``environ`` (``os.environ`` in ``main()``)."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (e.g. ``"READY=1"``); ``False`` if not sent (no socket, or an error)."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), self._address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %s: %s", self._address, e)
            return False
        return True


class Watchdog:
    """``WATCHDOG=1`` every ``interval`` seconds while the serving loop is alive (see the
    module docstring). ``interval`` is half of ``$WATCHDOG_USEC``; ``None`` (not under a
    watchdog) makes every method a no-op. Thread safe.
    """

    def __init__(self, notifier: Notifier, interval: float | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._waiting = threading.Event()  # the loop is blocked waiting for the source
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_environ(cls, notifier: Notifier, environ: Mapping[str, str]) -> Watchdog:
        """A watchdog for ``$WATCHDOG_USEC`` when ``$WATCHDOG_PID`` is unset or this process."""
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return cls(notifier, None)
        return cls(notifier, int(usec) / 2e6)

    @property
    def interval(self) -> float | None:
        return self._interval

    def start(self) -> None:
        """Start the thread that pings for a loop waiting on its source."""
        if self._interval is None or not self._notifier.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._while_waiting, name="watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """The serving loop made progress: ping if due. Cheap enough to call per sample."""
        self._waiting.clear()
        self._ping_if_due()

    def waiting(self) -> None:
        """The serving loop is about to block waiting for the source (or for the stop)."""
        self._ping_if_due()
        self._waiting.set()

    def stop(self) -> None:
        self._stop.set()
        self._waiting.set()

    def _ping_if_due(self) -> None:
        if self._interval is None:
            return
        now = self._clock()
        with self._lock:
            if now < self._next:
                return
            self._next = now + self._interval
        self._notifier.notify("WATCHDOG=1")

    def _while_waiting(self) -> None:
        assert self._interval is not None
        while not self._stop.is_set():
            self._waiting.wait()
            if self._stop.wait(self._interval / 2):
                return
            if self._waiting.is_set():
                self._ping_if_due()
