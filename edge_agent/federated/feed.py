"""Feeds the window store from the serving loop without slowing it down.

:meth:`WindowFeed.offer` runs on the agent's hot path for every detection: it counts, and only
every ``sample_every``-th window scored as normal is copied (one small array). Copies are
batched and written by a background thread in one transaction per batch; when that thread
falls behind, whole batches are dropped and counted rather than queued without bound.
Anomalous windows are never kept: the model trains on what it considers normal.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import numpy as np

from edge_agent.detector import Detection, Detector
from edge_agent.federated._errors import FederatedStateError
from edge_agent.federated.store import WindowStore

__all__ = ["WindowFeed"]

log = logging.getLogger(__name__)

_STOP = None


class WindowFeed:
    """Samples normal windows into a :class:`WindowStore` in batches (see the module docstring).

    ``offer`` is called from one thread (the serving loop); :meth:`flush` and :meth:`close`
    from any. The store is opened by the writer thread at its first batch. The pending batches
    and the ``dropped``/``stored`` counters are guarded by one lock (taken on the hot path only
    for a window that is kept).
    """

    def __init__(self, path: Path, max_windows: int, *, sample_every: int = 10, batch: int = 32,
                 max_pending_batches: int = 4) -> None:
        if sample_every < 1 or batch < 1:
            raise ValueError("sample_every and batch must be at least 1")
        self.path = Path(path)
        self.max_windows = max_windows
        self.sample_every = sample_every
        self.batch = batch
        self._seen: dict[str, int] = {}  # slot → normal windows seen
        self._pending: dict[tuple[str, tuple[int, int]], list[np.ndarray]] = {}
        self._queue: queue.Queue[tuple[str, np.ndarray] | None] = queue.Queue(max_pending_batches)
        self._lock = threading.Lock()  # _pending, _dropped, _stored
        self._dropped = 0  # windows dropped because the writer fell behind or failed
        self._stored = 0
        self._store: WindowStore | None = None
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._write_loop, name="window-feed", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Windows dropped because the writer fell behind or failed."""
        with self._lock:
            return self._dropped

    @property
    def stored(self) -> int:
        """Windows written to the store."""
        with self._lock:
            return self._stored

    def offer(self, detector: Detector, detection: Detection) -> None:
        """Consider the window ``detection`` scored (call right after ``detector.push``)."""
        if detection.is_anomaly:
            return
        n = self._seen.get(detection.slot, 0) + 1
        self._seen[detection.slot] = n
        if n % self.sample_every:
            return
        window = detector.last_window()
        model = f"{detector.spec.name}@{detection.model_version}"
        key = (model, (window.shape[0], window.shape[1]))
        with self._lock:
            pending = self._pending.setdefault(key, [])
            pending.append(window)
            if len(pending) >= self.batch:
                self._hand_over(key)

    def _hand_over(self, key: tuple[str, tuple[int, int]]) -> None:
        """Queue the pending windows of ``key`` for the writer (called with the lock held)."""
        windows = self._pending.pop(key, [])
        if not windows:
            return
        try:
            self._queue.put_nowait((key[0], np.stack(windows)))
        except queue.Full:
            self._dropped += len(windows)

    def flush(self, timeout: float = 10.0) -> bool:
        """Hand over partial batches and wait until the writer stored them; ``False`` on timeout."""
        with self._lock:
            for key in list(self._pending):
                self._hand_over(key)
        with self._idle:
            return self._idle.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)

    def close(self) -> None:
        """Flush, stop the writer and close the store."""
        self.flush()
        self._queue.put(_STOP)
        self._thread.join(10.0)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    if self._store is not None:
                        self._store.close()
                    return
                model, windows = item
                try:
                    if self._store is None:
                        self._store = WindowStore(self.path, self.max_windows)
                    self._store.add(windows, model)
                    with self._lock:
                        self._stored += len(windows)
                except (FederatedStateError, OSError) as e:
                    with self._lock:
                        self._dropped += len(windows)
                    log.warning("window store %s: %d windows not stored (%s)", self.path, len(windows), e)
            finally:
                self._queue.task_done()
                with self._idle:
                    self._idle.notify_all()
