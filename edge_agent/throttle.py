"""A warning that repeats for every occurrence of a failure but is logged at most once a period.

The agent meets failures that can recur for every sample (an event that cannot be stored on a
full disk): one line per occurrence would flood the journal, and none would hide the loss.
:class:`ThrottledLog` counts every occurrence, logs the first at once and then at most one
line per ``period`` saying how many happened since the previous line, and logs once more when
the failure is over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """Counts occurrences of one failure and logs them at most once per ``period`` seconds.

    Thread safe. ``clock`` is injectable for tests (defaults to ``time.monotonic``).
    """

    def __init__(
        self,
        logger: logging.Logger,
        period: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if period <= 0:
            raise ValueError("period must be positive")
        self._logger = logger
        self.period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None  # when the last line was logged; None: not failing
        self._held = 0  # occurrences since the last line
        self._episode = 0  # occurrences since the failure began
        self.total = 0  # occurrences since creation

    def warning(self, message: str, *args: object) -> bool:
        """Count one occurrence; log ``message % args`` if the period has passed. Returns
        whether a line was logged."""
        with self._lock:
            self.total += 1
            self._held += 1
            self._episode += 1
            now = self._clock()
            if self._last is not None and now - self._last < self.period:
                return False
            held, self._held, self._last = self._held, 0, now
        self._logger.warning("%s [%d time(s) since the last report]", message % args, held)
        return True

    def resolved(self, message: str) -> None:
        """The failure is over: log ``message`` with the count of this episode, once."""
        if self._last is None:  # unlocked fast path: the common case, called on every success
            return
        with self._lock:
            if self._last is None:
                return
            episode, self._episode, self._held, self._last = self._episode, 0, 0, None
        self._logger.info("%s [%d time(s) in all before that]", message, episode)
