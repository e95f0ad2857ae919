"""The agent's federated side, composed: can it join, which run, its SuperNode, its data.

:class:`FederatedParticipation` is what the daemon holds when ``[federated] enabled = true``
(the daemon imports this module only then). It composes:

- :func:`~edge_agent.federated.join.check_can_join` once at start: an agent whose profile may
  not train, or without the ``fl`` extra or the ``flower-supernode`` program, reports why and
  never starts a SuperNode;
- :meth:`on_pass`, called by each reconcile pass with the refreshed TUF repository: the
  group's active run (:func:`~edge_agent.federated.join.find_runs`) becomes the
  :class:`~edge_agent.federated.supernode.SuperNodeSpec` the supervisor converges on; a
  finished or removed run stops the SuperNode, and so does repository metadata that can no
  longer be trusted (:meth:`on_untrusted`: expired — a freeze attack withholding the
  ``finished`` document ends there — tampered, rolled back …): a run is followed only while
  its document verifies. A run asking for plaintext to a SuperLink off this host is refused
  (:func:`~edge_agent.federated.join.run_refusal`, reported in health as ``refused``);
- :class:`~edge_agent.federated.feed.WindowFeed` on the serving path;
- :meth:`health`: the ``federated`` object of the health report, with the local ε spent
  and the δ it was computed at (read from the ledger as recorded: no dp-accounting in the
  agent process).

Node config passed to the SuperNode (read by the ClientApp from ``context.node_config``):
``state-dir``, ``epsilon-budget``, ``delta``, ``node-name`` (the agent id) and ``app-sha256``
(the run document's SHA-256 of the FAB: the ClientApp refuses to train for any other app).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from edge_agent.config import FederatedConfig
from edge_agent.detector import Detection, Detector
from edge_agent.federated._errors import FederatedStateError
from edge_agent.federated.feed import WindowFeed
from edge_agent.federated.join import (
    JoinCheck,
    RunRepository,
    check_can_join,
    choose_run,
    find_runs,
    run_refusal,
)
from edge_agent.federated.ledger import LocalLedger
from edge_agent.federated.store import WindowStore
from edge_agent.federated.supernode import SuperNodeSpec, SuperNodeSupervisor
from edge_agent.trust import TrustError
from shared.federated import FederatedRun
from shared.profiles import FirmwareProfile

__all__ = ["FederatedParticipation", "LEDGER_FILE", "SUPERNODE_DIR", "WINDOWS_FILE"]

log = logging.getLogger(__name__)

WINDOWS_FILE = "windows.sqlite"
LEDGER_FILE = "ledger.sqlite"
SUPERNODE_DIR = "supernode"  # the supervisor's workdir under the federated state directory


class FederatedParticipation:
    """See the module docstring. ``state_dir`` is the agent's; the federated files go to
    ``config.state_dir`` or ``{state_dir}/federated``."""

    def __init__(self, config: FederatedConfig, *, agent_id: str, group: str,
                 profile: FirmwareProfile, state_dir: Path, check: JoinCheck | None = None,
                 supervisor: SuperNodeSupervisor | None = None) -> None:
        self.config = config
        self.agent_id = agent_id
        self.group = group
        self.dir = (config.state_dir or state_dir / "federated").absolute()
        self.dir.mkdir(parents=True, exist_ok=True)  # OSError: not a (writable) directory
        self.check = check or check_can_join(profile, config.supernode)
        if not self.check.can_join:
            log.warning("this agent cannot take part in federated training: %s", self.check.reason)
        self.supervisor = supervisor
        if self.supervisor is None and self.check.can_join:
            assert self.check.binary is not None
            self.supervisor = SuperNodeSupervisor(self.check.binary, self.dir / SUPERNODE_DIR)
        self.feed = WindowFeed(self.dir / WINDOWS_FILE, config.max_windows,
                               sample_every=config.sample_every)
        self.run: FederatedRun | None = None
        self.refused: str | None = None  # why the group's active run is not joined

    # -- the reconcile pass ----------------------------------------------------------------------

    def on_pass(self, repo: RunRepository) -> bool:
        """Converge the SuperNode on the group's run documents; ``False``: retry later.

        A document that fails verification (any :class:`TrustError` but ``unavailable``)
        counts as no run: the SuperNode stops rather than follow a document that can no
        longer be checked. ``unavailable`` (the broker) and storage errors change nothing
        and ask for a retry.
        """
        try:
            runs = find_runs(repo, self.group)
        except TrustError as e:
            log.warning("federated run documents not read: %s", e)
            if e.kind == "unavailable":
                return False
            self.on_untrusted(e)
            return True
        except OSError as e:
            log.warning("federated run documents not read: storage: %s", e)
            return False
        self._follow(choose_run(runs))
        return True

    def on_untrusted(self, error: TrustError) -> None:
        """The repository's metadata cannot be trusted any more (expired, tampered, rolled
        back …): leave the run, whatever its last verified document said."""
        if self.run is not None:
            log.warning("leaving federated run %s: its document cannot be verified (%s)",
                        self.run.run, error)
        self._follow(None)

    def _follow(self, run: FederatedRun | None) -> None:
        refusal = run_refusal(run) if run is not None else None
        if refusal is not None and refusal != self.refused:
            log.warning("%s", refusal)
        self.refused = refusal
        if run is not None and (self.run is None or run.run != self.run.run):
            log.info("federated run %s is active for group %s", run.run, self.group)
        if run is None and self.run is not None:
            log.info("federated run %s is over for this agent", self.run.run)
        self.run = run
        if self.supervisor is not None:
            self.supervisor.want(self._spec(run) if run is not None and refusal is None else None)

    def _spec(self, run: FederatedRun) -> SuperNodeSpec:
        return SuperNodeSpec(
            run=run.run, superlink=run.superlink, insecure=run.insecure,
            root_certificates=run.root_certificates,
            trusted_entities=dict(run.trusted_entities),
            node_config={
                "state-dir": str(self.dir),
                "epsilon-budget": self.config.epsilon_budget,
                "delta": self.config.delta,
                "node-name": self.agent_id,
                "app-sha256": run.app_sha256,
            },
        )

    # -- the serving loop ------------------------------------------------------------------------

    def offer(self, detector: Detector, detection: Detection) -> None:
        """Hot path: maybe keep the window ``detection`` scored (see :class:`WindowFeed`)."""
        self.feed.offer(detector, detection)

    # -- reports ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The health report's ``federated`` object (see ``shared.messages.AgentHealth``)."""
        out: dict[str, Any] = {"can_join": self.check.can_join, "reason": self.check.reason}
        status = self.supervisor.status() if self.supervisor is not None else None
        out["run"] = self.run.run if self.run is not None else None
        out["supernode"] = status["state"] if status else "stopped"
        out["restarts"] = status["restarts"] if status else 0
        out["refused"] = self.refused
        out["epsilon_budget"] = self.config.epsilon_budget if math.isfinite(self.config.epsilon_budget) else None
        spent, delta = self._spent()
        out["delta"] = delta  # the δ the spent ε was computed at
        out["epsilon_spent"] = spent
        out["windows"] = self._windows()
        out["windows_dropped"] = self.feed.dropped
        return out

    def _spent(self) -> tuple[float | None, float]:
        """``(ε spent, δ)`` as the ledger last recorded them (``(0.0, config δ)`` when nothing
        was charged, ``(None, config δ)`` when the ledger cannot be read)."""
        path = self.dir / LEDGER_FILE
        if not path.exists():
            return 0.0, self.config.delta
        try:
            with LocalLedger(path, self.config.epsilon_budget, self.config.delta) as ledger:
                recorded = ledger.recorded_total()
        except (FederatedStateError, ValueError) as e:
            log.warning("local privacy ledger %s unreadable: %s", path, e)
            return None, self.config.delta
        return (0.0, self.config.delta) if recorded is None else recorded

    def _windows(self) -> int:
        path = self.dir / WINDOWS_FILE
        if not path.exists():
            return 0
        try:
            with WindowStore(path, self.config.max_windows) as store:
                return len(store)
        except FederatedStateError:
            return 0

    def close(self) -> None:
        """Stop the SuperNode (SIGTERM, then SIGKILL) and flush the window feed."""
        if self.supervisor is not None:
            self.supervisor.close()
        self.feed.close()
