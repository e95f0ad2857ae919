"""The agent's own resource use for its health reports: resident memory and CPU share.

Read from ``/proc/self/statm`` and :func:`os.times`, so that the agent does not load psutil
(about 2 MiB resident) just to report on itself; psutil is used only where ``/proc`` is
missing. (The ``host`` source, which reports on the whole machine, still uses psutil.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ProcessUsage"]

_STATM = Path("/proc/self/statm")


class ProcessUsage:
    """Resident memory and CPU share of this process.

    ``clock`` (monotonic seconds) is injectable for tests. Not thread safe: one caller (the
    health reporter).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._last = (clock(), _cpu_seconds())

    def rss_bytes(self) -> int:
        """Resident set size now (VmRSS), in bytes."""
        try:
            return int(_STATM.read_text().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            import psutil  # not Linux: the portable way

            return int(psutil.Process().memory_info().rss)

    def cpu_percent(self) -> float:
        """CPU time used since the previous call (or creation) over the wall time elapsed,
        in percent of one core (above 100 when several cores were busy)."""
        now, cpu = self._clock(), _cpu_seconds()
        (then, cpu_then), self._last = self._last, (now, cpu)
        elapsed = now - then
        return 0.0 if elapsed <= 0 else 100.0 * (cpu - cpu_then) / elapsed


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
