"""Firmware profiles: one declarative TOML file per hardware target, and their strict parser.

A firmware profile tells the trainer what a class of edge hosts can run (artifact formats and
quantizations), how much of the host a model may use (RAM, flash, threads, p99 latency) and how
fast the host is relative to the reference machine (``speed_factor``, one x86-64-v3 core = 1.0).
The builtin profiles live in the ``firmware_profiles`` package as ``{name}.toml``.

Profiles are human-written configuration, so parsing is strict (see CONVENTIONS.md): unknown
keys, missing keys, wrong types and out-of-range values are all :class:`ProfileError`, with a
message naming the file and the key. A profile file looks like::

    name = "rpi4-arm64"                   # must equal the file stem; [a-z0-9][a-z0-9.-]*
    description = "Raspberry Pi 4 ..."    # one line
    arch = "aarch64"                      # "x86_64" | "aarch64"
    cpu = "Cortex-A72"
    cores = 4                             # int >= 1
    ram_mb = 4096                         # int >= 1, the device's RAM

    formats = ["onnx", "tflite"]          # non-empty subset of ["onnx", "tflite"]
    quantizations = ["fp32", "int8"]      # non-empty subset of ["fp32", "int8"]
    preferred_format = "tflite"           # one of formats
    preferred_quantization = "int8"       # one of quantizations
    may_train = true                      # may take part in federated training
    speed_factor = 0.22                   # float > 0; one x86-64-v3 core = 1.0

    [budget]                              # last: every key after a table header is in it
    model_ram_mb = 96.0                   # float > 0, <= ram_mb: loaded model + runtime
    model_flash_kb = 4096                 # int >= 1: max artifact size on disk
    latency_p99_ms = 20.0                 # float > 0: per single inference
    threads = 2                           # int >= 1, <= cores: inference threads

Float fields also accept a TOML integer (``model_ram_mb = 96``); booleans are never numbers.

This module uses the standard library only and does nothing at import time.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHES",
    "FORMATS",
    "QUANTIZATIONS",
    "FirmwareProfile",
    "ProfileBudget",
    "ProfileError",
    "builtin_profiles_dir",
    "list_profiles",
    "load_profile",
    "load_profiles",
    "parse_profile",
]

ARCHES: tuple[str, ...] = ("x86_64", "aarch64")
"""Machine architectures a profile may name (``platform.machine()`` spelling on Linux)."""

FORMATS: tuple[str, ...] = ("onnx", "tflite")
"""Artifact formats; the same names as the artifact bundle's ``format`` field."""

QUANTIZATIONS: tuple[str, ...] = ("fp32", "int8")
"""Quantizations; the same names as the artifact bundle's ``quantization`` field."""

PROFILE_SUFFIX = ".toml"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]*")
# Generous bound: a profile is a few hundred bytes; this stops a runaway file early.
_MAX_PROFILE_BYTES = 64 * 1024


class ProfileError(ValueError):
    """A firmware profile is malformed, invalid, or cannot be found.

    The message is one line naming the file (or ``source``) and, where one is at fault, the key
    (``budget.threads`` for a key inside ``[budget]``).
    """


@dataclass(frozen=True)
class ProfileBudget:
    """What one loaded model may use on a host of this profile.

    Attributes:
        model_ram_mb: RAM the loaded model plus its runtime may use, in MB.
        model_flash_kb: Largest artifact the host accepts on disk, in KB.
        latency_p99_ms: p99 latency target for one inference at batch 1, in milliseconds.
        threads: Number of threads the inference runtime may use.
    """

    model_ram_mb: float
    model_flash_kb: int
    latency_p99_ms: float
    threads: int

    def to_json(self) -> dict[str, Any]:
        """Return the budget as plain JSON-able data, keyed as in the ``[budget]`` table."""
        return {
            "model_ram_mb": self.model_ram_mb,
            "model_flash_kb": self.model_flash_kb,
            "latency_p99_ms": self.latency_p99_ms,
            "threads": self.threads,
        }


