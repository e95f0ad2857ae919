"""Firmware profiles: the builtin TOML files and the strict parser in ``shared.profiles``."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shared.profiles as profiles_module
from shared.profiles import (
    FORMATS,
    QUANTIZATIONS,
    FirmwareProfile,
    ProfileError,
    builtin_profiles_dir,
    list_profiles,
    load_profile,
    parse_profile,
)

BUILTIN_NAMES = (
    "cortex-a53",
    "jetson-orin-nano-cpu",
    "rpi4-arm64",
    "rpi5-arm64",
    "x86-64-v3",
    "x86-64-v4-vnni",
)

# The formats each builtin target allows: (formats, preferred format).
EXPECTED_FORMATS = {
    "x86-64-v3": (("onnx",), "onnx"),
    "x86-64-v4-vnni": (("onnx",), "onnx"),
    "jetson-orin-nano-cpu": (("onnx",), "onnx"),
    "rpi4-arm64": (("onnx", "tflite"), "tflite"),
    "rpi5-arm64": (("onnx", "tflite"), None),  # both allowed; preference is the profile's call
    "cortex-a53": (("tflite",), "tflite"),
}


def _valid_dict(name: str = "rpi4-arm64") -> dict[str, Any]:
    return load_profile(name).to_json()


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    table = out
    for p in parents:
        table = table[p]
    table[last] = value
    return out


def _delete(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    table = out
    for p in parents:
        table = table[p]
    del table[last]
    return out


def _parse_dict(data: dict[str, Any]) -> FirmwareProfile:
    return parse_profile(tomli_w.dumps(data), source="test.toml")


def _assert_valid(profile: FirmwareProfile) -> None:
    """Invariants every profile the parser returns must satisfy."""
    assert profile.cores >= 1 and profile.ram_mb >= 1
    assert 1 <= profile.budget.threads <= profile.cores
    assert 0 < profile.budget.model_ram_mb <= profile.ram_mb
    assert profile.budget.model_flash_kb >= 1
    assert 0 < profile.budget.latency_p99_ms < math.inf
    assert 0 < profile.speed_factor < math.inf
    assert profile.formats and set(profile.formats) <= set(FORMATS)
    assert profile.quantizations and set(profile.quantizations) <= set(QUANTIZATIONS)
    assert profile.preferred_format in profile.formats
    assert profile.preferred_quantization in profile.quantizations
    assert profile.allows(profile.preferred_format, profile.preferred_quantization)
    assert isinstance(profile.may_train, bool)


# -- builtin profiles --------------------------------------------------------------------------


def test_builtin_dir_holds_exactly_the_six_targets() -> None:
    stems = sorted(p.stem for p in builtin_profiles_dir().glob("*.toml"))
    assert stems == sorted(BUILTIN_NAMES)


def test_all_builtin_profiles_load_and_validate() -> None:
    loaded = list_profiles()
    assert [p.name for p in loaded] == sorted(BUILTIN_NAMES)
    for profile in loaded:
        _assert_valid(profile)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_each_builtin_profile_by_name(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    _assert_valid(profile)
    formats, preferred = EXPECTED_FORMATS[name]
    assert profile.formats == formats
    if preferred is not None:
        assert profile.preferred_format == preferred
    assert profile.quantizations == ("fp32", "int8")
    assert profile.preferred_quantization == "int8"
    assert profile.may_train is (name != "cortex-a53")
    assert profile.arch == ("x86_64" if name.startswith("x86-64") else "aarch64")


def test_variants_and_allows() -> None:
    rpi4 = load_profile("rpi4-arm64")
    assert rpi4.variants() == [
        ("onnx", "fp32"),
        ("onnx", "int8"),
        ("tflite", "fp32"),
        ("tflite", "int8"),
    ]
    assert rpi4.allows("tflite", "int8")
    a53 = load_profile("cortex-a53")
    assert a53.variants() == [("tflite", "fp32"), ("tflite", "int8")]
    assert not a53.allows("onnx", "int8")
    assert not a53.allows("tflite", "int4")
    assert not load_profile("x86-64-v3").allows("tflite", "fp32")


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_to_json_round_trips_through_toml(name: str) -> None:
    profile = load_profile(name)
    data = profile.to_json()
    assert json.loads(json.dumps(data)) == data  # plain JSON-able data
    assert isinstance(data["budget"], dict)
    assert parse_profile(tomli_w.dumps(data)) == profile


def test_docstring_example_is_a_valid_profile() -> None:
    doc = profiles_module.__doc__ or ""
    block = doc.split("A profile file looks like::\n", 1)[1].split("\n\nFloat fields", 1)[0]
    text = "\n".join(line.split("#", 1)[0].rstrip() for line in textwrap.dedent(block).splitlines())
    profile = parse_profile(text)
    assert profile.name == "rpi4-arm64" and profile.budget.threads == 2


def test_importing_the_module_is_stdlib_only() -> None:
    code = (
        "import sys, shared.profiles; "
        "bad = {'numpy', 'tomli_w', 'firmware_profiles'} & set(sys.modules); "
        "print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- strictness --------------------------------------------------------------------------------


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    data = _set(_valid_dict(), "emulated_runtime_note", "qemu")
    path = tmp_path / "rpi4-arm64.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    with pytest.raises(ProfileError) as exc:
        load_profile("rpi4-arm64", [tmp_path])
    message = str(exc.value)
    assert "emulated_runtime_note" in message
    assert str(path) in message


def test_unknown_budget_key_is_named(tmp_path: Path) -> None:
    data = _set(_valid_dict(), "budget.gpu_mb", 512)
    path = tmp_path / "rpi4-arm64.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    with pytest.raises(ProfileError) as exc:
        load_profile("rpi4-arm64", [tmp_path])
    assert "budget.gpu_mb" in str(exc.value)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    "key",
    ["name", "description", "cores", "budget", "formats", "may_train", "budget.threads", "speed_factor"],
)
def test_missing_key_is_named(key: str) -> None:
    with pytest.raises(ProfileError, match=f"missing key '{key}'"):
        _parse_dict(_delete(_valid_dict(), key))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cores", True),  # bool is not an int
        ("ram_mb", 4096.0),
        ("budget.threads", False),
        ("budget.model_flash_kb", "4096"),
        ("speed_factor", "fast"),  # string where float
        ("budget.model_ram_mb", "96"),
        ("budget.latency_p99_ms", True),
        ("may_train", 1),
        ("formats", "onnx"),
        ("budget", 3),
        ("name", 7),
        ("arch", ["aarch64"]),
    ],
)
def test_wrong_type_is_rejected(key: str, value: Any) -> None:
    with pytest.raises(ProfileError) as exc:
        _parse_dict(_set(_valid_dict(), key, value))
    assert f"'{key}'" in str(exc.value)
    assert "test.toml" in str(exc.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cores", 0),
        ("ram_mb", -1),
        ("speed_factor", 0.0),
        ("speed_factor", -0.5),
        ("speed_factor", math.nan),
        ("speed_factor", math.inf),
        ("budget.latency_p99_ms", 0),
        ("budget.model_ram_mb", 10.0**6),  # more than the device's RAM
        ("budget.threads", 5),  # more than the 4 cores
        ("budget.model_flash_kb", 0),
        ("formats", []),
        ("formats", ["pt"]),
        ("formats", ["onnx", "onnx", "tflite"]),
        ("quantizations", ["int4"]),
        ("preferred_format", "pt"),
        ("preferred_quantization", "int4"),
        ("arch", "riscv64"),
        ("name", "Bad_Name"),
        ("name", "../rpi4"),
        ("description", "two\nlines"),
        ("cpu", "  "),
    ],
)
def test_out_of_range_value_is_rejected(key: str, value: Any) -> None:
    with pytest.raises(ProfileError, match=f"'{key}'"):
        _parse_dict(_set(_valid_dict(), key, value))


def test_preferred_format_must_be_allowed() -> None:
    data = _set(_valid_dict("x86-64-v3"), "preferred_format", "tflite")
    with pytest.raises(ProfileError, match="'preferred_format'.*not in formats"):
        _parse_dict(data)


def test_float_fields_accept_toml_integers() -> None:
    profile = _parse_dict(_set(_valid_dict(), "budget.model_ram_mb", 96))
    assert profile.budget.model_ram_mb == 96.0
    assert isinstance(profile.budget.model_ram_mb, float)


def test_huge_integer_is_a_profile_error() -> None:
    text = tomli_w.dumps(_set(_valid_dict(), "speed_factor", 0.5)).replace(
        "speed_factor = 0.5", "speed_factor = " + "9" * 400
    )
    assert "9" * 400 in text
    with pytest.raises(ProfileError, match="'speed_factor'"):
        parse_profile(text)


@pytest.mark.parametrize(
    "text",
    ["", "not toml at all", "name = ", "a = " + "[" * 10_000, "a = " + "{b = " * 10_000, "\x00"],
)
def test_malformed_toml_is_a_profile_error(text: str) -> None:
    with pytest.raises(ProfileError, match="<string>"):
        parse_profile(text)


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../x86-64-v3", "firmware_profiles/x86-64-v3", "..\\x86-64-v3", "/etc/passwd", "..", ".", ""],
)
def test_path_like_names_are_rejected(name: str) -> None:
    with pytest.raises(ProfileError, match="invalid firmware profile name"):
        load_profile(name)


def test_traversal_cannot_reach_a_valid_file_outside_the_search_dir(tmp_path: Path) -> None:
    (tmp_path / "outside.toml").write_text(
        tomli_w.dumps(_set(_valid_dict(), "name", "outside")), encoding="utf-8"
    )
    inner = tmp_path / "inner"
    inner.mkdir()
    assert load_profile("outside", [tmp_path]).name == "outside"
    with pytest.raises(ProfileError):
        load_profile("../outside", [inner])


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as exc:
        load_profile("esp32")
    assert str(exc.value) == (
        "unknown firmware profile 'esp32'; known: " + ", ".join(sorted(BUILTIN_NAMES))
    )


def test_name_must_equal_the_file_stem(tmp_path: Path) -> None:
    (tmp_path / "my-pi.toml").write_text(tomli_w.dumps(_valid_dict()), encoding="utf-8")
    with pytest.raises(ProfileError, match="'name'.*file stem 'my-pi'"):
        load_profile("my-pi", [tmp_path])


def test_earlier_search_dir_overrides_builtin(tmp_path: Path) -> None:
    own = load_profile("rpi4-arm64").speed_factor + 1.0  # differs from the builtin, whatever it is
    custom = _set(_valid_dict(), "speed_factor", own)
    (tmp_path / "rpi4-arm64.toml").write_text(tomli_w.dumps(custom), encoding="utf-8")
    search = [tmp_path, builtin_profiles_dir()]
    assert load_profile("rpi4-arm64", search).speed_factor == own
    listed = {p.name: p for p in list_profiles(search)}
    assert sorted(listed) == sorted(BUILTIN_NAMES)
    assert listed["rpi4-arm64"].speed_factor == own
    assert listed["rpi5-arm64"] == load_profile("rpi5-arm64")


def test_list_profiles_reports_the_bad_file(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text(
        tomli_w.dumps(_set(_valid_dict(), "name", "good")), encoding="utf-8"
    )
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ProfileError, match="bad.toml"):
        list_profiles([tmp_path])
    assert list_profiles([tmp_path / "missing"]) == []


# -- properties --------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.text())
def test_parse_arbitrary_text_raises_only_profile_error(text: str) -> None:
    try:
        profile = parse_profile(text)
    except ProfileError:
        return
    _assert_valid(profile)


_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=0, max_value=64),
    st.floats(),  # includes nan, inf, -0.0
    st.floats(min_value=0.001, max_value=64.0),  # in range for most numeric fields
    st.text(max_size=12),
    st.sampled_from(
        ["onnx", "tflite", "fp32", "int8", "x86_64", "aarch64", "rpi4-arm64", "", "ONNX"]
    ),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_TOP_PATHS = list(_valid_dict().keys())
_BUDGET_PATHS = [f"budget.{k}" for k in _valid_dict()["budget"]]


@st.composite
def _mutated_profile(draw: st.DrawFn) -> dict[str, Any]:
    data = _valid_dict(draw(st.sampled_from(BUILTIN_NAMES)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        op = draw(st.sampled_from(["delete", "set", "add"]))
        budget_ok = isinstance(data.get("budget"), dict)
        paths = [p for p in _TOP_PATHS if p in data]
        paths += [p for p in _BUDGET_PATHS if budget_ok and p.split(".")[1] in data["budget"]]
        if op == "add" or not paths:
            table = data["budget"] if budget_ok and draw(st.booleans()) else data
            table[draw(st.text(min_size=1, max_size=10))] = draw(_values)
        elif op == "delete":
            data = _delete(data, draw(st.sampled_from(paths)))
        else:
            data = _set(data, draw(st.sampled_from(paths)), draw(_values))
    return data


@_SETTINGS
@given(_mutated_profile())
def test_parse_mutated_profile_raises_only_profile_error(data: dict[str, Any]) -> None:
    text = tomli_w.dumps(data)
    try:
        profile = parse_profile(text)
    except ProfileError as e:
        assert "\n" not in str(e)  # one clear line
        return
    _assert_valid(profile)
    assert parse_profile(tomli_w.dumps(profile.to_json())) == profile
