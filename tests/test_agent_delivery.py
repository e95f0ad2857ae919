"""The agent end to end: real Mosquitto, the agent and the trainer CLI as real subprocesses.

What each test proves:

1. a deployment published by ``edgefleet deploy`` reaches a running agent, which reports
   downloading → verifying → staging → active, announces the model in its retained state and
   streams anomaly events; a clean stop retains ``stopped``, a SIGKILL leaves the Last Will
   ``offline`` with the birth's ``bdseq``;
2. an attacker who can write to the broker cannot get a bad v2 activated (tampered bundle,
   untrusted signature, rollback, freeze, mix-and-match, endless data): the agent reports
   ``failed`` naming the attack and keeps serving v1;
3. an agent killed mid-download resumes from its chunk cache after a restart;
4. events detected while the broker is down are all delivered once it is back;
5. a document from a newer trainer, with variants this agent cannot run, still activates the
   variant it can run; a slot offered nothing runnable fails with a clear reason;
6. ``edgefleet fleet status`` marks an agent stale when the broker crashed with it (its
   retained state still says online, no Last Will was sent);
7. an agent started while the broker is down serves its last model from the first sample and
   delivers every event once the broker comes;
8. a state file that cannot be written (a condition the MQTT callbacks used to hit) does not
   stop reconnects or deliveries;
9. a full state directory never stops detection: what cannot be stored is counted, and the
   agent recovers by itself, applying the deployment it could not store; an agent first
   started on a full disk leaves no partial trust anchor and provisions once space returns;
10. inputs that shift away from the training reference raise one ``drift`` event, and health and
    ``edgefleet fleet status`` show the drift;
11. a shadow candidate (``edgefleet deploy --shadow``) is verified and stored like a model, scores
    the same samples beside the serving model without emitting anything, and health and
    ``edgefleet fleet status`` show how the two compare; ``--clear-shadow`` unloads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_delivery import (
    STAGING,
    TOPICS,
    Agents,
    Attacker,
    SmallDisks,
    Watch,
    bundle_bytes,
    bundle_sha,
    bundle_upath,
    cli,
    csv_timestamps,
    flagged_rows,
    json_lines,
    outbox_counts,
    poll_until,
    sha256_file,
)
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edge_agent.drift import season_of, window_for
from edge_agent.mqtt import connect
from shared.bundle import bundle_target_name, read_bundle, write_bundle
from shared.chunking import ChunkIndex, split
from shared.deployment import Deployment, Scope, Slot, Variant, encode_deployment
from shared.messages import decode_agent_state, decode_deployment_status
from shared.topics import RepoTopic
from trainer.fleet.deploy import plan_deployment, repository_lock, repository_path
from trainer.fleet.publisher import publish_repository
from trainer.fleet.tuf_repository import TufRepository
from trainer.registry import Registry

pytestmark = pytest.mark.slow


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic host-metrics CSV and a registry with host@1 and host@2 and a TUF repository."""
    base = tmp_path_factory.mktemp("delivery")
    csv = base / "host.csv"
    cli("data", "synth", "--out", str(csv), "--rows", "3000", "--seed", "1")
    assert (base / "host.labels.json").exists()
    registry = base / "registry"
    for seed in (0, 1):
        out = json.loads(cli(
            "train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host",
            "--registry", str(registry), "--epochs", "5", "--train-fraction", "0.3",
            "--seed", str(seed), "--json", "-q",
        ).stdout)
        assert out["version"] == seed + 1
    cli("repo", "init", "--registry", str(registry), "--json")
    return csv, registry


@dataclass
class Env:
    """One test's world: its own broker, registry copy (own TUF state), agents and clients."""

    csv: Path
    registry: Path
    broker: Any  # conftest.Broker
    agents: Agents
    attacker: Attacker
    tmp: Path
    _watches: list[Watch] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return repository_path(self.registry) / "metadata" / "root.json"

    def subscribe(self, *, persistent: bool = False) -> Watch:
        watch = Watch(self.broker.url, self.agents.tail, persistent=persistent)
        self._watches.append(watch)
        return watch

    def agent_config(self, agent_id: str, rate: float) -> Path:
        return self.agents.config(agent_id, trust=self.root, source=f"csv:{self.csv}?rate={rate:g}")

    def deploy(self, ref: str, *extra: str) -> dict:
        return json.loads(cli(
            "deploy", ref, "--group", "lab", "--registry", str(self.registry),
            "--broker", self.broker.url, "--json", *extra,
        ).stdout)

    def retained_agent(self, agent_id: str):
        """The retained (state, deployment status) of an agent, as a fresh subscriber sees them."""
        topics = [TOPICS.agent_state(agent_id), TOPICS.agent_deployments(agent_id)]
        got = self.attacker.read(TOPICS, topics)
        state, dep = (got.get(t) for t in topics)
        return (decode_agent_state(state) if state else None,
                decode_deployment_status(dep) if dep else None)


@pytest.fixture
def env(trained, broker, tmp_path: Path) -> Iterator[Env]:
    csv, registry = trained
    copy = Path(shutil.copytree(registry, tmp_path / "registry"))  # TUF versions stay per test
    agents = Agents(tmp_path / "agents", broker.url)
    attacker = Attacker(broker.url)
    e = Env(csv, copy, broker, agents, attacker, tmp_path)
    try:
        yield e
    finally:
        agents.close()  # SIGKILL every agent still running
        for w in e._watches:
            w.close()
        attacker.close()


def first(items):
    return next(iter(items), None)


def deployment_states(watch: Watch, model: str, version: int, since: int = 0) -> list[str]:
    return [d.state for d in watch.of("deployments", since) if (d.model, d.version) == (model, version)]


def wait_active(watch: Watch, version: int, since: int = 0, timeout: float = 40) -> None:
    watch.wait_for(lambda: "active" in deployment_states(watch, "host", version, since), timeout,
                   f"deployment host@{version} to become active")


def born(watch: Watch, since: int = 0):
    return watch.wait_for(
        lambda: first(s for s in watch.of("state", since) if s.status == "online"), 40,
        "the agent's birth (retained state online)",
    )


# -- 1. deploy → activate → events; stop, Last Will ---------------------------------------


