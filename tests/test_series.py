"""CSV time series parsing: both layouts, missing values, and one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.series import SeriesError, TimeOrderError, iter_csv_rows, read_series, sort_dedupe


def write(tmp_path: Path, text: str, name: str = "s.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_nab_layout(tmp_path: Path) -> None:
    s = read_series(write(tmp_path, "timestamp,value\n2014-02-14 14:30:00,0.1\n2014-02-14 14:35:00,0.2\n"))
    assert s.features == ("value",)
    assert s.timestamps == ["2014-02-14 14:30:00", "2014-02-14 14:35:00"]
    assert s.values.dtype == np.float32 and s.values.shape == (2, 1)


def test_multivariate_with_missing_cells(tmp_path: Path) -> None:
    s = read_series(write(tmp_path, "timestamp,cpu,mem\n2026-01-01T00:00:00,1,\n2026-01-01T00:01:00,nan,4\n"))
    assert s.features == ("cpu", "mem")
    assert np.isnan(s.values[0, 1]) and np.isnan(s.values[1, 0])


@pytest.mark.nab
def test_nab_file_reads(nab_dir: Path) -> None:
    s = read_series(nab_dir / "data/realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv")
    assert len(s) == 4032 and s.features == ("value",)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("timestamp\n", "header"),
        ("timestamp,value\n", "no data rows"),
        ("timestamp,value\n2026-01-01 00:00:00,abc\n", ":2: column 'value' has non-numeric value 'abc'"),
        ("timestamp,value\n2026-01-01 00:00:00,1,2\n", ":2: expected 2 fields, found 3"),
        ("timestamp,value\nyesterday,1\n", "timestamp 'yesterday'"),
        ("timestamp,a,b\n2026-01-01 00:00:00,1,\n2026-01-01 00:01:00,2,nan\n", "column 'b' has no numeric value"),
        ("timestamp,a,a\n2026-01-01 00:00:00,1,2\n", "distinct"),
        ("timestamp,value\n2026-01-01 00:00:00,inf\n", "infinite"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(SeriesError) as e:
        read_series(write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="cannot read"):
        read_series(tmp_path / "nope.csv")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_series_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "f.csv"
    p.write_bytes(b"timestamp,value\n" + data)
    try:
        s = read_series(p)
    except SeriesError:
        return
    assert s.values.shape == (len(s.timestamps), 1)


# -- time order -------------------------------------------------------------------------------


def rows(*stamps: str) -> str:
    return "timestamp,value\n" + "".join(f"{t},{i}\n" for i, t in enumerate(stamps))


@pytest.mark.parametrize(
    "stamps, needle",
    [
        (("2026-01-01 00:00:00", "2026-01-01 00:05:00", "2026-01-01 00:05:00"),
         ":4: timestamp '2026-01-01 00:05:00' repeats '2026-01-01 00:05:00' on line 3"),
        (("2026-01-01 00:00:00", "2026-01-01 00:10:00", "2026-01-01 00:05:00"),
         ":4: timestamp '2026-01-01 00:05:00' is earlier than '2026-01-01 00:10:00' on line 3"),
        (("2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00Z"), ":3: timestamp '2026-01-01T00:00:00Z' repeats"),
        (("100", "99.5"), ":3: timestamp '99.5' is earlier than '100'"),
    ],
)
def test_strict_time_names_file_and_first_offending_row(tmp_path: Path, stamps: tuple[str, ...], needle: str) -> None:
    path = write(tmp_path, rows(*stamps))
    assert len(read_series(path)) == len(stamps)  # as written by default
    with pytest.raises(TimeOrderError) as e:
        read_series(path, strict_time=True)
    assert str(e.value).startswith(f"{path}:") and needle in str(e.value)


def test_line_numbers_count_skipped_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,value\n2026-01-01 00:00:00,1\n\n2026-01-01 00:00:00,2\n")
    with pytest.raises(TimeOrderError, match=r":4: .* on line 2"):
        read_series(path, strict_time=True)


def test_non_finite_epoch_timestamps_are_malformed(tmp_path: Path) -> None:
    for bad in ("nan", "inf"):
        with pytest.raises(SeriesError, match=f"timestamp '{bad}'"):
            read_series(write(tmp_path, rows("1", bad)))


def test_the_streaming_reader_passes_rows_on_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, rows("2026-01-01 00:05:00", "2026-01-01 00:00:00", "2026-01-01 00:00:00"))
    assert [ts for ts, _, _ in iter_csv_rows(path)] == [
        "2026-01-01 00:05:00", "2026-01-01 00:00:00", "2026-01-01 00:00:00",
    ]


def test_sort_dedupe_keeps_the_first_row_of_a_timestamp_and_counts_what_it_did(tmp_path: Path) -> None:
    # 00:20 arrived early (one row to move); 00:05 is repeated (one row to drop).
    text = "timestamp,value\n" + "".join(
        f"2026-01-01 {t}:00,{v}\n" for t, v in
        [("00:00", 0), ("00:20", 1), ("00:05", 2), ("00:05", 3), ("00:10", 4), ("00:15", 5)]
    )
    path = write(tmp_path, text)
    fixed, repair = sort_dedupe(read_series(path))
    assert (repair.moved, repair.dropped) == (1, 1)
    assert fixed.timestamps == [f"2026-01-01 00:{m:02d}:00" for m in (0, 5, 10, 15, 20)]
    assert fixed.values[:, 0].tolist() == [0, 2, 4, 5, 1]  # the first 00:05 row (2) is kept


def test_sort_dedupe_of_an_ordered_series_changes_nothing(tmp_path: Path) -> None:
    series = read_series(write(tmp_path, rows("1", "2", "3")), strict_time=True)
    fixed, repair = sort_dedupe(series)
    assert fixed is series and not repair.changed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40))
def test_sort_dedupe_output_reads_back_strictly(tmp_path_factory: pytest.TempPathFactory, seconds: list[int]) -> None:
    p = tmp_path_factory.mktemp("order") / "s.csv"
    p.write_text(rows(*(str(s) for s in seconds)))
    fixed, repair = sort_dedupe(read_series(p))
    assert [float(t) for t in fixed.timestamps] == sorted(set(seconds))
    assert repair.dropped == len(seconds) - len(set(seconds))
    firsts = {s: i for i, s in reversed(list(enumerate(seconds)))}  # value = first row index
    assert fixed.values[:, 0].tolist() == [firsts[s] for s in sorted(set(seconds))]
    assert 0 <= repair.moved < max(len(set(seconds)), 1)
    q = p.with_name("fixed.csv")
    q.write_text("timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in zip(fixed.timestamps, fixed.values[:, 0])))
    assert len(read_series(q, strict_time=True)) == len(fixed)
