"""Packaging and deployment files: extras, Dockerfiles and the systemd units stay honest.

No Docker engine runs here, so the Dockerfiles are read and checked against pyproject: they
install the declared extras and start the declared entry points.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
SCRIPTS = PYPROJECT["project"]["scripts"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_extras_declare_what_each_side_needs() -> None:
    edge, trainer = _names(EXTRAS["edge"]), _names(EXTRAS["trainer"])
    assert {"numpy", "onnxruntime", "ai-edge-litert", "paho-mqtt", "tuf", "psutil", "prometheus-client"} <= edge
    assert not {"torch", "optuna", "onnx", "onnxscript", "litert-torch", "scikit-learn", "skl2onnx"} & edge
    assert {"torch", "onnx", "onnxscript", "onnxruntime", "optuna", "scipy", "cmaes", "sqlite-utils",
            "litert-torch", "scikit-learn", "skl2onnx"} <= trainer
    assert "torch==2.13.0" in EXTRAS["trainer"]
    assert {"pytest", "hypothesis", "ruff", "mypy"} <= _names(EXTRAS["dev"])
    assert SCRIPTS == {"edgefleet": "trainer.cli:main", "edgefleet-agent": "edge_agent.cli:main"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _check_common(path: Path, extra: str, entry: str) -> list[tuple[str, str]]:
    ins = _instructions(path)
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert f'".[{extra}]"' in runs, f"{path.name} must install the {extra} extra"
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name} must run as a non-root user"
    entrypoint = [rest for op, rest in ins if op == "ENTRYPOINT"][-1]
    assert entrypoint == f'["{entry}"]' and entry in SCRIPTS
    for op, rest in ins:
        if op == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (REPO_ROOT / src).exists(), f"{path.name} copies missing {src}"
    return ins


def test_edge_dockerfile_is_slim_non_root_edge_only_and_arch_neutral() -> None:
    ins = _check_common(REPO_ROOT / "Dockerfile.edge", "edge", "edgefleet-agent")
    body = " ".join(f"{op} {rest}" for op, rest in ins)
    assert "[trainer]" not in body and "torch" not in body
    assert all("slim" in rest and "--platform" not in rest for op, rest in ins if op == "FROM")
    assert not re.search(r"amd64|x86_64|aarch64|arm64", body), "nothing CPU-specific in the edge image"
    assert "COPY trainer" not in body


def test_trainer_dockerfile_installs_trainer_extra_and_pinned_torch() -> None:
    ins = _check_common(REPO_ROOT / "Dockerfile.trainer", "trainer", "edgefleet")
    assert '"torch==2.13.0"' in " ".join(rest for op, rest in ins if op == "RUN")


def _unit(name: str = "edgefleet-agent.service") -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in (REPO_ROOT / "deploy" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_is_hardened_and_restarts_on_failure() -> None:
    service = _unit()["Service"]
    assert service.get("DynamicUser") == ["yes"] or "User" in service
    assert service["StateDirectory"] == ["edgefleet"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["Restart"] == ["on-failure"]
    assert "run --config" in service["ExecStart"][0] and "edgefleet-agent" in service["ExecStart"][0]
    assert set(service["RestartPreventExitStatus"][0].split()) == {"2", "3"}  # config / credentials


def test_systemd_unit_waits_for_readiness_and_watches_the_serving_loop() -> None:
    service = _unit()["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert timedelta(seconds=5) <= _timespan(service["WatchdogSec"][0]) <= timedelta(minutes=5)
    assert service["RuntimeDirectory"] == ["edgefleet"]  # for the API's Unix socket
    assert "AF_UNIX" in service["RestrictAddressFamilies"][0].split()  # sd_notify's datagram


# Sandboxing settings of the agent's unit that the repository refresh must share.
_HARDENING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges",
              "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
              "RestrictAddressFamilies", "RestrictNamespaces", "LockPersonality")


def test_repo_refresh_service_is_hardened_and_runs_repo_refresh() -> None:
    service = _unit("edgefleet-repo-refresh.service")["Service"]
    agent = _unit()["Service"]
    for key in _HARDENING:
        assert service.get(key) == agent[key], key
    assert "User" in service and service.get("User") != ["root"]
    assert service["Type"] == ["oneshot"]
    [command] = service["ExecStart"]
    argv = command.split()
    assert argv[0] == "/usr/local/bin/edgefleet" and argv[1:3] == ["repo", "refresh"]
    assert "--registry" in argv and "--broker" in argv


def _elapses(spec: str, n: int) -> list[datetime]:
    proc = subprocess.run(["systemd-analyze", "calendar", f"--iterations={n}", spec],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TZ": "UTC", "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr
    found = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", proc.stdout)
    assert len(found) == n, proc.stdout
    return [datetime.fromisoformat(t) for t in found]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_repo_refresh_timer_runs_well_within_the_timestamp_expiry() -> None:
    from trainer.fleet.tuf_repository import ExpiryPolicy

    timer = _unit("edgefleet-repo-refresh.timer")
    assert timer["Timer"]["Unit"] == ["edgefleet-repo-refresh.service"]
    assert timer["Timer"]["Persistent"] == ["true"]  # a refresh missed while off runs at boot
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    [spec] = timer["Timer"]["OnCalendar"]
    [delay] = timer["Timer"]["RandomizedDelaySec"]
    times = _elapses(spec, 12)
    longest_gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    jitter = _timespan(delay)
    # At least three chances to refresh before a timestamp signed at one run expires.
    assert 3 * (longest_gap + jitter) <= ExpiryPolicy().timestamp, (longest_gap, jitter)


def _timespan(text: str) -> timedelta:
    proc = subprocess.run(["systemd-analyze", "timespan", text], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return timedelta(microseconds=int(re.search(r"μs: (\d+)", proc.stdout).group(1)))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(
    ("units", "binary"),
    [
        (("edgefleet-agent.service",), "edgefleet-agent"),
        (("edgefleet-repo-refresh.service", "edgefleet-repo-refresh.timer"), "edgefleet"),
    ],
)
def test_systemd_analyze_verify(tmp_path: Path, units: tuple[str, ...], binary: str) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's entry point.
    entry = Path(sys.executable).with_name(binary)
    paths = []
    for name in units:
        unit = tmp_path / name
        unit.write_text((REPO_ROOT / "deploy" / name).read_text()
                        .replace(f"/usr/local/bin/{binary} ", f"{entry} "))
        paths.append(str(unit))
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True,
                          timeout=60)
    problems = [line for line in proc.stderr.splitlines()
                if any(name in line for name in units) and "Documentation" not in line]
    assert proc.returncode == 0 or not problems, proc.stderr
