"""The TUF client of a simulated agent: python-tuf in this process, a bounded number of passes
at a time.

A real agent verifies in a child process per reconcile pass
(:class:`~edge_agent.trust.IsolatedRepository`) to keep python-tuf out of its own memory; five
hundred such children at once (≈ 30 MB each) would not fit a test machine. A simulated agent
runs the same :class:`~edge_agent.trust.TrustedRepository` (python-tuf's ``Updater``) over the
same :class:`~edge_agent.trust.MqttFetcher`, on its own trusted metadata, targets and chunk
cache in its own state directory, and over its own broker connection (``{agent}.fetch``, as the
real agent's child, driven by the fleet's :class:`~edge_agent.simulate.network.NetworkLoop`): the verification is the same, only the process is shared. Nothing of the
trust state is shared between agents. A semaphore shared by the fleet bounds how many passes
run at once, and so how many fetch connections are open.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from edge_agent.mqtt import BrokerError, BrokerSettings
from edge_agent.simulate.network import NetworkLoop
from edge_agent.trust import TrustError
from shared.topics import Topics

__all__ = ["InProcessRepository"]

log = logging.getLogger(__name__)


class InProcessRepository:
    """TUF-verified access to the repository for one agent, python-tuf in this process.

    Same contract as :class:`~edge_agent.trust.IsolatedRepository` (``refresh``,
    ``fetch_target``, ``list_targets``, ``close``). The first call of a pass waits for a place
    in ``passes``, connects as ``client_id`` and opens a ``TrustedRepository``; :meth:`close`
    (the end of the pass) disconnects and frees the place.

    Args:
        metadata_dir, targets_dir, chunks_dir: this agent's own TUF state.
        broker: where and how to connect.
        client_id: the MQTT client id of the fetch connection.
        topics: topic names.
        passes: shared by the fleet: how many passes may run at once.
        network: drives the fetch connection.
        timeout: seconds to wait for CONNACK and for one batch of retained messages.

    Raises:
        TrustError: (constructor) the trust anchor in ``metadata_dir`` is missing or invalid.
        OSError: (constructor) the anchor cannot be cached.

    Not thread safe: one reconcile thread uses it.
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
        passes: threading.Semaphore,
        network: NetworkLoop,
        timeout: float = 15.0,
    ) -> None:
        from edge_agent.trust.updater import check_trust_anchor

        self._metadata = Path(metadata_dir)
        self._targets = Path(targets_dir)
        self._chunks = Path(chunks_dir)
        self._broker = broker
        self._client_id = client_id
        self._topics = topics
        self._passes = passes
        self._network = network
        self._timeout = timeout
        self._client: Any = None
        self._repo: Any = None
        self._holding = False
        check_trust_anchor(self._metadata)

    def _repository(self) -> Any:
        if self._repo is not None:
            return self._repo
        from edge_agent.trust.fetcher import MqttFetcher
        from edge_agent.trust.updater import TrustedRepository

        if not self._holding:
            self._passes.acquire()
            self._holding = True
        try:
            self._client = self._network.connect(self._broker, self._client_id, self._timeout)
        except BrokerError as e:
            self.close()
            raise TrustError("unavailable", f"broker: {e}") from e
        fetcher = MqttFetcher(self._client, self._topics, self._chunks, timeout=self._timeout)
        try:
            self._repo = TrustedRepository(self._metadata, self._targets, fetcher)
        except BaseException:
            self.close()
            raise
        return self._repo

    def refresh(self) -> None:
        """As ``TrustedRepository.refresh``."""
        self._repository().refresh()

    def fetch_target(self, path: str) -> bytes:
        """As ``TrustedRepository.fetch_target``."""
        data: bytes = self._repository().fetch_target(path)
        return data

    def list_targets(self, prefix: str) -> list[str]:
        """As ``TrustedRepository.list_targets``."""
        return list(self._repository().list_targets(prefix))

    def close(self) -> None:
        """End the pass: disconnect and free the place (idempotent)."""
        client, self._client, self._repo = self._client, None, None
        try:
            if client is not None:
                self._network.forget(client)
                client.disconnect()
        finally:
            if self._holding:
                self._holding = False
                self._passes.release()