def test_deploy_activates_and_streams_events_then_stop_and_last_will(env: Env) -> None:
    watch = env.subscribe()
    config = env.agent_config("edge-1", rate=400)
    agent = env.agents.start(config)
    birth = born(watch)
    assert birth.active == () and birth.group == "lab" and birth.profile == "x86-64-v3"
    assert "onnxruntime" in birth.runtimes

    mark = watch.mark()
    report = env.deploy("host@1")
    assert (report["version"], report["serial"]) == (1, 1)
    wait_active(watch, 1, mark)
    assert deployment_states(watch, "host", 1, mark) == ["downloading", "verifying", "staging", "active"]
    sha = bundle_sha(env.registry, "host", 1)
    state = watch.wait_for(
        lambda: first(s for s in watch.of("state", mark) if s.active), 10, "state listing the model"
    )
    assert state.status == "online" and state.bdseq == birth.bdseq
    [active] = state.active
    assert (active.slot, active.model, active.version, active.format, active.quantization,
            active.sha256) == ("default", "host", 1, "onnx", "int8", sha)
    retained_state, retained_dep = env.retained_agent("edge-1")  # a late subscriber's view
    assert retained_state.active == state.active and retained_dep.state == "active"
    assert (retained_dep.model, retained_dep.version, retained_dep.serial) == ("host", 1, 1)

    events = watch.wait_for(lambda: len(watch.of("events")) >= 5 and watch.of("events"), 40,
                            "five anomaly events")
    for ev in events:
        assert ev["schema"] == "edgefleet.event/1" and ev["agent"] == "edge-1"
        assert ev["model_version"] == 1 and ev["slot"] == "default" and ev["is_anomaly"] is True
        # Decided by the bundle's score pipeline: anomaly_score >= 0.5 exactly when is_anomaly.
        assert ev["score"] > 0 and ev["threshold"] > 0 and 0.5 <= ev["anomaly_score"] <= 1
        datetime.fromisoformat(ev["timestamp"])
        assert len(ev["values"]) == 4  # cpu, memory, disk, network
    seqs = [ev["seq"] for ev in events]
    assert seqs[0] == 1 and all(a < b for a, b in zip(seqs, seqs[1:], strict=False)), seqs
    health = watch.wait_for(lambda: first(h for h in watch.of("health") if h.anomalies), 10,
                            "a health report counting anomalies")
    assert health.inferences >= health.anomalies > 0 and health.latency_ms["p99"] is not None

    # Clean stop: every event flushed, retained state "stopped" with the birth's bdseq.
    mark = watch.mark()
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()
    stopped = watch.wait_for(
        lambda: first(s for s in watch.of("state", mark) if s.status == "stopped"), 10, "state stopped"
    )
    assert stopped.bdseq == birth.bdseq and stopped.active == state.active
    depth, last_seq, dropped = outbox_counts(agent.state_dir)
    assert depth == 0 and dropped == 0
    watch.wait_for(lambda: watch.event_seqs() >= set(range(1, last_seq + 1)), 10,
                   f"every event 1..{last_seq} before the clean stop")
    assert env.retained_agent("edge-1")[0].status == "stopped"

    # Restart from the same state dir: the model is served again without a download; then a
    # SIGKILL leaves the Last Will, which carries the new birth's bdseq.
    mark = watch.mark()
    agent = env.agents.start(config)
    rebirth = born(watch, mark)
    assert rebirth.bdseq > birth.bdseq and rebirth.active == state.active
    agent.signal(signal.SIGKILL)
    agent.wait(10)
    will = watch.wait_for(
        lambda: first(s for s in watch.of("state", mark) if s.status == "offline"), 20,
        "the Last Will (state offline)",
    )
    assert will.bdseq == rebirth.bdseq
    assert env.retained_agent("edge-1")[0].status == "offline"
    assert "downloading" not in [d.state for d in watch.of("deployments", mark)]


# -- 2. attacks are refused while v1 keeps serving ----------------------------------------------


def _stage_v2(env: Env) -> dict[RepoTopic, bytes]:
    """The trainer deploys host@2 for real, but under a staging root the agent does not read;
    the attacker takes those messages to forge an update under the agents' root."""
    env.deploy("host@2", "--topic-root", STAGING.root)
    return env.attacker.staged()


def _only_targets_metadata(files: dict[RepoTopic, bytes]) -> RepoTopic:
    [name] = [f for f in files if f.kind == "metadata" and f.name.endswith(".targets.json")]
    return name


def attack_tampered(env: Env, agent) -> None:
    files = _stage_v2(env)
    chunk = RepoTopic("target-chunk", bundle_upath(env.registry, "host", 2), 0)
    data = bytearray(files[chunk])
    for i in range(100, len(data), 997):
        data[i] ^= 0xFF  # same length, different bytes
    files[chunk] = bytes(data)
    env.attacker.forge(files)


def attack_untrusted_signature(env: Env, agent) -> None:
    files = _stage_v2(env)
    name = _only_targets_metadata(files)
    md = Metadata.from_bytes(files[name])
    evil = b"an attacker's bundle"
    target = md.signed.targets[bundle_target_name("host", 2, "onnx", "int8")]
    target.length = len(evil)
    target.hashes = {"sha256": hashlib.sha256(evil).hexdigest()}
    md.sign(CryptoSigner.generate_ed25519())  # replaces the real signature
    files[name] = md.to_bytes()
    env.attacker.forge(files)


def attack_rollback(env: Env, agent) -> None:
    ts_topic = TOPICS.repo_metadata("timestamp.json")
    old = env.attacker.read(TOPICS, [ts_topic])[ts_topic]
    cli("repo", "refresh", "--registry", str(env.registry), "--broker", env.broker.url)
    newer = TufRepository.open(repository_path(env.registry)).versions()["timestamp"]

    def trusted_version() -> int:
        try:
            md = json.loads((agent.state_dir / "metadata" / "timestamp.json").read_bytes())
            return md["signed"]["version"]
        except (FileNotFoundError, ValueError):
            return 0

    poll_until(lambda: trusted_version() == newer, 20,
               f"the agent to trust the refreshed timestamp v{newer}", env.agents.tail)
    env.attacker.put(ts_topic, old)  # replay the older, validly signed timestamp


def attack_expired(env: Env, agent) -> None:
    stale = Path(shutil.copytree(repository_path(env.registry), env.tmp / "stale-tuf"))
    repo = TufRepository.open(stale)
    assert repo.refresh(timestamp_days=-1) == ["timestamp"]  # validly signed, already expired
    env.attacker.put(TOPICS.repo_metadata("timestamp.json"), repo.metadata_bytes("timestamp.json"))


def attack_mix_and_match(env: Env, agent) -> None:
    tuf = repository_path(env.registry)
    old = TufRepository.open(tuf).versions()["targets"]
    files = _stage_v2(env)
    name = _only_targets_metadata(files)
    assert name.name == f"{old + 1}.targets.json"
    files[name] = (tuf / "metadata" / f"{old}.targets.json").read_bytes()  # v1's, under v2's name
    env.attacker.forge(files)


