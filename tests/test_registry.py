"""The registry on real SQLite files: versions, blobs, schema migrations, concurrent writers."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
from pathlib import Path

import pytest

from trainer.registry import SCHEMA_VERSION, NewArtifact, Registry, RegistryError, parse_model_ref


def _artifact(payload: bytes) -> NewArtifact:
    return NewArtifact("onnx", "int8", payload, len(payload), ["x86-64-v3"], {"passed": True})


def _register(root: str, model: str, payload: bytes) -> int:
    with Registry.open(root, create=True) as reg:
        return reg.register(
            model, metrics={"m": 1}, params={}, lineage={"d": 1}, architecture={}, artifacts=[_artifact(payload)]
        ).version


def test_register_and_read_back(tmp_path: Path) -> None:
    assert _register(str(tmp_path), "cpu", b"one") == 1
    assert _register(str(tmp_path), "cpu", b"two") == 2
    with Registry.open(tmp_path) as reg:
        latest = reg.get("cpu")
        assert latest.version == 2 and latest.lineage["parent_version"] == 1
        art = latest.artifacts[0]
        assert reg.bundle(art.sha256) == b"two" and art.size_bytes == 3
        assert [m["name"] for m in reg.models()] == ["cpu"]
        with pytest.raises(RegistryError, match="known versions"):
            reg.get("cpu", 9)
        with pytest.raises(RegistryError, match="no model"):
            reg.get("mem")


def test_missing_registry_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry"):
        Registry.open(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_corrupt_or_misplaced_registry_is_a_registry_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "registry.sqlite").write_bytes(b"not a database\n" * 100)
    for attempt in (lambda: Registry.open(corrupt), lambda: Registry.open(corrupt, create=True),
                    lambda: Registry.migrate(corrupt), lambda: Registry.check_writable(corrupt)):
        with pytest.raises(RegistryError, match="not a database"):
            attempt()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RegistryError, match="cannot create registry"):
        Registry.open(a_file, create=True)
    with pytest.raises(RegistryError, match="is not a directory"):
        Registry.check_writable(a_file / "reg")


def test_check_writable_creates_nothing(tmp_path: Path) -> None:
    Registry.check_writable(tmp_path / "new" / "reg")  # a registry could be created there
    assert list(tmp_path.iterdir()) == []
    _register(str(tmp_path / "reg"), "cpu", b"x")
    before = sorted(p.name for p in (tmp_path / "reg").iterdir())
    Registry.check_writable(tmp_path / "reg")
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == before


def _permissions_apply(directory: Path) -> bool:
    """False when this process writes through file modes (root with CAP_DAC_OVERRIDE)."""
    probe = directory / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)
    return False


@pytest.mark.parametrize("target", ["registry.sqlite", ".", "parent"])
def test_a_registry_that_cannot_be_written_is_refused(tmp_path: Path, target: str) -> None:
    if not _permissions_apply(tmp_path):
        pytest.skip("this process writes through file permissions (root)")
    _register(str(tmp_path / "reg"), "cpu", b"x")
    locked = {"registry.sqlite": tmp_path / "reg" / "registry.sqlite", ".": tmp_path / "reg",
              "parent": tmp_path}[target]
    where = tmp_path / "new" if target == "parent" else tmp_path / "reg"
    locked.chmod(0o555)
    try:
        with pytest.raises(RegistryError, match="not writable|permission denied|readonly"):
            Registry.check_writable(where)
    finally:
        locked.chmod(0o755)


def test_a_missing_or_damaged_blob_is_a_registry_error(tmp_path: Path) -> None:
    _register(str(tmp_path), "cpu", b"payload")
    with Registry.open(tmp_path) as reg:
        sha = reg.get("cpu").artifacts[0].sha256
        path = reg.blobs.path(sha)
        path.chmod(0o644)
        path.write_bytes(b"tampered")
        with pytest.raises(RegistryError, match="corrupt"):
            reg.bundle(sha)
        path.unlink()
        with pytest.raises(RegistryError, match="lacks the blob"):
            reg.bundle(sha)


def test_schema_version_and_explicit_migration(tmp_path: Path) -> None:
    # An empty (v0) database is refused until migrated explicitly.
    sqlite3.connect(tmp_path / "registry.sqlite").close()
    with pytest.raises(RegistryError, match="registry migrate"):
        Registry.open(tmp_path)
    before, applied = Registry.migrate(tmp_path)
    assert (before, applied) == (0, list(range(1, SCHEMA_VERSION + 1)))
    assert Registry.migrate(tmp_path) == (SCHEMA_VERSION, [])
    Registry.open(tmp_path).close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    _register(str(tmp_path), "cpu", b"x")
    with sqlite3.connect(tmp_path / "registry.sqlite") as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(RegistryError, match="newer than this edgefleet"):
        Registry.open(tmp_path)


def test_bad_refs() -> None:
    assert parse_model_ref("cpu@3") == ("cpu", 3)
    assert parse_model_ref("cpu") == ("cpu", None)
    for bad in ("cpu@0", "cpu@x", "../x", ""):
        with pytest.raises(RegistryError):
            parse_model_ref(bad)


def _writer(root: str, start: multiprocessing.Event, n: int, tag: str, out: multiprocessing.Queue) -> None:
    start.wait(10)
    out.put([_register(root, "shared", f"{tag}-{i}".encode()) for i in range(n)])


def test_two_processes_writing_at_once_get_distinct_versions(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), start, 15, t, out)) for t in "ab"]
    for p in procs:
        p.start()
    start.set()
    got = sorted(out.get(timeout=120) + out.get(timeout=120))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert got == list(range(1, 31))
    with Registry.open(tmp_path) as reg:
        versions = reg.versions("shared")
        assert [v.version for v in versions] == list(range(1, 31))
        assert all(len(v.artifacts) == 1 for v in versions)
        assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_registry_being_created_is_never_seen_at_a_version_between(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one process writes a new registry's schema, another that opens it sees version 0
    and waits for the write lock, then opens the finished registry; it never sees a step
    between, which it would refuse as a registry that needs `registry migrate`."""
    import threading

    from trainer.registry import _schema

    inside, release = threading.Event(), threading.Event()
    last = _schema.MIGRATIONS[SCHEMA_VERSION]

    def paused(conn: sqlite3.Connection) -> None:
        inside.set()
        assert release.wait(30)
        last(conn)

    monkeypatch.setitem(_schema.MIGRATIONS, SCHEMA_VERSION, paused)
    creator = threading.Thread(target=lambda: Registry.open(tmp_path, create=True).close())
    creator.start()
    try:
        assert inside.wait(30)
        # every earlier step has run in the creator's transaction: none of it is visible yet
        probe = sqlite3.connect(tmp_path / "registry.sqlite")
        try:
            assert _schema.current_version(probe) == 0
        finally:
            probe.close()
        opened: list[int] = []
        second = threading.Thread(target=lambda: opened.append(_register(str(tmp_path), "cpu", b"x")))
        second.start()
        release.set()
        second.join(60)
        assert opened == [1]
    finally:
        release.set()
        creator.join(60)
    with Registry.open(tmp_path) as reg:
        assert [v.version for v in reg.versions("cpu")] == [1]


