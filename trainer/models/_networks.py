"""The torch modules of the two model families. Both map raw windows to one score each.

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

from trainer.models.spec import ArchitectureSpec

CLIP = 8.0


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
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
        self.body = _mlp([d, *widths, *reversed(widths[:-1]), d])

    def feature_errors(self, x: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """``(batch, features)``: mean absolute (or squared) reconstruction error of each metric."""
        n = x.shape[0]
        level = self.level(x)
        r = self.body(self.normalise(x, level).reshape(n, -1)).reshape(x.shape)
        return self.error(r, x, level, squared).mean(dim=1)


class WindowForecaster(_Normalised):
    """MLP that predicts the window's last row from the rows before it."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__(spec)
        rows = spec.window - 1 + (2 * spec.season_halfwidth + 1 if spec.season else 0)
        self.body = _mlp([rows * spec.features, *spec.hidden, spec.features])

    def feature_errors(self, x: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """``(batch, features)``: absolute (or squared) forecast error of each metric's last value.

        ``x`` holds :attr:`ArchitectureSpec.input_rows` rows; the last is the one forecast.
        """
        spec, n = self.spec, x.shape[1]
        past = x[:, n - spec.window : n - 1, :]
        level = self.level(past)
        body_in = self.normalise(past, level).reshape(x.shape[0], -1)
        if spec.season:
            lo = n - 1 - spec.season - spec.season_halfwidth
            seasonal = x[:, lo : lo + 2 * spec.season_halfwidth + 1, :]
            body_in = torch.cat([body_in, self.normalise(seasonal, level).reshape(x.shape[0], -1)], dim=1)
        return self.error(self.body(body_in), x[:, -1, :], level[:, 0, :], squared)


def build_network(spec: ArchitectureSpec) -> _Normalised:
    """A fresh (untrained) module for ``spec``."""
    if spec.family == "autoencoder":
        return WindowAutoencoder(spec)
    return WindowForecaster(spec)