def attack_endless_data(env: Env, agent) -> None:
    files = _stage_v2(env)
    upath = bundle_upath(env.registry, "host", 2)
    index_topic = RepoTopic("target-index", upath)
    real = ChunkIndex.from_bytes(files[index_topic])
    data = bundle_bytes(env.registry, bundle_sha(env.registry, "host", 2))
    index, chunks = split(data + bytes(4 * real.chunk_size), real.chunk_size)  # more than declared
    for i, chunk in enumerate(chunks):
        files[RepoTopic("target-chunk", upath, i)] = chunk
    files[index_topic] = index.to_bytes()
    env.attacker.forge(files)


ATTACKS = {
    "tampered": attack_tampered,
    "untrusted-signature": attack_untrusted_signature,
    "rollback": attack_rollback,
    "expired": attack_expired,
    "mix-and-match": attack_mix_and_match,
    "endless-data": attack_endless_data,
}


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_bad_update_is_refused_and_v1_keeps_serving(env: Env, kind: str) -> None:
    watch = env.subscribe()
    agent = env.agents.start(env.agent_config("edge-2", rate=100))
    born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    v1 = bundle_sha(env.registry, "host", 1)
    watch.wait_for(lambda: any(h.inferences for h in watch.of("health")), 20, "v1 serving")

    mark = watch.mark()
    ATTACKS[kind](env, agent)
    failed = watch.wait_for(
        lambda: first(d for d in watch.of("deployments", mark) if d.state == "failed"), 30,
        f"the agent to refuse the {kind} update",
    )
    assert failed.reason.startswith(f"{kind}: "), failed.reason
    print(f"refused: {failed.model}@{failed.version} {failed.reason[:160]}")
    if kind in ("tampered", "endless-data"):  # refused at the bundle, after the document
        assert (failed.model, failed.version) == ("host", 2)
        assert deployment_states(watch, "host", 2, mark) == ["downloading", "failed"]

    # v1 keeps serving: inferences keep increasing after the refusal, and nothing else ran.
    seen = max(h.inferences for h in watch.of("health"))
    after = watch.mark()
    watch.wait_for(lambda: any(h.inferences > seen for h in watch.of("health", after)), 15,
                   f"inferences to keep increasing after the refused update (were {seen})")
    assert agent.alive(), agent.tail()
    assert [d.state for d in watch.of("deployments", mark)].count("active") == 0
    state, dep = env.retained_agent("edge-2")
    assert [(a.model, a.version, a.sha256) for a in state.active] == [("host", 1, v1)]
    assert state.status == "online" and dep.state == "failed" and dep.reason == failed.reason
    assert not watch.undecodable
    assert "Traceback" not in agent.log.read_text(), agent.tail()  # refused, not crashed


# -- 3. killed mid-download, resumed from the chunk cache ----------------------------------


def test_agent_killed_mid_download_resumes_from_its_chunk_cache(env: Env) -> None:
    chunk_size = 1024
    watch = env.subscribe()
    env.deploy("host@1", "--chunk-size", str(chunk_size))  # retained: the agent starts later
    sha = bundle_sha(env.registry, "host", 1)
    data = bundle_bytes(env.registry, sha)
    upath = bundle_upath(env.registry, "host", 1)
    count = math.ceil(len(data) / chunk_size)
    index_topic = TOPICS.repo_target_index(upath)
    index = ChunkIndex.from_bytes(env.attacker.read(TOPICS, [index_topic])[index_topic])
    assert (index.count, index.chunk_size, index.sha256) == (count, chunk_size, sha)
    # Backstop so that the first run can never finish: the last chunk is gone, as if the
    # broker had dropped it. The agent is normally killed long before it gets there.
    last = TOPICS.repo_target_chunk(upath, count - 1)
    env.attacker.put(last, b"")

    config = env.agent_config("edge-3", rate=400)
    agent = env.agents.start(config)
    cache = agent.state_dir / "chunks" / f"{sha}-{chunk_size}"

    def cached() -> list[int]:
        try:
            return sorted(int(p.name) for p in cache.iterdir() if p.name.isdigit())
        except FileNotFoundError:
            return []

    def settled() -> bool:
        return any(d.state in ("failed", "active") for d in watch.of("deployments"))

    poll_until(lambda: len(cached()) >= count // 4 or settled(), 60,
               f"the agent to cache {count // 4} of {count} chunks", env.agents.tail, interval=0.002)
    agent.signal(signal.SIGKILL)
    agent.wait(10)
    states = deployment_states(watch, "host", 1)
    assert "active" not in states, states
    have = cached()
    print(f"killed with {len(have)}/{count} chunks cached; "
          f"{'mid-download' if 'failed' not in states else 'after the backstop stopped it'}")
    assert 0 < len(have) < count
    for i in have:  # the cache holds whole, correct chunks (written temp file + rename)
        assert (cache / str(i)).read_bytes() == data[i * chunk_size:(i + 1) * chunk_size], i

    # The broker now holds only the chunks the agent has *not* cached: completing the download
    # proves the resumed run read the others from its cache and only count - len(have) from
    # the broker.
    env.attacker.put(last, data[(count - 1) * chunk_size:])
    env.attacker.put_many((TOPICS.repo_target_chunk(upath, i), b"") for i in have)

    mark = watch.mark()
    agent = env.agents.start(config)
    wait_active(watch, 1, mark)
    assert deployment_states(watch, "host", 1, mark) == ["downloading", "verifying", "staging", "active"]
    state = watch.wait_for(lambda: first(s for s in watch.of("state", mark) if s.active), 10,
                           "state listing the model")
    assert [(a.version, a.sha256) for a in state.active] == [(1, sha)]
    assert sha256_file(agent.state_dir / "bundles" / f"{sha}.zip") == sha
    assert not cache.exists()  # a finished download leaves no partial chunks
    assert "Traceback" not in agent.log.read_text(), agent.tail()


# -- 4. broker stopped and restarted while events flow -----------------------------------------


