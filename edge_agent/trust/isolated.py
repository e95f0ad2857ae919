"""The agent's TUF client, run in a short-lived child process: :class:`IsolatedRepository`.

python-tuf verifies signatures with securesystemslib and cryptography and brings urllib3: about
13 MiB resident, a sixth of an agent, for something used a few seconds per deployment. Python
cannot unload an extension module, so importing them lazily would still keep them mapped
from the first refresh on. Instead, each reconcile pass talks to a child process
(``python -m edge_agent.trust._worker``) that runs :class:`~edge_agent.trust.TrustedRepository`
over its own broker connection and exits at :meth:`IsolatedRepository.close`; the agent
process never imports python-tuf.

The child persists trusted metadata and verified targets in the same directories an
in-process ``TrustedRepository`` would; the agent re-checks the length and sha256 of each
target file the child names before using its bytes. This module imports no python-tuf.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from edge_agent.mqtt import BrokerSettings
from edge_agent.trust._errors import TRUST_ERROR_KINDS, TargetNotFoundError, TrustError
from shared.topics import Topics

__all__ = ["IsolatedRepository"]

log = logging.getLogger(__name__)

_WORKER = "edge_agent.trust._worker"


class IsolatedRepository:
    """TUF-verified access to the repository, through a child process started on demand.

    Same contract as :class:`~edge_agent.trust.TrustedRepository`'s :meth:`refresh`,
    :meth:`fetch_target` and :meth:`list_targets`; the first call starts the child, :meth:`close` ends it (call it at
    the end of each reconcile pass). The child connects to the broker as ``client_id`` at its
    first refresh or fetch.

    Args:
        metadata_dir: trusted metadata cache (``root.json`` copied there at provisioning).
        targets_dir: verified targets, one file per sha256.
        chunks_dir: chunk cache for resumable downloads.
        broker: where and how the child connects.
        client_id: the child's MQTT client id (one child at a time per agent).
        topics: topic names (root prefix).
        timeout: seconds the child waits for one batch of retained messages, or for CONNACK.

    Raises:
        TrustError: (from the constructor) the trust anchor in ``metadata_dir`` is missing or
            invalid; it is checked in a child process before the constructor returns.
        OSError: (from the constructor) the anchor cannot be cached in ``metadata_dir``.

    Not thread safe: one reconcile thread uses it. A child outlives neither :meth:`close` nor
    the agent process.
    """

    def __init__(
        self,
        metadata_dir: str | os.PathLike[str],
        targets_dir: str | os.PathLike[str],
        chunks_dir: str | os.PathLike[str],
        *,
        broker: BrokerSettings,
        client_id: str,
        topics: Topics,
        timeout: float = 15.0,
    ) -> None:
        self._settings: dict[str, Any] = {
            "metadata_dir": str(metadata_dir),
            "targets_dir": str(targets_dir),
            "chunks_dir": str(chunks_dir),
            "broker": {
                "url": broker.url, "username": broker.username, "password": broker.password,
                "ca_file": broker.ca_file, "cert_file": broker.cert_file, "key_file": broker.key_file,
            },
            "client_id": client_id,
            "topic_root": topics.root,
            "timeout": timeout,
        }
        self._proc: subprocess.Popen[str] | None = None
        try:
            self._call({"op": "check"})
        finally:
            self.close()

    # -- the repository contract ---------------------------------------------------------------

    def refresh(self) -> None:
        """Download and verify the newest top-level metadata (root → … → targets).

        Raises:
            TrustError: as ``TrustedRepository.refresh``; ``unavailable`` also when the child
                cannot start or dies.
            OSError: the trusted metadata cannot be written (a full disk).
        """
        self._call({"op": "refresh"})

    def fetch_target(self, path: str) -> bytes:
        """Return the verified bytes of target ``path``.

        Raises:
            TargetNotFoundError: not a current target.
            TrustError: as ``TrustedRepository.fetch_target``; ``tampered`` if the file the
                child verified no longer matches its length and sha256.
            OSError: the state directory cannot be written (a full disk).
        """
        reply = self._call({"op": "fetch", "path": path})
        file = Path(reply["file"])
        try:
            data = file.read_bytes()
        except OSError as e:
            raise TrustError("unavailable", f"cannot read verified target {file}: {e}") from e
        if len(data) != reply["length"] or hashlib.sha256(data).hexdigest() != reply["sha256"]:
            raise TrustError("tampered", f"{file} changed after it was verified")
        return data

    def list_targets(self, prefix: str) -> list[str]:
        """Paths of the current verified targets that start with ``prefix``, sorted.

        Raises:
            TrustError: as ``TrustedRepository.list_targets``.
            OSError: the state directory cannot be written (a full disk).
        """
        reply = self._call({"op": "list", "prefix": prefix})
        return [str(p) for p in reply.get("paths", [])]

    def close(self) -> None:
        """End the child process, if one runs (idempotent). The next call starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the child exits at end of input
            proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    # -- the child -----------------------------------------------------------------------------

    def _start(self) -> subprocess.Popen[str]:
        # The child imports exactly what this process would: same interpreter, same sys.path
        # (-P: nothing prepended from the working directory).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        settings = dict(self._settings, log_level=logging.getLogger().getEffectiveLevel())
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", _WORKER],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )
        except OSError as e:
            raise TrustError("unavailable", f"cannot start the TUF worker process: {e}") from e
        self._proc = proc
        self._send(proc, settings)
        return proc

    def _send(self, proc: subprocess.Popen[str], obj: dict[str, Any]) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(obj) + "\n")
            proc.stdin.flush()
        except OSError:
            pass  # the child is gone: the read of its reply says so

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc or self._start()
        self._send(proc, request)
        assert proc.stdout is not None
        reply = _read_reply(proc.stdout)
        if reply is None:
            self.close()
            raise TrustError(
                "unavailable", f"the TUF worker process ended (exit code {proc.returncode})"
            )
        if reply.get("ok"):
            return reply
        if "not_found" in reply:
            raise TargetNotFoundError(str(reply["not_found"]))
        if "oserror" in reply:
            code, text, filename = reply["oserror"]
            raise OSError(code, text, filename) if code is not None else OSError(text)
        kind, message = str(reply.get("kind")), str(reply.get("message"))
        if kind not in TRUST_ERROR_KINDS:
            kind, message = "unavailable", f"{kind}: {message}"
        raise TrustError(kind, message)


def _read_reply(stream: IO[str]) -> dict[str, Any] | None:
    """The child's reply to one request; its log lines on the way are logged here."""
    for line in stream:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        record = obj.get("log")
        if isinstance(record, list) and len(record) == 3:
            level, name, message = record
            logging.getLogger(str(name)).log(int(level), "%s", message)
            continue
        return obj
    return None
