"""The SuperNode child process: started while the host takes part in a run, stopped after.

:class:`SuperNodeSupervisor` owns at most one ``flower-supernode`` child. The agent says what
it wants with :meth:`SuperNodeSupervisor.want` (a :class:`SuperNodeSpec`, or ``None``); a
supervisor thread converges on it:

* **Own process group.** The child starts in a new session, so SIGTERM/SIGKILL reach the
  SuperNode *and* the ClientApp processes it spawns, and a signal meant for the agent (Ctrl-C
  on a terminal) does not reach them. None of their memory (an idle SuperNode is ~270 MiB, a
  ClientApp with torch 320-390 MiB) is in the agent's process.
* **Restart with backoff.** A child that exits while still wanted is started again after a
  jittered exponential delay (reset once a child has run for :data:`STABLE_SECONDS`).
* **Stop: SIGTERM, then SIGKILL.** When the run ends, changes, or the agent stops, the group
  gets SIGTERM and, after ``stop_timeout`` seconds, SIGKILL; :meth:`want` and :meth:`close`
  return once the child is reaped.
* **No orphan outlives a restart.** The child's pid is kept in ``{workdir}/supernode.pid``;
  :func:`end_leftover` (run by every new supervisor, and by the agent at start even when it
  will not supervise one) ends a SuperNode that an agent killed with SIGKILL left behind,
  after checking that the pid still runs ``flower-supernode`` with this workdir's files. A
  child that exits by itself takes its process group (SuperExec, a ClientApp mid-training)
  with it.
* **Trust.** The SuperLink address comes only from the TUF-verified run document.
  ``--insecure`` only when that document asks for it (the agent allows that only for a
  loopback SuperLink); ``--root-certificates`` when it carries a CA bundle. The node config's
  ``app-sha256`` makes the ClientApp decline an app whose FAB differs from the one the
  document names (a wrong app, not a malicious one: a malicious app would not run that
  check). ``--trusted-entities`` (a YAML file written from the document's keys) is passed only
  when the document names keys: on flwr 1.42 an app submitted to a self-hosted SuperLink
  carries no signature, so with that option the SuperNode refuses every app, and ``edgefleet
  fl start`` publishes no keys (see docs/federated.md).
* **Minimal environment.** The child gets ``PATH``, ``HOME``, ``LANG``, ``LC_*``, ``TMPDIR``,
  ``PYTHONPATH`` and ``FLWR_*`` only: none of the agent's secrets (its MQTT password may sit
  in its environment).

flwr is not imported here: the SuperNode is a separate program.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.federated import openssh_ed25519
from shared.files import write_atomically

__all__ = ["STABLE_SECONDS", "SuperNodeSpec", "SuperNodeSupervisor", "child_env", "end_leftover",
           "node_config_arg"]

log = logging.getLogger(__name__)

STABLE_SECONDS = 60.0  # a child that ran this long resets the restart backoff
PID_FILE = "supernode.pid"
ENTITIES_FILE = "trusted-entities.yaml"
CERTIFICATES_FILE = "root-certificates.pem"
LOG_FILE = "supernode.log"
_LOG_MAX_BYTES = 4 * 1024 * 1024  # the child's log is truncated at each start beyond this
_ENV_KEEP = ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")
_ENV_KEEP_PREFIXES = ("LC_", "FLWR_")


@dataclass(frozen=True)
class SuperNodeSpec:
    """What one SuperNode runs for: the run, where its SuperLink is, whom to trust, and the
    node config the ClientApp reads (``state-dir``, ``epsilon-budget``, ``delta``,
    ``node-name``, ``app-sha256``). ``root_certificates``: PEM CA bundle for the SuperLink's
    TLS (``None``: the system's)."""

    run: str
    superlink: str
    trusted_entities: Mapping[str, str]
    node_config: Mapping[str, str | float | int]
    insecure: bool = False
    root_certificates: str | None = None


def child_env(source: Mapping[str, str]) -> dict[str, str]:
    """The SuperNode's environment: the entries of ``source`` it needs, nothing else (see the
    module docstring), with Flower's telemetry and update check off unless set."""
    env = {k: v for k, v in source.items() if k in _ENV_KEEP or k.startswith(_ENV_KEEP_PREFIXES)}
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def node_config_arg(config: Mapping[str, str | float | int]) -> str:
    """``--node-config`` text: space separated ``key=value`` with TOML values (Flower parses
    it as TOML). Strings are double-quoted; infinite floats become the string ``"inf"``.

    Raises ``ValueError`` for a key that is not a bare TOML key or a string holding ``"``, a
    backslash or a control character.
    """
    parts = []
    for key, value in config.items():
        if not key or not all(c.isalnum() or c in "-_" for c in key):
            raise ValueError(f"node config key {key!r} is not a bare key")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            f = float(value)
            text = '"inf"' if f == float("inf") else repr(value if isinstance(value, int) else f)
        else:
            if any(ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
                raise ValueError(f"node config value of {key!r} may not contain quotes, "
                                 "backslashes or control characters")
            text = f'"{value}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_backoff(attempt: int) -> float:
    """Full jitter in [1, min(60, 2^attempt)] seconds."""
    return random.uniform(1.0, max(1.0, min(60.0, 2.0**attempt)))


class SuperNodeSupervisor:
    """Runs ``flower-supernode`` while a :class:`SuperNodeSpec` is wanted; see the module docstring.

    Args:
        binary: path of ``flower-supernode``.
        workdir: the supervisor's files (pid file, trusted entities, the child's log).
        env: where the child's environment is taken from (default: this process's), filtered
            by :func:`child_env`.
        backoff: seconds to wait before restart number ``n`` (1, 2, …).
        stop_timeout: seconds between SIGTERM and SIGKILL.
        clock: monotonic seconds (tests inject one).

    Thread safe. Call :meth:`close` when the agent stops.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        backoff: Callable[[int], float] = _default_backoff,
        stop_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = child_env(os.environ if env is None else env)
        # The SuperNode starts its companions (flower-superexec, flwr-clientapp) by name: they
        # sit beside it, so its directory goes first on PATH.
        here = os.path.dirname(os.path.abspath(binary))
        base["PATH"] = os.pathsep.join([here, *(p for p in base.get("PATH", "").split(os.pathsep) if p)])
        self._env = base
        self._backoff = backoff
        self.stop_timeout = stop_timeout
        self._clock = clock
        self._cond = threading.Condition()
        self._wanted: SuperNodeSpec | None = None
        self._running: SuperNodeSpec | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._failures = 0  # consecutive early exits (backoff attempt number)
        self._restart_at: float | None = None
        self._restarts = 0
        self._last_exit: int | None = None
        self._last_error: str | None = None
        self._closed = False
        self._applied = 0  # generation of `want` calls the thread has acted on
        self._generation = 0
        end_leftover(self.workdir, stop_timeout)
        self._thread = threading.Thread(target=self._loop, name="supernode-supervisor", daemon=True)
        self._thread.start()

    # -- the agent's side ------------------------------------------------------------------------

    def want(self, spec: SuperNodeSpec | None, *, wait: float | None = 30.0) -> None:
        """Run a SuperNode for ``spec`` (``None``: none). Returns once the supervisor has acted
        on it (started or stopped the child), or after ``wait`` seconds."""
        with self._cond:
            if spec == self._wanted:
                return
            self._wanted = spec
            self._restart_at, self._failures = None, 0  # a new wish starts without delay
            self._generation += 1
            generation = self._generation
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._applied >= generation or self._closed, wait)

    def status(self) -> dict[str, Any]:
        """``state`` (``stopped``, ``running``, ``restarting``), ``run``, ``pid``, ``restarts``,
        ``last_exit`` (the last child's exit code) and ``last_error``."""
        with self._cond:
            proc = self._proc
            running = proc is not None and proc.poll() is None
            if running:
                state = "running"
            elif self._wanted is not None:
                state = "restarting"
            else:
                state = "stopped"
            return {
                "state": state,
                "run": self._running.run if running and self._running else
                (self._wanted.run if self._wanted else None),
                "pid": proc.pid if running and proc is not None else None,
                "restarts": self._restarts,
                "last_exit": self._last_exit,
                "last_error": self._last_error,
            }

    def close(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL) and the supervisor thread; idempotent.

        Returns once the child is gone: if the supervisor thread has not stopped it within
        ``stop_timeout`` plus a margin (a stop or a start in progress), its process group is
        killed from here.
        """
        with self._cond:
            self._closed = True
            self._wanted = None
            self._cond.notify_all()
        self._thread.join(self.stop_timeout + 15.0)
        if not self._thread.is_alive():
            return
        with self._cond:
            proc = self._proc
        if proc is not None:
            log.warning("SuperNode pid %d still running at close: killing its process group", proc.pid)
            _kill_group(proc.pid)
            try:
                proc.wait(10.0)
            except subprocess.TimeoutExpired:
                log.error("SuperNode pid %d did not end after SIGKILL", proc.pid)
            try:
                (self.workdir / PID_FILE).unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove %s: %s", self.workdir / PID_FILE, e)
        self._thread.join(10.0)

    # -- the supervisor thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._needs_action, self._timeout())
                if self._closed and self._proc is None:
                    self._applied = self._generation
                    self._cond.notify_all()
                    return
                wanted, running, proc = self._wanted, self._running, self._proc
                generation = self._generation
            try:
                self._step(wanted, running, proc)
            except Exception as e:  # the supervisor must outlive any one failure
                if isinstance(e, OSError | ValueError):  # files, a run document's keys
                    log.error("SuperNode for run %s not started: %s", wanted.run if wanted else "?", e)
                else:
                    log.exception("SuperNode supervisor step failed")
                with self._cond:
                    self._last_error = f"{type(e).__name__}: {e}"
                    self._failures += 1
                    self._restart_at = self._clock() + self._backoff(self._failures)
            with self._cond:
                if self._proc is None or self._running == self._wanted:
                    self._applied = max(self._applied, generation)
                self._cond.notify_all()

    def _needs_action(self) -> bool:
        proc = self._proc
        if self._closed:
            return True
        if proc is not None:
            return self._wanted != self._running or proc.poll() is not None
        if self._wanted is not None:
            return self._restart_at is None or self._clock() >= self._restart_at
        return False

    def _timeout(self) -> float:
        if self._proc is None and self._wanted is not None and self._restart_at is not None:
            return max(0.0, self._restart_at - self._clock())
        # Flower's child exits are not signalled to this thread: poll their liveness.
        return 0.5 if self._proc is not None else 60.0

    def _step(self, wanted: SuperNodeSpec | None, running: SuperNodeSpec | None,
              proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and (wanted != running or proc.poll() is not None):
            code = proc.poll()
            if code is None:
                self._stop(proc)
                code = proc.returncode
                early = False
            else:
                # the SuperNode is gone: its SuperExec and a ClientApp mid-training go too
                _kill_group(proc.pid)
                ran = self._clock() - self._started_at
                early = ran < STABLE_SECONDS
                log.warning("SuperNode for run %s exited with code %s after %.0f s%s",
                            running.run if running else "?", code, ran,
                            f"; see {self.workdir / LOG_FILE}" if code else "")
            (self.workdir / PID_FILE).unlink(missing_ok=True)
            with self._cond:
                self._proc, self._running, self._last_exit = None, None, code
                if wanted is not None and wanted == running:  # died while wanted: restart
                    self._failures = self._failures + 1 if early else 1
                    self._restarts += 1
                    delay = self._backoff(self._failures)
                    self._restart_at = self._clock() + delay
                    log.info("restarting the SuperNode in %.1f s", delay)
                    return
                self._restart_at = None
                self._failures = 0
        if wanted is not None and self._proc is None:
            with self._cond:
                if self._restart_at is not None and self._clock() < self._restart_at:
                    return
            self._start(wanted)

    def _start(self, spec: SuperNodeSpec) -> None:
        entities = {k: openssh_ed25519(v) for k, v in spec.trusted_entities.items()}
        entities_path = self.workdir / ENTITIES_FILE
        if entities:
            # JSON is YAML: a flow mapping of key id → "ssh-ed25519 …"
            write_atomically(entities_path, (json.dumps(entities, indent=1) + "\n").encode())
        else:
            entities_path.unlink(missing_ok=True)  # an earlier run's keys do not apply
        args = [self.binary, "--superlink", spec.superlink]
        if spec.insecure:
            args.append("--insecure")
        if spec.root_certificates is not None:
            certificates = self.workdir / CERTIFICATES_FILE
            write_atomically(certificates, spec.root_certificates.encode())
            args += ["--root-certificates", str(certificates)]
        if entities:
            args += ["--trusted-entities", str(entities_path)]
        args += [
            "--node-config", node_config_arg(spec.node_config),
            # the SuperNode's own Runtime API (for its ClientApp processes): loopback, a free
            # port, so that several agents can share a host
            "--host", "127.0.0.1", "--port", str(_free_port()),
        ]
        log_path = self.workdir / LOG_FILE
        try:
            if log_path.stat().st_size > _LOG_MAX_BYTES:
                log_path.unlink()
        except FileNotFoundError:
            pass
        with self._cond:
            if self._closed:
                return
        with open(log_path, "ab") as out:
            try:
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=self._env,
                                        start_new_session=True, cwd=self.workdir)
            except OSError as e:
                with self._cond:
                    self._last_error = f"cannot start {self.binary}: {e}"
                    self._failures += 1
                    self._restart_at = self._clock() + self._backoff(self._failures)
                log.error("cannot start %s: %s", self.binary, e)
                return
        # Owned from here on: whatever fails next, this child is the one stopped, never a
        # second one started beside it.
        with self._cond:
            self._proc, self._running = proc, spec
            self._started_at = self._clock()
            self._restart_at = None
            self._last_error = None
        try:
            write_atomically(self.workdir / PID_FILE, f"{proc.pid}\n".encode())
        except OSError as e:
            log.error("cannot write %s (%s): stopping the SuperNode it would leave untracked",
                      self.workdir / PID_FILE, e)
            self._stop(proc)
            with self._cond:
                self._proc, self._running, self._last_exit = None, None, proc.returncode
                self._last_error = f"cannot write the pid file: {e}"
                self._failures += 1
                self._restart_at = self._clock() + self._backoff(self._failures)
            return
        log.info("SuperNode for run %s started (pid %d, SuperLink %s%s)", spec.run, proc.pid,
                 spec.superlink, ", insecure" if spec.insecure else "")

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the child's process group, SIGKILL after ``stop_timeout``; reaped."""
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                log.warning("SuperNode pid %d did not stop within %.0f s of %s", proc.pid, wait, sig.name)
        else:
            return
        # the SuperNode is gone; its ClientApps in the same group must not linger either
        _kill_group(proc.pid)
        log.info("SuperNode pid %d stopped (exit code %s)", proc.pid, proc.returncode)


def _kill_group(pgid: int) -> None:
    """SIGKILL to process group ``pgid``; nothing if it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def end_leftover(workdir: Path, stop_timeout: float = 10.0) -> bool:
    """End the SuperNode an earlier agent (killed without a clean stop) left running.

    Reads ``{workdir}/supernode.pid``; the process it names is signalled (its group: SIGTERM,
    then SIGKILL after ``stop_timeout``) only if it still runs ``flower-supernode`` in this
    workdir (the supervisor starts it there), so a pid reused by an unrelated process is left
    alone.
    The pid file is removed. Returns whether a SuperNode was ended. Cheap when there is no
    pid file (no Flower import, ever).
    """
    pid_path = Path(workdir) / PID_FILE
    try:
        text = pid_path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        pid = int(text.strip())
    except ValueError:
        pid = 0  # not a pid: nothing to end, the file goes
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd") if pid > 0 else None
    except OSError:
        cwd = None
    ours = pid > 0 and any(b"flower-supernode" in a for a in cmdline[:2]) and \
        cwd == str(Path(workdir).resolve())
    if ours:
        log.warning("ending the SuperNode (pid %d) that the last agent run left behind", pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + stop_timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)  # not our child: it cannot be waited for
            if not _alive(pid):
                break
        _kill_group(pid)  # what the SuperNode started (SuperExec, a ClientApp) goes too
    try:
        pid_path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s: %s", pid_path, e)
    return ours


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
