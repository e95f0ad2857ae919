"""The child process of :class:`~edge_agent.trust.isolated.IsolatedRepository`.

Run as ``python -m edge_agent.trust._worker``. It reads one JSON line of settings from stdin,
then answers requests, one JSON line each, until stdin closes:

- ``{"op": "check"}``: the trust anchor loads (:func:`check_trust_anchor`); no broker needed;
- ``{"op": "refresh"}``: :meth:`TrustedRepository.refresh`;
- ``{"op": "list", "prefix": P}``: :meth:`TrustedRepository.list_targets`, replied as
  ``{"ok": true, "paths": […]}``;
- ``{"op": "fetch", "path": P}``: :meth:`TrustedRepository.fetch_target`; the verified target
  stays in ``targets_dir`` under its sha256 and the reply names that file, its length and
  sha256.

Replies are ``{"ok": true, …}``, ``{"ok": false, "kind": K, "message": M}`` (a
:class:`TrustError`, plus ``"not_found": P`` for a target the trusted metadata does not list)
or ``{"ok": false, "oserror": [errno, strerror, filename]}`` (the state directory cannot be
written, e.g. a full disk). Log records go to stdout
too, as ``{"log": [level, logger, message]}`` lines before the reply, so that the agent logs
them in its own format. The broker connection is opened at the first refresh or fetch.
The process exits when stdin closes or the agent that started it is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from edge_agent.mqtt import BrokerError, connect
from edge_agent.trust._errors import TargetNotFoundError, TrustError
from edge_agent.trust.fetcher import MqttFetcher
from edge_agent.trust.updater import TrustedRepository, check_trust_anchor
from shared.topics import Topics

log = logging.getLogger(__name__)


class _Channel:
    """Writes JSON lines to the agent; log records and replies never interleave mid-line."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()


class _ForwardHandler(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._channel.send({"log": [record.levelno, record.name, record.getMessage()]})
        except BrokenPipeError:
            pass  # the agent is gone (it is stopping): main() ends quietly on its next write
        except Exception:  # a log line must never break a request
            self.handleError(record)


class _Session:
    """The TUF client state of one worker: a broker connection and a TrustedRepository."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._s = settings
        self._client: Any = None
        self._repo: TrustedRepository | None = None

    def _repository(self) -> TrustedRepository:
        if self._repo is None:
            b = self._s["broker"]
            try:
                self._client = connect(
                    b["url"], client_id=self._s["client_id"], username=b.get("username"),
                    password=b.get("password"), ca_file=b.get("ca_file"),
                    cert_file=b.get("cert_file"), key_file=b.get("key_file"),
                    timeout=self._s["timeout"],
                )
            except BrokerError as e:
                raise TrustError("unavailable", f"broker: {e}") from e
            fetcher = MqttFetcher(self._client, Topics(self._s["topic_root"]),
                                  self._s["chunks_dir"], timeout=self._s["timeout"])
            try:
                self._repo = TrustedRepository(
                    self._s["metadata_dir"], self._s["targets_dir"], fetcher
                )
            except BaseException:
                self.close()  # the next request connects afresh
                raise
        return self._repo

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "check":
                check_trust_anchor(self._s["metadata_dir"])
                return {"ok": True}
            if op == "refresh":
                self._repository().refresh()
                return {"ok": True}
            if op == "list":
                return {"ok": True, "paths": self._repository().list_targets(str(request["prefix"]))}
            if op == "fetch":
                data = self._repository().fetch_target(request["path"])
                sha256 = hashlib.sha256(data).hexdigest()
                path = Path(self._s["targets_dir"]) / sha256
                return {"ok": True, "file": str(path), "sha256": sha256, "length": len(data)}
            return {"ok": False, "kind": "unavailable", "message": f"unknown request {op!r}"}
        except TargetNotFoundError as e:
            return {"ok": False, "kind": e.kind, "message": e.message, "not_found": e.path}
        except TrustError as e:
            return {"ok": False, "kind": e.kind, "message": e.message}
        except OSError as e:  # the state directory (a full disk): the agent retries the pass
            return {"ok": False, "oserror": [e.errno, e.strerror or str(e), e.filename]}
        except Exception as e:  # reported to the agent, which keeps its current model
            log.exception("TUF worker: %s failed", op)
            return {"ok": False, "kind": "unavailable", "message": f"{op} failed: {e!r}"}

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()


def _exit_with_parent(parent: int) -> None:
    """Exit as soon as the agent that started this worker is gone (it may die mid-request)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> int:
    _exit_with_parent(os.getppid())
    line = sys.stdin.readline()
    try:
        settings = json.loads(line)
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        print("edge_agent.trust._worker: expected one JSON line of settings on stdin", file=sys.stderr)
        return 2
    channel = _Channel(sys.stdout)
    root = logging.getLogger()
    root.addHandler(_ForwardHandler(channel))
    root.setLevel(int(settings.get("log_level", logging.WARNING)))
    for noisy in ("tuf", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    session = _Session(settings)
    try:
        for request in sys.stdin:
            channel.send(session.handle(json.loads(request)))
    except BrokenPipeError:
        # The agent closed its end (it is stopping, or it died): nobody is left to tell.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
