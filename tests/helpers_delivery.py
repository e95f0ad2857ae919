"""Helpers for end-to-end delivery tests: the real agent and CLIs as subprocesses, a subscriber
that collects what agents publish, and an attacker with write access to the broker.

Nothing here mocks a part: the agent is ``python -m edge_agent.cli run``, the trainer is
``python -m trainer.cli``, the broker is the ``broker`` fixture's Mosquitto. Waits are on
events (a ``threading.Condition``) or, for files the agent writes, on polling with a deadline;
every wait fails with what was seen and the agents' stderr tails.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest

from edge_agent.mqtt import RetainedReader, connect
from shared.bundle import bundle_target_name
from shared.messages import (
    MessageError,
    decode_agent_event,
    decode_agent_health,
    decode_agent_state,
    decode_deployment_status,
)
from shared.topics import RepoTopic, Topics
from trainer.fleet.tuf_repository import url_path
from trainer.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
TOPICS = Topics()
STAGING = Topics(root="staging/v1")  # where the trainer publishes what an attacker then forges

T = TypeVar("T")


# -- the trainer CLI ------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``edgefleet ARGS…`` (the real CLI) and assert it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"edgefleet {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return proc


def bundle_sha(registry: Path, model: str, version: int, fmt: str = "onnx", quant: str = "int8") -> str:
    with Registry.open(registry) as reg:
        record = reg.get(model, version)
    return next(a.sha256 for a in record.artifacts if (a.format, a.quantization) == (fmt, quant))


def bundle_bytes(registry: Path, sha256: str) -> bytes:
    with Registry.open(registry) as reg:
        return reg.bundle(sha256)


def bundle_upath(registry: Path, model: str, version: int, fmt: str = "onnx", quant: str = "int8") -> str:
    """The consistent-snapshot url path (``artifacts/{sha256}.{name}``) the agent fetches."""
    target = bundle_target_name(model, version, fmt, quant)
    return url_path(target, bundle_sha(registry, model, version, fmt, quant))


# -- the agent as a subprocess --------------------------------------------------------------------


class AgentProcess:
    """One ``edgefleet-agent run`` subprocess; stderr goes to a file for failure messages.

    With ``stdin=True`` its standard input is a pipe that stays open until :meth:`kill`:
    :meth:`feed` writes to it (for ``source = "stdin"``).
    """

    def __init__(self, config: Path, state_dir: Path, log: Path, *, exit_at_end: bool,
                 stdin: bool = False, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.state_dir = state_dir
        self.log = log
        cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)]
        if exit_at_end:
            cmd.append("--exit-at-end")
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                         stdin=subprocess.PIPE if stdin else None,
                                         env={**os.environ, **env} if env else None)

    def feed(self, lines: Iterable[str]) -> None:
        """Write lines to the agent's stdin pipe (blocks while the agent does not read)."""
        assert self.proc.stdin is not None, "agent started without stdin=True"
        self.proc.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.proc.stdin.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"agent pid {self.pid} did not exit within {timeout:g} s\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must wake to die cleanly
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no stderr)"
        return "\n".join(text[-lines:])


class Agents:
    """Writes configs with ``edgefleet-agent init-config`` and starts agents; kills them all."""

    def __init__(self, base: Path, broker_url: str) -> None:
        self.base = base
        self.broker_url = broker_url
        self.started: list[AgentProcess] = []

    def config(self, agent_id: str, *, trust: Path, source: str, health_period: float = 0.5,
               drift_window: int | None = None) -> Path:
        """A config as a user gets it from ``init-config``, with a short health period.

        Drift monitoring is off unless ``drift_window`` sets its window: a drift event takes
        an outbox ``seq`` like an anomaly event, and most tests count the events
        ``edgefleet detect`` predicts.
        """
        home = self.base / agent_id
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "init-config", "--agent-id", agent_id,
             "--group", "lab", "--profile", "x86-64-v3", "--broker", self.broker_url,
             "--trust", str(trust), "--state-dir", str(home / "state"), "--source", source],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        text, n = re.subn(r"(?m)^period_seconds = \S+", f"period_seconds = {health_period}", proc.stdout)
        assert n == 1, "init-config no longer writes [health] period_seconds"
        if drift_window is None:
            text, n = re.subn(r"(?m)^(\[drift\]\nenabled = )true", r"\1false", text)
        else:
            text, n = re.subn(r"(?m)^(\[drift\](?:\n.*)*?\nwindow = )\d+", rf"\g<1>{drift_window}", text)
        assert n == 1, "init-config no longer writes [drift] enabled and window"
        path = home / "agent.toml"
        path.write_text(text)
        return path

    def start(self, config: Path, *, exit_at_end: bool = False, stdin: bool = False,
              env: Mapping[str, str] | None = None) -> AgentProcess:
        """Start an agent; ``env`` adds to (or overrides) this process's environment."""
        agent = AgentProcess(config, config.parent / "state", config.parent / "stderr.log",
                             exit_at_end=exit_at_end, stdin=stdin, env=env)
        self.started.append(agent)
        return agent

    def tail(self) -> str:
        return "\n".join(
            f"--- agent pid {a.pid} ({'running' if a.alive() else f'exit {a.proc.returncode}'}) "
            f"stderr tail ---\n{a.tail()}"
            for a in self.started
        ) or "(no agent started)"

    def close(self) -> None:
        for agent in self.started:
            agent.kill()