@dataclass(frozen=True)
class FirmwareProfile:
    """A hardware target: what it runs, what a model may use on it, and how fast it is.

    Instances returned by :func:`parse_profile`, :func:`load_profile` and
    :func:`list_profiles` satisfy every rule in the module docstring (the dataclass itself
    does not re-check values passed to its constructor). Instances are immutable and hashable,
    so they are safe to share between threads.

    Attributes:
        name: Profile name, equal to the file stem (``[a-z0-9][a-z0-9.-]*``).
        description: One-line human description.
        arch: ``"x86_64"`` or ``"aarch64"``.
        cpu: CPU model or class, e.g. ``"Cortex-A72"``.
        cores: CPU cores on the device.
        ram_mb: RAM of the device, in MB.
        budget: What one loaded model may use (:class:`ProfileBudget`).
        formats: Allowed artifact formats, in the order the file declares them.
        quantizations: Allowed quantizations, in the order the file declares them.
        preferred_format: The format to deploy when several are built; one of ``formats``.
        preferred_quantization: The quantization to deploy by default; one of
            ``quantizations``.
        may_train: Whether hosts of this profile may take part in federated training.
        speed_factor: Single-core inference speed relative to one x86-64-v3 core (= 1.0).
    """

    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    ram_mb: int
    budget: ProfileBudget
    formats: tuple[str, ...]
    quantizations: tuple[str, ...]
    preferred_format: str
    preferred_quantization: str
    may_train: bool
    speed_factor: float

    def allows(self, format: str, quantization: str) -> bool:
        """Return whether an artifact of this format and quantization may run on the target."""
        return format in self.formats and quantization in self.quantizations

    def variants(self) -> list[tuple[str, str]]:
        """Return every allowed ``(format, quantization)`` pair.

        The order is stable: formats in declared order, and for each format the quantizations
        in declared order.
        """
        return [(f, q) for f in self.formats for q in self.quantizations]

    def to_json(self) -> dict[str, Any]:
        """Return the profile as plain JSON-able data mirroring the TOML file.

        Keys and nesting are those of the file (``budget`` is a nested dict, arrays are
        lists), so serialising the result as TOML and parsing it gives an equal profile.
        """
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "cpu": self.cpu,
            "cores": self.cores,
            "ram_mb": self.ram_mb,
            "budget": self.budget.to_json(),
            "formats": list(self.formats),
            "quantizations": list(self.quantizations),
            "preferred_format": self.preferred_format,
            "preferred_quantization": self.preferred_quantization,
            "may_train": self.may_train,
            "speed_factor": self.speed_factor,
        }


_TOP_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "arch",
    "cpu",
    "cores",
    "ram_mb",
    "budget",
    "formats",
    "quantizations",
    "preferred_format",
    "preferred_quantization",
    "may_train",
    "speed_factor",
)
_BUDGET_KEYS: tuple[str, ...] = ("model_ram_mb", "model_flash_kb", "latency_p99_ms", "threads")


def parse_profile(text: str, *, source: str = "<string>") -> FirmwareProfile:
    """Parse and validate the TOML text of one firmware profile.

    Args:
        text: The TOML document.
        source: Where the text came from (a file path), used in error messages only.

    Returns:
        A valid :class:`FirmwareProfile`. The name is checked against the name pattern here;
        that it equals the file stem is checked by :func:`load_profile`.

    Raises:
        ProfileError: The text is not TOML, or has an unknown or missing key, a value of the
            wrong type (a bool is not an int), or a value out of range or inconsistent with
            another (e.g. ``preferred_format`` not in ``formats``, ``threads > cores``). This
            is the only exception raised for any ``str`` input.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{source}: not valid TOML: {e}") from e
    except RecursionError as e:  # tomllib recurses on nested arrays and inline tables
        raise ProfileError(f"{source}: not valid TOML: nested too deeply") from e
    return _profile_from_mapping(data, source)


def builtin_profiles_dir() -> Path:
    """Return the directory holding the builtin profiles (the ``firmware_profiles`` package).

    Raises:
        ProfileError: The package is not installed as a plain directory (e.g. zipped).
    """
    root = resources.files("firmware_profiles")
    if not isinstance(root, Path):
        raise ProfileError(
            f"the firmware_profiles package is not a directory on disk ({root!r}); "
            "install edgefleet unzipped"
        )
    return root


def load_profile(name: str, search_dirs: Sequence[Path] | None = None) -> FirmwareProfile:
    """Load the profile ``{name}.toml`` from the first of ``search_dirs`` that has it.

    Args:
        name: Profile name. Anything that is not a valid profile name (including anything with
            a path separator or a leading dot) is rejected before the filesystem is touched.
        search_dirs: Directories to look in, earlier ones first (so an operator's directory
            placed before the builtin one overrides a builtin profile). Default: only
            :func:`builtin_profiles_dir`.

    Returns:
        A valid :class:`FirmwareProfile` whose ``name`` equals ``name``.

    Raises:
        ProfileError: The name is invalid or unknown (the message lists the known names), or
            the file cannot be read or is invalid (see :func:`parse_profile`), or its ``name``
            key differs from the file stem.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ProfileError(
            f"invalid firmware profile name {name!r}: expected a bare name matching "
            f"{_NAME_RE.pattern}, e.g. 'rpi4-arm64'"
        )
    dirs = _resolve_dirs(search_dirs)
    for directory in dirs:
        path = directory / f"{name}{PROFILE_SUFFIX}"
        if path.is_file():
            return _load_file(path)
    known = ", ".join(sorted(_profile_paths(dirs))) or "(none)"
    raise ProfileError(f"unknown firmware profile {name!r}; known: {known}")


