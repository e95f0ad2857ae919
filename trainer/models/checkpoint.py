"""A trained model's weights as bytes (safetensors), and the model rebuilt from them.

The registry keeps these bytes beside every version's artifacts, so that a registered version
can be compressed, fine-tuned or distilled from later. The graph is never stored: it is
rebuilt from the version's :class:`~trainer.models.spec.ArchitectureSpec` (whose ``layers``
record what compression reshaped, :func:`compressed_layers`), and the weights are loaded into
it strictly, so a spec and weights that disagree are refused rather than half loaded.
safetensors rather than ``torch.save``: no pickle to trust when loading, and the same weights
give the same bytes.
"""

from __future__ import annotations

import dataclasses
from typing import cast

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from trainer.models._networks import build_network
from trainer.models.spec import ArchitectureSpec, SpecError

__all__ = ["CheckpointError", "compressed_layers", "load_weights", "parameter_count", "weights_bytes"]

_FORMAT = "edgefleet-weights/1"


class CheckpointError(ValueError):
    """Stored weights that cannot be read, or that do not fit the spec they come with."""


def weights_bytes(model: nn.Module) -> bytes:
    """The model's state (parameters and buffers) as safetensors bytes."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return save_tensors(state, metadata={"format": _FORMAT})


def load_weights(spec: ArchitectureSpec, data: bytes) -> nn.Module:
    """The model of ``spec`` with the weights of ``data``, in eval mode.

    Raises :class:`CheckpointError` when ``data`` is not such weights or does not fit ``spec``.
    """
    try:
        state = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"unreadable model weights: {e}") from e
    try:
        model = build_network(spec)
        model.load_state_dict(state, strict=True)
    except (SpecError, RuntimeError) as e:
        raise CheckpointError(f"the stored weights do not fit the architecture: {e}") from e
    return model.eval()


def _shape(layer: nn.Module) -> tuple[int, ...] | None:
    if isinstance(layer, (nn.Linear, nn.Conv1d)):
        return (int(layer.weight.shape[0]), int(layer.weight.shape[1]))
    if (isinstance(layer, nn.Sequential) and len(layer) == 2
            and all(isinstance(m, nn.Linear) for m in layer)):
        first, second = cast(nn.Linear, layer[0]), cast(nn.Linear, layer[1])
        return (second.out_features, first.out_features, first.in_features)
    return None


def compressed_layers(model: nn.Module, spec: ArchitectureSpec) -> ArchitectureSpec:
    """``spec`` with ``layers`` set to every layer of ``model`` whose shape differs from what the
    spec's other fields build: pruned ``nn.Linear``/``nn.Conv1d`` and factorized pairs."""
    base = build_network(dataclasses.replace(spec, layers=()))
    layers = []
    for path, layer in base.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv1d)):
            continue
        try:
            actual = _shape(model.get_submodule(path))
        except AttributeError:
            actual = None
        if actual is None:
            raise SpecError(f"layer {path!r} of the compressed model is neither linear nor convolutional")
        if actual != _shape(layer):
            layers.append((path, actual))
    return dataclasses.replace(spec, layers=tuple(sorted(layers)))


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model`` (weights and biases; the normalisation buffers are not counted)."""
    return sum(p.numel() for p in model.parameters())
