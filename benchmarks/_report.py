"""Shared by every ``benchmarks/bench_*.py``: machine description, percentiles, docs update.

Each benchmark script owns one section of ``docs/benchmarks.md``, delimited by
``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->``; :func:`update_benchmarks_doc` rewrites that
section only, so scripts can run in any order and leave each other's figures alone.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DOC_HEADER",
    "machine_info",
    "machine_line",
    "median",
    "percentile_ms",
    "percentile_us",
    "markdown_table",
    "print_table",
    "update_benchmarks_doc",
]

DOC_HEADER = """# Benchmarks

Every figure in this file comes from `make bench`, which runs each script under `benchmarks/`
(`benchmarks/bench_*.py`); each script rewrites only its own section, stamped with the date,
the machine and the command that reproduces it. Do not edit the figures by hand: rerun the
script. Data: the team's NAB subset in `../shared/data/nab` (not part of this repository).
"""

_PACKAGES = ("onnxruntime", "ai-edge-litert", "torch")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_gib() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.MULTILINE)
    return round(int(m.group(1)) / 1024**2, 1) if m else None


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', text, re.MULTILINE)
        if m:
            return f"{m.group(1)} (kernel {platform.release()})"
    except OSError:
        pass
    return platform.platform()


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, RAM, OS, Python and runtime versions."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = package_version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "os": _os_name(),
        "python": platform.python_version(),
        "packages": versions,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line for a report: CPU, cores, RAM, OS, Python, runtime versions."""
    info = info or machine_info()
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    return (
        f"{info['cpu']} ({info['arch']}, {info['logical_cores']} logical cores, "
        f"{info['ram_gib']} GiB RAM), {info['os']}, Python {info['python']}; {pkgs}"
    )


def percentile_ms(samples_ns: Sequence[int] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) of nanosecond samples, in milliseconds."""
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q)) / 1e6


def percentile_us(samples_ns: Sequence[int] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) of nanosecond samples, in microseconds."""
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q)) / 1e3


def median(values: Iterable[float]) -> float:
    """Median of per-run figures (the figure a report gives for repeated runs)."""
    return float(statistics.median(list(values)))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are str()-ed, and ``|`` in them escaped."""

    def cells(values: Iterable[Any]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [cells(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [cells(row) for row in rows]
    return "\n".join(lines)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print right-aligned columns to stdout (the script's readable twin of the markdown)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def _section(section: str, markdown: str, command: str, info: dict[str, Any]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<!-- bench:{section} -->\n"
        f"_Measured {stamp} on {info['cpu']} ({info['logical_cores']} logical cores). "
        f"Reproduce: `{command}`._\n\n"
        f"{markdown.strip()}\n"
        f"<!-- /bench:{section} -->"
    )


def update_benchmarks_doc(
    section: str,
    markdown: str,
    *,
    command: str,
    path: Path = Path("docs/benchmarks.md"),
    header: str = DOC_HEADER,
) -> Path:
    """Replace (or append) the ``section`` block of the benchmarks doc; return its path.

    The block is stamped with the UTC date, the machine (CPU model, logical cores) and the
    command that reproduces it. Other sections are kept byte for byte; a missing file starts
    with ``header`` (another doc can hold generated blocks too). The file is written
    atomically (temp file in the same directory, fsync, ``os.replace``), so a crash leaves the
    old file or the new one, never half of one. Not safe against two concurrent writers.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", section):
        raise ValueError(f"bad section name {section!r}: use lowercase letters, digits and '-'")
    path = Path(path)
    block = _section(section, markdown, command, machine_info())
    text = path.read_text(encoding="utf-8") if path.exists() else header
    pattern = re.compile(
        rf"<!-- bench:{re.escape(section)} -->.*?<!-- /bench:{re.escape(section)} -->", re.DOTALL
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a doc is world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
