"""Compression steps on small real models, without the CLI: the recipe parser, structured
pruning and low-rank factorization that shrink the graph, the spec's ``layers`` and the
stored weights that rebuild a compressed model, refusals of unsupported families."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer.compress import CompressError, ModelState, RecipeError, StepData, parse_recipe
from trainer.compress._distill import Distillation
from trainer.compress._finetune import FineTune
from trainer.compress._lowrank import LowRank
from trainer.compress._prune import StructuredPruning
from trainer.compress._sparsify import Sparsify
from trainer.compress.measure import count_flops
from trainer.models import (
    ArchitectureSpec,
    Recipe,
    SpecError,
    build_network,
    compressed_layers,
    load_weights,
    parameter_count,
    score_windows,
    weights_bytes,
)

WINDOW = 16
SPECS = {
    "forecaster": ArchitectureSpec("forecaster", WINDOW, 4, (64, 32)),
    "forecaster-seasonal": ArchitectureSpec("forecaster", WINDOW, 4, (64, 32), season=288),
    "autoencoder": ArchitectureSpec("autoencoder", WINDOW, 4, (64, 16)),
    "conv": ArchitectureSpec("conv", WINDOW, 4, (16, 16, 16), dilations=(1, 2, 4)),
    "conv-widths": ArchitectureSpec("conv", WINDOW, 4, (16, 32, 16), dilations=(1, 2, 4)),
    "conv-seasonal": ArchitectureSpec("conv", WINDOW, 1, (8, 16), dilations=(1, 2), residual=False, season=288),
}


def _data(spec: ArchitectureSpec, n: int = 64) -> StepData:
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(n, spec.input_rows, spec.features)).astype(np.float32)
    teacher = build_network(spec).eval()
    return StepData(windows, windows[: n // 4], windows[:, 0, :], Recipe(epochs=1), teacher)


def _state(spec: ArchitectureSpec) -> ModelState:
    torch.manual_seed(0)
    return ModelState(build_network(spec), spec)


# -- recipes -------------------------------------------------------------------------------------


def test_recipe_canonical_text_and_gate_grouping() -> None:
    recipe = parse_recipe(" prune:0.5 , finetune:5,quantize:int8")
    assert recipe.text == "prune:0.5:magnitude:layer,finetune:5,quantize:int8"
    assert parse_recipe(recipe.text) == recipe
    assert recipe.judged_steps() == [1, 2]  # prune is judged after its fine-tuning
    assert recipe.gate_label(1) == "prune:0.5:magnitude:layer (with finetune:5)"
    assert recipe.export.quantization == "int8" and recipe.export.scheme == "static"
    assert parse_recipe("quantize:dynamic").export.scheme == "dynamic"
    assert parse_recipe("lowrank:rank=8").steps[0].token == "lowrank:rank=8"
    assert parse_recipe("distill:32-8:alpha=0.25:epochs=3").text == "distill:32-8:alpha=0.25:epochs=3"


@pytest.mark.parametrize("text, words", [
    ("", "empty step"), ("prune", "needs a ratio"), ("prune:1.5", r"in \(0, 1\)"), ("shrink:2", "unknown step"),
    ("quantize:int8,finetune:2", "last step"), ("quantize:int4", "one of int8"), ("finetune:0", "at least 1"),
    ("prune:0.5:taylor:taylor", "given twice"), ("sparsify:0.5,lowrank:0.9", "put sparsify after"),
    ("quantize:fp32:per-tensor", "no granularity"), ("distill:a-b", "integers"),
])
def test_bad_recipes_name_the_problem(text: str, words: str) -> None:
    with pytest.raises(RecipeError, match=words):
        parse_recipe(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="prunefinetquaizlowrkdsp:,=.0123456789-8 ", max_size=40))
def test_any_recipe_text_parses_or_is_refused_in_one_line(text: str) -> None:
    try:
        recipe = parse_recipe(text)
    except RecipeError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert parse_recipe(recipe.text) == recipe


# -- structured pruning ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("importance, scope", [("magnitude", "layer"), ("taylor", "global")])
def test_pruning_removes_parameters_and_rebuilds_from_spec_and_weights(name: str, importance: str, scope: str) -> None:
    spec = SPECS[name]
    state, data = _state(spec), _data(spec)
    before = parameter_count(state.model)
    pruned = StructuredPruning(0.5, importance, scope).apply(state, data)
    after = parameter_count(pruned.model)
    assert after < 0.75 * before
    flops = count_flops(pruned.model, data.train[0])
    assert 0 < flops < count_flops(build_network(spec), data.train[0])
    # the output layer keeps one output per metric
    out = pruned.model.head if spec.family == "conv" else pruned.model.body[-1]
    assert out.out_features == (spec.features if spec.family != "autoencoder" else WINDOW * spec.features)
    compressed = compressed_layers(pruned.model, spec)
    assert compressed.layers and ArchitectureSpec.from_json(compressed.to_json()) == compressed
    rebuilt = load_weights(compressed, weights_bytes(pruned.model))
    assert parameter_count(rebuilt) == after
    np.testing.assert_allclose(score_windows(rebuilt, data.train), score_windows(pruned.model.eval(), data.train),
                               rtol=1e-5, atol=1e-6)


def test_pruned_conv_keeps_the_channels_it_keeps_everywhere() -> None:
    """The head reads the same channels the last block still writes (checked by weights)."""
    spec = SPECS["conv"]
    state = _state(spec)
    original = build_network(spec)
    original.load_state_dict(state.model.state_dict())
    pruned = StructuredPruning(0.5).apply(state, _data(spec)).model
    w0, w1 = original.body[0].conv.weight, pruned.body[0].conv.weight
    kept = [int((w0 - w1[j]).abs().sum((1, 2)).argmin()) for j in range(w1.shape[0])]
    assert len(set(kept)) == len(kept) == 8
    torch.testing.assert_close(pruned.head.weight, original.head.weight[:, kept])


@pytest.mark.parametrize("spec, words", [
    (ArchitectureSpec("linear", WINDOW, 4, ()), "nothing to prune"),
    (ArchitectureSpec("attention", WINDOW, 4, (16, 16), heads=2), "not supported"),
])
def test_pruning_refuses_families_it_cannot_prune(spec: ArchitectureSpec, words: str) -> None:
    with pytest.raises(CompressError, match=words):
        StructuredPruning(0.5).check(spec)


def test_pruning_refuses_recurrent_layers() -> None:
    spec = SPECS["forecaster"]
    state = _state(spec)
    state.model.memory = nn.LSTM(4, 8)  # torch-pruning 1.6 fails on LSTM, leaves GRU unpruned
    with pytest.raises(CompressError, match="recurrent"):
        StructuredPruning(0.5).apply(state, _data(spec))


# -- low rank, sparsity, distillation --------------------------------------------------------------


def test_low_rank_factorizes_linear_layers_exactly_at_full_energy_rank() -> None:
    spec = SPECS["forecaster"]
    state, data = _state(spec), _data(spec)
    before = parameter_count(state.model)
    low = LowRank(rank=12).apply(state, data)
    assert parameter_count(low.model) < before
    layer = low.model.body[0]
    assert isinstance(layer, nn.Sequential) and layer[0].out_features == 12 and layer[0].bias is None
    compressed = compressed_layers(low.model, spec)
    assert ("body.0", (64, 12, WINDOW * 4 - 4)) in compressed.layers
    rebuilt = load_weights(compressed, weights_bytes(low.model))
    np.testing.assert_allclose(score_windows(rebuilt, data.train), score_windows(low.model, data.train), rtol=1e-5)
    # a layer whose weights are of rank 6 keeps all its energy at rank 6: same scores
    exact = _state(spec)
    with torch.no_grad():
        first = exact.model.body[0].weight
        first.copy_(torch.randn(first.shape[0], 6) @ torch.randn(6, first.shape[1]) / 8)
    reference = score_windows(exact.model.eval(), data.train)
    exact = LowRank(energy=0.9999).apply(exact, data)
    assert exact.model.body[0][0].out_features == 6
    np.testing.assert_allclose(score_windows(exact.model, data.train), reference, rtol=1e-3, atol=1e-4)


def test_sparsify_zeroes_weights_without_changing_shapes() -> None:
    spec = SPECS["forecaster"]
    state = _state(spec)
    before = parameter_count(state.model)
    sparse = Sparsify(0.7).apply(state, _data(spec))
    final = sparse.finalized()
    assert parameter_count(final) == before
    weights = torch.cat([m.weight.flatten() for m in final.modules() if isinstance(m, nn.Linear)])
    assert 0.69 < float((weights == 0).float().mean()) < 0.71
    assert compressed_layers(final, spec).layers == ()
    # fine-tuning trains through the masks: the zeros stay zeros
    tuned = FineTune(2).apply(sparse, _data(spec)).finalized()
    weights = torch.cat([m.weight.flatten() for m in tuned.modules() if isinstance(m, nn.Linear)])
    assert 0.69 < float((weights == 0).float().mean()) < 0.71
    assert not torch.equal(tuned.body[0].weight, final.body[0].weight)


def test_distillation_trains_a_student_of_the_widths_given() -> None:
    spec = SPECS["forecaster"]
    state, data = _state(spec), _data(spec)
    student = Distillation((8,), alpha=0.5, epochs=1).apply(state, data)
    assert student.spec.hidden == (8,) and parameter_count(student.model) < parameter_count(state.model)
    torch.testing.assert_close(student.model.std, data.teacher.std)
    with pytest.raises(CompressError, match="hidden widths"):
        Distillation((8,)).check(ArchitectureSpec("linear", WINDOW, 4, ()))


# -- the spec's layers -------------------------------------------------------------------------------


def test_spec_layers_round_trip_and_are_checked() -> None:
    spec = dataclasses.replace(SPECS["forecaster"], layers=(("body.0", (32, 60)), ("body.2", (4, 8, 32))))
    assert ArchitectureSpec.from_json(spec.to_json()) == spec
    assert "layers" not in SPECS["forecaster"].to_json()  # uncompressed specs are recorded as before
    model = build_network(spec)
    assert model.body[0].out_features == 32 and isinstance(model.body[2], nn.Sequential)
    with pytest.raises(SpecError):
        dataclasses.replace(SPECS["forecaster"], layers=(("body.0", (0, 60)),))
    with pytest.raises(SpecError, match="no layer"):
        build_network(dataclasses.replace(SPECS["forecaster"], layers=(("body.9", (4, 4)),)))


def test_rows_of_masking_steps_say_the_latency_does_not_change() -> None:
    from trainer.cli_compress import format_row
    from trainer.compress import StepRow

    row = StepRow("sparsify:0.5", "rpi4-arm64", "tflite", "fp32", "static", 100, 50, 200, 1000, 600,
                  0.1, 0.2, False, 0.5, -0.01, 0.99, True)
    assert "masks only: the runtime latency does not change" in format_row(row)
    moved = dataclasses.replace(row, step="prune:0.5", latency_changes=True)
    assert "latency does not change" not in format_row(moved)
    failed = dataclasses.replace(row, parity_passed=False, failures=("max error 2x threshold",))
    assert "parity failed: max error 2x threshold" in format_row(failed)


# -- the step contract, over every step ------------------------------------------------------------

EXAMPLES = {"prune": "prune:0.5:taylor", "finetune": "finetune:1", "lowrank": "lowrank:rank=4",
            "sparsify": "sparsify:0.5", "distill": "distill:16:epochs=1", "quantize": "quantize:dynamic"}


def test_every_step_has_an_example() -> None:
    from trainer.compress import STEPS

    assert set(EXAMPLES) == set(STEPS)


@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("family", ["forecaster", "conv"])
def test_step_contract(name: str, family: str) -> None:
    """Every step: its token parses back to it; on a model it accepts it leaves a model that
    scores every window, and that its spec and weights rebuild exactly."""
    (step,) = parse_recipe(EXAMPLES[name]).steps
    assert parse_recipe(step.token).steps == (step,) and step.name == name
    spec = SPECS[family]
    if (name, family) == ("lowrank", "conv"):  # its one Linear, the head (16 -> 4), cannot shrink
        # refused from the spec, before any work
        with pytest.raises(CompressError, match=r"no Linear layer of this conv model gets smaller.*Linear\(16, 4\)"):
            step.check(spec)
        return
    step.check(spec)
    data = _data(spec)
    after = step.apply(_state(spec), data)
    model = after.finalized()
    scores = score_windows(model, data.train)
    assert scores.shape == (len(data.train),) and np.isfinite(scores).all()
    compressed = compressed_layers(model, after.spec)
    rebuilt = load_weights(ArchitectureSpec.from_json(compressed.to_json()), weights_bytes(model))
    np.testing.assert_allclose(score_windows(rebuilt, data.train), scores, rtol=1e-5, atol=1e-6)