def test_events_detected_while_the_broker_is_down_are_all_delivered(env: Env) -> None:
    watch = env.subscribe(persistent=True)
    agent = env.agents.start(env.agent_config("edge-4", rate=300), exit_at_end=True)
    born(watch)
    env.deploy("host@1")
    # The score pipeline raises one event per excursion: a few per replay of this series.
    watch.wait_for(lambda: len(watch.event_seqs()) >= 1, 40, "the first event")

    env.broker.stop()
    delivered_before = max(watch.event_seqs())
    poll_until(lambda: outbox_counts(agent.state_dir)[0] >= 2, 30,
               "the agent to keep detecting while the broker is down (outbox growing)",
               env.agents.tail)
    assert agent.alive(), agent.tail()
    # Our subscriber must be back before the agent republishes: Mosquitto 2.0 may drop messages
    # that reach a restored persistent session before its client reconnects
    # (eclipse-mosquitto/mosquitto#769, see tests/test_outbox.py). Freezing the agent orders the
    # two reconnects without any sleep.
    agent.signal(signal.SIGSTOP)
    try:
        depth_down, last_down, _ = outbox_counts(agent.state_dir)
        env.broker.start()
        assert watch.ready.wait(20), f"the subscriber did not resubscribe\n{env.agents.tail()}"
    finally:
        resumed = datetime.now(UTC)
        agent.signal(signal.SIGCONT)
    assert depth_down >= 2 and last_down > delivered_before

    watch.wait_for(
        lambda: any(h.outbox_depth == 0 and datetime.fromisoformat(h.ts) > resumed
                    for h in watch.of("health")),
        30, "a health report after the restart with outbox depth 0",
    )
    assert agent.wait(60) == 0, agent.tail()  # the CSV ended (--exit-at-end): clean stop
    depth, last_seq, dropped = outbox_counts(agent.state_dir)
    assert (depth, dropped) == (0, 0) and last_seq > last_down, (
        f"outbox after a clean stop: depth {depth}, dropped {dropped}, last seq {last_seq}\n"
        f"{watch.summary()}"
    )
    watch.wait_for(lambda: watch.event_seqs() >= set(range(1, last_seq + 1)), 20,
                   f"every event 1..{last_seq}")
    assert watch.event_seqs() == set(range(1, last_seq + 1))  # none lost, none invented
    copies = len(watch.of("events"))
    print(f"{last_seq} events ({depth_down} queued while the broker was down); "
          f"{copies - last_seq} duplicate deliveries merged by seq")
    assert {e["model_version"] for e in watch.of("events")} == {1}
    assert not watch.undecodable


# -- 5. a newer trainer's document: variants this agent cannot run are skipped ------------------


def _deploy_as_a_newer_trainer(env: Env) -> None:
    """Deploy host@1 to group lab the way ``edgefleet deploy`` does, but with the document a
    newer trainer might write: slot ``default`` also offers a ggml and an int4 variant, and slot
    ``next`` offers only those. Signed and published for real (TUF over MQTT)."""
    scope = Scope("group", "lab")
    with Registry.open(env.registry) as registry, repository_lock(env.registry):
        repo = TufRepository.open(repository_path(env.registry))
        plan = plan_deployment(registry, repo, "host@1", scope)
        default = plan.document.slots["default"]
        newer = (
            Variant("artifacts/host-1-ggml-int8.bin", "ggml", "int8", ("x86-64-v3",), "e" * 64,
                    1234, extra={"runtime_min": "3.0"}),
            Variant("artifacts/host-1-onnx-int4.zip", "onnx", "int4", ("x86-64-v3",), "f" * 64,
                    999),
        )
        slots = {
            "default": Slot(default.model, default.version, (newer[0], *default.variants, newer[1])),
            "next": Slot("host-next", 3, newer, extra={"canary": True}),
        }
        document = Deployment(scope, plan.document.serial, slots, extra={"rollout": 2})
        files = {**plan.files, scope.target: encode_deployment(document)}
        repo.add_targets(files, custom=plan.custom)
        client = connect(env.broker.url, client_id="newer-trainer", timeout=10)
        try:
            publish_repository(repo, client, TOPICS)
        finally:
            client.disconnect()
            client.loop_stop()


def test_agent_runs_the_variant_it_knows_from_a_newer_trainers_document(env: Env) -> None:
    watch = env.subscribe()
    agent = env.agents.start(env.agent_config("edge-5", rate=200))
    born(watch)
    _deploy_as_a_newer_trainer(env)

    wait_active(watch, 1)
    assert deployment_states(watch, "host", 1) == ["downloading", "verifying", "staging", "active"]
    failed = watch.wait_for(
        lambda: first(d for d in watch.of("deployments") if d.slot == "next"), 30,
        "slot next to report that nothing in it can run here",
    )
    assert (failed.state, failed.model, failed.version) == ("failed", "host-next", 3)
    assert failed.reason == (
        "no runnable variant for profile x86-64-v3 (formats onnx): "
        "ggml/int8: unknown format; onnx/int4: unknown quantization"
    ), failed.reason

    sha = bundle_sha(env.registry, "host", 1)
    state = watch.wait_for(
        lambda: first(s for s in watch.of("state") if s.active), 10, "state listing the model"
    )
    assert [(a.slot, a.version, a.format, a.quantization, a.sha256) for a in state.active] == [
        ("default", 1, "onnx", "int8", sha)
    ]
    watch.wait_for(lambda: any(h.inferences for h in watch.of("health")), 20, "host@1 serving")
    assert agent.alive(), agent.tail()
    assert not watch.undecodable
    assert "Traceback" not in agent.log.read_text(), agent.tail()


# -- 5b. a version found by `edgefleet search` ships as any other ------------------------------


def test_a_searched_version_deploys_and_serves_like_a_trained_one(env: Env) -> None:
    space = env.tmp / "space.json"
    space.write_text(json.dumps({"windows": [16], "widths": [16], "bottlenecks": [4], "layers": [1, 1],
                                 "epochs": 3, "patience": 2, "batch_sizes": [64]}))
    found = json.loads(cli(
        "search", "--data", str(env.csv), "--profile", "x86-64-v3", "--name", "host", "--registry",
        str(env.registry), "--space", str(space), "--trials", "2", "--json", "-q", timeout=600,
    ).stdout)
    [version] = found["versions"]
    assert version["version"] == 3 and version["lineage"]["search"]["study"] == "host"
    watch = env.subscribe()
    agent = env.agents.start(env.agent_config("edge-s", rate=400))
    born(watch)
    mark = watch.mark()
    env.deploy("host@3")
    wait_active(watch, 3, mark)
    state = watch.wait_for(lambda: first(s for s in watch.of("state", mark) if s.active), 10,
                           "state listing the searched model")
    assert [(a.model, a.version, a.sha256) for a in state.active] == [("host", 3, bundle_sha(env.registry, "host", 3))]
    watch.wait_for(lambda: any(h.inferences for h in watch.of("health", mark)), 30, "host@3 serving")
    assert agent.alive(), agent.tail()


# -- 6. the broker crashed with the agent: its retained "online" is stale -----------------------


