"""``edgefleet repo|deploy|fleet`` end to end: real CLI subprocesses, registry, Mosquitto, TUF."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from tuf.api.metadata import Metadata

from edge_agent.mqtt import RetainedReader
from edge_agent.trust import MqttFetcher, TargetNotFoundError, TrustedRepository
from shared.bundle import bundle_target_name
from shared.chunking import RepoIndex
from shared.deployment import (
    Deployment,
    agent_target,
    choose_variant,
    decode_deployment,
    group_target,
)
from shared.messages import (
    ActiveModel,
    AgentHealth,
    AgentState,
    DeploymentStatus,
    encode_agent_health,
    encode_agent_state,
    encode_deployment_status,
)
from shared.profiles import load_profile
from shared.topics import Topics
from trainer.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
TOPICS = Topics()


# -- fixtures ---------------------------------------------------------------------------------


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real CLI; with ``ok`` assert it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the CLI failed with ``code`` and one line on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgefleet: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with m@1 and m@2 (both for x86-64-v3 and rpi4-arm64), trained by the CLI."""
    base = tmp_path_factory.mktemp("trained")
    csv = base / "sine.csv"
    rng = random.Random(7)
    t0 = datetime(2026, 1, 1)
    rows = ["timestamp,value"] + [
        f"{(t0 + timedelta(minutes=5 * i)):%Y-%m-%d %H:%M:%S},{math.sin(i / 10) + rng.gauss(0, 0.1):.5f}"
        for i in range(600)
    ]
    csv.write_text("\n".join(rows) + "\n")
    registry = base / "registry"
    for _ in range(2):
        run(
            "train", "--data", str(csv), "--profile", "x86-64-v3", "--profile", "rpi4-arm64",
            "--name", "m", "--registry", str(registry), "--epochs", "2", "--json", "-q",
        )
    return registry


