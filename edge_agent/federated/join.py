"""Whether this host may take part in federated training, and which run it should join.

Pure rules plus one read of the TUF repository the reconcile pass already refreshed: the
agent learns of runs only from signed ``federated/runs/{run}.json`` targets
(:mod:`shared.federated`), never from an unsigned message.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edge_agent.trust import TargetNotFoundError
from shared.federated import (
    RUNS_PREFIX,
    FederatedRun,
    FederatedRunError,
    decode_run,
    is_loopback,
    run_from_target,
)
from shared.profiles import FirmwareProfile

__all__ = ["FL_MODULES", "JoinCheck", "RunRepository", "check_can_join", "choose_run", "find_runs",
           "missing_modules", "run_refusal"]

log = logging.getLogger(__name__)

#: What the SuperNode's ClientApp processes import (the ``fl`` extra: Flower, the ledger's
#: accountant, torch for local training); probed without importing them.
FL_MODULES = ("flwr", "dp_accounting", "torch")
FL_HINT = "pip install 'edgefleet[edge,fl]' (flwr, dp-accounting and torch)"
_PROBE = ("import importlib.util, sys; "
          "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")


@dataclass(frozen=True)
class JoinCheck:
    """``can_join`` and, when it cannot, a one-line ``reason``; ``binary`` is the resolved
    ``flower-supernode`` path when it can."""

    can_join: bool
    reason: str | None = None
    binary: str | None = None


def missing_modules(binary: str, modules: Sequence[str] = FL_MODULES) -> tuple[str | None, list[str]]:
    """The ``modules`` the ClientApps of SuperNode ``binary`` could not import.

    They run in the SuperNode's environment, which need not be the agent's: when a ``python``
    sits beside ``binary`` (a virtualenv's ``bin``), that interpreter is asked (a child
    process; ``find_spec`` only locates the top-level names, nothing is imported), otherwise
    the agent's own. Returns ``(interpreter asked or None for the agent's, missing names)``;
    an interpreter that cannot be run counts every module as missing.
    """
    python = os.path.join(os.path.dirname(os.path.abspath(binary)), "python")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return None, [m for m in modules if importlib.util.find_spec(m) is None]
    try:
        out = subprocess.run([python, "-c", _PROBE, *modules], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot probe %s for the fl extra: %s", python, e)
        return python, list(modules)
    if out.returncode != 0:
        log.warning("cannot probe %s for the fl extra: exit code %s", python, out.returncode)
        return python, list(modules)
    return python, out.stdout.split()


def check_can_join(
    profile: FirmwareProfile,
    supernode: str,
    *,
    probe: Callable[[str, Sequence[str]], tuple[str | None, list[str]]] = missing_modules,
    which: Callable[[str], str | None] = shutil.which,
    modules: Sequence[str] = FL_MODULES,
) -> JoinCheck:
    """Whether an agent of ``profile`` may and can run a SuperNode.

    ``supernode`` is the configured binary: a name looked up on ``PATH`` or a path. The ``fl``
    extra is looked for where the SuperNode's ClientApps will run (:func:`missing_modules`);
    no module is imported into the agent.
    """
    if not profile.may_train:
        return JoinCheck(False, f"profile {profile.name} may not train (may_train = false)")
    if os.sep in supernode:
        binary = supernode if os.access(supernode, os.X_OK) and os.path.isfile(supernode) else None
    else:
        binary = which(supernode)
    if binary is None:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:  # the likely reason: flower-supernode comes with flwr
            return JoinCheck(False, f"{supernode} not found and the fl extra is not installed "
                                    f"(missing {', '.join(missing)}): {FL_HINT}")
        return JoinCheck(False, f"{supernode} not found or not executable")
    python, missing = probe(binary, modules)
    if missing:
        where = f" for {python}" if python else ""
        return JoinCheck(False, f"the fl extra is not installed{where} (missing {', '.join(missing)}): "
                                f"{FL_HINT}")
    return JoinCheck(True, None, binary)


def run_refusal(run: FederatedRun) -> str | None:
    """Why this agent will not join ``run`` although it is addressed to its group, else ``None``.

    A plaintext (``insecure``) connection is accepted only to a SuperLink on this host.
    """
    if run.insecure and not is_loopback(run.superlink):
        return (f"run {run.run} asks for an insecure (plaintext) connection to {run.superlink}, "
                "which is not a loopback address: refused")
    return None


class RunRepository(Protocol):
    """What reading the run documents needs from the refreshed TUF repository."""

    def list_targets(self, prefix: str) -> list[str]: ...

    def fetch_target(self, path: str) -> bytes: ...


def find_runs(repo: RunRepository, group: str) -> list[FederatedRun]:
    """The verified run documents addressed to ``group``, sorted by run name.

    A malformed document, or one whose ``run`` does not match its target path, is logged and
    skipped. Raises :class:`TrustError` (``unavailable`` for a broker problem: retry later).
    """
    runs = []
    for path in repo.list_targets(RUNS_PREFIX):
        name = run_from_target(path)
        if name is None:
            continue
        try:
            run = decode_run(repo.fetch_target(path))
        except TargetNotFoundError:
            continue  # removed between the listing and the fetch
        except FederatedRunError as e:
            log.warning("federated run document %s ignored: %s", path, e)
            continue
        if run.run != name:
            log.warning("federated run document %s names run %r: ignored", path, run.run)
            continue
        if run.group == group:
            runs.append(run)
    return sorted(runs, key=lambda r: r.run)


def choose_run(runs: Sequence[FederatedRun]) -> FederatedRun | None:
    """The run to take part in: the active one, or among several the last by name.

    One SuperNode serves one SuperLink; a trainer runs one run per group at a time, so more
    than one active run is unexpected and logged.
    """
    active = [r for r in runs if r.active]
    if len(active) > 1:
        log.warning("%d active federated runs for one group (%s): joining %s", len(active),
                    ", ".join(r.run for r in active), active[-1].run)
    return active[-1] if active else None