def _fleet_status(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "fleet", "status", "--broker", env.broker.url, *args],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_fleet_status_marks_an_agent_stale_when_the_broker_crashed_with_it(env: Env) -> None:
    watch = env.subscribe()
    period = 2.0
    config = env.agents.config("edge-6", trust=env.root, source=f"csv:{env.csv}?rate=50",
                               health_period=period)
    agent = env.agents.start(config)
    birth = born(watch)
    assert birth.health_period_s == period
    watch.wait_for(lambda: watch.of("health"), 20, "a health report")
    saved_after = time.time()

    [live] = json.loads(_fleet_status(env, "--json").stdout)
    assert (live["agent"], live["status"], live["stale"]) == ("edge-6", "online", False)
    assert live["health_period_s"] == period and live["health_age_s"] is not None

    # Mosquitto sends the Last Will when it shuts down cleanly, and when a client's connection
    # drops; a broker that crashes first (SIGKILL, power loss) sends nothing, and restarts from
    # its last autosave with the retained "online" of an agent that may be long gone.
    db = env.broker.workdir / "mosquitto.db"
    poll_until(lambda: db.exists() and db.stat().st_mtime > saved_after, 10,
               "Mosquitto to autosave the retained birth and health", env.agents.tail)
    assert env.broker.proc is not None
    env.broker.proc.kill()
    env.broker.proc.wait(10)
    env.broker.proc = None
    agent.signal(signal.SIGKILL)
    agent.wait(10)
    env.broker.start()

    def stale() -> dict | None:
        views = json.loads(_fleet_status(env, "--json").stdout)
        return first(v for v in views if v["stale"])

    view = poll_until(stale, 60, "fleet status to mark edge-6 stale", env.agents.tail, interval=1)
    assert (view["agent"], view["status"]) == ("edge-6", "online")  # no Will was ever sent
    assert view["health_age_s"] >= 3 * period  # stale is decided on the unrounded age
    [line] = _fleet_status(env).stdout.splitlines()[1:]
    assert line.startswith("edge-6") and "online (stale)" in line and " s ago: " in line


# -- 7. broker down when the agent starts ------------------------------------------------------


def _resume_broker(env: Env, watch: Watch, agent) -> None:
    """Start the broker again, our subscriber first: the agent is frozen until it is back."""
    agent.signal(signal.SIGSTOP)
    try:
        env.broker.start()
        assert watch.ready.wait(20), f"the subscriber did not resubscribe\n{env.agents.tail()}"
    finally:
        agent.signal(signal.SIGCONT)


def test_an_agent_started_while_the_broker_is_down_serves_and_delivers_every_event(env: Env) -> None:
    watch = env.subscribe()
    config = env.agent_config("edge-5", rate=300)
    agent = env.agents.start(config)
    birth = born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()
    _, before, _ = outbox_counts(agent.state_dir)  # events of the first run, flushed at its stop
    timestamps = csv_timestamps(env.csv)
    flagged = [timestamps[i] for i in flagged_rows(env.registry, "host@1", env.csv, env.tmp / "v1.csv")]
    assert len(flagged) >= 5, "the synthetic series should have anomalies for this test"

    env.broker.stop()
    agent = env.agents.start(config)  # a host booting during a network outage
    poll_until(lambda: outbox_counts(agent.state_dir)[1] >= before + 3, 60,
               "the agent to detect and queue events with no broker", env.agents.tail)
    assert agent.alive(), agent.tail()
    mark = watch.mark()
    _resume_broker(env, watch, agent)
    rebirth = born(watch, mark)
    assert rebirth.bdseq > birth.bdseq and [a.version for a in rebirth.active] == [1]

    # The second run replayed the whole series from its first sample: its events are exactly
    # what `edgefleet detect` flags, numbered on from the first run without a gap.
    expected = set(range(before + 1, before + len(flagged) + 1))
    watch.wait_for(lambda: watch.event_seqs() >= expected, 60,
                   f"events {before + 1}..{before + len(flagged)}")
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()
    depth, last_seq, dropped = outbox_counts(agent.state_dir)
    assert (depth, last_seq, dropped) == (0, before + len(flagged), 0)
    second = {e["seq"]: e["timestamp"] for e in watch.of("events") if e["seq"] > before}
    assert set(second) == expected
    assert sorted(second.values()) == sorted(flagged)
    assert "Traceback" not in agent.log.read_text(), agent.tail()


# -- 8. the state file cannot be written -------------------------------------------------------


def test_an_unwritable_state_file_does_not_stop_reconnects_or_deliveries(env: Env) -> None:
    watch = env.subscribe()
    config = env.agents.config("edge-6", trust=env.root, source="stdin")
    agent = env.agents.start(config, stdin=True)
    birth = born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    flagged = flagged_rows(env.registry, "host@1", env.csv, env.tmp / "v1.csv")
    half = 1500
    first_half = [r for r in flagged if r < half]
    assert first_half and len(flagged) > len(first_half)
    agent.feed(json_lines(env.csv, 0, half))
    watch.wait_for(lambda: len(watch.event_seqs()) == len(first_half), 30, "the first half's events")

    # A directory where state.json was: it can no longer be replaced (as root, permissions
    # would not stop a write). Each disconnect takes a new birth/death sequence number, whose
    # reservation can then not be saved.
    state_json = agent.state_dir / "state.json"
    state_json.unlink()
    state_json.mkdir()
    (state_json / "in-the-way").touch()
    env.broker.stop()
    agent.feed(json_lines(env.csv, half))
    poll_until(lambda: outbox_counts(agent.state_dir)[1] == len(flagged), 60,
               "the second half's events queued while the broker is down", env.agents.tail)
    mark = watch.mark()
    _resume_broker(env, watch, agent)
    rebirth = born(watch, mark)
    assert rebirth.bdseq > birth.bdseq
    watch.wait_for(lambda: watch.event_seqs() == set(range(1, len(flagged) + 1)), 60,
                   f"every event 1..{len(flagged)} after the reconnect")
    log_text = agent.log.read_text()
    assert "cannot save the birth/death sequence reservation" in log_text, agent.tail()
    assert "Traceback" not in log_text, agent.tail()
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()


# -- 9. a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disks() -> Iterator[SmallDisks]:
    disks = SmallDisks()
    try:
        yield disks
    finally:
        disks.close()