def load_profiles(names: Iterable[str], extra_dirs: Sequence[Path] = ()) -> list[FirmwareProfile]:
    """Each profile of ``names`` once, in order, looked up in ``extra_dirs`` before the built-in
    ones (the trainer's ``--profiles-dir``). Raises :class:`ProfileError` as :func:`load_profile`."""
    dirs = [*extra_dirs, builtin_profiles_dir()] if extra_dirs else None
    return [load_profile(name, dirs) for name in dict.fromkeys(names)]


def list_profiles(search_dirs: Sequence[Path] | None = None) -> list[FirmwareProfile]:
    """Load every ``*.toml`` profile in ``search_dirs``, sorted by name.

    When two directories hold the same name, the earlier directory wins (as in
    :func:`load_profile`). Missing directories are skipped.

    Args:
        search_dirs: Directories to look in; default: only :func:`builtin_profiles_dir`.

    Raises:
        ProfileError: Any of the files is invalid; the message names the file.
    """
    paths = _profile_paths(_resolve_dirs(search_dirs))
    return [_load_file(paths[n]) for n in sorted(paths)]


# -- private helpers ---------------------------------------------------------------------------


def _resolve_dirs(search_dirs: Sequence[Path] | None) -> list[Path]:
    if search_dirs is None:
        return [builtin_profiles_dir()]
    return [Path(d) for d in search_dirs]


def _profile_paths(dirs: Iterable[Path]) -> dict[str, Path]:
    """Map profile name -> file for every ``*.toml`` in ``dirs``; earlier directories win."""
    found: dict[str, Path] = {}
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob(f"*{PROFILE_SUFFIX}")):
            if path.is_file():
                found.setdefault(path.stem, path)
    return found


def _load_file(path: Path) -> FirmwareProfile:
    source = str(path)
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise ProfileError(f"{source}: cannot read: {e.strerror or e}") from e
    if len(raw) > _MAX_PROFILE_BYTES:
        raise ProfileError(f"{source}: larger than {_MAX_PROFILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{source}: not UTF-8: {e}") from e
    profile = parse_profile(text, source=source)
    if profile.name != path.stem:
        raise ProfileError(
            f"{source}: key 'name': {profile.name!r} must equal the file stem {path.stem!r}"
        )
    return profile


def _check_keys(
    table: Mapping[str, Any], allowed: tuple[str, ...], source: str, prefix: str
) -> None:
    for key in table:
        if key not in allowed:
            raise ProfileError(
                f"{source}: unknown key {prefix + key!r}; allowed: {', '.join(allowed)}"
            )
    for key in allowed:
        if key not in table:
            raise ProfileError(f"{source}: missing key {prefix + key!r}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _get_str(table: Mapping[str, Any], key: str, source: str, prefix: str = "") -> str:
    value = table[key]
    if not isinstance(value, str):
        raise ProfileError(
            f"{source}: key {prefix + key!r}: expected a string, got {_type_name(value)}"
        )
    if not value.strip():
        raise ProfileError(f"{source}: key {prefix + key!r}: must not be empty")
    if "\n" in value or "\r" in value:
        raise ProfileError(f"{source}: key {prefix + key!r}: must be a single line")
    return value


def _get_choice(table: Mapping[str, Any], key: str, choices: Sequence[str], source: str) -> str:
    value = _get_str(table, key, source)
    if value not in choices:
        raise ProfileError(f"{source}: key {key!r}: {value!r} is not one of {', '.join(choices)}")
    return value


def _get_int(table: Mapping[str, Any], key: str, source: str, prefix: str = "") -> int:
    value = table[key]
    # bool is a subclass of int in Python; in a profile `cores = true` is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(
            f"{source}: key {prefix + key!r}: expected an integer, got {_type_name(value)}"
        )
    if value < 1:
        raise ProfileError(f"{source}: key {prefix + key!r}: must be >= 1, got {value}")
    return value