# -- a small disk ---------------------------------------------------------------------------------


class SmallDisks:
    """Small tmpfs file systems for state directories, unmounted by :meth:`close`.

    Mounting needs root (or CAP_SYS_ADMIN); without it the test is skipped with the reason.
    """

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, path: Path, size: str = "2m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                  capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no mount(8) on this machine: cannot make a small disk")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs (needs root): {proc.stderr.strip()}")
        self.mounted.append(path)
        return path

    @staticmethod
    def fill(path: Path) -> int:
        """Write ``path/filler`` until the file system is full; returns the bytes written."""
        written = 0
        fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 1 << 12, 1):  # big blocks, then the last page to the byte
                block = bytes(size)
                while True:
                    try:
                        written += os.write(fd, block)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    @staticmethod
    def free(path: Path) -> None:
        (path / "filler").unlink()

    def close(self) -> None:
        for path in reversed(self.mounted):
            # Lazy: an agent killed a moment ago may still hold files open.
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
        self.mounted.clear()


# -- data for the agents ------------------------------------------------------------------------


def json_lines(csv_path: Path, start: int = 0, stop: int | None = None) -> list[str]:
    """Rows ``start:stop`` of a CSV as the JSON lines a ``stdin`` source reads."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))[start:stop]
    return [json.dumps({k: (v if k == "timestamp" else float(v)) for k, v in row.items()}) for row in rows]


def flagged_rows(registry: Path, ref: str, data: Path, out: Path) -> list[int]:
    """The row numbers that ``edgefleet detect`` (the agent's own detection code) flags."""
    cli("detect", ref, "--registry", str(registry), "--data", str(data), "--out", str(out),
        "--profile", "x86-64-v3")
    with open(out, newline="") as f:
        return [i for i, row in enumerate(csv.DictReader(f)) if row["is_anomaly"] == "1"]


def csv_timestamps(csv_path: Path) -> list[str]:
    with open(csv_path, newline="") as f:
        return [row["timestamp"] for row in csv.DictReader(f)]


# -- what agents publish --------------------------------------------------------------------------


@dataclass
class Received:
    """One message from an agent, decoded; ``n`` is its arrival number (0, 1, …)."""

    n: int
    agent: str
    kind: str
    body: Any


_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "state": decode_agent_state,
    "health": decode_agent_health,
    "deployments": decode_deployment_status,
    "events": decode_agent_event,  # anomaly and drift events share the topic and its seq
}


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


