"""Flower's processes and command line, driven from the trainer: the SuperLink, ``flwr run``
and ``flwr ls``.

Checked on flwr 1.42: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTP port;
it starts ``flower-superexec`` by name (the venv's ``bin`` must be on ``PATH``); offline it
needs ``--disable-runtime-dependency-installation``; without ``--database`` a restart loses
its nodes. ``flwr run`` exits 0 even when the run fails, so :func:`wait_for_run` reads the run's
status with ``flwr ls --run-id``. ``flwr`` finds the SuperLink by a connection name in
``$FLWR_HOME/config.toml``, written here per trainer state directory: ``insecure = true`` for
plaintext, else ``root-certificates`` = the absolute path of a CA bundle (TLS).

TLS (``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certfile``, all three or ``--insecure``)
covers all three APIs, and the ``flower-superexec`` the SuperLink starts reaches its Runtime API
at the listen address (``0.0.0.0`` → ``127.0.0.1``) verified with that CA: the certificate must
name that address too (e.g. ``IP:127.0.0.1`` in its subjectAltName).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.federated.tls import TlsFiles

__all__ = [
    "APP_DIR",
    "FlowerError",
    "RunStatus",
    "SuperLink",
    "flower_env",
    "free_port",
    "run_status",
    "stop_run",
    "submit_run",
    "wait_for_run",
]

APP_DIR = Path(__file__).with_name("flower_app")
CONNECTION = "edgefleet"


class FlowerError(RuntimeError):
    """Flower's processes or command line failed (one line, with the tail of their output)."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Flower's processes run in: no telemetry, no update check, this
    interpreter's ``bin`` first on ``PATH`` (Flower starts its helpers by name), ``FLWR_HOME``."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(flwr_home), "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    env.update(extra or {})
    return env


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None = None) -> None:
    """Point the ``edgefleet`` connection of ``flwr`` at ``address``: plaintext, or TLS verified
    with the CA bundle ``root_certificates`` (written as an absolute path, as ``flwr`` needs)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    transport = ("insecure = true\n" if root_certificates is None else
                 f"root-certificates = {json.dumps(str(Path(root_certificates).absolute()))}\n")
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{transport}', encoding="utf-8")


def wait_until(ready: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] = lambda: True,
               interval: float = 0.2) -> None:
    """Poll ``ready`` until it holds; :class:`FlowerError` on timeout or when ``alive`` fails."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            raise FlowerError(f"{what}: the process exited")
        if time.monotonic() >= deadline:
            raise FlowerError(f"{what}: not ready within {timeout:g} s")
        time.sleep(interval)


def connect_host(host: str) -> str:
    """Where this host reaches a server listening on ``host``: a wildcard address means loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((connect_host(host), port), timeout=0.2).close()
        return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM ``proc``, its process group and every process it started (Flower starts its
    ``flower-superexec`` in a session of its own), then SIGKILL what is left after ``timeout``."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for child in family:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class SuperLink:
    """A ``flower-superlink`` listening on ``host:port``, its state in ``state_dir`` (database,
    log); plaintext, or TLS with ``tls`` (certificate, key and CA bundle all given).

    Started in a process group of its own (:func:`stop_process` ends it with its helpers).
    """

    state_dir: Path
    port: int
    host: str = "127.0.0.1"
    tls: TlsFiles | None = None
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """Where ``flwr`` on this host reaches it."""
        host = connect_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    def start(self, timeout: float = 60.0) -> SuperLink:
        """Start it and wait until it listens. Raises :class:`FlowerError` (nothing left
        running) when the port is taken already, the process exits or ``timeout`` passes."""
        if _listening(self.host, self.port):  # else a stale SuperLink on the port would get the run
            raise FlowerError(f"port {self.port} on 127.0.0.1 is in use already (another SuperLink?)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        transport = ["--insecure"]
        if self.tls is not None:
            if self.tls.cert is None or self.tls.key is None:
                raise ValueError("a SuperLink with TLS needs its certificate and key")
            transport = ["--ssl-certfile", str(self.tls.cert.absolute()), "--ssl-keyfile", str(self.tls.key.absolute()),
                         "--ssl-ca-certfile", str(self.tls.ca.absolute())]
        write_connection(self.flwr_home, self.address, None if self.tls is None else self.tls.ca)
        log = (self.state_dir / "superlink.log").open("ab")
        self.proc = subprocess.Popen(
            [_exe("flower-superlink"), *transport, "--disable-runtime-dependency-installation",
             "--database", str(self.state_dir / "superlink.db"), "--host", self.host, "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=flower_env(self.flwr_home), start_new_session=True)
        log.close()
        proc = self.proc
        try:
            wait_until(lambda: _listening(self.host, self.port), timeout, f"flower-superlink on {self.address}",
                       alive=lambda: proc.poll() is None)
            if proc.poll() is not None:
                raise FlowerError(f"flower-superlink on {self.address}: the process exited")
        except BaseException:
            stop_process(proc)
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log_tail(self, chars: int = 2000) -> str:
        path = self.state_dir / "superlink.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _flwr(args: list[str], flwr_home: Path, timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run([_exe("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                              timeout=timeout, env=flower_env(flwr_home))
    except subprocess.TimeoutExpired as e:
        raise FlowerError(f"flwr {args[0]} did not answer within {timeout:g} s") from e
    try:
        obj = json.loads(proc.stdout[proc.stdout.index("{"):]) if "{" in proc.stdout else {}
    except ValueError:
        obj = {}
    if proc.returncode != 0 or not obj.get("success", False):
        detail = obj.get("error-message") or (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FlowerError(f"flwr {args[0]} failed: {detail if isinstance(detail, str) else detail[0]}")
    return obj


def submit_run(flwr_home: Path, run_config: dict[str, str], app_dir: Path = APP_DIR, timeout: float = 120.0) -> str:
    """``flwr run`` the app with ``run_config``; returns Flower's run id (as text)."""
    pairs = " ".join(f'{k}="{v}"' for k, v in run_config.items())
    obj = _flwr(["run", str(app_dir), CONNECTION, "--run-config", pairs], flwr_home, timeout)
    return str(obj["run-id"])


def stop_run(flwr_home: Path, run_id: str, timeout: float = 60.0) -> None:
    """``flwr stop`` the run (raises :class:`FlowerError`, e.g. when it has finished already)."""
    _flwr(["stop", str(run_id), CONNECTION], flwr_home, timeout)


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: str  # e.g. "pending", "running", "finished:completed", "finished:failed"

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def run_status(flwr_home: Path, run_id: str, timeout: float = 60.0) -> RunStatus:
    """The run's status from ``flwr ls --run-id`` (the Control API)."""
    obj = _flwr(["ls", CONNECTION, "--run-id", str(run_id)], flwr_home, timeout)
    runs = obj.get("runs") or []
    if not runs:
        raise FlowerError(f"the SuperLink knows no run {run_id}")
    return RunStatus(str(run_id), str(runs[0].get("status", "unknown")))


def wait_for_run(flwr_home: Path, run_id: str, timeout: float, interval: float = 2.0) -> RunStatus:
    """Poll the run's status until it is finished (or raise :class:`FlowerError` at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(flwr_home, run_id)
        if status.finished:
            return status
        if time.monotonic() >= deadline:
            raise FlowerError(f"Flower run {run_id} still {status.status} after {timeout:g} s")
        time.sleep(interval)
