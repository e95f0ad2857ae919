"""One model runtime session per artifact, shared by every simulated agent of a process.

A real agent opens its own session for each model it activates. Five hundred simulated agents
activating the same artifact would hold five hundred copies of it in onnxruntime or LiteRT;
:class:`SharedRuntimes` opens a model once per distinct session (keyed by the sha256 of the
model bytes inside the verified bundle, a digest of its spec, which shapes the session's
windows and fallbacks, and the thread count: identical artifacts, identical key) and hands
every agent the same session. Runtimes are not safe for concurrent calls
(:class:`~edge_agent.runtime.ModelRuntime`), so each agent gets a :class:`SerializedRuntime`
view whose calls take the session's lock.
"""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np

from edge_agent.runtime import ModelRuntime, open_runtime
from shared.bundle import BundleSpec

__all__ = ["SerializedRuntime", "SharedRuntimes"]


class SerializedRuntime:
    """A view of a shared runtime session: calls are serialized by the session's lock;
    :meth:`close` does nothing (the session belongs to :class:`SharedRuntimes`)."""

    def __init__(self, runtime: ModelRuntime, lock: threading.Lock) -> None:
        self._runtime = runtime
        self._lock = lock
        self.name = runtime.name
        self.format = runtime.format
        self.batch_size = runtime.batch_size

    def score(self, windows: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._runtime.score(windows)

    def score_one(self, window: np.ndarray) -> float:
        with self._lock:
            return self._runtime.score_one(window)

    def close(self) -> None:
        """Nothing: other agents still use the session."""


def _session_key(spec: BundleSpec, model: bytes, threads: int) -> str:
    """What a session is built from: the format, the model bytes, the spec (window shape,
    fallback quantization …, canonical JSON) and the thread count."""
    spec_json = json.dumps(spec.to_json(), sort_keys=True, separators=(",", ":"), default=str)
    return ":".join((spec.format, hashlib.sha256(model).hexdigest(),
                     hashlib.sha256(spec_json.encode()).hexdigest(), str(threads)))


class SharedRuntimes:
    """Runtime sessions keyed by model, spec and thread count (:func:`_session_key`). Thread safe: agents activate concurrently, and
    the first one to ask for a model opens it while the others wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[ModelRuntime, threading.Lock]] = {}
        self._opening: dict[str, threading.Lock] = {}

    def open(self, spec: BundleSpec, model: bytes, *, threads: int) -> ModelRuntime:
        """The shared session of ``model`` (opened now if it is the first request).

        Raises:
            ModelRuntimeError: as :func:`~edge_agent.runtime.open_runtime` (nothing is kept;
                the next request tries again).
        """
        key = _session_key(spec, model, threads)
        with self._lock:
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:
            with self._lock:
                found = self._sessions.get(key)
            if found is None:
                runtime = open_runtime(spec, model, threads=threads)
                found = (runtime, threading.Lock())
                with self._lock:
                    self._sessions[key] = found
        return SerializedRuntime(*found)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        """Close every session (when no agent serves any more)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for runtime, lock in sessions:
            with lock:
                runtime.close()
