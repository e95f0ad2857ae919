"""The repository's lifecycle with a running agent: pruning old bundles, rotating the root.

Real Mosquitto with its default queue limits, the agent and the trainer CLI as subprocesses:

1. three versions deployed in small chunks leave more retained chunks than a client's queue
   holds; ``repo prune`` still publishes (it reads index messages only), a fresh subscriber
   then finds only the kept bundles, complete, and the agent activates a pruned version that
   is deployed again;
2. ``repo rotate-root --new-keys``: the agent walks to the new root and activates a
   deployment signed with the new keys.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers_delivery import TOPICS, Agents, Attacker, Watch, cli
from tuf.api.metadata import Metadata, TargetFile

from edge_agent.trust import MqttFetcher, TargetNotFoundError, TrustedRepository
from shared.chunking import ChunkIndex, join
from shared.deployment import (
    Deployment,
    Scope,
    Slot,
    Variant,
    decode_deployment,
    group_target,
)
from trainer.fleet.deploy import repository_path
from trainer.fleet.prune import plan_prune
from trainer.fleet.tuf_repository import TufRepository, url_path

CHUNK = "2048"  # three versions' bundles then need ~1200 retained chunks: over 1000


# -- the keep rule (no I/O) -------------------------------------------------------------------


def _bundle(model: str, version: int, fmt: str = "onnx") -> tuple[str, TargetFile]:
    path = f"artifacts/{model}-{version}-{fmt}-int8.zip"
    tf = TargetFile.from_data(path, path.encode(), ["sha256"])
    tf.unrecognized_fields["custom"] = {"model": model, "version": version, "format": fmt}
    return path, tf


def _doc(group: str, **slots: tuple[str, int]) -> Deployment:
    return Deployment(
        scope=Scope("group", group),
        serial=1,
        slots={
            name: Slot(model=m, version=v, variants=(Variant(
                target=f"artifacts/{m}-{v}-onnx-int8.zip", format="onnx", quantization="int8",
                profiles=("x86-64-v3",), sha256="0" * 64, size_bytes=1,
            ),))
            for name, (m, v) in slots.items()
        },
    )


def test_keep_rule_keeps_versions_in_use_and_the_newest_others_per_model():
    targets = dict(
        [_bundle("a", v) for v in range(1, 7)]
        + [_bundle("a", 2, "tflite"), _bundle("b", 1), _bundle("b", 2)]
        + [("deployments/groups/lab.json", TargetFile.from_data("x", b"{}", ["sha256"]))]
    )
    # a@5 in use by one group, a@2 (rolled back) by another slot; b@1 in use
    docs = [_doc("lab", default=("a", 5), canary=("a", 2)), _doc("edge", default=("b", 1))]

    plan = plan_prune(targets, docs, keep=2)
    assert plan.in_use == {"a": (5, 2), "b": (1,)}
    assert plan.rollback == {"a": (6, 4), "b": (2,)}  # the newest other versions
    assert plan.removed_versions == {"a": (3, 1)}
    assert plan.remove == ("artifacts/a-1-onnx-int8.zip", "artifacts/a-3-onnx-int8.zip")
    # a@2's tflite bundle is kept with its version, though no document names it as a variant
    assert "artifacts/a-2-tflite-int8.zip" not in plan.remove

    nothing_kept = plan_prune(targets, docs, keep=0)
    assert nothing_kept.rollback == {"a": (), "b": ()}
    assert set(nothing_kept.remove) == {
        "artifacts/a-1-onnx-int8.zip", "artifacts/a-3-onnx-int8.zip",
        "artifacts/a-4-onnx-int8.zip", "artifacts/a-6-onnx-int8.zip", "artifacts/b-2-onnx-int8.zip",
    }
    assert plan_prune(targets, [], keep=10).remove == ()  # nothing is ever removed past keep
    with pytest.raises(ValueError):
        plan_prune(targets, docs, keep=-1)


def test_keep_rule_keeps_a_shadow_candidate_in_use():
    targets = dict(_bundle("a", v) for v in range(1, 5))
    [doc] = [_doc("lab", default=("a", 1))]
    shadowed = dataclasses.replace(doc, slots={"default": dataclasses.replace(
        doc.slots["default"], shadow=_doc("x", default=("a", 3)).slots["default"])})
    plan = plan_prune(targets, [shadowed], keep=0)
    assert plan.in_use == {"a": (3, 1)}
    assert set(plan.remove) == {"artifacts/a-2-onnx-int8.zip", "artifacts/a-4-onnx-int8.zip"}


# -- with a running agent ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic host-metrics CSV and a registry with host@1..3 and a TUF repository."""
    base = tmp_path_factory.mktemp("lifecycle")
    csv = base / "host.csv"
    cli("data", "synth", "--out", str(csv), "--rows", "3000", "--seed", "1")
    registry = base / "registry"
    for seed in (0, 1, 2):
        cli(
            "train", "--data", str(csv), "--profile", "x86-64-v3", "--name", "host",
            "--registry", str(registry), "--epochs", "2", "--train-fraction", "0.3",
            "--seed", str(seed), "--json", "-q",
        )
    cli("repo", "init", "--registry", str(registry), "--json")
    return csv, registry