class Watch:
    """A paho 2.x subscriber to ``edgefleet/v1/agents/+/#`` that decodes and keeps everything.

    ``persistent=True`` uses a fixed client id, ``clean_session=False`` and QoS 1, so that the
    broker keeps the subscription and queues events for it across a restart. It resubscribes
    on every connect; :attr:`ready` is set once subscribed and cleared on disconnect.
    """

    def __init__(self, url: str, diag: Callable[[], str], *, persistent: bool = False) -> None:
        self.diag = diag
        self.cond = threading.Condition()
        self.messages: list[Received] = []
        self.undecodable: list[tuple[str, str]] = []
        self.ready = threading.Event()
        client_id = f"watch-{uuid.uuid4().hex[:10]}"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
            protocol=mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_disconnect = lambda *_: self.ready.clear()
        self.client.on_message = self._on_message
        host, port = _host_port(url)
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise AssertionError(f"test subscriber not subscribed within 10 s to {url}")

    def _on_connect(self, client, _userdata, _flags, reason, _props) -> None:
        if not reason.is_failure:
            client.subscribe(f"{TOPICS.root}/agents/+/#", qos=1)

    def _on_message(self, _client, _userdata, msg: mqtt.MQTTMessage) -> None:
        parsed = TOPICS.parse_agent_topic(msg.topic)
        if parsed is None or not msg.payload:
            return  # not an agent topic, or a cleared retained message
        agent, kind = parsed
        decode = _DECODERS.get(kind)
        if decode is None:
            return
        try:
            body = decode(msg.payload)
        except MessageError as e:
            with self.cond:
                self.undecodable.append((msg.topic, str(e)))
            return
        with self.cond:
            self.messages.append(Received(len(self.messages), agent, kind, body))
            self.cond.notify_all()

    # -- queries (callers hold no lock: each takes a snapshot) ---------------------------------

    def mark(self) -> int:
        """The arrival number the next message will get: "after this point"."""
        with self.cond:
            return len(self.messages)

    def of(self, kind: str, since: int = 0) -> list[Any]:
        with self.cond:
            return [m.body for m in self.messages[since:] if m.kind == kind]

    def event_seqs(self) -> set[int]:
        return {e["seq"] for e in self.of("events")}

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Wait until ``predicate()`` (called under the lock, with the lists) returns truthy."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{self.summary()}")

    def summary(self) -> str:
        with self.cond:
            msgs = list(self.messages)
        lines = [f"received {len(msgs)} message(s); undecodable: {self.undecodable[:3]}"]
        for m in [m for m in msgs if m.kind in ("state", "deployments")][-8:]:
            b = m.body
            if m.kind == "state":
                active = [(a.model, a.version) for a in b.active]
                lines.append(f"  #{m.n} state {b.status} bdseq={b.bdseq} active={active}")
            else:
                lines.append(f"  #{m.n} deployment {b.model}@{b.version} {b.state} {b.reason or ''}")
        health = [m for m in msgs if m.kind == "health"]
        if health:
            h = health[-1].body
            lines.append(f"  last health #{health[-1].n}: inferences={h.inferences} "
                         f"outbox_depth={h.outbox_depth}")
        events = [m.body["seq"] for m in msgs if m.kind == "events"]
        if events:
            lines.append(f"  {len(events)} event(s), seqs {min(events)}..{max(events)}")
        return "\n".join(lines) + "\n" + self.diag()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def poll_until(predicate: Callable[[], T], timeout: float, what: str, diag: Callable[[], str],
               interval: float = 0.02) -> T:
    """Poll something the agent writes to disk until ``predicate()`` is truthy (or fail)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{diag()}")
        time.sleep(interval)  # polling a file the agent writes, not waiting for correctness


def outbox_counts(state_dir: Path) -> tuple[int, int, int]:
    """``(pending events, last seq assigned, dropped)`` read from the agent's outbox.sqlite."""
    path = state_dir / "outbox.sqlite"
    if not path.exists():
        return 0, 0, 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        depth = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    return depth, meta["next_seq"] - 1, meta["dropped"]


# -- the broker as untrusted storage: read it, write it ---------------------------------------


class Attacker:
    """A plain paho client with write access to the broker (connected, network thread running)."""

    def __init__(self, url: str) -> None:
        self.client = connect(url, client_id=f"attacker-{uuid.uuid4().hex[:10]}", timeout=10)

    def put(self, topic: str, payload: bytes) -> None:
        """Replace (or, with ``b""``, delete) a retained message and wait for its PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        infos = [(t, self.client.publish(t, p, qos=1, retain=True)) for t, p in items]
        for topic, info in infos:
            info.wait_for_publish(10)
            assert info.is_published(), f"no PUBACK for {topic}"

    def read(self, topics: Topics, filters: list[str]) -> dict[str, bytes | None]:
        return RetainedReader(self.client, topics, timeout=10).read(filters)

    def staged(self) -> dict[RepoTopic, bytes]:
        """What the trainer published under the staging root, by parsed repository topic."""
        got = self.read(STAGING, [STAGING.repo_all()])
        out: dict[RepoTopic, bytes] = {}
        for topic, payload in got.items():
            parsed = STAGING.parse_repo_topic(topic)
            if parsed is not None and payload:
                out[parsed] = payload
        return out

    def forge(self, files: dict[RepoTopic, bytes]) -> None:
        """Publish ``files`` under the agents' root in the trainer's order, timestamp last."""
        phases = (
            [f for f in files if f.kind == "target-chunk"],
            [f for f in files if f.kind == "target-index"],
            [f for f in files if f.kind == "metadata" and f.name != "timestamp.json"],
            [f for f in files if f.kind == "index"],
            [f for f in files if f.kind == "metadata" and f.name == "timestamp.json"],
        )
        for phase in phases:
            self.put_many((real_topic(f), files[f]) for f in phase)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def real_topic(f: RepoTopic) -> str:
    """The agents' topic of a parsed repository topic."""
    if f.kind == "index":
        return TOPICS.repo_index()
    if f.kind == "metadata":
        return TOPICS.repo_metadata(f.name)
    if f.kind == "target-index":
        return TOPICS.repo_target_index(f.name)
    assert f.kind == "target-chunk" and f.chunk is not None
    return TOPICS.repo_target_chunk(f.name, f.chunk)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie (from /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out
