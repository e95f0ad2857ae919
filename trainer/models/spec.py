"""The JSON-able architecture spec that builds (and later rebuilds) a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CENTERINGS", "FAMILIES", "ArchitectureSpec", "SpecError"]

FAMILIES = ("autoencoder", "forecaster")
CENTERINGS = ("window", "train")


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

    ``centering`` says where the body's input is centred: ``window`` subtracts each window's
    own per-metric mean (the model sees the window's shape, and adds that mean back to its
    output), ``train`` the training mean. Both scale by the training standard deviation.
    Window centring makes the model translation-equivariant: after a level shift the error
    spikes while the window straddles the step, then returns to the noise level once the
    window holds only the new level — the new normal stops being an error. Centred on the
    training mean, a model trained on one level keeps forecasting that level after a shift,
    and its error stays high for as long as the shift lasts (docs/model-choice.md).
    Specs recorded without the field (older versions) were trained with ``train``.

    ``season`` (forecasters only; 0 = none) adds seasonal context: besides the last ``window``
    rows, the body sees the ``2 * season_halfwidth + 1`` rows centred one season (``season``
    rows, e.g. one day) before the row it forecasts, centred on the same level. A daily
    pattern that skips a beat is then an error, and a recurring daily event is not. The
    model's input grows to :attr:`input_rows` rows (what the agent buffers); the body's only
    to ``window - 1 + 2 * season_halfwidth + 1`` values per metric.
    """

    family: str
    window: int
    features: int
    hidden: tuple[int, ...]
    centering: str = "window"
    season: int = 0
    season_halfwidth: int = 8

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.centering not in CENTERINGS:
            raise SpecError(f"unknown centering {self.centering!r}; known: {', '.join(CENTERINGS)}")
        if self.window < 2 or self.features < 1 or not self.hidden or min(self.hidden) < 1:
            raise SpecError("spec needs window >= 2, features >= 1 and positive hidden widths")
        if self.season:
            if self.family != "forecaster":
                raise SpecError("seasonal context (season > 0) needs the forecaster family")
            if self.season_halfwidth < 0 or self.season - self.season_halfwidth < self.window:
                raise SpecError(
                    "season needs season_halfwidth >= 0 and season - season_halfwidth >= window "
                    "(a shorter season lies inside the window already)"
                )

    @property
    def input_rows(self) -> int:
        """Rows of one model input: ``window``, or back to one season and its half-width."""
        return max(self.window, self.season + self.season_halfwidth + 1) if self.season else self.window

    @property
    def score_kind(self) -> str:
        return "reconstruction_mae" if self.family == "autoencoder" else "forecast_mae"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        if not self.season:  # as older versions recorded it
            del d["season"], d["season_halfwidth"]
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ArchitectureSpec:
        try:
            return cls(
                family=str(obj["family"]),
                window=int(obj["window"]),
                features=int(obj["features"]),
                hidden=tuple(int(h) for h in obj["hidden"]),
                centering=str(obj.get("centering", "train")),
                season=int(obj.get("season", 0)),
                season_halfwidth=int(obj.get("season_halfwidth", 8)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"bad architecture spec {obj!r}: {e}") from e