def test_a_full_disk_never_stops_detection_and_the_agent_recovers_by_itself(
    env: Env, small_disks: SmallDisks
) -> None:
    watch = env.subscribe()
    config = env.agents.config("edge-7", trust=env.root, source="stdin")
    state = small_disks.mount(config.parent / "state")
    v1 = flagged_rows(env.registry, "host@1", env.csv, env.tmp / "v1.csv")
    # rows fed before the disk fills ([0, a)), while it is full ([a, b): two events), after
    # space returns ([b, end): more anomalies to come)
    a = 1000
    later = [r for r in v1 if r >= a]
    assert [r for r in v1 if r < a] and len(later) >= 3, f"too few anomalies flagged in the synthetic series: {v1}"
    b = later[1] + 1
    in_a, in_b = [r for r in v1 if r < a], later[:2]

    agent = env.agents.start(config, stdin=True)
    born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    agent.feed(json_lines(env.csv, 0, a))
    watch.wait_for(lambda: any(h.anomalies == len(in_a) and h.outbox_depth == 0 for h in watch.of("health")),
                   30, f"{len(in_a)} events detected and delivered")
    assert watch.event_seqs() == set(range(1, len(in_a) + 1))

    SmallDisks.fill(state)
    mark = watch.mark()
    env.deploy("host@2")
    failed = watch.wait_for(lambda: first(d for d in watch.of("deployments", mark) if d.state == "failed"),
                            40, "host@2 to fail for lack of space")
    assert "No space left on device" in failed.reason, failed.reason
    agent.feed(json_lines(env.csv, a, b))  # detected while nothing can be stored
    total = len(in_a) + len(in_b)
    watch.wait_for(lambda: any(h.anomalies == total and h.outbox_dropped == len(in_b)
                               for h in watch.of("health", mark)),
                   30, f"health counting {len(in_b)} events that could not be stored")
    assert agent.alive(), agent.tail()
    assert watch.event_seqs() == set(range(1, len(in_a) + 1))
    lines = [line for line in agent.log.read_text().splitlines() if " not stored (" in line]
    assert 1 <= len(lines) < len(in_b), lines  # logged, but not once per event

    # Space comes back: nothing is redeployed, the agent applies host@2 by itself, then
    # stores and delivers again, numbering on from the last stored event. (host@2 starts a
    # fresh score pipeline, so `edgefleet detect` over the whole series does not predict its
    # events exactly: the test asks for some, all delivered, none missing.)
    SmallDisks.free(state)
    wait_active(watch, 2, mark, timeout=90)
    agent.feed(json_lines(env.csv, b))
    watch.wait_for(lambda: any(e["model_version"] == 2 for e in watch.of("events")), 60,
                   "an event from host@2 once space is back")
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()
    depth, last_seq, _ = outbox_counts(state)
    assert depth == 0 and last_seq > len(in_a)
    watch.wait_for(lambda: watch.event_seqs() == set(range(1, last_seq + 1)), 10,
                   f"every stored event 1..{last_seq}")
    assert {e["model_version"] for e in watch.of("events") if e["seq"] > len(in_a)} == {2}
    assert "Traceback" not in agent.log.read_text(), agent.tail()


def test_an_agent_first_started_on_a_full_disk_provisions_once_space_returns(
    env: Env, small_disks: SmallDisks
) -> None:
    watch = env.subscribe()
    config = env.agent_config("edge-8", rate=400)
    state = small_disks.mount(config.parent / "state")
    SmallDisks.fill(state)
    agent = env.agents.start(config)
    born(watch)  # it runs and announces itself with nothing written
    failed = watch.wait_for(lambda: first(d for d in watch.of("deployments") if d.state == "failed"),
                            40, "a report that the trusted metadata cannot be stored")
    assert failed.reason.startswith("storage: ") and "No space left on device" in failed.reason
    mark = watch.mark()
    env.deploy("host@1")
    anchor = state / "metadata" / "root.json"
    assert not anchor.exists() and not list(state.glob("metadata/.*.tmp")), "a partial trust anchor"
    assert agent.alive(), agent.tail()

    SmallDisks.free(state)
    wait_active(watch, 1, mark, timeout=90)
    assert anchor.read_bytes() == env.root.read_bytes()
    watch.wait_for(lambda: watch.of("events"), 40, "events once the model serves")
    assert "Traceback" not in agent.log.read_text(), agent.tail()


# -- federated learning: the agent keeps windows it scored as normal ------------------------------


def test_a_federated_agent_keeps_a_bounded_store_of_normal_windows(env: Env) -> None:
    from edge_agent.federated import WindowStore

    watch = env.subscribe()
    config = env.agent_config("edge-fl", rate=400)
    text = config.read_text().replace("[federated]\nenabled = false", "[federated]\nenabled = true\n"
                                      "max_windows = 40\nsample_every = 3")
    assert "max_windows = 40" in text
    config.write_text(text)
    agent = env.agents.start(config)
    born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    health = watch.wait_for(
        lambda: first(h for h in watch.of("health") if h.federated and h.federated["windows"] >= 40),
        60, "the window store to fill up to its bound")
    assert health.federated["epsilon_spent"] == 0.0 and health.federated["run"] is None
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()
    with WindowStore(agent.state_dir / "federated" / "windows.sqlite") as store:
        assert len(store) == 40  # bounded: the oldest were dropped
        windows = store.windows()
    spec = read_bundle(bundle_bytes(env.registry, bundle_sha(env.registry, "host", 1)))[0]
    assert windows.shape == (40, spec.window, len(spec.features))
    assert np.isfinite(windows).all()


# -- drift: live inputs leave the training reference -------------------------------------------------


def test_a_level_shift_raises_one_drift_event_and_health_and_fleet_status_show_it(env: Env) -> None:
    watch = env.subscribe()
    config = env.agents.config("edge-drift", trust=env.root, source="stdin", drift_window=300)
    agent = env.agents.start(config, stdin=True)
    born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    spec = read_bundle(bundle_bytes(env.registry, bundle_sha(env.registry, "host", 1)))[0]
    window = spec.window
    # the configured 300 samples, rounded up to whole seasons when the model has one
    drift_window = window_for(300, season_of(spec))

    # The rows the model was trained on (and validated with): a full drift window, no drift.
    normal = json_lines(env.csv, 0, 900)
    agent.feed(normal)
    scored = len(normal) - window + 1
    health = watch.wait_for(lambda: first(h for h in watch.of("health") if h.inferences == scored), 60,
                            f"health after the {scored} scored normal samples")
    drift = health.drift["default"]
    assert (drift["available"], drift["model"], drift["version"]) == (True, "host", 1)
    assert scored >= drift_window
    assert (drift["window"], drift["fill"], drift["drifted"]) == (drift_window, drift_window, False)
    assert set(drift["features"]) == {"cpu", "memory", "disk", "network"}
    assert all(f["psi"] < 0.25 for f in drift["features"].values())

    # cpu moves to a new level, 40 points up: the agent says so once, with the figures.
    mark = watch.mark()
    shifted = [json.dumps({**row, "cpu": row["cpu"] + 40.0})
               for row in map(json.loads, json_lines(env.csv, 900, 1500))]
    agent.feed(shifted)
    event = watch.wait_for(
        lambda: first(e for e in watch.of("events") if e["schema"] == "edgefleet.drift/1"), 60,
        "a drift event")
    assert (event["agent"], event["slot"], event["model"], event["model_version"]) == ("edge-drift", "default", "host", 1)
    assert "cpu" in event["drifted_features"] and event["window"] == drift_window
    assert event["features"]["cpu"]["psi"] >= 0.25 and event["features"]["cpu"]["ks_pvalue"] < 0.05
    assert event["timestamp"] in {json.loads(line)["timestamp"] for line in shifted}
    health = watch.wait_for(
        lambda: first(h for h in watch.of("health", mark) if h.inferences == scored + len(shifted)), 60,
        "health after every shifted sample")
    assert health.drift["default"]["drifted"] is True
    assert health.drift["default"]["features"]["cpu"]["drifted"] is True

    [view] = json.loads(_fleet_status(env, "--json").stdout)
    assert view["drift"]["default"]["drifted"] is True and "cpu" in view["drift"]["default"]["drifted_features"]
    [line] = _fleet_status(env).stdout.splitlines()[1:]
    assert "DRIFTED cpu" in line
    # raised once: the drift lasts, the event is not repeated; every event, of both kinds, is delivered
    _, last_seq, _ = outbox_counts(agent.state_dir)
    watch.wait_for(lambda: watch.event_seqs() >= set(range(1, last_seq + 1)), 20, "every event")
    assert [e["schema"] for e in watch.of("events")].count("edgefleet.drift/1") == 1
    assert not watch.undecodable


