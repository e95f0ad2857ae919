"""Round trips and malformed input for the deployment document and the agent→trainer messages.

Forward compatibility is part of the contract: what a newer peer may send (unknown fields, a
variant in a format or quantization this version does not know, a new status string) decodes,
re-encodes unchanged, and is skipped or shown as it is, never refused.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.deployment import (
    SCHEMA_DEPLOYMENT,
    Deployment,
    DeploymentError,
    Scope,
    Slot,
    Variant,
    agent_target,
    choose_variant,
    decode_deployment,
    describe_unrunnable,
    encode_deployment,
    group_target,
)
from shared.messages import (
    AGENT_STATUSES,
    DEPLOYMENT_STATES,
    ActiveModel,
    AgentHealth,
    AgentState,
    DeploymentStatus,
    MessageError,
    decode_agent_health,
    decode_agent_state,
    decode_deployment_status,
    encode_agent_health,
    encode_agent_state,
    encode_deployment_status,
)

# -- strategies -------------------------------------------------------------------------------

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
text = st.text(max_size=20)
hexes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
counts = st.integers(min_value=0, max_value=2**53)
numbers = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


def extras(known: set[str]) -> st.SearchStrategy[dict]:
    """Unknown fields a newer peer might add."""
    return st.dictionaries(text.filter(lambda k: k not in known), json_values, max_size=3)


targets = st.lists(
    st.text(alphabet="abcz019-_.", min_size=1, max_size=8).filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=3,
).map("/".join)

# Formats and quantizations a newer trainer might offer, besides the known ones.
new_words = st.text(min_size=1, max_size=10)
variants = st.builds(
    Variant,
    target=targets,
    format=st.sampled_from(["onnx", "tflite"]) | new_words,
    quantization=st.sampled_from(["fp32", "int8"]) | new_words,
    profiles=st.lists(text, max_size=3).map(tuple),
    sha256=hexes,
    size_bytes=counts,
    extra=extras({"target", "format", "quantization", "profiles", "sha256", "size_bytes"}),
)
# A shadow candidate: a slot without a shadow of its own (a "shadow" inside it is an unknown field).
shadow_slots = st.builds(
    Slot,
    model=st.text(min_size=1, max_size=20),
    version=st.integers(min_value=1, max_value=2**31),
    variants=st.lists(variants, max_size=2).map(tuple),
    extra=extras({"model", "version", "variants"}),
)
slots = st.builds(
    Slot,
    model=st.text(min_size=1, max_size=20),
    version=st.integers(min_value=1, max_value=2**31),
    variants=st.lists(variants, max_size=4).map(tuple),
    extra=extras({"model", "version", "variants", "shadow"}),
    shadow=st.none() | shadow_slots,
)
scopes = st.builds(
    Scope,
    kind=st.sampled_from(["group", "agent"]),
    name=names,
    extra=extras({"group", "agent"}),
)
deployments = st.builds(
    Deployment,
    scope=scopes,
    serial=counts,
    slots=st.dictionaries(names, slots, max_size=3),
    extra=extras({"schema", "scope", "serial", "slots"}),
)

actives = st.builds(
    ActiveModel,
    slot=text, model=text, version=st.integers(1, 2**31), format=text, quantization=text,
    sha256=text,
    extra=extras({"slot", "model", "version", "format", "quantization", "sha256"}),
)
agent_states = st.builds(
    AgentState,
    agent=names,
    status=st.sampled_from(AGENT_STATUSES) | new_words,
    bdseq=counts,
    group=st.none() | names,
    profile=text,
    arch=text,
    runtimes=st.lists(text, max_size=3).map(tuple),
    active=st.lists(actives, max_size=3).map(tuple),
    emulated=st.booleans(),
    ts=text,
    health_period_s=st.none() | st.floats(min_value=0.001, max_value=1e6) | st.integers(1, 3600),
    extra=extras(set(AgentState._KNOWN)),
)
healths = st.builds(
    AgentHealth,
    agent=names,
    ts=text,
    inferences=counts,
    anomalies=counts,
    errors=counts,
    latency_ms=st.fixed_dictionaries(
        {"p50": st.none() | numbers, "p99": st.none() | numbers},
        optional={"p999": numbers},
    ),
    outbox_depth=counts,
    outbox_dropped=counts,
    outbox_refused=st.none() | counts,
    rss_mb=st.none() | numbers,
    cpu_percent=st.none() | numbers,
    federated=st.none() | st.fixed_dictionaries(
        {"can_join": st.booleans()},
        optional={"reason": st.none() | text, "run": st.none() | names, "windows": counts,
                  "epsilon_spent": st.none() | numbers},
    ),
    drift=st.none() | st.dictionaries(names, st.fixed_dictionaries(
        {"available": st.just(True), "drifted": st.booleans()},
        optional={"fill": counts, "score": st.fixed_dictionaries({"psi": st.none() | numbers})},
    ) | st.fixed_dictionaries({"available": st.just(False), "reason": text})),
    extra=extras(set(AgentHealth._KNOWN)),
    shadow=st.none() | st.dictionaries(names, st.fixed_dictionaries(
        {"model": text, "version": st.integers(1, 2**31), "state": st.just("active"),
         "samples": counts, "agreement": st.none() | st.floats(0, 1),
         "correlation": st.none() | st.floats(-1, 1), "active_only": counts, "shadow_only": counts,
         "latency_ms": st.fixed_dictionaries({"p50": st.none() | numbers, "p99": st.none() | numbers})},
    ) | st.fixed_dictionaries({"model": text, "version": st.integers(1, 2**31),
                               "state": st.just("failed"), "reason": text},
                              optional={"serial": counts}), min_size=1),
)
statuses = st.builds(
    DeploymentStatus,
    agent=names,
    slot=text,
    model=text,
    version=st.integers(),
    state=st.sampled_from(DEPLOYMENT_STATES) | new_words,
    reason=st.none() | text,
    serial=counts,
    ts=text,
    extra=extras(set(DeploymentStatus._KNOWN)),
    role=st.sampled_from(["active", "shadow"]) | new_words,
)

# The fields each decoder requires (besides "schema"): dropping or mistyping one is an error.
_KNOWN_BY_DECODER = {
    "decode_deployment": {"scope", "serial", "slots"},
    "decode_agent_state": set(AgentState._KNOWN) - {"schema", "health_period_s"},  # optional
    "decode_agent_health": set(AgentHealth._KNOWN) - {"schema", "federated", "drift", "started_at",
                                                      "shadow", "outbox_refused"},  # optional
    "decode_deployment_status": set(DeploymentStatus._KNOWN) - {"schema", "role"},  # role: optional
}

CODECS = [
    (deployments, encode_deployment, decode_deployment, DeploymentError),
    (agent_states, encode_agent_state, decode_agent_state, MessageError),
    (healths, encode_agent_health, decode_agent_health, MessageError),
    (statuses, encode_deployment_status, decode_deployment_status, MessageError),
]
IDS = ["deployment", "agent-state", "agent-health", "deployment-status"]


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "encode", "decode", "error"), CODECS, ids=IDS)
def test_round_trip_keeps_every_field(strategy, encode, decode, error):
    @settings(max_examples=150, deadline=None)
    @given(strategy)
    def check(obj):
        data = encode(obj)
        back = decode(data)
        assert back == obj
        assert encode(back) == data  # canonical: same object, same bytes

    check()


@pytest.mark.parametrize(("strategy", "encode", "decode", "error"), CODECS, ids=IDS)
def test_unknown_fields_survive_an_old_reader(strategy, encode, decode, error):
    """A newer peer's payload with extra fields re-encodes with those fields intact."""

    @settings(max_examples=50, deadline=None)
    @given(strategy, st.dictionaries(st.sampled_from(["zz_new", "future"]), json_values))
    def check(obj, added):
        wire = json.loads(encode(obj))
        wire.update(added)
        back = decode(json.dumps(wire).encode())
        assert json.loads(encode(back)) == wire

    check()