@dataclass
class Env:
    csv: Path
    registry: Path
    broker: Any  # conftest.Broker
    agents: Agents
    reader: Attacker  # only reads here: a plain client of the broker
    watch: Watch

    @property
    def root(self) -> Path:
        return repository_path(self.registry) / "metadata" / "root.json"

    def start_agent(self, agent_id: str):
        config = self.agents.config(agent_id, trust=self.root, source=f"csv:{self.csv}?rate=200")
        return self.agents.start(config)

    def edgefleet(self, *args: str) -> dict:
        return json.loads(cli(
            *args, "--registry", str(self.registry), "--broker", self.broker.url,
            "--chunk-size", CHUNK, "--json",
        ).stdout)

    def deploy(self, ref: str) -> dict:
        return self.edgefleet("deploy", ref, "--group", "lab")

    def born(self) -> None:
        self.watch.wait_for(lambda: any(s.status == "online" for s in self.watch.of("state")),
                            40, "the agent's birth")

    def wait_active(self, version: int, since: int) -> None:
        def states() -> list[str]:
            return [d.state for d in self.watch.of("deployments", since)
                    if (d.model, d.version) == ("host", version)]

        # An older version than the one serving is reported as rolled_back once active.
        self.watch.wait_for(lambda: {"active", "rolled_back"} & set(states()), 60,
                            f"host@{version} to become active")
        assert "failed" not in states(), self.watch.summary()


@pytest.fixture
def env(trained, broker, tmp_path: Path) -> Iterator[Env]:
    csv, registry = trained
    copy = Path(shutil.copytree(registry, tmp_path / "registry"))
    agents = Agents(tmp_path / "agents", broker.url)
    reader = Attacker(broker.url)
    watch = Watch(broker.url, agents.tail)
    try:
        yield Env(csv, copy, broker, agents, reader, watch)
    finally:
        agents.close()
        watch.close()
        reader.close()