# -- 11. shadow mode --------------------------------------------------------------------------


def test_a_shadow_candidate_is_compared_with_the_serving_model_emits_nothing_and_is_removed(
    env: Env,
) -> None:
    watch = env.subscribe()
    config = env.agents.config("edge-shadow", trust=env.root, source="stdin")
    agent = env.agents.start(config, stdin=True)
    born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    windows = {v: read_bundle(bundle_bytes(env.registry, bundle_sha(env.registry, "host", v)))[0].window
               for v in (1, 2)}
    assert windows[1] == windows[2], "both versions are trained alike: the same window"
    window = windows[1]
    flagged = flagged_rows(env.registry, "host@1", env.csv, env.tmp / "v1.csv")
    rows = len(csv_timestamps(env.csv))
    before = 500
    agent.feed(json_lines(env.csv, 0, before))
    watch.wait_for(lambda: first(h for h in watch.of("health") if h.inferences == before - window + 1), 60,
                   "health after the first samples")

    mark = watch.mark()
    report = env.deploy("host@2", "--shadow")
    assert (report["role"], report["model"], report["version"], report["serial"]) == ("shadow", "host", 2, 2)
    watch.wait_for(
        lambda: first(d for d in watch.of("deployments", mark) if d.role == "shadow" and d.state == "active"),
        40, "the shadow host@2 to become active")
    shadow_states = [d.state for d in watch.of("deployments", mark) if d.role == "shadow"]
    assert shadow_states == ["downloading", "verifying", "staging", "active"]
    assert all((d.model, d.version) == ("host", 2) for d in watch.of("deployments", mark) if d.role == "shadow")
    # Verified and stored like a model; the serving model and its retained status are untouched.
    sha2 = bundle_sha(env.registry, "host", 2)
    assert sha256_file(agent.state_dir / "bundles" / f"{sha2}.zip") == sha2
    stored = json.loads((agent.state_dir / "state.json").read_text())["slots"]["default"]
    assert (stored["current"]["version"], stored["shadow"]["version"], stored["shadow"]["sha256"]) == (1, 2, sha2)
    _, retained = env.retained_agent("edge-shadow")
    assert (retained.model, retained.version, retained.state, retained.role) == ("host", 1, "active", "active")

    agent.feed(json_lines(env.csv, before))
    scored = rows - window + 1
    health = watch.wait_for(
        lambda: first(h for h in watch.of("health", mark) if h.inferences == scored and h.shadow
                      and h.shadow["default"]["samples"] == rows - before), 60,
        "health comparing the shadow over every later sample")
    shadow = health.shadow["default"]
    assert (shadow["model"], shadow["version"], shadow["state"]) == ("host", 2, "active")
    assert 0.0 <= shadow["agreement"] <= 1.0
    disagree = shadow["active_only"] + shadow["shadow_only"]
    assert shadow["agreement"] == pytest.approx(1 - disagree / shadow["samples"])
    assert math.isfinite(shadow["correlation"]) and -1.0 <= shadow["correlation"] <= 1.0
    assert shadow["latency_ms"]["p50"] is not None and shadow["latency_ms"]["p99"] is not None
    assert shadow["errors"] == 0
    # Only the serving model's alarms are events: exactly what `edgefleet detect` flags for v1.
    watch.wait_for(lambda: watch.event_seqs() == set(range(1, len(flagged) + 1)), 30,
                   f"the {len(flagged)} events of host@1")
    assert {e["model_version"] for e in watch.of("events")} == {1}
    assert outbox_counts(agent.state_dir)[1] == len(flagged)
    assert health.anomalies == len(flagged)

    [view] = json.loads(_fleet_status(env, "--json").stdout)
    assert (view["shadow"]["default"]["model"], view["shadow"]["default"]["version"]) == ("host", 2)
    assert view["shadow"]["default"]["samples"] == rows - before
    [line] = _fleet_status(env).stdout.splitlines()[1:]
    assert "host@2 agree" in line

    # Cleared: the agent unloads it, health no longer has it and its bundle goes.
    mark = watch.mark()
    cleared = json.loads(cli("deploy", "--clear-shadow", "--group", "lab", "--registry", str(env.registry),
                             "--broker", env.broker.url, "--json").stdout)
    assert (cleared["role"], cleared["model"], cleared["version"]) == ("shadow-cleared", "host", 2)
    watch.wait_for(
        lambda: first(d for d in watch.of("deployments", mark) if d.role == "shadow" and d.state == "removed"),
        40, "the shadow to be removed")
    mark = watch.mark()
    watch.wait_for(lambda: first(h for h in watch.of("health", mark) if h.shadow is None), 20,
                   "health without a shadow")
    assert not (agent.state_dir / "bundles" / f"{sha2}.zip").exists()
    assert "shadow" not in json.loads((agent.state_dir / "state.json").read_text())["slots"]["default"]
    assert env.retained_agent("edge-shadow")[1].version == 1
    assert not watch.undecodable
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()


