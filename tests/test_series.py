"""CSV time series parsing: both layouts, missing values, and one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.series import SeriesError, read_series


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
