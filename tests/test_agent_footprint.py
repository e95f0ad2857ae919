"""The agent process loads only what its active model needs, and never python-tuf.

- importing the agent imports neither model runtime, nor python-tuf and its crypto stack, nor
  psutil, nor anything federated (``edge_agent.federated``, flwr, dp-accounting, torch);
  probing the runtimes does not import them;
- :class:`IsolatedRepository` (python-tuf in a child process) keeps ``TrustedRepository``'s
  contract against a real broker and a real TUF repository, and leaves no process behind;
- a real ``edgefleet-agent run`` serving a TFLite model (rpi4-arm64) never maps onnxruntime,
  one serving ONNX (x86-64-v3) never maps LiteRT, and neither maps python-tuf's crypto library
  once its reconcile pass is over (read from ``/proc/PID/maps``);
- the health report's own figures (resident memory, CPU share) are this process's.

Memory figures themselves are measured by ``benchmarks/bench_agent.py``, not asserted here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_delivery import TOPICS, AgentProcess, Watch, cli, poll_until

from edge_agent.mqtt import BrokerSettings
from edge_agent.trust import IsolatedRepository, TargetNotFoundError, TrustError
from edge_agent.usage import ProcessUsage
from trainer.fleet.publisher import publish_repository
from trainer.fleet.tuf_repository import TufRepository, url_path

REPO_ROOT = Path(__file__).resolve().parents[1]

# top-level packages that must not be in the agent's sys.modules / address space for nothing
RUNTIMES = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert"}
TUF_STACK = ("tuf", "securesystemslib", "cryptography", "urllib3")
FEDERATED = ("flwr", "dp_accounting", "torch", "grpc")


def workers(pid: int) -> list[int]:
    """Live TUF worker processes whose parent is ``pid`` (from ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[1]) == pid and fields[0] != "Z" and b"edge_agent.trust._worker" in cmdline:
            out.append(int(stat.parent.name))
    return out


def mapped_packages(pid: int) -> set[str]:
    """Top-level site-packages names with a file mapped into process ``pid``."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = re.search(r"/site-packages/([^/]+)/", line)
        if m:
            found.add(m.group(1))
    return found


# -- imports ----------------------------------------------------------------------------------


def test_importing_the_agent_loads_no_runtime_no_tuf_and_no_psutil() -> None:
    code = (
        "import json, sys\n"
        "import edge_agent.cli, edge_agent.daemon\n"
        "from edge_agent.runtime import available_runtimes\n"
        "found = available_runtimes()\n"
        "print(json.dumps({'found': found, 'modules': sorted({m.split('.')[0] for m in sys.modules}),\n"
        "                  'federated': 'edge_agent.federated' in sys.modules,\n"
        "                  'api': sorted(m for m in ('edge_agent.api', 'http.server') if m in sys.modules)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["found"] == ["onnxruntime", "litert"]  # both installed here, found without import
    loaded = set(out["modules"])
    assert not loaded & {*RUNTIMES.values(), "tflite_runtime", *TUF_STACK, "psutil", *FEDERATED,
                         "prometheus_client"}
    assert not out["federated"]
    assert out["api"] == []  # the local API (and its HTTP server) loads only when enabled


# -- IsolatedRepository -----------------------------------------------------------------------

A = b"deployment-doc " * 10
B = bytes(range(256)) * 21  # several 1 KiB chunks


@pytest.fixture
def published(tmp_path: Path, clients) -> tuple[TufRepository, object]:
    repo = TufRepository.init(tmp_path / "tuf")
    repo.add_targets({"deployments/groups/g.json": A, "artifacts/m-1-onnx-int8.zip": B})
    pub = clients()
    publish_repository(repo, pub, TOPICS, chunk_size=1024, timeout=5)
    return repo, pub


def isolated(tmp_path: Path, broker_url: str, root: Path) -> IsolatedRepository:
    state = tmp_path / "agent"
    (state / "metadata").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root, state / "metadata" / "root.json")
    return IsolatedRepository(
        state / "metadata", state / "targets", state / "chunks",
        broker=BrokerSettings(broker_url), client_id="iso-1.fetch", topics=TOPICS, timeout=5,
    )


def test_isolated_repository_verifies_in_a_child_process_and_leaves_none(
    tmp_path: Path, broker, published
) -> None:
    repo, pub = published
    iso = isolated(tmp_path, broker.url, repo.root_json_path)
    assert workers(os.getpid()) == []  # the trust-anchor check's child has ended
    try:
        iso.refresh()
        [worker] = workers(os.getpid())
        assert iso.fetch_target("deployments/groups/g.json") == A
        assert iso.fetch_target("artifacts/m-1-onnx-int8.zip") == B
        assert iso.list_targets("deployments/") == ["deployments/groups/g.json"]
        assert iso.list_targets("federated/runs/") == []
        with pytest.raises(TargetNotFoundError):
            iso.fetch_target("deployments/agents/nobody.json")
        assert workers(os.getpid()) == [worker]  # one child for the whole pass
    finally:
        iso.close()
    assert workers(os.getpid()) == []
    # a new pass starts a new child, which bootstraps from the persisted trusted state
    iso.refresh()
    assert iso.fetch_target("deployments/groups/g.json") == A
    iso.close()

    # an attacker replaces a chunk of a new target: refused, with the attack's kind
    c = b"\x01" * 3000
    repo.add_targets({"artifacts/m-2-onnx-int8.zip": c})
    publish_repository(repo, pub, TOPICS, chunk_size=1024, timeout=5)
    upath = url_path("artifacts/m-2-onnx-int8.zip", hashlib.sha256(c).hexdigest())
    info = pub.publish(TOPICS.repo_target_chunk(upath, 1), b"\x00" * 1024, qos=1, retain=True)
    info.wait_for_publish(5)
    iso.refresh()
    with pytest.raises(TrustError) as e:
        iso.fetch_target("artifacts/m-2-onnx-int8.zip")
    assert e.value.kind == "tampered"
    assert iso.fetch_target("deployments/groups/g.json") == A  # the child survives a refusal
    iso.close()


def test_isolated_repository_refuses_a_bad_anchor_and_reports_a_dead_broker(
    tmp_path: Path, broker, published
) -> None:
    repo, _ = published
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    with pytest.raises(TrustError, match="trusted root is invalid"):
        isolated(tmp_path / "bad", broker.url, bogus)
    assert workers(os.getpid()) == []

    iso = isolated(tmp_path, broker.url, repo.root_json_path)  # checked without the broker
    broker.stop()
    with pytest.raises(TrustError) as e:
        iso.refresh()
    assert e.value.kind == "unavailable" and "broker" in e.value.message
    iso.close()
    assert workers(os.getpid()) == []


# -- the real agent ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registry with host@1 built for x86-64-v3 and rpi4-arm64 (ONNX and TFLite variants)."""
    base = tmp_path_factory.mktemp("footprint")
    csv = base / "host.csv"
    cli("data", "synth", "--out", str(csv), "--rows", "1500", "--seed", "3")
    registry = base / "registry"
    cli("train", "--data", str(csv), "--profile", "x86-64-v3", "--profile", "rpi4-arm64",
        "--name", "host", "--registry", str(registry), "--epochs", "1", "--window", "16",
        "--train-fraction", "0.5", "--json", "-q", timeout=400)
    cli("repo", "init", "--registry", str(registry), "--json")
    return csv, registry


