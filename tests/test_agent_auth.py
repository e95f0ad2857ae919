"""The agent against a broker that checks credentials: bad ones stop it, good ones connect."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from trainer.fleet.tuf_repository import TufRepository


def _config(tmp_path: Path, broker: str, password: str, root: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "init-config", "--agent-id", "auth-1", "--group", "g",
         "--profile", "x86-64-v3", "--broker", broker, "--trust", str(root),
         "--state-dir", str(tmp_path / "state"), "--source", "stdin"],
        capture_output=True, text=True, check=True,
    ).stdout
    (tmp_path / "pw").write_text(password + "\n")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(out.replace('# username = "agent"', 'username = "alice"').replace(
        '# password_file = "/etc/edgefleet/mqtt-password"', f'password_file = "{tmp_path / "pw"}"'))
    return cfg


def test_bad_credentials_stop_the_agent_with_exit_3(auth_broker: str, tmp_path: Path) -> None:
    root = TufRepository.init(tmp_path / "tuf").root_json_path
    cfg = _config(tmp_path, auth_broker, "wrong", root)
    proc = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "refused the credentials" in proc.stderr and "wrong" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_good_credentials_connect_and_announce(auth_broker: str, tmp_path: Path) -> None:
    root = TufRepository.init(tmp_path / "tuf").root_json_path
    cfg = _config(tmp_path, auth_broker, "s3cret", root)
    online = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2)
    sub.username_pw_set("alice", "s3cret")
    sub.on_message = lambda _c, _u, m: json.loads(m.payload)["status"] == "online" and online.set()
    host, port = auth_broker.removeprefix("mqtt://").split(":")
    sub.connect(host, int(port))
    sub.subscribe("edgefleet/v1/agents/auth-1/state", 1)
    sub.loop_start()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert online.wait(60), "the agent did not announce itself"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        sub.loop_stop()
    assert proc.returncode == 0, err[-2000:]


def test_an_invalid_trust_root_is_a_config_error(auth_broker: str, tmp_path: Path) -> None:
    bogus = tmp_path / "root.json"
    bogus.write_text("{}")
    cfg = _config(tmp_path, auth_broker, "s3cret", bogus)
    proc = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "trust root" in proc.stderr and "Traceback" not in proc.stderr
