"""Agent sources against real inputs: psutil on this host, CSV files, JSON lines."""

from __future__ import annotations

import io
import threading
from itertools import islice
from pathlib import Path

import pytest

from edge_agent.daemon import Backoff
from edge_agent.sources import SourceError, open_source, parse_source


def test_host_source_reads_this_hosts_metrics() -> None:
    stop = threading.Event()
    samples = list(islice(open_source(parse_source("host?period=0.05"), stop), 2))
    for s in samples:
        assert {"cpu", "memory", "load"} <= set(s.values)
        assert 0 <= s.values["cpu"] <= 100 and 0 < s.values["memory"] <= 100
        assert s.values["disk"] >= 0 and s.values["network"] >= 0


def test_csv_source_multivariate_and_stop(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("timestamp,cpu,mem\n" + "".join(f"2026-01-01 00:{i:02d}:00,{i},{2 * i}\n" for i in range(50)))
    stop = threading.Event()
    it = open_source(parse_source(f"csv:{p}"), stop)
    first = next(it)
    assert first.timestamp == "2026-01-01 00:00:00" and first.values == {"cpu": 0.0, "mem": 0.0}
    stop.set()
    assert list(it) == []  # a stopped source ends


def test_csv_source_reports_a_bad_row(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("timestamp,value\n2026-01-01 00:00:00,1\n2026-01-01 00:05:00,x\n")
    with pytest.raises(SourceError, match=":3: column 'value'"):
        list(open_source(parse_source(f"csv:{p}"), threading.Event()))


def test_stdin_json_lines_skip_bad_lines(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO('{"timestamp": "t1", "cpu": 1.5}\nnot json\n{"cpu": null}\n')
    samples = list(open_source(parse_source("stdin"), threading.Event(), stdin=stream))
    assert samples[0].timestamp == "t1" and samples[0].values == {"cpu": 1.5}
    assert len(samples) == 2 and samples[1].values["cpu"] != samples[1].values["cpu"]  # NaN
    assert "line 2: skipped" in capsys.readouterr().err


def test_backoff_is_jittered_exponential_and_capped() -> None:
    import random

    b = Backoff(base=0.5, cap=8.0, rng=random.Random(7))
    delays = [b.next() for _ in range(12)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    assert max(delays[:2]) <= 1.0 and max(delays[6:]) > 2.0  # grows, then stays under the cap
    assert len(set(delays)) == len(delays)  # jittered: no two agents retry in lockstep
    b.reset()
    assert b.next() <= 0.5 + 1e-9