@pytest.fixture
def registry(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained registry (tests add a TUF repository to it)."""
    return Path(shutil.copytree(trained, tmp_path / "registry"))


def tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def init(registry: Path) -> Path:
    out = json.loads(run("repo", "init", "--registry", str(registry), "--json").stdout)
    return Path(out["root"])


def deploy(registry: Path, broker, ref: str, *scope: str) -> dict:
    proc = run("deploy", ref, *scope, "--registry", str(registry), "--broker", broker.url, "--json")
    return json.loads(proc.stdout)


def agent_repo(tmp_path: Path, client: mqtt.Client, root: Path, name: str = "a") -> TrustedRepository:
    state = tmp_path / f"agent-{name}"
    fetcher = MqttFetcher(client, TOPICS, state / "chunks", timeout=5)
    return TrustedRepository(state / "metadata", state / "targets", fetcher, root.read_bytes())


def _target_of(upath: str) -> str:
    """``dir/{sha256}.{basename}`` (a consistent-snapshot url path) → ``dir/{basename}``."""
    dirname, _, base = upath.rpartition("/")
    return f"{dirname}/{base.split('.', 1)[1]}"


def registry_sha(registry: Path, version: int, fmt: str, quant: str) -> str:
    with Registry.open(registry) as reg:
        record = reg.get("m", version)
    return next(a.sha256 for a in record.artifacts if (a.format, a.quantization) == (fmt, quant))


# -- repo init --------------------------------------------------------------------------------


@pytest.mark.slow  # trains two versions once per module
def test_repo_init_prints_root_and_refuses_a_second_init(registry):
    proc = run("repo", "init", "--registry", str(registry), "--json")
    out = json.loads(proc.stdout)
    assert out == {
        "root": str(registry / "tuf" / "metadata" / "root.json"),
        "repository": str(registry / "tuf"),
    }
    root = Metadata.from_bytes(Path(out["root"]).read_bytes())
    assert root.signed.type == "root" and root.signed.consistent_snapshot

    before = tree(registry)
    again = run("repo", "init", "--registry", str(registry), ok=False)
    assert "already exists" in one_line_error(again, 2)
    assert tree(registry) == before  # nothing rewritten, not even a key

    other = registry.parent / "other"
    shutil.copytree(registry, other, ignore=shutil.ignore_patterns("tuf"))
    text = run("repo", "init", "--registry", str(other), "--root-key-dir", str(other / "offline"))
    assert str(other / "tuf" / "metadata" / "root.json") in text.stdout
    assert (other / "offline" / "root.pem").exists()
    assert not (other / "tuf" / "keys" / "root.pem").exists()


# -- deploy -----------------------------------------------------------------------------------


@pytest.mark.slow  # trains two versions once per module
def test_deploy_reaches_a_verifying_agent(registry, broker, clients, tmp_path):
    root = init(registry)
    report = deploy(registry, broker, "m@2", "--group", "lab")
    assert report["version"] == 2 and report["serial"] == 1
    assert report["document"] == group_target("lab")
    bundles = [bundle_target_name("m", 2, f, q) for f, q in
               [("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")]]
    assert report["bundles"] == bundles

    # what a plain subscriber finds retained on the broker
    there = RetainedReader(clients(), TOPICS, timeout=5).read([TOPICS.repo_all()])
    assert TOPICS.repo_metadata("timestamp.json") in there
    index = RepoIndex.from_bytes(there[TOPICS.repo_index()])
    listed = {_target_of(upath) for upath in index.targets}
    assert listed == {group_target("lab"), *bundles}
    for upath in index.targets:
        assert TOPICS.repo_target_index(upath) in there

    # an agent (TUF over MQTT) verifies the document and the bundle it chooses
    ag = agent_repo(tmp_path, clients(), root)
    ag.refresh()
    doc = decode_deployment(ag.fetch_target(group_target("lab")))
    assert doc.scope.kind == "group" and doc.scope.name == "lab" and doc.serial == 1
    slot = doc.slots["default"]
    assert (slot.model, slot.version) == ("m", 2)
    profile = load_profile("rpi4-arm64")
    variant = choose_variant(
        slot, profile.name, profile.preferred_format, profile.preferred_quantization,
        {"onnx", "tflite"},
    )
    assert variant is not None and (variant.format, variant.quantization) == ("tflite", "int8")
    data = ag.fetch_target(variant.target)
    sha = hashlib.sha256(data).hexdigest()
    assert sha == variant.sha256 == registry_sha(registry, 2, "tflite", "int8")
    assert len(data) == variant.size_bytes
    assert ag.target_custom(variant.target) == {
        "format": "tflite", "quantization": "int8", "profiles": ["rpi4-arm64"],
        "model": "m", "version": 2,
    }
    x86 = load_profile("x86-64-v3")
    onnx = choose_variant(slot, x86.name, x86.preferred_format, x86.preferred_quantization, {"onnx"})
    assert onnx is not None and onnx.target == bundle_target_name("m", 2, "onnx", "int8")


@pytest.mark.slow  # trains two versions once per module
def test_rollback_is_a_newer_document_naming_the_older_version(registry, broker, clients, tmp_path):
    root = init(registry)
    deploy(registry, broker, "m@2", "--group", "lab")
    ag = agent_repo(tmp_path, clients(), root)
    ag.refresh()
    assert decode_deployment(ag.fetch_target(group_target("lab"))).slots["default"].version == 2

    report = deploy(registry, broker, "m@1", "--group", "lab")
    assert (report["version"], report["serial"]) == (1, 2)
    ag.refresh()
    doc = decode_deployment(ag.fetch_target(group_target("lab")))
    assert doc.serial == 2 and doc.slots["default"].version == 1
    v = choose_variant(doc.slots["default"], "x86-64-v3", "onnx", "int8", {"onnx"})
    assert v is not None and v.target == bundle_target_name("m", 1, "onnx", "int8")
    assert hashlib.sha256(ag.fetch_target(v.target)).hexdigest() == registry_sha(
        registry, 1, "onnx", "int8"
    )


@pytest.mark.slow  # trains two versions once per module
def test_agent_document_is_a_separate_target_with_its_own_serial(registry, broker, clients, tmp_path):
    root = init(registry)
    deploy(registry, broker, "m@2", "--group", "lab")
    deploy(registry, broker, "m@2", "--group", "lab")  # group serial 2
    pinned = deploy(registry, broker, "m@1", "--agent", "pi-7")
    assert pinned["document"] == agent_target("pi-7") and pinned["serial"] == 1
    # another slot on the same scope keeps the first slot
    canary = deploy(registry, broker, "m@2", "--agent", "pi-7", "--slot", "canary")
    assert canary["serial"] == 2

    ag = agent_repo(tmp_path, clients(), root)
    ag.refresh()
    group_doc = decode_deployment(ag.fetch_target(group_target("lab")))
    agent_doc: Deployment = decode_deployment(ag.fetch_target(agent_target("pi-7")))
    assert (group_doc.serial, group_doc.slots["default"].version) == (2, 2)
    assert agent_doc.scope.kind == "agent" and agent_doc.scope.name == "pi-7"
    assert agent_doc.serial == 2
    assert {k: s.version for k, s in agent_doc.slots.items()} == {"default": 1, "canary": 2}


@pytest.mark.slow  # trains two versions once per module
def test_deploy_refuses_a_group_a_rollout_holds_unless_forced(registry, broker):
    from trainer.fleet.rollout import DEFAULT_GATES, RolloutRecord, RolloutStore

    init(registry)
    deploy(registry, broker, "m@1", "--group", "lab")
    now = "2026-01-01T00:00:00.000+00:00"
    with Registry.open(registry) as reg:
        RolloutStore(reg).create(RolloutRecord(
            id="ro-00000001", created_at=now, updated_at=now, model="m", version=2,
            previous_version=1, group="lab", slot="default", stages=("1", "100%"), soak_s=60.0,
            gates=DEFAULT_GATES, agents=("pi-7", "pi-8"), state="running", stage=0, paused=False,
            abort_requested=False, progress={"phase": "deploy", "skipped": {}},
        ))
    before = tree(registry / "tuf")
    for scope in (("--group", "lab"), ("--agent", "pi-8")):
        proc = run("deploy", "m@2", *scope, "--registry", str(registry), "--broker", broker.url,
                   ok=False)
        assert proc.returncode == 2 and "edgefleet rollout abort ro-00000001" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert tree(registry / "tuf") == before
    assert deploy(registry, broker, "m@2", "--agent", "pi-9")["serial"] == 1  # not in the group
    forced = deploy(registry, broker, "m@2", "--group", "lab", "--force")
    assert forced["serial"] == 2


@pytest.mark.slow  # trains two versions once per module
def test_repo_publish_is_idempotent_and_refresh_republishes(registry, broker, clients):
    init(registry)
    deploy(registry, broker, "m@2", "--group", "lab")
    publish = ["repo", "publish", "--registry", str(registry), "--broker", broker.url, "--json"]
    first = json.loads(run(*publish).stdout)
    second = json.loads(run(*publish).stdout)
    for report in (first, second):  # deploy already published everything
        assert report["messages"] == 0 and report["published_targets"] == []
        assert len(report["skipped_targets"]) == 5 and report["cleared_topics"] == []

    reader = RetainedReader(clients(), TOPICS, timeout=5)
    before = json.loads(reader.read([TOPICS.repo_metadata("timestamp.json")])[
        TOPICS.repo_metadata("timestamp.json")])["signed"]["version"]
    refreshed = json.loads(
        run("repo", "refresh", "--registry", str(registry), "--broker", broker.url, "--json").stdout
    )
    assert refreshed["renewed"] == ["timestamp"]
    assert refreshed["published"]["published_metadata"] == ["timestamp.json"]
    after = json.loads(reader.read([TOPICS.repo_metadata("timestamp.json")])[
        TOPICS.repo_metadata("timestamp.json")])["signed"]["version"]
    assert after == before + 1 == refreshed["versions"]["timestamp"]

    offline = run("repo", "refresh", "--registry", str(registry))
    assert "not published" in offline.stdout
    caught_up = json.loads(run(*publish).stdout)
    assert caught_up["published_metadata"] == ["timestamp.json"]
    assert caught_up["cleared_topics"] == []


# -- repo prune, rotate-root --------------------------------------------------------------------

@pytest.mark.slow  # trains two versions once per module
def test_repo_prune_keeps_what_deployments_use_and_clears_the_rest(registry, broker, clients, tmp_path):
    root = init(registry)
    v1 = deploy(registry, broker, "m@1", "--group", "lab")["bundles"]
    v2 = deploy(registry, broker, "m@2", "--group", "lab")["bundles"]  # m@1 no longer in use
    prune = ["repo", "prune", "--registry", str(registry), "--broker", broker.url, "--json"]

    before = tree(registry)
    dry = json.loads(run(*prune, "--keep", "0", "--dry-run").stdout)
    assert dry["dry_run"] is True and dry["published"] is None
    assert dry["removed_targets"] == v1
    assert (dry["in_use"], dry["rollback"], dry["removed_versions"]) == ({"m": [2]}, {"m": []}, {"m": [1]})
    assert tree(registry) == before  # a dry run changes nothing

    kept = json.loads(run(*prune).stdout)  # default: two rollback versions per model
    assert kept["removed_targets"] == [] and kept["rollback"] == {"m": [1]}

    text = run("repo", "prune", "--registry", str(registry), "--broker", broker.url, "--keep", "0")
    assert text.stdout.splitlines()[0] == "m: in use 2; kept for rollback -; pruned 1"
    assert f"removed {len(v1)} target(s)" in text.stdout

    # What a fresh subscriber finds retained: m@1's bundles are gone, chunks and all.
    there = RetainedReader(clients(), TOPICS, timeout=5).read([TOPICS.repo_all()])
    parsed = [p for t in there if (p := TOPICS.parse_repo_topic(t)) is not None]
    retained_targets = {_target_of(p.name) for p in parsed if p.kind.startswith("target-")}
    assert retained_targets == {group_target("lab"), *v2}
    assert len(RepoIndex.from_bytes(there[TOPICS.repo_index()]).targets) == 1 + len(v2)
    assert not list((registry / "tuf" / "targets").rglob("*.m-1-*"))  # deleted on disk too

    # The kept bundles still verify; the pruned ones are no longer targets.
    ag = agent_repo(tmp_path, clients(), root)
    ag.refresh()
    for target in v2:
        custom = ag.target_custom(target)
        data = ag.fetch_target(target)
        sha = registry_sha(registry, 2, custom["format"], custom["quantization"])
        assert hashlib.sha256(data).hexdigest() == sha
    for target in v1:
        with pytest.raises(TargetNotFoundError):
            ag.fetch_target(target)

    # A pruned version can be deployed again (a rollback adds its bundles back).
    assert deploy(registry, broker, "m@1", "--group", "lab")["serial"] == 3
    ag.refresh()
    data = ag.fetch_target(v1[0])
    custom = ag.target_custom(v1[0])
    assert hashlib.sha256(data).hexdigest() == registry_sha(
        registry, 1, custom["format"], custom["quantization"]
    )


@pytest.mark.slow  # trains two versions once per module
def test_repo_rotate_root_is_followed_by_agents_and_refresh_warns_before_root_expires(
    registry, broker, clients, tmp_path
):
    root = init(registry)
    deploy(registry, broker, "m@1", "--group", "lab")
    ag = agent_repo(tmp_path, clients(), root)
    ag.refresh()

    rotated = json.loads(run(
        "repo", "rotate-root", "--registry", str(registry), "--new-keys", "--broker", broker.url,
        "--json",
    ).stdout)
    assert rotated["renewed"] == ["root", "targets", "snapshot", "timestamp"]
    assert rotated["new_keys"] == ["root", "targets", "snapshot", "timestamp"]
    assert rotated["versions"]["root"] == 2 and rotated["root"] == str(root)
    assert "2.root.json" in rotated["published"]["published_metadata"]
    deploy(registry, broker, "m@2", "--group", "lab")  # signed with the new keys

    ag.refresh()
    assert decode_deployment(ag.fetch_target(group_target("lab"))).slots["default"].version == 2
    trusted = Metadata.from_file(str(tmp_path / "agent-a" / "metadata" / "root.json"))
    assert trusted.signed.version == 2

    refresh = ["repo", "refresh", "--registry", str(registry)]
    assert run(*refresh).stderr == ""  # root is good for a year: no warning
    short = run("repo", "rotate-root", "--registry", str(registry), "--expires", "10")
    assert "signed root v3 (same keys)" in short.stdout and "not published" in short.stdout
    warned = run(*refresh)
    assert "warning: root.json expires" in warned.stderr and "rotate-root" in warned.stderr


# -- fleet status -----------------------------------------------------------------------------


def _put(client: mqtt.Client, topic: str, payload: bytes) -> None:
    info = client.publish(topic, payload, qos=1, retain=True)
    info.wait_for_publish(5)
    assert info.is_published()


def _now_iso(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat(timespec="milliseconds")


def test_fleet_status_shows_what_agents_retained(broker, clients):
    agent = clients()  # a paho client acting as four agents
    # pi-1 is live: born and reporting health just now, every 60 s.
    _put(agent, TOPICS.agent_state("pi-1"), encode_agent_state(AgentState(
        agent="pi-1", status="online", bdseq=3, group="lab", profile="rpi4-arm64",
        arch="aarch64", runtimes=("onnxruntime", "litert"),
        active=(ActiveModel("default", "m", 2, "tflite", "int8", "a" * 64),),
        emulated=True, ts=_now_iso(), health_period_s=60, extra={"future": 1},
    )))
    _put(agent, TOPICS.agent_deployments("pi-1"), encode_deployment_status(DeploymentStatus(
        agent="pi-1", slot="default", model="m", version=2, state="active", reason=None,
        serial=4, ts=_now_iso(),
    )))
    _put(agent, TOPICS.agent_health("pi-1"), encode_agent_health(AgentHealth(
        agent="pi-1", ts=_now_iso(), inferences=120, anomalies=2, errors=0,
        latency_ms={"p50": 0.4, "p99": 1.25}, outbox_depth=0, outbox_dropped=0, rss_mb=80.5,
        cpu_percent=3.0,
    )))
    # old-1 died without its Last Will (say the broker crashed with it): its retained state
    # still says online, its last health is hours old. Its birth predates health_period_s.
    _put(agent, TOPICS.agent_state("old-1"), encode_agent_state(AgentState(
        agent="old-1", status="online", bdseq=1, group="lab", profile="x86-64-v3",
        arch="x86_64", runtimes=("onnxruntime",), active=(), emulated=False,
        ts=_now_iso(-timedelta(hours=3, minutes=1)),
    )))
    _put(agent, TOPICS.agent_health("old-1"), encode_agent_health(AgentHealth(
        agent="old-1", ts=_now_iso(-timedelta(hours=3)), inferences=7, anomalies=0, errors=0,
        latency_ms={"p50": None, "p99": None}, outbox_depth=0, outbox_dropped=0, rss_mb=None,
        cpu_percent=None,
    )))
    _put(agent, TOPICS.agent_state("x86-1"), encode_agent_state(AgentState(
        agent="x86-1", status="offline", bdseq=1, group=None, profile="x86-64-v3",
        arch="x86_64", runtimes=("onnxruntime",), active=(), emulated=False,
        ts="2026-01-01T00:00:03Z",
    )))
    _put(agent, TOPICS.agent_deployments("x86-1"), encode_deployment_status(DeploymentStatus(
        agent="x86-1", slot="default", model="m", version=1, state="failed",
        reason="smoke test: output mismatch", serial=1, ts="2026-01-01T00:00:04Z",
    )))
    # zz-1 is a newer agent that reports a status and a deployment state this version lacks.
    _put(agent, TOPICS.agent_state("zz-1"), encode_agent_state(AgentState(
        agent="zz-1", status="draining", bdseq=9, group="lab", profile="x86-64-v3",
        arch="x86_64", runtimes=("onnxruntime",), active=(), emulated=False, ts=_now_iso(),
        health_period_s=60,
    )))
    _put(agent, TOPICS.agent_deployments("zz-1"), encode_deployment_status(DeploymentStatus(
        agent="zz-1", slot="default", model="m", version=2, state="benchmarking", reason=None,
        serial=2, ts=_now_iso(),
    )))
    _put(agent, TOPICS.agent_state("broken"), b"not json")  # ignored, not fatal

    views = json.loads(run("fleet", "status", "--broker", broker.url, "--json").stdout)
    assert [v["agent"] for v in views] == ["old-1", "pi-1", "x86-1", "zz-1"]
    old, pi, x86, zz = views
    assert pi["status"] == "online" and pi["profile"] == "rpi4-arm64" and pi["group"] == "lab"
    assert pi["emulated"] is True
    assert [{k: a[k] for k in ("slot", "model", "version", "format")} for a in pi["active"]] == [
        {"slot": "default", "model": "m", "version": 2, "format": "tflite"}
    ]
    assert {k: pi["last_deployment"][k] for k in ("state", "reason", "version")} == {
        "state": "active", "reason": None, "version": 2,
    }
    assert pi["health"]["latency_ms"] == {"p50": 0.4, "p99": 1.25}
    assert pi["health"]["inferences"] == 120
    assert pi["health_period_s"] == 60 and pi["stale"] is False
    assert 0 <= pi["health_age_s"] < 3 * 60

    assert old["status"] == "online" and old["stale"] is True
    assert old["health_period_s"] is None  # judged on the default period
    assert 3 * 3600 <= old["health_age_s"] < 4 * 3600

    assert x86["status"] == "offline" and x86["active"] == [] and x86["health"] is None
    assert x86["health_age_s"] is None and x86["stale"] is False  # offline: not a live claim
    assert x86["last_deployment"]["state"] == "failed"
    assert x86["last_deployment"]["reason"] == "smoke test: output mismatch"

    assert zz["status"] == "draining" and zz["last_deployment"]["state"] == "benchmarking"
    assert zz["stale"] is False

    text = run("fleet", "status", "--broker", broker.url).stdout
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["AGENT", "STATUS", "GROUP"]
    assert lines[1].startswith("old-1") and "online (stale)" in lines[1]
    assert "3 h ago: p99 - ms, 7 inf" in lines[1]
    assert lines[2].startswith("pi-1") and "online (emulated)" in lines[2]
    assert "default=m@2/tflite-int8" in lines[2] and " s ago: p99 1.25 ms" in lines[2]
    assert "stale" not in lines[2]
    assert lines[3].startswith("x86-1") and "offline" in lines[3] and "stale" not in lines[3]
    assert "m@1 failed (smoke test: output mismatch)" in lines[3]
    assert lines[4].startswith("zz-1") and "draining" in lines[4]
    assert "m@2 benchmarking" in lines[4]


def test_fleet_status_of_an_empty_fleet(broker):
    assert json.loads(run("fleet", "status", "--broker", broker.url, "--json").stdout) == []
    assert "no agents" in run("fleet", "status", "--broker", broker.url).stdout


# -- bad input --------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


@pytest.mark.slow  # trains two versions once per module
def test_bad_inputs_are_one_line_with_the_right_exit_code(registry, broker, tmp_path):
    url = broker.url
    reg = str(registry)
    missing_repo = run("deploy", "m@1", "--group", "g", "--registry", reg, "--broker", url, ok=False)
    assert "edgefleet repo init --registry" in one_line_error(missing_repo, 2)
    assert not (registry / "tuf").exists()  # nothing half-created

    init(registry)
    unknown = run("deploy", "m@9", "--group", "g", "--registry", reg, "--broker", url, ok=False)
    assert "m@9" in one_line_error(unknown, 2) and "known versions: [1, 2]" in unknown.stderr
    no_model = run("deploy", "zz@1", "--group", "g", "--registry", reg, "--broker", url, ok=False)
    assert "zz" in one_line_error(no_model, 2)
    no_registry = run(
        "deploy", "m@1", "--group", "g", "--registry", str(tmp_path / "nope"), "--broker", url,
        ok=False,
    )
    assert "no registry" in one_line_error(no_registry, 2)
    bad_group = run("deploy", "m@1", "--group", "a/b", "--registry", reg, "--broker", url, ok=False)
    assert "group" in one_line_error(bad_group, 2)

    closed = f"mqtt://127.0.0.1:{_closed_port()}"
    for cmd in (
        ["deploy", "m@1", "--group", "g", "--registry", reg],
        ["repo", "publish", "--registry", reg],
        ["fleet", "status"],
    ):
        bad_url = run(*cmd, "--broker", "http://127.0.0.1:1883", ok=False)
        assert "bad broker URL" in one_line_error(bad_url, 2)
        unreachable = run(*cmd, "--broker", closed, "--broker-timeout", "3", ok=False)
        assert "cannot connect" in one_line_error(unreachable, 1)

    no_password = run(
        "fleet", "status", "--broker", url, "--username", "u", "--password-file",
        str(tmp_path / "missing"), ok=False,
    )
    assert "--password-file" in one_line_error(no_password, 2)

    # repo prune / rotate-root: bad input changes nothing
    before = tree(registry)
    for args, expected in (
        (["repo", "prune", "--registry", reg, "--keep", "-1"], "--keep"),
        (["repo", "prune", "--registry", reg, "--keep", "two"], "--keep"),
        (["repo", "prune", "--registry", str(tmp_path / "nope")], "no TUF repository"),
        (["repo", "prune", "--registry", reg, "--broker", "http://x"], "bad broker URL"),
        (["repo", "rotate-root", "--registry", reg, "--new-keys", "mirror"], "--new-keys"),
        (["repo", "rotate-root", "--registry", reg, "--expires", "0"], "--expires"),
        (["repo", "rotate-root", "--registry", reg, "--root-key-dir", str(tmp_path)], "no root key"),
        (["repo", "rotate-root", "--registry", str(tmp_path / "nope")], "no TUF repository"),
    ):
        proc = run(*args, ok=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], (args, lines)
    assert tree(registry) == before


def test_credentials_from_a_file_or_the_environment(auth_broker, tmp_path):
    good = tmp_path / "good"
    good.write_text("s3cret\n")
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    status = ["fleet", "status", "--broker", auth_broker, "--json", "--username", "alice"]
    assert json.loads(run(*status, "--password-file", str(good)).stdout) == []
    refused = run(*status, "--password-file", str(bad), ok=False)
    assert "refused the credentials" in one_line_error(refused, 2)
    assert "wrong" not in refused.stderr  # the secret never reaches the output

    env = {**os.environ, "EDGEFLEET_MQTT_PASSWORD": "s3cret"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *status], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60, env=env,
    )
    assert proc.returncode == 0, proc.stderr
