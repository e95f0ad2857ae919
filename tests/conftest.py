"""Shared fixtures: a private Mosquitto broker per test, the team's NAB data, the repo root."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NAB_DIR = REPO_ROOT.parent / "shared" / "data" / "nab"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    """A private Mosquitto on a loopback port that a test may stop and start again."""

    port: int
    workdir: Path
    proc: subprocess.Popen | None = None
    extra_config: str = ""  # more mosquitto.conf lines (e.g. "max_packet_size 4096\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            # Mosquitto's default queue limits stay (max_queued_messages 1000 per client, 20 in
            # flight), as on a stock broker: nothing may rely on receiving more at once.
            # As root, Mosquitto would drop to the `mosquitto` user, which cannot write the
            # test's private directory: persistence (retained messages across a restart) and
            # the log would silently vanish.
            + ("user root\n" if os.geteuid() == 0 else "")
            +
            f"log_dest file {self.workdir}/mosquitto.log\n"
            + self.extra_config
        )
        self.proc = subprocess.Popen(
            [_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    log = self.workdir / "mosquitto.log"
                    raise RuntimeError(f"mosquitto exited: {log.read_text() if log.exists() else ''}") from None
                time.sleep(0.02)  # polling a port, not waiting for correctness
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _mosquitto() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        pytest.fail("mosquitto is not installed: run `make setup`")
    return exe


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A fresh private broker for one test (persistence on, so a restart keeps sessions)."""
    b = Broker(port=_free_port(), workdir=tmp_path_factory.mktemp("mosquitto"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def clients(broker: Broker) -> Iterator[Callable[[], Any]]:
    """Factory of MQTT clients connected to ``broker``; all are disconnected at teardown."""
    from edge_agent.mqtt import connect

    made: list[Any] = []

    def make() -> Any:
        c = connect(broker.url, client_id=f"t-{uuid.uuid4().hex[:12]}", timeout=5)
        made.append(c)
        return c

    yield make
    for c in made:
        c.disconnect()
        c.loop_stop()


def _nab_present() -> bool:
    return (NAB_DIR / "data").is_dir()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the ``nab`` marker true, so ``-m "not nab"`` runs without the NAB data.

    A test that uses ``nab_dir`` (directly or through another fixture) must carry the marker;
    marked tests are skipped with the reason when the data is absent (in CI, ``nab_dir``
    fails them instead: CI must have the data).
    """
    unmarked = [item.nodeid for item in items
                if "nab_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("nab") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that read NAB data must be marked @pytest.mark.nab: {', '.join(unmarked)}")
    if _nab_present() or os.environ.get("CI") == "true":
        return
    skip = pytest.mark.skip(reason=f"NAB data not found at {NAB_DIR} (it lives beside the repository)")
    for item in items:
        if item.get_closest_marker("nab") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def nab_dir() -> Path:
    """The team's NAB sample, for tests marked ``nab``; a failure in CI when absent."""
    if not _nab_present():
        if os.environ.get("CI") == "true":
            pytest.fail(f"NAB data missing at {NAB_DIR}: CI must have ../shared/data/nab")
        pytest.skip(f"NAB data not found at {NAB_DIR} (it lives beside the repository)")
    return NAB_DIR


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[str]:
    """A private Mosquitto that only lets user ``alice`` (password ``s3cret``) in."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    passwd_tool = shutil.which("mosquitto_passwd")
    if passwd_tool is None or not Path(mosquitto).exists():
        pytest.fail("mosquitto and mosquitto_passwd are needed: run `make setup`")
    workdir = tmp_path / "auth-broker"
    workdir.mkdir()
    passwd = workdir / "passwd"
    subprocess.run(
        [passwd_tool, "-b", "-c", str(passwd), "alice", "s3cret"], check=True, capture_output=True
    )
    passwd.chmod(0o600)
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_listening(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)  # polling a port, not waiting for correctness
    raise RuntimeError("mosquitto did not start listening")
