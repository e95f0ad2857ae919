"""The agent's recent samples across a restart: saved at a clean stop, judged at the next start.

A model reads a window of ``spec.window`` samples before it scores; a forecaster with one day
of seasonal context reads about 300 rows of 5-minute samples. The agent keeps its recent
samples in memory to pre-fill a newly activated model; this module keeps them across a restart
as well, so that a restarted agent scores from its first sample instead of a day later:

- :func:`save_recent` writes them to the state directory when the agent stops on SIGTERM or
  SIGINT (atomically; not periodically, so a crash leaves the file of the last clean stop);
- :func:`load_recent` reads them back at start (a missing file is a first start; a corrupt one
  is moved aside with a warning, never an error);
- :func:`discontinuity` decides, at the first live sample, whether the stream continues where
  the saved samples ended. Samples from before a gap would join two unrelated stretches of
  time in one window, so they are dropped and the models refill their windows.

The file, ``recent-samples.jsonl``, is JSON lines: a header, then one line per sample, oldest
first, with one value per feature of the header::

    {"format": "edgefleet.recent-samples/1", "features": ["cpu", "memory"]}
    ["2026-01-05 00:00:00", 17.69, null]

A missing value (NaN, ±inf, ``None``, or a feature the sample does not have) is written
``null`` and read back as NaN, which the detector treats as missing in every case. Lines are
read one at a time: loading never holds the whole file in memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path

from edge_agent.sources import Sample
from shared.files import write_atomically
from shared.series import timestamp_key

__all__ = [
    "FORMAT",
    "MAX_GAP_STEPS",
    "RECENT_SAMPLES",
    "RecentSamplesError",
    "decode_recent",
    "discontinuity",
    "encode_recent",
    "load_recent",
    "save_recent",
]

log = logging.getLogger(__name__)

FORMAT = "edgefleet.recent-samples/1"
RECENT_SAMPLES = "recent-samples.jsonl"  # in the agent's state directory
MAX_GAP_STEPS = 3.0  # a first live sample further than this many typical steps is a gap
_NAN = float("nan")  # one object for every missing value read back


class RecentSamplesError(ValueError):
    """A recent-samples file is not in :data:`FORMAT`; the message names the line."""


def _value(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


def encode_recent(samples: Sequence[Sample]) -> bytes:
    """The file's bytes for ``samples`` (oldest first); :func:`decode_recent` reads them back.

    The header lists every feature any sample has, in order of first appearance.
    """
    index: dict[str, None] = {}
    for sample in samples:
        for name in sample.values:
            index.setdefault(name)
    features = list(index)
    lines = [json.dumps({"format": FORMAT, "features": features})]
    for sample in samples:
        get = sample.values.get
        lines.append(json.dumps([sample.timestamp, *(_value(get(f)) for f in features)], allow_nan=False))
    lines.append("")
    return "\n".join(lines).encode()


def decode_recent(lines: Iterable[str], *, limit: int | None = None) -> list[Sample]:
    """The samples of a file's ``lines`` (an open text file will do), oldest first; with
    ``limit``, only the last ``limit`` of them (the others are read and let go).

    Raises:
        RecentSamplesError: the header or a line is not in :data:`FORMAT` (the message names
            the line).
    """
    it = iter(lines)
    head_line = next(it, "")
    try:
        head = json.loads(head_line)
    except ValueError:
        head = None
    features = head.get("features") if isinstance(head, dict) and head.get("format") == FORMAT else None
    if not (isinstance(features, list) and all(isinstance(f, str) for f in features)
            and len(set(features)) == len(features)):
        raise RecentSamplesError(f"line 1: not a {FORMAT} header")
    width = len(features) + 1
    kept: deque[Sample] = deque(maxlen=limit)
    for number, line in enumerate(it, start=2):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise RecentSamplesError(f"line {number}: {e}") from e
        if not (isinstance(row, list) and len(row) == width and isinstance(row[0], str)):
            raise RecentSamplesError(f"line {number}: expected [timestamp, {width - 1} value(s)]")
        values: dict[str, float] = {}
        for name, v in zip(features, row[1:], strict=True):
            if v is None:
                values[name] = _NAN
            elif type(v) in (int, float):  # not bool, str, list…
                values[name] = float(v)
            else:
                raise RecentSamplesError(f"line {number}: {name} is {v!r}, not a number or null")
        kept.append(Sample(row[0], values))
    return list(kept)


def save_recent(path: Path, samples: Sequence[Sample]) -> None:
    """Replace ``path`` with ``samples`` (temp file, fsync, rename: a crash leaves the old file
    or the new one).

    Raises:
        OSError: the file cannot be written (e.g. a full disk); the old one is left as it was.
    """
    write_atomically(path, encode_recent(samples))


def load_recent(path: Path, *, limit: int) -> list[Sample]:
    """The last ``limit`` samples saved in ``path``, oldest first; ``[]`` when there are none.

    Never raises: a missing file is a first start (silent); a file that cannot be read is
    logged as a warning and ignored; one that is not in :data:`FORMAT` is logged as a warning
    and moved aside to ``{path}.corrupt`` (replacing an older one), so that it is reported
    once.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return decode_recent(f, limit=limit)
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("cannot read the recent samples in %s (%s): models refill their windows", path, e)
        return []
    except ValueError as e:  # RecentSamplesError, or bytes that are not UTF-8
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except OSError as moved:
            where = f"left in place: {moved}"
        else:
            where = f"moved to {aside.name}"
        log.warning("%s is unreadable (%s; %s): models refill their windows", path, e, where)
        return []


def discontinuity(saved: Sequence[str], first: str, *, max_steps: float = MAX_GAP_STEPS) -> str | None:
    """Why the live sample at ``first`` does not continue the samples saved at ``saved``
    (their timestamps, oldest first), or ``None`` when it does.

    It continues them when it comes after the last one, by at most ``max_steps`` typical
    steps (the median step between the saved samples). A repeated or earlier timestamp (a
    replay from its start, a clock set back), a longer gap, a timestamp that cannot be read
    (:func:`shared.series.timestamp_key`) or fewer than two saved samples (no step to go by)
    do not. Pure: no I/O.
    """
    if len(saved) < 2:
        return f"{len(saved)} sample(s) give no typical step"
    try:
        keys = [timestamp_key(t) for t in saved]
        now = timestamp_key(first)
    except ValueError as e:
        return f"a timestamp cannot be read ({e})"
    steps = sorted(b - a for a, b in zip(keys, keys[1:]))
    mid = len(steps) // 2
    step = steps[mid] if len(steps) % 2 else (steps[mid - 1] + steps[mid]) / 2
    gap = now - keys[-1]
    if gap <= 0:
        return f"time went back: {first} does not come after {saved[-1]}"
    if gap > max_steps * step:
        return f"gap of {timedelta(seconds=gap)} after {saved[-1]} (typical step {timedelta(seconds=step)})"
    return None