@pytest.mark.parametrize(("strategy", "encode", "decode", "error"), CODECS, ids=IDS)
def test_malformed_payloads_raise_the_codec_error(strategy, encode, decode, error):
    assert issubclass(error, ValueError)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
    def garbage(raw):
        try:
            decode(raw)
        except error:
            pass

    @settings(max_examples=100, deadline=None)
    @given(strategy, st.data())
    def broken(obj, data):
        wire = json.loads(encode(obj))
        key = data.draw(st.sampled_from(sorted(_KNOWN_BY_DECODER[decode.__name__])))
        if data.draw(st.booleans()):
            del wire[key]
        else:
            wire[key] = [] if not isinstance(wire[key], list) else "x"
        with pytest.raises(error):
            decode(json.dumps(wire).encode())

    garbage()
    broken()


def test_newer_major_version_is_refused():
    doc = Deployment(Scope("group", "g"), 1, {})
    wire = json.loads(encode_deployment(doc))
    wire["schema"] = "edgefleet.deployment/2"
    with pytest.raises(DeploymentError, match="unsupported"):
        decode_deployment(json.dumps(wire).encode())
    with pytest.raises(MessageError):
        decode_agent_state(b'{"schema": "edgefleet.agent-state/2"}')
    with pytest.raises(MessageError):
        decode_deployment_status(b'{"schema": "edgefleet.agent-health/1"}')


