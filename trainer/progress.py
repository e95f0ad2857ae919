"""A small progress bar for long CLI work, on stderr so ``--json`` stdout stays clean."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redraws one line in place on a terminal; prints a line every few seconds elsewhere."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False
        self._last = 0.0
        self._pending: str | None = None  # a line not yet printed (non-terminal output)
        self._start = time.monotonic()

    def update(self, done: int, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        width = 24
        filled = int(width * min(done, self.total) / self.total)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"{detail} ({now - self._start:.0f}s)"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._open = True
        elif now - self._last >= 2.0 or done == self.total or done == 1:
            self.stream.write(line + "\n")
            self._last = now
            self._pending = None
        else:
            self._pending = line
        self.stream.flush()

    def finish(self) -> None:
        if self._pending is not None:  # e.g. early stopping: show where it ended
            self.stream.write(self._pending + "\n")
            self._pending = None
        if self._open:
            self.stream.write("\n")
            self._open = False
            self.stream.flush()

    def note(self, text: str, *, always: bool = False) -> None:
        if self.enabled or always:
            self.finish()
            self.stream.write(text + "\n")
            self.stream.flush()