def test_a_stored_shadow_that_no_longer_loads_is_reported_failed_and_fetched_again(env: Env) -> None:
    """Between two runs the stored shadow bundle is damaged on disk: the restarted agent reports
    it ``failed`` (health shows it), takes it out of its store, and fetches it again."""
    watch = env.subscribe()
    config = env.agent_config("edge-shadow-disk", rate=200)
    agent = env.agents.start(config)
    born(watch)
    env.deploy("host@1")
    wait_active(watch, 1)
    env.deploy("host@2", "--shadow")
    watch.wait_for(lambda: first(d for d in watch.of("deployments") if d.role == "shadow" and d.state == "active"),
                   40, "the shadow host@2 to become active")
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()
    sha2 = bundle_sha(env.registry, "host", 2)
    bundle = agent.state_dir / "bundles" / f"{sha2}.zip"
    bundle.write_bytes(b"not a bundle" + bundle.read_bytes()[12:])
    # Without a timestamp on the broker the restarted agent cannot refresh, so the start-up
    # failure stays what it reports until the timestamp is back.
    timestamp = TOPICS.repo_metadata("timestamp.json")
    saved = env.attacker.read(TOPICS, [timestamp])[timestamp]
    assert saved
    env.attacker.put(timestamp, b"")

    mark = watch.mark()
    agent = env.agents.start(config)
    born(watch, mark)
    failed = watch.wait_for(
        lambda: first(d for d in watch.of("deployments", mark) if d.role == "shadow" and d.state == "failed"),
        40, "the stored shadow's failure")
    assert (failed.model, failed.version, failed.serial, failed.slot) == ("host", 2, 2, "default")
    assert failed.reason.startswith("stored bundle does not load: ")
    health = watch.wait_for(lambda: first(h for h in watch.of("health", mark) if h.shadow), 20,
                            "health reporting the failed shadow")
    assert health.shadow["default"] == {"model": "host", "version": 2, "state": "failed",
                                        "reason": failed.reason, "serial": 2}
    assert "shadow" not in json.loads((agent.state_dir / "state.json").read_text())["slots"]["default"]
    assert env.retained_agent("edge-shadow-disk")[0].active[0].version == 1

    env.attacker.put(timestamp, saved)  # the next pass fetches the candidate again
    watch.wait_for(
        lambda: first(d for d in watch.of("deployments", mark) if d.role == "shadow" and d.state == "active"),
        60, "the shadow host@2 to be fetched again")
    assert [d.state for d in watch.of("deployments", mark) if d.role == "shadow"] == [
        "failed", "downloading", "verifying", "staging", "active"]
    assert sha256_file(bundle) == sha2
    mark = watch.mark()
    health = watch.wait_for(lambda: first(h for h in watch.of("health", mark) if h.shadow), 20,
                            "health with the shadow running again")
    assert health.shadow["default"]["state"] == "active"
    assert "Traceback" not in agent.log.read_text(), agent.tail()


def _deploy_a_shadow_that_fails_its_smoke_test(env: Env) -> str:
    """host@1 serves; host@2 is offered as its shadow in a bundle whose golden outputs are off
    by 10 (its model cannot reproduce them). Signed and published for real; returns the
    bundle's sha256."""
    spec, model = read_bundle(bundle_bytes(env.registry, bundle_sha(env.registry, "host", 2)))
    golden = dataclasses.replace(spec.golden, outputs=[v + 10.0 for v in spec.golden.outputs])
    broken = write_bundle(dataclasses.replace(spec, golden=golden), model)
    sha = hashlib.sha256(broken).hexdigest()
    target = bundle_target_name("host", 2, "onnx", "int8")
    scope = Scope("group", "lab")
    with Registry.open(env.registry) as registry, repository_lock(env.registry):
        repo = TufRepository.open(repository_path(env.registry))
        plan = plan_deployment(registry, repo, "host@1", scope)
        shadow = Slot("host", 2, (Variant(target, "onnx", "int8", ("x86-64-v3",), sha, len(broken)),))
        slots = {"default": dataclasses.replace(plan.document.slots["default"], shadow=shadow)}
        document = Deployment(scope, plan.document.serial, slots)
        files = {**plan.files, target: broken, scope.target: encode_deployment(document)}
        repo.add_targets(files, custom=plan.custom)
        client = connect(env.broker.url, client_id="shadow-trainer", timeout=10)
        try:
            publish_repository(repo, client, TOPICS)
        finally:
            client.disconnect()
            client.loop_stop()
    return sha


def test_a_shadow_that_fails_its_smoke_test_is_reported_and_the_model_keeps_serving(env: Env) -> None:
    watch = env.subscribe()
    agent = env.agents.start(env.agent_config("edge-shadow-bad", rate=200))
    born(watch)
    sha = _deploy_a_shadow_that_fails_its_smoke_test(env)
    wait_active(watch, 1)
    failed = watch.wait_for(
        lambda: first(d for d in watch.of("deployments") if d.role == "shadow" and d.state == "failed"), 40,
        "the shadow to fail its smoke test")
    assert (failed.model, failed.version) == ("host", 2) and failed.reason.startswith("smoke test: ")
    # (a later pass may try the same candidate again: it fails again, reported once)
    assert [d.state for d in watch.of("deployments") if d.role == "shadow"][:4] == [
        "downloading", "verifying", "staging", "failed"]
    health = watch.wait_for(lambda: first(h for h in watch.of("health") if h.shadow and h.inferences), 20,
                            "health reporting the failed shadow while v1 serves")
    assert health.shadow["default"] == {"model": "host", "version": 2, "state": "failed",
                                        "reason": failed.reason, "serial": failed.serial}
    state, dep = env.retained_agent("edge-shadow-bad")
    assert [(a.model, a.version) for a in state.active] == [("host", 1)]
    assert (dep.version, dep.state, dep.role) == (1, "active", "active")
    assert not (agent.state_dir / "bundles" / f"{sha}.zip").exists()
    watch.wait_for(lambda: watch.of("events"), 30, "v1's events")
    assert {e["model_version"] for e in watch.of("events")} == {1}

    # Withdrawn, though nothing was ever installed: the failure goes from health too.
    mark = watch.mark()
    cli("deploy", "--clear-shadow", "--group", "lab", "--registry", str(env.registry),
        "--broker", env.broker.url, "--json")
    removed = watch.wait_for(
        lambda: first(d for d in watch.of("deployments", mark) if d.role == "shadow" and d.state == "removed"),
        40, "the failed shadow to be removed")
    assert (removed.model, removed.version) == ("host", 2)
    mark = watch.mark()
    watch.wait_for(lambda: first(h for h in watch.of("health", mark) if h.shadow is None and h.inferences), 20,
                   "health without the failed shadow")
    assert "Traceback" not in agent.log.read_text(), agent.tail()
