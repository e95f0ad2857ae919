"""The torch modules of the model families. Each maps raw windows to one score each.

Input: float32 ``(batch, window, features)`` raw values. Normalisation (per-feature mean and
std from the training data) is part of the graph, so exported artifacts take raw metrics.
Output: float32 ``(batch,)`` raw anomaly scores (higher = more anomalous): the absolute error
in units of the training standard deviation. Absolute, not squared: the streaming score
pipeline (:mod:`shared.score_pipeline`) averages and standardizes these errors, and a squared
error's tail is so heavy that one spike dominates the history it is measured against
(docs/model-choice.md has the comparison).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.spec import ArchitectureSpec, SpecError

CLIP = 8.0


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _mlp(sizes: list[int], activation: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class _Normalised(nn.Module):
    mean: torch.Tensor  # buffers: per-feature training mean and std
    std: torch.Tensor

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.zeros(spec.features))
        self.register_buffer("std", torch.ones(spec.features))

    def level(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, features)``: where ``x`` (raw rows) is centred — its own per-metric mean
        (``centering="window"``) or the training mean (``"train"``); see :class:`ArchitectureSpec`.
        """
        if self.spec.centering == "window":
            return x.mean(dim=1, keepdim=True)
        return self.mean.expand(x.shape[0], 1, -1)

    def normalise(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Centred on ``level``, scaled by the training std, clipped to ±CLIP standard deviations.

        The body never needs to see further out than that to know a window is unusual (the
        error term sees the raw values), and a bounded input gives int8 a fixed, fine grid.
        """
        return torch.clamp((x - level) / self.std, -CLIP, CLIP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The anomaly score: the error of the worst metric.

        The maximum, not the mean, over metrics: a host whose network traffic drops to zero
        is anomalous however normal its CPU, memory and disk are; averaging would divide that
        one metric's error by the number of metrics. (For one metric both are the same.)
        """
        return self.feature_errors(x).amax(dim=1)

    def feature_errors(self, x: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """``(batch, features)`` per-metric errors; ``squared`` for the training loss."""
        raise NotImplementedError

    def error(
        self, predicted: torch.Tensor, raw: torch.Tensor, level: torch.Tensor, squared: bool = False
    ) -> torch.Tensor:
        """Normalised absolute (or squared) error of a prediction (normalised units, centred on
        ``level``) against raw values.

        It is computed from the raw input, not from the normalised tensor fed to the body: an
        int8 converter quantizes that tensor (clipping it to the calibration range), and an
        anomaly is exactly what lies outside that range. (Only the body's matrix products are
        quantized; ``level`` and this error stay in float.)
        """
        e = (predicted * self.std + level - raw) / self.std
        return e * e if squared else e.abs()


class WindowAutoencoder(_Normalised):
    """MLP autoencoder over the flattened normalised window."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__(spec)
        d = spec.window * spec.features
        widths = list(spec.hidden)
        self.body = _mlp([d, *widths, *reversed(widths[:-1]), d], spec.activation)

    def feature_errors(self, x: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """``(batch, features)``: mean absolute (or squared) reconstruction error of each metric."""
        n = x.shape[0]
        level = self.level(x)
        r = self.body(self.normalise(x, level).reshape(n, -1)).reshape(x.shape)
        return self.error(r, x, level, squared).mean(dim=1)


def _seasonal_rows(spec: ArchitectureSpec) -> int:
    return 2 * spec.season_halfwidth + 1 if spec.season else 0


class _Forecasting(_Normalised):
    """The forecasting families' contract: predict the last row from the ``window - 1`` rows
    before it (and the seasonal rows a season back), centred on those rows' level.

    Subclasses implement :meth:`predict` on normalised rows.
    """

    def predict(self, past: torch.Tensor, seasonal: torch.Tensor | None) -> torch.Tensor:
        """``(batch, features)`` normalised forecast of the last row from the normalised
        ``(batch, window - 1, features)`` past rows and ``(batch, 2 * season_halfwidth + 1,
        features)`` seasonal rows (``None`` without a season)."""
        raise NotImplementedError

    def feature_errors(self, x: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """``(batch, features)``: absolute (or squared) forecast error of each metric's last value.

        ``x`` holds :attr:`ArchitectureSpec.input_rows` rows; the last is the one forecast.
        """
        spec, n = self.spec, x.shape[1]
        past = x[:, n - spec.window : n - 1, :]
        level = self.level(past)
        seasonal = None
        if spec.season:
            lo = n - 1 - spec.season - spec.season_halfwidth
            seasonal = self.normalise(x[:, lo : lo + _seasonal_rows(spec), :], level)
        predicted = self.predict(self.normalise(past, level), seasonal)
        return self.error(predicted, x[:, -1, :], level[:, 0, :], squared)


def _flat(past: torch.Tensor, seasonal: torch.Tensor | None) -> torch.Tensor:
    flat = past.reshape(past.shape[0], -1)
    if seasonal is None:
        return flat
    return torch.cat([flat, seasonal.reshape(seasonal.shape[0], -1)], dim=1)


class WindowForecaster(_Forecasting):
    """MLP that predicts the window's last row from the rows before it."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__(spec)
        rows = spec.window - 1 + _seasonal_rows(spec)
        self.body = _mlp([rows * spec.features, *spec.hidden, spec.features], spec.activation)

    def predict(self, past: torch.Tensor, seasonal: torch.Tensor | None) -> torch.Tensor:
        return self.body(_flat(past, seasonal))


class LinearForecaster(_Forecasting):
    """Linear autoregression of the last row on the rows before it (and the seasonal rows): one
    ``nn.Linear``, trained by gradient descent with weight decay as an L2 (ridge-like) penalty."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__(spec)
        rows = spec.window - 1 + _seasonal_rows(spec)
        self.body = nn.Linear(rows * spec.features, spec.features)

    def predict(self, past: torch.Tensor, seasonal: torch.Tensor | None) -> torch.Tensor:
        return self.body(_flat(past, seasonal))


class _CausalBlock(nn.Module):
    """Causal dilated Conv1d (the output at time t reads times <= t only), then ReLU, plus the
    block's input when ``residual`` (through a 1x1 convolution where widths differ).

    Causal by padding both ends and dropping the outputs past the last input time, not by
    padding the left end only: the residual projection then reads the very tensor the
    convolution reads, which the TFLite int8 converter needs (a separate padded copy gets a
    calibration range of its own, and the converter refuses a pad whose input and output
    ranges differ).
    """

    def __init__(self, channels_in: int, channels_out: int, kernel: int, dilation: int, residual: bool) -> None:
        super().__init__()
        pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(channels_in, channels_out, kernel, dilation=dilation, padding=pad)
        self.relu = nn.ReLU()
        self.residual = residual
        self.project = nn.Conv1d(channels_in, channels_out, 1) if residual and channels_in != channels_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x)[:, :, : x.shape[2]])
        if not self.residual:
            return y
        return y + (x if self.project is None else self.project(x))


class ConvForecaster(_Forecasting):
    """Temporal convolutional network: causal dilated Conv1d blocks over the rows before the
    last, then a linear head on the last time step's channels (and the seasonal rows)."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__(spec)
        widths = [spec.features, *spec.hidden]
        self.body = nn.Sequential(*(
            _CausalBlock(a, b, spec.kernel, d, spec.residual)
            for a, b, d in zip(widths[:-1], widths[1:], spec.dilations)
        ))
        self.head = nn.Linear(spec.hidden[-1] + _seasonal_rows(spec) * spec.features, spec.features)

    def predict(self, past: torch.Tensor, seasonal: torch.Tensor | None) -> torch.Tensor:
        channels = self.body(past.transpose(1, 2))  # (batch, width, time)
        return self.head(_flat(channels[:, :, -1], seasonal))


class _SelfAttention(nn.Module):
    """Multi-head self-attention written with plain matrix products and softmax.

    ``nn.MultiheadAttention`` exports and quantizes as well (checked: onnxruntime's QDQ
    quantizes its MatMuls, litert-torch its projections to int8 FULLY_CONNECTED); written out,
    every op of the graph is in this file and the last block can compute one query only. The
    projections are ``nn.Linear`` (int8 in both formats). No mask: the rows it attends over
    all lie before the forecast row. ``queries`` reads queries from the last ``queries`` positions only (keys and
    values from all of them), which is all the forecast needs in the last block.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, time, width)`` → ``(batch, heads, time, width / heads)``."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, queries: int) -> torch.Tensor:
        q = self._split(self.query(x[:, x.shape[1] - queries :, :]))
        k, v = self._split(self.key(x)), self._split(self.value(x))
        weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scale, dim=-1)
        return self.out(torch.matmul(weights, v).transpose(1, 2).flatten(2))


class _AttentionBlock(nn.Module):
    """Self-attention, then a two-layer ReLU MLP (``2 * width``), each added to its input and
    layer-normalised (post-norm: the block's output is what the next block and head read)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attention = _SelfAttention(width, heads)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = _mlp([width, 2 * width, width])

    def forward(self, x: torch.Tensor, queries: int) -> torch.Tensor:
        y = self.norm1(x[:, x.shape[1] - queries :, :] + self.attention(x, queries))
        return self.norm2(y + self.mlp(y))


class AttentionForecaster(_Forecasting):
    """Self-attention over the rows before the last: each row projected to ``width`` plus a
    learned positional embedding, :class:`_AttentionBlock` per hidden entry, then a linear head
    on the last position (and the seasonal rows)."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__(spec)
        width = spec.hidden[0]
        self.embed = nn.Linear(spec.features, width)
        self.position = nn.Parameter(torch.randn(spec.window - 1, width) * 0.02)
        self.blocks = nn.ModuleList(_AttentionBlock(width, spec.heads) for _ in spec.hidden)
        self.head = nn.Linear(width + _seasonal_rows(spec) * spec.features, spec.features)

    def predict(self, past: torch.Tensor, seasonal: torch.Tensor | None) -> torch.Tensor:
        h = self.embed(past) + self.position
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # only the last position is read: the last block computes its queries alone
            h = block(h, 1 if i == last else h.shape[1])
        return self.head(_flat(h[:, -1, :], seasonal))


def build_network(spec: ArchitectureSpec) -> _Normalised:
    """A fresh (untrained) module for ``spec``, with the compressed shapes of ``spec.layers``.

    Raises ``ValueError`` for a tree family (scikit-learn builds those:
    :func:`trainer.models.fit`), and :class:`~trainer.models.spec.SpecError` (a
    ``ValueError``) when a ``layers`` path names no ``nn.Linear`` / ``nn.Conv1d`` of the
    family's graph.
    """
    if spec.tree_ensemble:
        raise ValueError(f"the {spec.family} family is not a torch network")
    if spec.family == "autoencoder":
        model: _Normalised = WindowAutoencoder(spec)
    elif spec.family == "linear":
        model = LinearForecaster(spec)
    elif spec.family == "conv":
        model = ConvForecaster(spec)
    elif spec.family == "attention":
        model = AttentionForecaster(spec)
    else:
        model = WindowForecaster(spec)
    for path, shape in spec.layers:
        _resize(model, path, shape)
    return model


def low_rank_pair(features_in: int, rank: int, features_out: int, bias: bool = True) -> nn.Sequential:
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``: a factorized ``Linear(in, out)``."""
    return nn.Sequential(nn.Linear(features_in, rank, bias=False), nn.Linear(rank, features_out, bias=bias))


def _resize(model: _Normalised, path: str, shape: tuple[int, ...]) -> None:
    """Replace the layer at ``path`` by one of ``shape`` (see ``ArchitectureSpec.layers``)."""
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = parent.get_submodule(name)
    except AttributeError:
        raise SpecError(f"layers: the {model.spec.family} family has no layer {path!r}") from None
    new: nn.Module
    if isinstance(layer, nn.Linear) and len(shape) == 3:
        new = low_rank_pair(shape[2], shape[1], shape[0], bias=layer.bias is not None)
    elif isinstance(layer, nn.Linear) and len(shape) == 2:
        new = nn.Linear(shape[1], shape[0], bias=layer.bias is not None)
    elif isinstance(layer, nn.Conv1d) and len(shape) == 2:
        padding = layer.padding if isinstance(layer.padding, str) else layer.padding[0]
        new = nn.Conv1d(shape[1], shape[0], layer.kernel_size[0], stride=layer.stride[0], padding=padding,
                        dilation=layer.dilation[0], bias=layer.bias is not None)
    else:
        raise SpecError(f"layers: {path!r} is a {type(layer).__name__}; shape {list(shape)} does not apply")
    setattr(parent, name, new)