def test_opening_a_new_registry_while_another_process_holds_its_write_lock_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new file is still in rollback-journal mode while its creator holds the write lock;
    SQLite then refuses another connection's switch to WAL at once ("database is locked"),
    without waiting in the busy handler. The opener retries instead of failing."""
    import threading
    import time

    from trainer.registry import store

    holder = sqlite3.connect(tmp_path / "registry.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a creator between its BEGIN and its COMMIT
    retrying = threading.Event()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        retrying.set()
        real_sleep(seconds)

    monkeypatch.setattr(store.time, "sleep", sleep)
    opened: list[int] = []
    failed: list[Exception] = []

    def register() -> None:
        try:
            opened.append(_register(str(tmp_path), "cpu", b"x"))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            failed.append(e)

    opener = threading.Thread(target=register)
    opener.start()
    try:
        assert retrying.wait(30) or failed, "the opener neither retried nor failed"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        opener.join(60)
    assert not failed, failed
    assert opened == [1]


def test_creating_over_a_registry_another_process_is_creating(tmp_path: Path) -> None:
    # What a second `train` sees when the first has created the file but not migrated it yet.
    sqlite3.connect(tmp_path / "registry.sqlite").close()
    assert _register(str(tmp_path), "cpu", b"x") == 1


def test_weights_are_kept_by_content_and_v1_registries_migrate_to_versions_without_them(tmp_path: Path) -> None:
    from trainer.registry._schema import migrate

    with Registry.open(tmp_path / "new", create=True) as reg:
        record = reg.register("cpu", metrics={}, params={}, lineage={"parent_version": None}, architecture={},
                              artifacts=[_artifact(b"a")], weights=b"weights")
        assert reg.weights(record) == b"weights" and record.weights is not None
        assert record.lineage["parent_version"] is None  # a lineage may name its own parent
    # a registry written before weights were kept (schema v1)
    old = tmp_path / "old"
    old.mkdir()
    conn = sqlite3.connect(old / "registry.sqlite", isolation_level=None)
    migrate(conn, target=1)
    conn.execute("INSERT INTO models VALUES ('cpu', 'then')")
    conn.execute("INSERT INTO versions VALUES ('cpu', 1, 'then', '{}', '{}', '{}', '{}')")
    conn.close()
    with pytest.raises(RegistryError, match="registry migrate"):
        Registry.open(old)
    assert Registry.migrate(old) == (1, [2, 3, 4])
    with Registry.open(old) as reg:
        record = reg.get("cpu", 1)
        assert record.weights is None
        with pytest.raises(RegistryError, match="without its model weights"):
            reg.weights(record)
