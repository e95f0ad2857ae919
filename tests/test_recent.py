"""The recent-samples file (kept across a clean restart) and the rule that decides whether a
restarted agent may use it: round trips, missing values, corrupt files, gaps in time."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.recent import (
    FORMAT,
    RecentSamplesError,
    decode_recent,
    discontinuity,
    encode_recent,
    load_recent,
    save_recent,
)
from edge_agent.sources import Sample


def _same(a: list[Sample], b: list[Sample]) -> bool:
    """Equal samples, NaN equal to NaN and to a missing feature."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.timestamp != y.timestamp:
            return False
        for name in x.values.keys() | y.values.keys():
            u, v = x.values.get(name, math.nan), y.values.get(name, math.nan)
            if not (u == v or (math.isnan(u) and math.isnan(v))):
                return False
    return True


def test_round_trip_keeps_values_and_missing_values(tmp_path: Path) -> None:
    samples = [
        Sample("2026-01-05 00:00:00", {"cpu": 17.6912, "memory": 48.4754}),
        Sample("2026-01-05 00:05:00", {"cpu": math.nan, "memory": 0.1 + 0.2}),
        Sample("2026-01-05 00:10:00", {"cpu": None, "memory": math.inf}),  # type: ignore[dict-item]
        Sample("2026-01-05 00:15:00", {"cpu": 3.0, "temperature": -1e-300}),  # a feature comes late
    ]
    path = tmp_path / "state" / "recent-samples.jsonl"
    save_recent(path, samples)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": FORMAT, "features": ["cpu", "memory", "temperature"]}
    assert json.loads(lines[2]) == ["2026-01-05 00:05:00", None, 0.30000000000000004, None]

    back = load_recent(path, limit=100)
    assert [s.timestamp for s in back] == [s.timestamp for s in samples]
    assert (back[0].values["cpu"], back[0].values["memory"]) == (17.6912, 48.4754)
    assert math.isnan(back[0].values["temperature"])  # absent: comes back missing
    assert math.isnan(back[1].values["cpu"]) and back[1].values["memory"] == 0.1 + 0.2  # exact
    assert math.isnan(back[2].values["cpu"]) and math.isnan(back[2].values["memory"])  # None, inf
    assert back[3].values["temperature"] == -1e-300
    assert _same(load_recent(path, limit=2), back[-2:])  # only the last `limit`


@given(st.lists(st.builds(
    Sample,
    st.text(),
    st.dictionaries(st.text(max_size=5), st.floats(allow_nan=True, allow_infinity=True), max_size=4),
), max_size=20))
def test_decode_reads_back_what_encode_wrote(samples: list[Sample]) -> None:
    text = encode_recent(samples).decode()
    back = decode_recent(text.splitlines(keepends=True))
    finite = [Sample(s.timestamp, {k: v if math.isfinite(v) else math.nan for k, v in s.values.items()})
              for s in samples]
    assert _same(back, finite)


def test_a_missing_file_is_a_first_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert load_recent(tmp_path / "recent-samples.jsonl", limit=10) == []
    assert caplog.records == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "line 1: not a edgefleet.recent-samples/1 header"),
        (b'{"format": "edgefleet.recent-samples/9", "features": []}\n', "line 1"),
        (b'{"format": "edgefleet.recent-samples/1", "features": ["a", "a"]}\n', "line 1"),
        (b'{"format": "edgefleet.recent-samples/1", "features": ["a"]}\n["t", 1.0]\n["t", 2', "line 3"),
        (b'{"format": "edgefleet.recent-samples/1", "features": ["a"]}\n["t", 1.0, 2.0]\n', "line 2"),
        (b'{"format": "edgefleet.recent-samples/1", "features": ["a"]}\n["t", "1.0"]\n', "line 2"),
        (b'{"format": "edgefleet.recent-samples/1", "features": ["a"]}\n["t", true]\n', "line 2"),
        (b'{"format": "edgefleet.recent-samples/1", "features": ["a"]}\n[5, 1.0]\n', "line 2"),
        (b"\xff\xfe\x00garbage", "utf-8"),
    ],
)
def test_a_corrupt_file_is_survived_and_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    path = tmp_path / "recent-samples.jsonl"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="edge_agent.recent"):
        assert load_recent(path, limit=10) == []
    [record] = caplog.records
    assert record.levelname == "WARNING" and why in record.getMessage()
    assert "moved to recent-samples.jsonl.corrupt" in record.getMessage()
    assert not path.exists() and (tmp_path / "recent-samples.jsonl.corrupt").read_bytes() == content
    # reported once: the next start finds no file, and the next stop writes a good one
    caplog.clear()
    assert load_recent(path, limit=10) == []
    assert caplog.records == []
    save_recent(path, [Sample("1", {"a": 1.0})])
    assert load_recent(path, limit=10) == [Sample("1", {"a": 1.0})]


def test_decode_names_the_bad_line() -> None:
    with pytest.raises(RecentSamplesError, match="line 3"):
        decode_recent(['{"format": "edgefleet.recent-samples/1", "features": []}\n', '["t"]\n', "{}\n"])


# -- the gap rule -------------------------------------------------------------------------------


def _five_minutes(n: int, start_hour: int = 0) -> list[str]:
    return [f"2026-01-05 {start_hour + i // 12:02d}:{i % 12 * 5:02d}:00" for i in range(n)]


def test_a_stream_that_continues_within_three_steps_is_resumed() -> None:
    saved = _five_minutes(24)  # 00:00 … 01:55
    assert saved[-1] == "2026-01-05 01:55:00"
    assert discontinuity(saved, "2026-01-05 02:00:00") is None
    assert discontinuity(saved, "2026-01-05 02:10:00") is None  # three steps: two samples missed
    assert discontinuity(saved, "2026-01-05T02:10:00+00:00") is None  # the same instant
    # a step that is not typical does not decide: the median does
    assert discontinuity([*saved[:-1], "2026-01-05 05:00:00"], "2026-01-05 05:05:00") is None
    assert discontinuity(["100", "110", "120"], "150") is None  # epoch seconds


@pytest.mark.parametrize(
    ("first", "why"),
    [
        ("2026-01-05 02:10:01", "gap of 0:15:01 after 2026-01-05 01:55:00 (typical step 0:05:00)"),
        ("2026-01-06 02:00:00", "gap of 1 day, 0:05:00"),
        ("2026-01-05 01:55:00", "time went back"),  # the same timestamp again: a replay
        ("2026-01-05 00:00:00", "time went back"),
        ("yesterday", "cannot be read"),
    ],
)
def test_a_gap_or_a_step_back_drops_the_saved_samples(first: str, why: str) -> None:
    reason = discontinuity(_five_minutes(24), first)
    assert reason is not None and why in reason


def test_too_few_or_unreadable_saved_samples_are_not_resumed() -> None:
    assert discontinuity([], "2026-01-05 00:00:00") is not None
    assert discontinuity(["2026-01-05 00:00:00"], "2026-01-05 00:05:00") is not None
    assert "cannot be read" in (discontinuity(["t1", "t2"], "t3") or "")