def _canonical(obj: dict) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def test_a_newer_trainers_document_decodes_and_round_trips():
    """Variants this version cannot run are kept (with their unknown fields), not refused."""
    known = {"target": "artifacts/m-3-onnx-int8.zip", "format": "onnx", "quantization": "int8",
             "profiles": ["x86-64-v3"], "sha256": "a" * 64, "size_bytes": 10}
    new_format = {**known, "target": "artifacts/m-3-ggml-int8.bin", "format": "ggml",
                  "sha256": "b" * 64, "runtime_min": "2.1", "signature_scheme": {"v": 2}}
    new_quant = {**known, "target": "artifacts/m-3-onnx-int4.zip", "quantization": "int4",
                 "sha256": "c" * 64}
    wire = {
        "schema": SCHEMA_DEPLOYMENT, "scope": {"group": "lab"}, "serial": 7, "rollout": "canary",
        "slots": {
            "default": {"model": "m", "version": 3, "variants": [new_format, known, new_quant]},
            "future": {"model": "m", "version": 3, "variants": [new_format, new_quant],
                       "pinned": True},
        },
    }
    doc = decode_deployment(json.dumps(wire).encode())
    assert encode_deployment(doc) == _canonical(wire)  # decode → encode keeps everything
    assert doc.extra == {"rollout": "canary"}
    default, future = doc.slots["default"], doc.slots["future"]
    assert [v.format for v in default.variants] == ["ggml", "onnx", "onnx"]
    assert default.variants[0].extra == {"runtime_min": "2.1", "signature_scheme": {"v": 2}}

    chosen = choose_variant(default, "x86-64-v3", "ggml", "int4", {"onnx", "tflite"})
    assert chosen is not None and chosen.target == known["target"]
    assert choose_variant(future, "x86-64-v3", "onnx", "int8", {"onnx", "tflite"}) is None
    assert [describe_unrunnable(v, "x86-64-v3", {"onnx"}) for v in default.variants] == [
        "ggml/int8: unknown format", None, "onnx/int4: unknown quantization",
    ]
    only_known = Variant(**{k: (tuple(v) if k == "profiles" else v) for k, v in known.items()})
    assert describe_unrunnable(only_known, "rpi4-arm64", {"onnx"}) == (
        "onnx/int8: not built for rpi4-arm64"
    )
    assert describe_unrunnable(only_known, "x86-64-v3", {"tflite"}) == "onnx/int8: no onnx runtime"


