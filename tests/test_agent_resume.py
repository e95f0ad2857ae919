"""A restarted agent resumes its recent samples: real Mosquitto, real agent processes.

An agent keeps its last samples across a clean stop (SIGTERM), so that a model with a long
window scores from the first sample after the restart instead of refilling its window — but
only when the stream continues where it stopped. Each run replays a CSV to its end and is then
stopped; its final health report (published at the stop) says how many windows it scored:

1. a first run on rows 0-119 fills the window first: 120 - (W - 1) inferences;
2. a restart on rows 120-239 (the timestamps continue) scores every one of its 120 samples;
3. a restart on rows whose timestamps come a day later refills: 120 - (W - 1) inferences.
"""

from __future__ import annotations

import csv
import re
import signal
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from helpers_delivery import AgentProcess, Agents, Watch, cli, poll_until

from edge_agent.recent import RECENT_SAMPLES, load_recent
from trainer.fleet.deploy import repository_path

pytestmark = pytest.mark.slow

W = 24  # the model's window
ROWS = 120  # rows per run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic 5-minute host-metrics CSV and a registry with res@1 (window W) and a TUF
    repository."""
    base = tmp_path_factory.mktemp("resume")
    data = base / "host.csv"
    cli("data", "synth", "--out", str(data), "--rows", "600", "--seed", "2")
    registry = base / "registry"
    cli("train", "--data", str(data), "--profile", "x86-64-v3", "--name", "res", "--registry",
        str(registry), "--epochs", "1", "--window", str(W), "--family", "autoencoder",
        "--train-fraction", "0.5", "--json", "-q")
    cli("repo", "init", "--registry", str(registry), "--json")
    return data, registry


@pytest.fixture
def agents(broker, tmp_path: Path) -> Iterator[Agents]:
    made = Agents(tmp_path / "agents", broker.url)
    try:
        yield made
    finally:
        made.close()


def _rows(data: Path, start: int, stop: int, *, shift: timedelta = timedelta()) -> Path:
    """Rows ``start:stop`` of ``data`` as a CSV of their own, timestamps moved by ``shift``."""
    with open(data, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)[start:stop]
    out = data.parent / f"rows-{start}-{stop}-{int(shift.total_seconds())}.csv"
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for ts, *values in rows:
            moved = (datetime.fromisoformat(ts) + shift).strftime("%Y-%m-%d %H:%M:%S")
            writer.writerow([moved, *values])
    return out


def _use_source(config: Path, source: Path) -> None:
    text, n = re.subn(r'(?m)^spec = ".*"$', f'spec = "csv:{source}"', config.read_text())
    assert n == 1, "init-config no longer writes [source] spec"
    config.write_text(text)


def _replay_and_stop(agents: Agents, watch: Watch, config: Path) -> tuple[AgentProcess, int]:
    """Start the agent, let it replay its CSV to the end, stop it with SIGTERM; returns the
    process and the number of windows it scored (from the health report it sends at the stop)."""
    mark = watch.mark()
    agent = agents.start(config)
    log_lines = agent.log.read_text().count("\n")  # earlier runs wrote to the same file

    def said(text: str) -> bool:
        return text in "\n".join(agent.log.read_text().splitlines()[log_lines:])

    watch.wait_for(lambda: any(s.status == "online" for s in watch.of("state", mark)), 60,
                   "the agent's birth")
    poll_until(lambda: said("source ended"), 60, "the agent to replay its CSV", agents.tail)
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.tail()
    watch.wait_for(lambda: any(s.status == "stopped" for s in watch.of("state", mark)), 10,
                   "state stopped")
    return agent, max(h.inferences for h in watch.of("health", mark))


def test_a_restarted_agent_scores_from_its_first_sample_unless_time_jumped(
    trained, broker, agents: Agents
) -> None:
    data, registry = trained
    root = repository_path(registry) / "metadata" / "root.json"
    watch = Watch(broker.url, agents.tail)
    try:
        config = agents.config("edge-r", trust=root, source=f"csv:{_rows(data, 0, ROWS)}")
        cli("deploy", "res@1", "--group", "lab", "--registry", str(registry), "--broker", broker.url)

        agent, inferences = _replay_and_stop(agents, watch, config)
        assert inferences == ROWS - (W - 1)  # the first run fills the window first
        saved = load_recent(agent.state_dir / RECENT_SAMPLES, limit=10_000)
        with open(data, newline="") as f:
            first_rows = [row["timestamp"] for row in csv.DictReader(f)][:ROWS]
        assert [s.timestamp for s in saved] == first_rows

        # The stream continues: the restarted agent scores from its first sample.
        _use_source(config, _rows(data, ROWS, 2 * ROWS))
        agent, inferences = _replay_and_stop(agents, watch, config)
        assert inferences == ROWS, agent.tail()
        assert f"resumed {ROWS} samples saved at the last stop" in agent.log.read_text()

        # A day went by: the samples from before the restart are dropped, the window refills.
        _use_source(config, _rows(data, 2 * ROWS, 3 * ROWS, shift=timedelta(days=1)))
        agent, inferences = _replay_and_stop(agents, watch, config)
        assert inferences == ROWS - (W - 1), agent.tail()
        log = agent.log.read_text()
        assert re.search(rf"dropped {2 * ROWS} samples saved at the last stop: gap of 1 day, ", log), agent.tail()
        assert "Traceback" not in log and "WARNING edge_agent.recent" not in log, agent.tail()
        saved = load_recent(agent.state_dir / RECENT_SAMPLES, limit=10_000)
        assert len(saved) == ROWS and saved[0].timestamp == "2026-01-06 20:00:00"  # row 240, a day on
    finally:
        watch.close()
