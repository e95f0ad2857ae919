"""TUF-verified delivery over MQTT: real Mosquitto, real python-tuf metadata, real attacks."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata

from edge_agent.mqtt import BrokerError, RetainedReader, connect, parse_broker_url
from edge_agent.trust import (
    TARGET_BASE_URL,
    ChunkMissingError,
    MqttFetcher,
    TargetNotFoundError,
    TrustedRepository,
    TrustError,
)
from shared.chunking import ChunkError, ChunkIndex, RepoIndex, join, split
from shared.topics import MAX_TARGET_DEPTH, RepoTopic, TopicError, Topics
from trainer.fleet.publisher import publish_repository
from trainer.fleet.tuf_repository import RepositoryError, TufRepository, url_path

TOPICS = Topics()
CHUNK = 1024  # small chunks so that small targets span several messages


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    return TufRepository.init(tmp_path / "tuf")


def agent(
    tmp_path: Path, client: mqtt.Client, repo: TufRepository, name: str = "a"
) -> TrustedRepository:
    state = tmp_path / f"agent-{name}"
    fetcher = MqttFetcher(client, TOPICS, state / "chunks", timeout=5)
    return TrustedRepository(
        state / "metadata", state / "targets", fetcher, repo.root_json_path.read_bytes()
    )


def publish(repo: TufRepository, client: mqtt.Client):
    return publish_repository(repo, client, TOPICS, chunk_size=CHUNK, timeout=5)


def put(client: mqtt.Client, topic: str, payload: bytes) -> None:
    """An attacker with write access to the broker replaces a retained message."""
    info = client.publish(topic, payload, qos=1, retain=True)
    info.wait_for_publish(5)
    assert info.is_published()


def retained(client: mqtt.Client) -> dict[str, bytes | None]:
    return RetainedReader(client, TOPICS, timeout=5).read([TOPICS.repo_all()])


def refused(exc_info: pytest.ExceptionInfo[TrustError]) -> type[BaseException]:
    """The python-tuf exception class behind a TrustError."""
    cause = exc_info.value.__cause__
    assert cause is not None
    return type(cause)


A = b"deployment-doc " * 10  # 150 bytes: one chunk
B = bytes(range(256)) * 21  # 5376 bytes: six chunks


def seed(repo: TufRepository) -> None:
    repo.add_targets(
        {"deployments/groups/g.json": A, "artifacts/m-1-onnx-int8.zip": B},
        custom={"artifacts/m-1-onnx-int8.zip": {"format": "onnx"}},
    )


# -- happy path -------------------------------------------------------------------------------


def test_happy_path(tmp_path, repo, clients):
    seed(repo)
    report = publish(repo, clients())
    assert len(report.published_targets) == 2
    assert report.published_metadata[-1] == "timestamp.json"

    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    assert ag.fetch_target("deployments/groups/g.json") == A
    assert ag.fetch_target("artifacts/m-1-onnx-int8.zip") == B
    assert ag.target_custom("artifacts/m-1-onnx-int8.zip") == {"format": "onnx"}
    assert ag.target_custom("deployments/groups/g.json") == {}
    with pytest.raises(TargetNotFoundError):
        ag.fetch_target("deployments/agents/nobody.json")
    # second fetch comes from the verified local copy
    assert ag.fetch_target("artifacts/m-1-onnx-int8.zip") == B


def test_changed_target_is_picked_up_after_next_refresh(tmp_path, repo, clients):
    seed(repo)
    pub = clients()
    publish(repo, pub)
    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    assert ag.fetch_target("deployments/groups/g.json") == A

    repo.add_targets({"deployments/groups/g.json": b'{"v": 2}'})
    publish(repo, pub)
    assert ag.fetch_target("deployments/groups/g.json") == A  # no refresh yet: old trusted view
    ag.refresh()
    assert ag.fetch_target("deployments/groups/g.json") == b'{"v": 2}'

    # a restarted agent bootstraps from its own state dir (root.json copied there)
    state = tmp_path / "agent-a"
    again = TrustedRepository(
        state / "metadata", state / "targets", MqttFetcher(clients(), TOPICS, state / "chunks")
    )
    again.refresh()
    assert again.fetch_target("deployments/groups/g.json") == b'{"v": 2}'


def test_publish_is_idempotent_and_collects_garbage(tmp_path, repo, clients):
    seed(repo)
    pub = clients()
    first = publish(repo, pub)
    assert first.messages > 0

    second = publish(repo, pub)
    assert second.published_targets == [] and second.published_metadata == []
    assert not second.index_published and second.cleared_topics == [] and second.messages == 0
    assert len(second.skipped_targets) == 2

    old_b = url_path("artifacts/m-1-onnx-int8.zip", hashlib.sha256(B).hexdigest())
    repo.remove_targets(["artifacts/m-1-onnx-int8.zip"])
    third = publish(repo, pub)
    assert TOPICS.repo_target_index(old_b) in third.cleared_topics

    there = retained(clients())  # a fresh subscriber sees what is retained now
    parsed = [TOPICS.parse_repo_topic(t) for t in there]
    assert all(p is not None for p in parsed)
    assert not [p for p in parsed if p.name == old_b]
    names = {p.name for p in parsed if p.kind == "metadata"}
    assert names == set(repo.current_files().metadata)
    assert "2.targets.json" not in names  # superseded metadata is gone too
    assert RepoIndex.from_bytes(there[TOPICS.repo_index()]).targets == tuple(
        repo.current_files().targets
    )

    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    with pytest.raises(TargetNotFoundError):
        ag.fetch_target("artifacts/m-1-onnx-int8.zip")


# -- attacks ----------------------------------------------------------------------------------


def test_tampered_chunk_is_refused(tmp_path, repo, clients):
    seed(repo)
    pub = clients()
    publish(repo, pub)
    upath = url_path("artifacts/m-1-onnx-int8.zip", hashlib.sha256(B).hexdigest())
    put(pub, TOPICS.repo_target_chunk(upath, 2), b"\x00" * CHUNK)

    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    with pytest.raises(TrustError) as e:
        ag.fetch_target("artifacts/m-1-onnx-int8.zip")
    assert e.value.kind == "tampered"
    assert refused(e) is tuf_exc.LengthOrHashMismatchError
    assert not any((tmp_path / "agent-a" / "targets").iterdir())  # nothing unverified kept
    assert ag.fetch_target("deployments/groups/g.json") == A  # the rest still works


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_metadata_signed_by_untrusted_key_is_refused(tmp_path, repo, clients, role):
    seed(repo)
    pub = clients()
    publish(repo, pub)
    versions = repo.versions()
    evil = CryptoSigner.generate_ed25519()
    name = "timestamp.json" if role == "timestamp" else f"{versions[role]}.{role}.json"
    md = Metadata.from_bytes(repo.metadata_bytes(name))
    if role == "targets":
        md.signed.targets["artifacts/m-1-onnx-int8.zip"].hashes["sha256"] = "0" * 64
    elif role == "timestamp":
        md.signed.version += 1
    else:
        md.signed.expires = md.signed.expires.replace(year=md.signed.expires.year + 1)
    md.sign(evil)
    put(pub, TOPICS.repo_metadata(name), md.to_bytes())

    ag = agent(tmp_path, clients(), repo)
    with pytest.raises(TrustError) as e:
        ag.refresh()
    assert e.value.kind == "untrusted-signature"
    assert refused(e) is tuf_exc.UnsignedMetadataError


def test_replayed_older_timestamp_is_rollback(tmp_path, repo, clients):
    pub = clients()
    seed(repo)
    publish(repo, pub)
    old_timestamp = repo.metadata_bytes("timestamp.json")
    ag = agent(tmp_path, clients(), repo)
    ag.refresh()

    repo.add_targets({"deployments/groups/g.json": b"newer"})
    publish(repo, pub)
    ag.refresh()  # the agent has now seen the newer timestamp

    put(pub, TOPICS.repo_metadata("timestamp.json"), old_timestamp)
    with pytest.raises(TrustError) as e:
        ag.refresh()
    assert e.value.kind == "rollback"
    assert refused(e) is tuf_exc.BadVersionNumberError
    assert ag.fetch_target("deployments/groups/g.json") == b"newer"  # kept its trusted state


def test_expired_timestamp_is_refused(tmp_path, repo, clients):
    pub = clients()
    seed(repo)
    publish(repo, pub)
    ag = agent(tmp_path, clients(), repo)
    ag.refresh()

    assert repo.refresh(timestamp_days=-1) == ["timestamp"]  # a freeze: expiry in the past
    publish(repo, pub)
    with pytest.raises(TrustError) as e:
        ag.refresh()
    assert e.value.kind == "expired"
    assert refused(e) is tuf_exc.ExpiredMetadataError

    repo.refresh()  # the trainer re-signs: agents recover
    publish(repo, pub)
    ag.refresh()


@pytest.mark.parametrize("role", ["targets", "snapshot"])
def test_mix_and_match_is_refused(tmp_path, repo, clients, role):
    pub = clients()
    seed(repo)
    publish(repo, pub)
    old = repo.versions()[role]
    old_bytes = repo.metadata_bytes(f"{old}.{role}.json")
    repo.add_targets({"deployments/groups/g.json": b"v3"})
    publish(repo, pub)
    new = repo.versions()[role]
    # the current snapshot/timestamp with targets/snapshot metadata of another version
    put(pub, TOPICS.repo_metadata(f"{new}.{role}.json"), old_bytes)

    ag = agent(tmp_path, clients(), repo)
    with pytest.raises(TrustError) as e:
        ag.refresh()
    assert e.value.kind == "mix-and-match"
    assert refused(e) is tuf_exc.BadVersionNumberError


@pytest.mark.parametrize("how", ["longer-index", "longer-chunk"])
def test_endless_target_data_is_refused(tmp_path, repo, clients, how):
    pub = clients()
    seed(repo)
    publish(repo, pub)
    upath = url_path("deployments/groups/g.json", hashlib.sha256(A).hexdigest())
    if how == "longer-index":
        big = A + b"x" * 10 * CHUNK
        index, chunks = split(big, CHUNK)
        for i, c in enumerate(chunks):
            put(pub, TOPICS.repo_target_chunk(upath, i), c)
        put(pub, TOPICS.repo_target_index(upath), index.to_bytes())
    else:
        put(pub, TOPICS.repo_target_chunk(upath, 0), A + b"x" * 100)

    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    with pytest.raises(TrustError) as e:
        ag.fetch_target("deployments/groups/g.json")
    assert e.value.kind == "endless-data"
    assert refused(e) is tuf_exc.DownloadLengthMismatchError
    assert ag._fetcher.chunks_from_broker <= 1  # refused before streaming the excess


def test_endless_metadata_is_refused(tmp_path, repo, clients):
    pub = clients()
    seed(repo)
    publish(repo, pub)
    md = json.loads(repo.metadata_bytes("timestamp.json"))
    md["signed"]["padding"] = "x" * 100_000  # over UpdaterConfig.timestamp_max_length
    put(pub, TOPICS.repo_metadata("timestamp.json"), json.dumps(md).encode())

    ag = agent(tmp_path, clients(), repo)
    with pytest.raises(TrustError) as e:
        ag.refresh()
    assert e.value.kind == "endless-data"
    assert refused(e) is tuf_exc.DownloadLengthMismatchError


def test_missing_chunk_is_detected(tmp_path, repo, clients):
    pub = clients()
    seed(repo)
    publish(repo, pub)
    upath = url_path("artifacts/m-1-onnx-int8.zip", hashlib.sha256(B).hexdigest())
    put(pub, TOPICS.repo_target_chunk(upath, 3), b"")  # as if the broker had dropped it

    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    with pytest.raises(TrustError) as e:
        ag.fetch_target("artifacts/m-1-onnx-int8.zip")
    assert e.value.kind == "unavailable"
    assert refused(e) is ChunkMissingError
    assert "[3]" in str(e.value)


def test_interrupted_download_resumes_from_chunk_cache(tmp_path, repo, clients):
    big = hashlib.sha256(b"seed").digest() * (20 * CHUNK // 32)  # 20 chunks
    repo.add_targets({"artifacts/big.zip": big})
    publish(repo, clients())
    upath = url_path("artifacts/big.zip", hashlib.sha256(big).hexdigest())
    cache = tmp_path / "chunks"

    first_client = clients()
    first = MqttFetcher(first_client, TOPICS, cache, chunk_window=1, timeout=5)
    stream = first.fetch(TARGET_BASE_URL + upath)
    got = [next(stream) for _ in range(7)]
    assert b"".join(got) == big[: 7 * CHUNK]
    first_client.disconnect()  # the agent dies mid-download
    first_client.loop_stop()
    with pytest.raises(tuf_exc.DownloadError):
        next(stream)

    second = MqttFetcher(clients(), TOPICS, cache, timeout=5)
    state = tmp_path / "agent"
    ag = TrustedRepository(
        state / "metadata", state / "targets", second, repo.root_json_path.read_bytes()
    )
    data = ag.fetch_target("artifacts/big.zip")
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(big).hexdigest()
    assert second.chunks_from_cache == 7
    assert second.chunks_from_broker == 13 < 20
    assert not any(cache.iterdir())  # a finished download leaves no partial chunks


# -- repository -------------------------------------------------------------------------------


def test_repository_init_open_and_refuse_overwrite(tmp_path):
    rkd = tmp_path / "offline"
    repo = TufRepository.init(tmp_path / "tuf", rkd)
    assert stat.S_IMODE((rkd / "root.pem").stat().st_mode) == 0o600
    for role in ("targets", "snapshot", "timestamp"):
        assert stat.S_IMODE((repo.keys_dir / f"{role}.pem").stat().st_mode) == 0o600
    assert not (repo.keys_dir / "root.pem").exists()
    assert set(repo.current_files().metadata) == {
        "1.root.json",
        "1.targets.json",
        "1.snapshot.json",
        "timestamp.json",
    }
    with pytest.raises(RepositoryError, match="refusing to overwrite"):
        TufRepository.init(tmp_path / "tuf", rkd)

    repo.add_targets({"a/b.bin": b"hello"})
    reopened = TufRepository.open(tmp_path / "tuf")  # no root key needed
    assert (
        reopened.versions()
        == repo.versions()
        == {
            "root": 1,
            "targets": 2,
            "snapshot": 2,
            "timestamp": 2,
        }
    )
    assert reopened.target_bytes("a/b.bin") == b"hello"
    sha = hashlib.sha256(b"hello").hexdigest()
    assert (reopened.targets_dir / "a" / f"{sha}.b.bin").read_bytes() == b"hello"
    assert reopened.current_files().targets == {f"a/{sha}.b.bin": "a/b.bin"}
    with pytest.raises(RepositoryError):
        TufRepository.open(tmp_path / "nothing")
    with pytest.raises(RepositoryError):
        repo.add_targets({"../evil": b"x"})


# -- broker helpers ---------------------------------------------------------------------------


def test_parse_broker_url():
    assert parse_broker_url("mqtt://h") == ("mqtt", "h", 1883)
    assert parse_broker_url("mqtts://h:1") == ("mqtts", "h", 1)
    assert parse_broker_url("mqtts://h") == ("mqtts", "h", 8883)
    for bad in ("http://h", "mqtt://", "mqtt://h:99999", "mqtt://h/x", "mqtt://u:p@h"):
        with pytest.raises(BrokerError):
            parse_broker_url(bad)


def test_connect_refused_is_a_broker_error(broker):
    broker.stop()
    with pytest.raises(BrokerError):
        connect(broker.url, client_id="x", timeout=2)


# -- codecs (hypothesis) ----------------------------------------------------------------------

agent_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
levels = st.text(min_size=1, max_size=12).filter(
    lambda s: not any(c in s for c in "/+#\x00") and s not in (".", "..")
)
paths = st.lists(levels, min_size=1, max_size=5).map("/".join)


@given(agent_ids, st.sampled_from(["state", "health", "events", "deployments", "commands"]))
def test_agent_topics_round_trip(agent_id, kind):
    topic = getattr(TOPICS, f"agent_{kind}")(agent_id)
    assert TOPICS.parse_agent_topic(topic) == (agent_id, kind)
    assert Topics(root="x").parse_agent_topic(topic) is None


@given(paths, st.integers(min_value=0, max_value=10**6))
def test_repo_topics_round_trip(path, i):
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(TopicError):
            TOPICS.repo_target_index(path)
        return
    assert TOPICS.parse_repo_topic(TOPICS.repo_target_index(path)) == RepoTopic(
        "target-index", path
    )
    assert TOPICS.parse_repo_topic(TOPICS.repo_target_chunk(path, i)) == RepoTopic(
        "target-chunk", path, i
    )


@given(st.text(max_size=20))
def test_invalid_ids_raise_topic_error(s):
    bad = any(c in s for c in "/+#\x00") or s in ("", ".", "..")
    if bad:
        with pytest.raises(TopicError):
            TOPICS.repo_metadata(s)
    try:
        TOPICS.agent_state(s)
    except TopicError:
        pass
    else:
        assert TOPICS.parse_agent_topic(TOPICS.agent_state(s)) == (s, "state")


def test_topic_examples():
    assert (
        TOPICS.repo_target_chunk("artifacts/x.zip", 3)
        == "edgefleet/v1/repo/targets/artifacts/x.zip/chunks/3"
    )
    assert TOPICS.all_agent_states() == "edgefleet/v1/agents/+/state"
    assert TOPICS.repo_all() == "edgefleet/v1/repo/#"
    assert TOPICS.parse_repo_topic("edgefleet/v1/repo/index") == RepoTopic("index")
    assert TOPICS.parse_repo_topic("edgefleet/v1/repo/targets/a/chunks/007") is None
    for bad in ("a+b", "a/#", "", "a//b", "-x", "x" * 65):
        with pytest.raises(TopicError):
            TOPICS.agent_state(bad)
    with pytest.raises(TopicError):
        Topics(root="a/+/b")


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
def test_chunk_split_join_round_trip(data, size):
    index, chunks = split(data, size)
    assert index.count == len(chunks) and all(chunks)
    assert join(index, chunks) == data
    assert ChunkIndex.from_bytes(index.to_bytes()) == index
    if chunks:
        with pytest.raises(ChunkError):
            join(index, chunks[:-1])


@given(
    st.dictionaries(
        st.text(max_size=5).filter(
            lambda k: k not in {"schema", "length", "chunk_size", "count", "sha256"}
        ),
        st.integers(),
        max_size=3,
    )
)
def test_chunk_index_keeps_unknown_fields(extra):
    index, _ = split(b"abc", 2)
    obj = json.loads(index.to_bytes())
    obj.update(extra)
    again = ChunkIndex.from_bytes(json.dumps(obj).encode())
    assert dict(again.extra) == extra
    assert json.loads(again.to_bytes()) == obj


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_chunk_index_malformed_is_chunk_error(raw):
    try:
        ChunkIndex.from_bytes(raw)
    except ChunkError:
        pass


@given(
    st.lists(st.text(max_size=10), unique=True).map(sorted),
    st.lists(paths, unique=True).map(sorted),
)
def test_repo_index_round_trip(metadata, targets):
    ri = RepoIndex(tuple(metadata), tuple(targets), {"future": 1})
    back = RepoIndex.from_bytes(ri.to_bytes())
    assert back == ri and back.extra == {"future": 1}


def test_chunk_index_rejects_inconsistency():
    good = json.loads(split(b"abcde", 2)[0].to_bytes())
    for patch in (
        {"count": 2},
        {"sha256": "zz"},
        {"chunk_size": 0},
        {"length": -1},
        {"schema": "x"},
    ):
        with pytest.raises(ChunkError):
            ChunkIndex.from_bytes(json.dumps({**good, **patch}).encode())


def test_agent_recovers_after_broker_restart(tmp_path, repo, clients, broker):
    seed(repo)
    publish(repo, clients())
    client = clients()
    ag = agent(tmp_path, client, repo)
    ag.refresh()

    reconnected = threading.Event()
    client.on_connect = lambda *_args: reconnected.set()
    broker.stop()
    with pytest.raises(TrustError) as e:
        ag.refresh()
    assert e.value.kind == "unavailable"
    broker.start()
    assert reconnected.wait(15)  # paho reconnects by itself; reads subscribe on demand

    repo.add_targets({"deployments/groups/g.json": b"after restart"})
    publish(repo, clients())  # the trainer republishes (idempotent on a broker that kept it)
    ag.refresh()
    assert ag.fetch_target("deployments/groups/g.json") == b"after restart"


# -- publishing within a stock broker's limits, pruning, root rotation ------------------------

TINY = 64  # chunk size that makes a few KiB of targets exceed Mosquitto's 1000-message queue


def many_chunks(n_targets: int, chunks: int) -> dict[str, bytes]:
    return {
        f"artifacts/big-{i}.zip": hashlib.sha256(bytes([i])).digest() * (chunks * TINY // 32)
        for i in range(n_targets)
    }


def chunk_topics(repo: TufRepository, target: str) -> list[str]:
    tf = repo.targets()[target]
    upath = url_path(target, tf.hashes["sha256"])
    return [TOPICS.repo_target_chunk(upath, i) for i in range(-(-tf.length // TINY))]


def test_publish_reads_only_index_messages_within_default_queue_limits(tmp_path, repo, clients):
    files = many_chunks(3, 400)  # 1200 retained chunks: more than one client's queue holds
    repo.add_targets(files)
    pub = clients()
    first = publish_repository(repo, pub, TOPICS, chunk_size=TINY, timeout=10)
    assert first.messages > 1200 and first.read_messages == 0  # an empty broker

    # Reading what exists receives the repo index, metadata and chunk indexes only: with
    # every chunk as well, Mosquitto would drop the reader's overflow (and its marker).
    again = publish_repository(repo, pub, TOPICS, chunk_size=TINY, timeout=10)
    assert again.messages == 0 and len(again.skipped_targets) == 3
    assert again.read_messages == 1 + len(repo.current_files().metadata) + 3

    # Removing a target clears its chunks (learnt from its index) and its index.
    gone = "artifacts/big-0.zip"
    gone_chunks = chunk_topics(repo, gone)
    repo.remove_targets([gone])
    third = publish_repository(repo, pub, TOPICS, chunk_size=TINY, timeout=10)
    assert set(gone_chunks) <= set(third.cleared_topics) and len(gone_chunks) == 400
    reader = RetainedReader(clients(), TOPICS, timeout=10)
    assert reader.read(gone_chunks[:500]) == {}  # a subscriber to those topics finds nothing
    kept = chunk_topics(repo, "artifacts/big-1.zip")
    assert len(reader.read(kept)) == 400

    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    assert ag.fetch_target("artifacts/big-1.zip") == files["artifacts/big-1.zip"]
    with pytest.raises(TargetNotFoundError):
        ag.fetch_target(gone)


def test_republishing_with_bigger_chunks_clears_the_chunks_no_index_names(repo, clients):
    seed(repo)
    pub = clients()
    publish_repository(repo, pub, TOPICS, chunk_size=TINY, timeout=5)
    upath = url_path("artifacts/m-1-onnx-int8.zip", hashlib.sha256(B).hexdigest())
    report = publish_repository(repo, pub, TOPICS, chunk_size=CHUNK, timeout=5)
    assert upath in report.published_targets
    there = retained(clients())
    chunks = sorted(
        p.chunk for t in there if (p := TOPICS.parse_repo_topic(t)) and p.name == upath
        and p.kind == "target-chunk"
    )
    assert chunks == list(range(-(-len(B) // CHUNK)))  # 6, not the 84 of the tiny chunking
    assert ChunkIndex.from_bytes(there[TOPICS.repo_target_index(upath)]).chunk_size == CHUNK


def trusted_root_version(tmp_path: Path, name: str = "a") -> int:
    """The root version an agent's TrustedRepository trusts on disk (python-tuf's root.json)."""
    return Metadata.from_file(str(tmp_path / f"agent-{name}" / "metadata" / "root.json")).signed.version


def test_agent_follows_a_root_rotation_with_new_keys(tmp_path, repo, clients):
    seed(repo)
    pub = clients()
    publish(repo, pub)
    ag = agent(tmp_path, clients(), repo)
    ag.refresh()
    old_keys = {r: (repo.keys_dir / f"{r}.pem").read_bytes() for r in ("targets", "timestamp")}
    old_root_key = (repo.root_key_dir / "root.pem").read_bytes()

    renewed = repo.rotate_root(new_keys=["root", "targets", "snapshot", "timestamp"])
    assert renewed == ["root", "targets", "snapshot", "timestamp"]
    assert repo.versions()["root"] == 2
    assert (repo.root_key_dir / "root.pem").read_bytes() != old_root_key
    assert not list(repo.keys_dir.glob("*.next")) and not list(repo.root_key_dir.glob("*.next"))
    v2 = Metadata.from_bytes(repo.metadata_bytes("2.root.json"))
    v1 = Metadata.from_bytes(repo.metadata_bytes("1.root.json"))
    assert len(v2.signatures) == 2  # the old root key and the new one
    assert v2.signed.get_root_verification_result(v1.signed, v2.signed_bytes, v2.signatures).verified
    repo.add_targets({"deployments/groups/g.json": b"signed with the new keys"})
    publish(repo, pub)

    ag.refresh()
    assert trusted_root_version(tmp_path) == 2
    assert ag.fetch_target("deployments/groups/g.json") == b"signed with the new keys"
    assert TufRepository.open(repo.path).versions() == repo.versions()  # the new keys load

    # Whoever holds an old (retired) online key can no longer sign what agents accept.
    stolen = load_pem_private_key(old_keys["timestamp"], None)
    [keyid] = v1.signed.roles["timestamp"].keyids
    md = Metadata.from_bytes(repo.metadata_bytes("timestamp.json"))
    md.signed.version += 1
    md.sign(CryptoSigner(stolen, v1.signed.keys[keyid]))
    put(pub, TOPICS.repo_metadata("timestamp.json"), md.to_bytes())
    with pytest.raises(TrustError) as e:
        ag.refresh()
    assert e.value.kind == "untrusted-signature"


def test_root_rotation_without_new_keys_renews_root_only(tmp_path, repo, clients):
    seed(repo)
    before = repo.versions()
    keys = {p.name: p.read_bytes() for p in repo.keys_dir.glob("*.pem")}
    assert repo.rotate_root(expires=timedelta(days=30)) == ["root", "timestamp"]
    after = repo.versions()
    assert (after["root"], after["targets"], after["snapshot"]) == (2, before["targets"], before["snapshot"])
    assert {p.name: p.read_bytes() for p in repo.keys_dir.glob("*.pem")} == keys
    assert repo.expiries()["root"] - datetime.now(UTC) < timedelta(days=31)
    publish(repo, clients())
    ag = agent(tmp_path, clients(), repo)  # bootstraps from root v1, walks to v2
    ag.refresh()
    assert trusted_root_version(tmp_path) == 2
    assert ag.fetch_target("deployments/groups/g.json") == A


def test_root_rotation_refuses_bad_input_without_writing(tmp_path):
    repo = TufRepository.init(tmp_path / "tuf", tmp_path / "offline")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RepositoryError, match="unknown role"):
        repo.rotate_root(new_keys=["mirror"])
    with pytest.raises(RepositoryError, match="future"):
        repo.rotate_root(expires=timedelta(days=0))
    no_key = TufRepository.open(tmp_path / "tuf")  # root key looked for in tuf/keys
    with pytest.raises(RepositoryError, match="no root key"):
        no_key.rotate_root()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


class _Crash(Exception):
    pass


def test_rotation_interrupted_before_the_new_root_leaves_the_old_keys(tmp_path, repo, monkeypatch):
    seed(repo)
    before = repo.versions()
    real = TufRepository._write_metadata

    def crash_on_root(self, filename, md):
        if filename.endswith("root.json"):
            raise _Crash
        real(self, filename, md)

    monkeypatch.setattr(TufRepository, "_write_metadata", crash_on_root)
    with pytest.raises(_Crash):
        repo.rotate_root(new_keys=["root", "targets"])
    monkeypatch.undo()
    assert (repo.keys_dir / "targets.pem.next").exists()  # the crash left the new key behind

    reopened = TufRepository.open(repo.path)
    assert not (repo.keys_dir / "targets.pem.next").exists()  # dropped: no root trusts it
    assert reopened.versions() == before
    reopened.add_targets({"deployments/groups/g.json": b"after"})  # the old keys still sign
    assert reopened.rotate_root(new_keys=["root"])[0] == "root"  # the root key is intact too


def test_rotation_interrupted_before_re_signing_is_completed_by_refresh(tmp_path, repo, clients,
                                                                         monkeypatch):
    seed(repo)
    pub = clients()
    publish(repo, pub)
    ag = agent(tmp_path, clients(), repo)
    ag.refresh()

    def crash(self, **_kw):
        raise _Crash

    monkeypatch.setattr(TufRepository, "refresh", crash)
    with pytest.raises(_Crash):
        repo.rotate_root(new_keys=["targets", "snapshot"])
    monkeypatch.undo()

    reopened = TufRepository.open(repo.path)
    assert reopened.versions()["root"] == 2
    # targets and snapshot are still signed by the retired keys: refresh re-signs them.
    assert reopened.refresh() == ["targets", "snapshot", "timestamp"]
    publish(reopened, pub)
    ag.refresh()
    assert trusted_root_version(tmp_path) == 2
    assert ag.fetch_target("artifacts/m-1-onnx-int8.zip") == B


def test_collect_files_deletes_what_no_current_metadata_names(tmp_path, repo):
    seed(repo)
    repo.add_targets({"deployments/groups/g.json": b"v2"})
    old_b = repo.targets_dir / url_path("artifacts/m-1-onnx-int8.zip", hashlib.sha256(B).hexdigest())
    assert old_b.exists()
    repo.remove_targets(["artifacts/m-1-onnx-int8.zip"])
    repo.rotate_root()
    deleted = repo.collect_files()
    assert old_b in deleted and not old_b.exists() and not old_b.parent.exists()
    current = repo.current_files()
    assert sorted(p.name for p in repo.metadata_dir.glob("*.json")) == sorted(
        {*current.metadata, "root.json"}
    )
    assert {"1.root.json", "2.root.json"} <= set(current.metadata)
    assert sorted(str(p.relative_to(repo.targets_dir)) for p in repo.targets_dir.rglob("*")
                  if p.is_file()) == sorted(current.targets)
    again = TufRepository.open(repo.path)
    assert again.target_bytes("deployments/groups/g.json") == b"v2"
    assert again.collect_files() == []


def test_target_paths_are_at_most_max_depth_levels(repo):
    deep = "/".join(["d"] * MAX_TARGET_DEPTH)
    repo.add_targets({deep: b"x"})
    with pytest.raises(RepositoryError, match="levels"):
        repo.add_targets({deep + "/e": b"x"})
    assert len(TOPICS.repo_target_indexes()) == MAX_TARGET_DEPTH
    index_topic = TOPICS.repo_target_index(url_path(deep, "0" * 64))
    assert index_topic.count("/") == TOPICS.repo_target_indexes()[-1].count("/")