def test_unknown_status_strings_are_kept_as_they_are():
    state = AgentState(
        agent="pi-1", status="draining", bdseq=1, group=None, profile="p", arch="a",
        runtimes=(), active=(), emulated=False, ts="t",
    )
    wire = json.loads(encode_agent_state(state))
    assert wire["status"] == "draining" and "health_period_s" not in wire
    assert decode_agent_state(json.dumps(wire).encode()) == state
    status = DeploymentStatus(agent="pi-1", slot="s", model="m", version=1,
                              state="benchmarking", reason=None, serial=1, ts="t")
    assert decode_deployment_status(encode_deployment_status(status)).state == "benchmarking"
    with pytest.raises(MessageError, match="status"):
        decode_agent_state(json.dumps({**wire, "status": ""}).encode())
    wire_status = json.loads(encode_deployment_status(status))
    with pytest.raises(MessageError, match="state"):
        decode_deployment_status(json.dumps({**wire_status, "state": ""}).encode())


def test_the_births_health_period_is_optional_and_checked():
    state = AgentState(
        agent="pi-1", status="online", bdseq=1, group=None, profile="p", arch="a",
        runtimes=(), active=(), emulated=False, ts="t", health_period_s=2.5,
    )
    wire = json.loads(encode_agent_state(state))
    assert wire["health_period_s"] == 2.5
    assert decode_agent_state(json.dumps(wire).encode()).health_period_s == 2.5
    del wire["health_period_s"]  # an agent that predates the field
    assert decode_agent_state(json.dumps(wire).encode()).health_period_s is None
    for bad in (0, -1, "10", True, [], 1e400):
        with pytest.raises(MessageError, match="health_period_s"):
            decode_agent_state(json.dumps({**wire, "health_period_s": bad}).encode())


def test_deployment_example_and_validation():
    v = Variant("artifacts/m-2-onnx-int8.zip", "onnx", "int8", ("x86-64-v3",), "a" * 64, 10)
    doc = Deployment(Scope("agent", "pi-1"), 3, {"default": Slot("m", 2, (v,))})
    wire = json.loads(encode_deployment(doc))
    assert wire == {
        "schema": SCHEMA_DEPLOYMENT,
        "scope": {"agent": "pi-1"},
        "serial": 3,
        "slots": {
            "default": {
                "model": "m",
                "version": 2,
                "variants": [
                    {
                        "target": "artifacts/m-2-onnx-int8.zip",
                        "format": "onnx",
                        "quantization": "int8",
                        "profiles": ["x86-64-v3"],
                        "sha256": "a" * 64,
                        "size_bytes": 10,
                    }
                ],
            }
        },
    }
    assert doc.target == "deployments/agents/pi-1.json"
    for patch in (
        {"scope": {"group": "g", "agent": "a"}},
        {"scope": {"group": "../x"}},
        {"serial": True},
        {"serial": -1},
        {"slots": {"bad/slot": wire["slots"]["default"]}},
    ):
        with pytest.raises(DeploymentError):
            decode_deployment(json.dumps({**wire, **patch}).encode())
    bad_variant = dict(wire["slots"]["default"]["variants"][0])
    for patch in ({"format": ""}, {"format": 3}, {"quantization": ""}, {"quantization": None},
                  {"sha256": "A" * 64}, {"target": "../../etc/passwd"}, {"size_bytes": -1},
                  {"profiles": [1]}):
        slot = {**wire["slots"]["default"], "variants": [{**bad_variant, **patch}]}
        with pytest.raises(DeploymentError):
            decode_deployment(json.dumps({**wire, "slots": {"default": slot}}).encode())
    with pytest.raises(DeploymentError):
        encode_deployment(Deployment(Scope("group", "g"), 1, {"s": Slot("m", 0, ())}))


def test_target_paths():
    assert group_target("lab-1") == "deployments/groups/lab-1.json"
    assert agent_target("pi.07") == "deployments/agents/pi.07.json"
    for bad in ("", "a/b", "..", "-x", "a+b", "x" * 65):
        with pytest.raises(DeploymentError):
            group_target(bad)
        with pytest.raises(DeploymentError):
            agent_target(bad)


