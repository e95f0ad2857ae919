"""Where an agent's samples come from: the host (psutil), a CSV replay, or JSON lines on stdin.

A source is an iterator of :class:`Sample` (timestamp + named values); the detector picks the
features its model was trained on by name, so a host source feeds a model trained on
``cpu,memory,disk,network`` and a CSV source feeds whatever its header names.
"""

from __future__ import annotations

import codecs
import json
import os
import selectors
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from shared.series import SeriesError, iter_csv_rows

__all__ = ["Sample", "SourceError", "SourceSpec", "open_source", "parse_source", "rebase_source"]


class SourceError(ValueError):
    """A source spec is malformed, or the source cannot be read."""


@dataclass(frozen=True, slots=True)  # the agent keeps the last 4096 for model swaps and restarts
class Sample:
    """One observation: when, and the value of each named metric."""

    timestamp: str
    values: dict[str, float]


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``host[?period=S]``, ``csv:PATH[?rate=R]`` or ``stdin`` spec."""

    kind: str
    path: Path | None = None
    period: float = 5.0
    rate: float | None = None


def _number(query: dict[str, list[str]], key: str, spec: str) -> float | None:
    if key not in query:
        return None
    try:
        value = float(query[key][-1])
    except ValueError:
        raise SourceError(f"{spec!r}: {key} must be a number") from None
    if not value > 0:
        raise SourceError(f"{spec!r}: {key} must be positive")
    return value


def parse_source(spec: str) -> SourceSpec:
    """Parse a source spec; raises :class:`SourceError` with one line."""
    if spec == "stdin":
        return SourceSpec("stdin")
    if spec.startswith("csv:"):
        parts = urlsplit(spec[4:])
        query = parse_qs(parts.query)
        unknown = set(query) - {"rate"}
        if unknown or not parts.path:
            raise SourceError(f"{spec!r}: expected csv:PATH[?rate=ROWS_PER_SECOND]")
        return SourceSpec("csv", path=Path(parts.path), rate=_number(query, "rate", spec))
    if spec == "host" or spec.startswith("host?"):
        query = parse_qs(spec[5:])
        if set(query) - {"period"}:
            raise SourceError(f"{spec!r}: expected host[?period=SECONDS]")
        return SourceSpec("host", period=_number(query, "period", spec) or 5.0)
    raise SourceError(f"unknown source {spec!r}: use host[?period=S], csv:PATH[?rate=R] or stdin")


def rebase_source(spec: str, base: Path) -> str:
    """``spec`` with a relative ``csv:`` path made absolute against ``base``; others unchanged.

    ``~`` is expanded and the result normalised; the query (``?rate=R``) is kept as written.
    Raises :class:`SourceError` for a malformed spec, as :func:`parse_source` does.
    """
    parsed = parse_source(spec)
    if parsed.kind != "csv":
        return spec
    parts = urlsplit(spec[4:])
    path = os.path.abspath(os.path.join(base, os.path.expanduser(parts.path)))
    return "csv:" + path + (f"?{parts.query}" if parts.query else "") + (
        f"#{parts.fragment}" if parts.fragment else ""
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _host(spec: SourceSpec, stop: threading.Event) -> Iterator[Sample]:
    import psutil

    psutil.cpu_percent(None)  # prime the counter
    disk = psutil.disk_io_counters()
    net = psutil.net_io_counters()
    last = time.monotonic()
    while not stop.wait(spec.period):
        now = time.monotonic()
        dt = max(now - last, 1e-6)
        last = now
        values = {
            "cpu": psutil.cpu_percent(None),
            "memory": psutil.virtual_memory().percent,
            "load": psutil.getloadavg()[0],
        }
        new_disk, new_net = psutil.disk_io_counters(), psutil.net_io_counters()
        if disk and new_disk:
            moved = (new_disk.read_bytes + new_disk.write_bytes) - (disk.read_bytes + disk.write_bytes)
            values["disk"] = moved / dt / 1e6  # MB/s
        if net and new_net:
            moved = (new_net.bytes_recv + new_net.bytes_sent) - (net.bytes_recv + net.bytes_sent)
            values["network"] = moved / dt / 1e3  # kB/s
        disk, net = new_disk, new_net
        temps: dict[str, list[Any]] = getattr(psutil, "sensors_temperatures", dict)() or {}
        readings = [t.current for entries in temps.values() for t in entries if t.current]
        if readings:
            values["temperature"] = max(readings)
        yield Sample(_now(), values)


def _csv(spec: SourceSpec, stop: threading.Event) -> Iterator[Sample]:
    assert spec.path is not None
    interval = 1.0 / spec.rate if spec.rate else 0.0
    next_at = time.monotonic()
    try:
        for ts, features, values in iter_csv_rows(spec.path):
            if interval:
                next_at += interval
                if stop.wait(max(0.0, next_at - time.monotonic())):
                    return
            elif stop.is_set():
                return
            yield Sample(ts, dict(zip(features, values)))
    except SeriesError as e:
        raise SourceError(str(e)) from e


def _lines(stream: TextIO, stop: threading.Event, poll: float = 0.2) -> Iterator[str]:
    """The lines of ``stream``; a read blocked on a quiet pipe gives way to ``stop`` within
    ``poll`` seconds.

    A plain ``readline`` would not: Python resumes a read interrupted by SIGTERM once the
    handler has run, so an agent fed by a pipe that stays open would never stop. A pipe, FIFO,
    socket or terminal is therefore watched with a selector and read with ``os.read``. A
    regular file or an in-memory stream never blocks and is iterated as it is.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: StringIO & co.
        yield from stream
        return
    selector = selectors.DefaultSelector()
    try:
        selector.register(fd, selectors.EVENT_READ)
    except (OSError, ValueError):  # epoll refuses regular files, which never block anyway
        selector.close()
        yield from stream
        return
    decoder = codecs.getincrementaldecoder(getattr(stream, "encoding", None) or "utf-8")("replace")
    pending = ""
    try:
        while not stop.is_set():
            if not selector.select(poll):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # end of input
                pending += decoder.decode(b"", final=True)
                if pending:
                    yield pending
                return
            *lines, pending = (pending + decoder.decode(chunk)).split("\n")
            yield from lines
    finally:
        selector.close()


def _stdin(stream: TextIO, stop: threading.Event) -> Iterator[Sample]:
    for line_no, line in enumerate(_lines(stream, stop), start=1):
        if stop.is_set():
            return
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            ts = str(obj.pop("timestamp", None) or _now())
            values = {str(k): float(v) if v is not None else float("nan") for k, v in obj.items()}
        except (ValueError, TypeError, AttributeError) as e:
            # One bad line must not stop a feed: skip it and say where.
            print(f"edgefleet-agent: stdin line {line_no}: skipped: {e}", file=sys.stderr)
            continue
        yield Sample(ts, values)


def open_source(spec: SourceSpec, stop: threading.Event, stdin: TextIO | None = None) -> Iterator[Sample]:
    """Iterate samples until the source ends or ``stop`` is set."""
    if spec.kind == "host":
        return _host(spec, stop)
    if spec.kind == "csv":
        return _csv(spec, stop)
    return _stdin(stdin or sys.stdin, stop)
