"""The JSON-able architecture spec that builds (and later rebuilds) a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["FAMILIES", "ArchitectureSpec", "SpecError"]

FAMILIES = ("autoencoder", "forecaster")


class SpecError(ValueError):
    """An architecture spec is malformed."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything needed to build a model's graph (not its weights).

    ``family`` is ``autoencoder`` (reconstruct the normalised window; score = mean squared
    reconstruction error) or ``forecaster`` (predict the window's last row from the rows before
    it; score = mean squared forecast error). ``hidden`` lists the widths of the hidden layers
    of the MLP body; for the autoencoder the last width is the bottleneck and the decoder
    mirrors the encoder.
    """

    family: str
    window: int
    features: int
    hidden: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.window < 2 or self.features < 1 or not self.hidden or min(self.hidden) < 1:
            raise SpecError("spec needs window >= 2, features >= 1 and positive hidden widths")

    @property
    def score_kind(self) -> str:
        return "reconstruction_mae" if self.family == "autoencoder" else "forecast_mae"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ArchitectureSpec:
        try:
            return cls(
                family=str(obj["family"]),
                window=int(obj["window"]),
                features=int(obj["features"]),
                hidden=tuple(int(h) for h in obj["hidden"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"bad architecture spec {obj!r}: {e}") from e