# -- choose_variant ---------------------------------------------------------------------------


def _v(fmt: str, quant: str, profiles: tuple[str, ...] = ("p",)) -> Variant:
    return Variant(f"artifacts/m-1-{fmt}-{quant}.zip", fmt, quant, profiles, "0" * 64, 1)


ALL = (_v("onnx", "fp32"), _v("onnx", "int8"), _v("tflite", "fp32"), _v("tflite", "int8"))


@pytest.mark.parametrize(
    ("variants", "pf", "pq", "available", "want"),
    [
        (ALL, "tflite", "int8", {"onnx", "tflite"}, ("tflite", "int8")),
        (ALL, "onnx", "fp32", {"onnx", "tflite"}, ("onnx", "fp32")),
        (ALL[:3], "tflite", "int8", {"onnx", "tflite"}, ("tflite", "fp32")),  # then format
        (ALL, "tflite", "int8", {"onnx"}, ("onnx", "int8")),  # no LiteRT: same quantization
        (ALL[:1], "tflite", "int8", {"onnx"}, ("onnx", "fp32")),  # then anything
        (ALL, "tflite", "int8", set(), None),  # no runtime at all
        ((_v("tflite", "int8", ("other",)), ALL[0]), "tflite", "int8", {"tflite", "onnx"},
         ("onnx", "fp32")),  # a variant not built for this profile is never chosen
        ((_v("tflite", "int8", ("other",)),), "tflite", "int8", {"tflite"}, None),
    ],
)
def test_choose_variant_preference(variants, pf, pq, available, want):
    got = choose_variant(Slot("m", 1, tuple(variants)), "p", pf, pq, available)
    assert (None if got is None else (got.format, got.quantization)) == want


@given(st.permutations(ALL), st.sampled_from(["onnx", "tflite"]), st.sampled_from(["fp32", "int8"]),
       st.sets(st.sampled_from(["onnx", "tflite"])))
def test_choose_variant_ignores_order(order, pf, pq, available):
    a = choose_variant(Slot("m", 1, tuple(order)), "p", pf, pq, available)
    b = choose_variant(Slot("m", 1, ALL), "p", pf, pq, available)
    assert a == b
    assert (a is None) == (not available)


def test_choose_variant_is_deterministic_for_duplicates():
    twins = [
        Variant("artifacts/b.zip", "onnx", "int8", ("p",), "1" * 64, 1),
        Variant("artifacts/a.zip", "onnx", "int8", ("p",), "2" * 64, 1),
    ]
    for _ in range(5):
        random.shuffle(twins)
        got = choose_variant(Slot("m", 1, tuple(twins)), "p", "onnx", "int8", ["onnx"])
        assert got is not None and got.target == "artifacts/a.zip"


unknown_variants = st.builds(
    Variant,
    target=targets,
    format=st.sampled_from(["onnx", "tflite", "ggml"]),
    quantization=st.sampled_from(["fp32", "int8", "int4"]),
    profiles=st.just(("p",)),
    sha256=hexes,
    size_bytes=counts,
).filter(lambda v: v.format == "ggml" or v.quantization == "int4")


@given(st.lists(unknown_variants, max_size=4), st.permutations(ALL),
       st.sampled_from(["onnx", "tflite", "ggml"]), st.sampled_from(["fp32", "int8", "int4"]),
       st.sets(st.sampled_from(["onnx", "tflite"])))
def test_variants_of_unknown_format_or_quantization_never_change_the_choice(
    unknown, order, pf, pq, available
):
    mixed = Slot("m", 1, (*unknown, *order))
    got = choose_variant(mixed, "p", pf, pq, available)
    assert got == choose_variant(Slot("m", 1, ALL), "p", pf, pq, available)
    assert choose_variant(Slot("m", 1, tuple(unknown)), "p", pf, pq, available) is None