def _retained_targets(env: Env, also: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """What a fresh subscriber finds, by target url path: index and chunks, for every target
    with a retained index and for the url paths ``also`` (to see that nothing of them is left).

    The chunks are read target by target: one subscription to all of ``repo/#`` would queue
    more retained messages than a stock Mosquitto keeps for one client (1000), and drop the rest.
    """
    out: dict[str, dict[str, Any]] = {}

    def collect(got: dict[str, bytes | None]) -> None:
        for topic, payload in got.items():
            parsed = TOPICS.parse_repo_topic(topic)
            if parsed is None or not parsed.kind.startswith("target-"):
                continue
            entry = out.setdefault(parsed.name, {"index": None, "chunks": {}})
            if parsed.kind == "target-index":
                entry["index"] = ChunkIndex.from_bytes(payload)
            else:
                entry["chunks"][parsed.chunk] = payload

    collect(env.reader.read(TOPICS, list(TOPICS.repo_target_indexes())))
    for name in sorted({*out, *also}):
        collect(env.reader.read(TOPICS, [TOPICS.repo_target_chunks(name)]))
    return out


@pytest.mark.slow
def test_prune_within_stock_queue_limits_and_the_agent_still_activates(env: Env, tmp_path: Path):
    env.start_agent("edge-p")
    env.born()
    deployed = {}
    for version in (1, 2, 3):
        mark = env.watch.mark()
        deployed[version] = env.deploy(f"host@{version}")["bundles"]
        env.wait_active(version, mark)

    before = TufRepository.open(repository_path(env.registry)).targets()
    chunks = int(CHUNK)
    assert sum(-(-tf.length // chunks) for tf in before.values()) > 1000  # over one client's queue

    pruned = env.edgefleet("repo", "prune", "--keep", "1")
    assert (pruned["in_use"], pruned["rollback"], pruned["removed_versions"]) == (
        {"host": [3]}, {"host": [2]}, {"host": [1]},
    )
    assert pruned["removed_targets"] == deployed[1]

    # A fresh subscriber: host@1's bundles are gone, every kept target is complete.
    targets = TufRepository.open(repository_path(env.registry)).targets()
    assert set(targets) == {group_target("lab"), *deployed[2], *deployed[3]}
    kept = {url_path(p, tf.hashes["sha256"]): p for p, tf in targets.items()}
    there = _retained_targets(env, also=[url_path(p, before[p].hashes["sha256"]) for p in deployed[1]])
    assert set(there) == set(kept)
    for upath, entry in there.items():
        index = entry["index"]
        data = join(index, [entry["chunks"][i] for i in range(index.count)])
        targets[kept[upath]].verify_length_and_hashes(data)

    # Kept bundles verify through TUF; the pruned ones are no longer targets.
    ag = _agent_repo(env, tmp_path / "verifier")
    doc = decode_deployment(ag.fetch_target(group_target("lab")))
    assert doc.slots["default"].version == 3
    for target in deployed[2] + deployed[3]:
        ag.fetch_target(target)
    for target in deployed[1]:
        with pytest.raises(TargetNotFoundError):
            ag.fetch_target(target)

    # The running agent goes on: host@1, pruned, is deployed again and activated.
    mark = env.watch.mark()
    env.deploy("host@1")
    env.wait_active(1, mark)
    state = env.watch.wait_for(
        lambda: [s for s in env.watch.of("state", mark) if s.active], 10, "a state after it")
    assert [(a.model, a.version) for a in state[-1].active] == [("host", 1)]


@pytest.mark.slow
def test_running_agent_follows_a_root_rotation_with_new_keys(env: Env):
    agent = env.start_agent("edge-r")
    env.born()
    mark = env.watch.mark()
    env.deploy("host@1")
    env.wait_active(1, mark)
    trusted_root = agent.state_dir / "metadata" / "root.json"
    assert Metadata.from_file(str(trusted_root)).signed.version == 1

    rotated = env.edgefleet("repo", "rotate-root", "--new-keys")
    assert rotated["versions"]["root"] == 2 and rotated["renewed"][0] == "root"
    mark = env.watch.mark()
    env.deploy("host@2")  # signed with keys the agent's trusted root v1 does not know
    env.wait_active(2, mark)
    assert Metadata.from_file(str(trusted_root)).signed.version == 2
    assert agent.alive(), agent.tail()


def _agent_repo(env: Env, state: Path) -> TrustedRepository:
    fetcher = MqttFetcher(env.reader.client, TOPICS, state / "chunks", timeout=10)
    repo = TrustedRepository(state / "metadata", state / "targets", fetcher,
                             env.root.read_bytes())
    repo.refresh()
    return repo