@pytest.mark.slow
@pytest.mark.parametrize(
    ("profile", "offered", "serves", "unused"),
    [
        # rpi4-arm64 may run either format and prefers TFLite: onnxruntime is installed,
        # offered, and must still never be loaded.
        ("rpi4-arm64", ["onnxruntime", "litert"], "tflite", "onnxruntime"),
        ("x86-64-v3", ["onnxruntime"], "onnx", "litert"),
    ],
)
def test_a_serving_agent_maps_only_its_models_runtime_and_no_tuf(
    trained, broker, tmp_path: Path, profile: str, offered: list[str], serves: str, unused: str
) -> None:
    csv, registry = trained
    registry = Path(shutil.copytree(registry, tmp_path / "registry"))
    root = registry / "tuf" / "metadata" / "root.json"
    cli("deploy", "host@1", "--group", "lab", "--registry", str(registry), "--broker", broker.url)
    home = tmp_path / "edge"
    home.mkdir()
    text = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "init-config", "--agent-id", "edge-fp",
         "--group", "lab", "--profile", profile, "--broker", broker.url, "--trust", str(root),
         "--state-dir", str(home / "state"), "--source", f"csv:{csv}?rate=100"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    config = home / "agent.toml"
    config.write_text(re.sub(r"(?m)^period_seconds = \S+", "period_seconds = 0.5", text))
    agent = AgentProcess(config, home / "state", home / "stderr.log", exit_at_end=False)
    watch = Watch(broker.url, agent.tail)
    try:
        state = watch.wait_for(
            lambda: next((s for s in watch.of("state") if s.active), None), 60,
            "the agent to announce an active model",
        )
        assert [a.format for a in state.active] == [serves]
        assert list(state.runtimes) == offered
        watch.wait_for(lambda: any(h.inferences > 0 for h in watch.of("health")), 30,
                       "a health report counting inferences")
        # The pass that activated the model is over: its TUF process has exited.
        poll_until(lambda: workers(agent.pid) == [], 30, "the TUF worker to exit", agent.tail)
        assert agent.alive(), agent.tail()
        mapped = mapped_packages(agent.pid)
        assert RUNTIMES["onnxruntime" if serves == "onnx" else "litert"] in mapped  # it serves
        assert RUNTIMES[unused] not in mapped, sorted(mapped)
        assert not mapped & set(TUF_STACK), sorted(mapped)
    finally:
        watch.close()
        agent.kill()


# -- the health report's own figures ----------------------------------------------------------


def _vmrss() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def test_process_usage_reports_this_process() -> None:
    lo = _vmrss()
    rss = ProcessUsage().rss_bytes()
    hi = _vmrss()
    assert min(lo, hi) - 2**20 <= rss <= max(lo, hi) + 2**20

    ticks = iter([100.0, 102.0])  # two seconds of wall time between the readings
    a = _cpu()
    usage = ProcessUsage(clock=lambda: next(ticks))
    b = _cpu()
    while _cpu() - b < 0.05:  # burn some CPU
        sum(i * i for i in range(10_000))
    c = _cpu()
    percent = usage.cpu_percent()
    d = _cpu()
    assert 100 * (c - b) / 2 <= percent <= 100 * (d - a) / 2
    assert percent > 0