def test_a_shadow_entry_round_trips_and_an_old_reader_keeps_it_as_an_unknown_field():
    """A slot's ``shadow`` (shadow mode) decodes to :attr:`Slot.shadow`; a reader that does not
    know the field (modelled by dropping it from the known ones) keeps it in ``extra`` and
    writes it back unchanged, so an older agent serves the slot's model and ignores the rest."""
    variant = {"target": "artifacts/m-2-onnx-int8.zip", "format": "onnx", "quantization": "int8",
               "profiles": ["x86-64-v3"], "sha256": "d" * 64, "size_bytes": 10}
    shadow = {"model": "m", "version": 3, "variants": [{**variant, "sha256": "e" * 64}],
              "shadow": {"nested": True}}
    wire = {"schema": SCHEMA_DEPLOYMENT, "scope": {"group": "lab"}, "serial": 4,
            "slots": {"default": {"model": "m", "version": 2, "variants": [variant], "shadow": shadow}}}
    doc = decode_deployment(json.dumps(wire).encode())
    slot = doc.slots["default"]
    assert (slot.version, slot.shadow.version) == (2, 3)  # type: ignore[union-attr]
    assert slot.shadow.shadow is None and slot.shadow.extra == {"shadow": {"nested": True}}  # type: ignore[union-attr]
    assert encode_deployment(doc) == _canonical(wire)
    # An old reader: the same slot with the shadow as an unknown field serves version 2.
    old = Slot(model="m", version=2, variants=slot.variants, extra={"shadow": shadow})
    assert json.loads(encode_deployment(Deployment(doc.scope, 4, {"default": old}))) == wire
    assert choose_variant(old, "x86-64-v3", "onnx", "int8", {"onnx"}).sha256 == "d" * 64  # type: ignore[union-attr]
    # No shadow, no field: documents of trainers before shadow mode are unchanged.
    plain = {**wire, "slots": {"default": {"model": "m", "version": 2, "variants": [variant]}}}
    assert encode_deployment(decode_deployment(json.dumps(plain).encode())) == _canonical(plain)
    bad = {**wire, "slots": {"default": {**wire["slots"]["default"], "shadow": {"model": "m"}}}}
    with pytest.raises(DeploymentError, match="the shadow of slot 'default'"):
        decode_deployment(json.dumps(bad).encode())


def test_a_shadow_status_says_its_role_and_an_active_one_writes_none():
    base = dict(agent="pi-1", slot="default", model="m", version=2, state="failed",
                reason="smoke test: golden vectors differ", serial=3, ts="t")
    shadow = json.loads(encode_deployment_status(DeploymentStatus(**base, role="shadow")))
    assert shadow["role"] == "shadow"
    active = json.loads(encode_deployment_status(DeploymentStatus(**base)))
    assert "role" not in active  # as agents before shadow mode wrote it
    assert decode_deployment_status(json.dumps(active).encode()).role == "active"


def test_a_malformed_shadow_entry_is_dropped_and_the_rest_of_the_health_kept():
    good = {"model": "m", "version": 2, "state": "failed", "reason": "smoke test: x", "serial": 4}
    health = AgentHealth(agent="pi-1", ts="t", inferences=7, anomalies=0, errors=0, outbox_depth=0,
                         outbox_dropped=0, latency_ms={"p50": None, "p99": None}, rss_mb=None,
                         cpu_percent=None, shadow={"a": good})
    wire = json.loads(encode_agent_health(health))
    wire["shadow"].update({"b": {"model": "m"}, "c": "x", "d": {**good, "version": "2"},
                           "e": {**good, "serial": -1}})
    back = decode_agent_health(json.dumps(wire).encode())
    assert back.shadow == {"a": good}
    assert back.inferences == 7
    wire["shadow"] = ["not", "a", "map"]  # the field itself still has to be a map
    with pytest.raises(MessageError, match="'shadow'"):
        decode_agent_health(json.dumps(wire).encode())