def _get_positive_float(table: Mapping[str, Any], key: str, source: str, prefix: str = "") -> float:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(
            f"{source}: key {prefix + key!r}: expected a number, got {_type_name(value)}"
        )
    try:
        number = float(value)
    except OverflowError:  # tomllib accepts integers beyond the float range
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise ProfileError(
            f"{source}: key {prefix + key!r}: must be a finite number > 0, got {value}"
        )
    return number


def _get_bool(table: Mapping[str, Any], key: str, source: str) -> bool:
    value = table[key]
    if not isinstance(value, bool):
        raise ProfileError(
            f"{source}: key {key!r}: expected true or false, got {_type_name(value)}"
        )
    return value


def _get_subset(
    table: Mapping[str, Any], key: str, choices: Sequence[str], source: str
) -> tuple[str, ...]:
    value = table[key]
    if not isinstance(value, list):
        raise ProfileError(f"{source}: key {key!r}: expected an array, got {_type_name(value)}")
    if not value:
        raise ProfileError(f"{source}: key {key!r}: must not be empty")
    seen: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in choices:
            raise ProfileError(
                f"{source}: key {key!r}: {item!r} is not one of {', '.join(choices)}"
            )
        if item in seen:
            raise ProfileError(f"{source}: key {key!r}: {item!r} listed twice")
        seen.append(item)
    return tuple(seen)


def _profile_from_mapping(data: Mapping[str, Any], source: str) -> FirmwareProfile:
    _check_keys(data, _TOP_KEYS, source, "")
    raw_budget = data["budget"]
    if not isinstance(raw_budget, dict):
        raise ProfileError(
            f"{source}: key 'budget': expected a table, got {_type_name(raw_budget)}"
        )
    _check_keys(raw_budget, _BUDGET_KEYS, source, "budget.")

    name = _get_str(data, "name", source)
    if not _NAME_RE.fullmatch(name):
        raise ProfileError(f"{source}: key 'name': {name!r} does not match {_NAME_RE.pattern}")
    cores = _get_int(data, "cores", source)
    ram_mb = _get_int(data, "ram_mb", source)

    budget = ProfileBudget(
        model_ram_mb=_get_positive_float(raw_budget, "model_ram_mb", source, "budget."),
        model_flash_kb=_get_int(raw_budget, "model_flash_kb", source, "budget."),
        latency_p99_ms=_get_positive_float(raw_budget, "latency_p99_ms", source, "budget."),
        threads=_get_int(raw_budget, "threads", source, "budget."),
    )
    if budget.threads > cores:
        raise ProfileError(
            f"{source}: key 'budget.threads': {budget.threads} exceeds cores ({cores})"
        )
    if budget.model_ram_mb > ram_mb:
        raise ProfileError(
            f"{source}: key 'budget.model_ram_mb': {budget.model_ram_mb} exceeds ram_mb ({ram_mb})"
        )

    formats = _get_subset(data, "formats", FORMATS, source)
    quantizations = _get_subset(data, "quantizations", QUANTIZATIONS, source)
    preferred_format = _get_str(data, "preferred_format", source)
    if preferred_format not in formats:
        raise ProfileError(
            f"{source}: key 'preferred_format': {preferred_format!r} is not in formats "
            f"({', '.join(formats)})"
        )
    preferred_quantization = _get_str(data, "preferred_quantization", source)
    if preferred_quantization not in quantizations:
        raise ProfileError(
            f"{source}: key 'preferred_quantization': {preferred_quantization!r} is not in "
            f"quantizations ({', '.join(quantizations)})"
        )

    return FirmwareProfile(
        name=name,
        description=_get_str(data, "description", source),
        arch=_get_choice(data, "arch", ARCHES, source),
        cpu=_get_str(data, "cpu", source),
        cores=cores,
        ram_mb=ram_mb,
        budget=budget,
        formats=formats,
        quantizations=quantizations,
        preferred_format=preferred_format,
        preferred_quantization=preferred_quantization,
        may_train=_get_bool(data, "may_train", source),
        speed_factor=_get_positive_float(data, "speed_factor", source),
    )
