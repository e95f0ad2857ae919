"""``quantize:int8|fp32|dynamic[:per-channel|per-tensor]``: how the artifacts are quantized.

- ``int8``: static post-training quantization, calibrated on :data:`CALIBRATION` (each
  format's default granularity: ONNX QDQ per-channel int8 weights with 16-bit activations,
  TFLite full int8 with per-tensor weights; ``per-channel`` / ``per-tensor`` choose it);
- ``dynamic``: int8 weights, activations quantized at run time (onnxruntime
  ``quantize_dynamic``, LiteRT dynamic-range), shipped as ``int8`` artifacts whose bundle
  records ``quantization_scheme: dynamic``;
- ``fp32``: no quantization.

The step only chooses the export; the rows after it measure that artifact. It must be the
recipe's last step. Calibration set (static int8): :data:`CALIBRATION`.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainer.compress._base import CompressionStep, ExportChoice, ModelState, RecipeError, StepData

__all__ = ["CALIBRATION", "Quantization"]

CALIBRATION = ("256 windows spread evenly over the training and validation windows of --data "
               "(the set edgefleet train calibrates on)")
_MODES = ("int8", "fp32", "dynamic")
_GRANULARITIES = ("per-channel", "per-tensor")


class Quantization(CompressionStep):
    name = "quantize"

    def __init__(self, mode: str, granularity: str | None = None) -> None:
        self.mode, self.granularity = mode, granularity

    @classmethod
    def parse(cls, args: Sequence[str]) -> Quantization:
        if not args or args[0] not in _MODES:
            raise RecipeError(f"quantize needs one of {', '.join(_MODES)}, e.g. quantize:int8")
        if len(args) > 2 or (len(args) == 2 and args[1] not in _GRANULARITIES):
            raise RecipeError(f"quantize:{args[0]} takes at most one option, {' or '.join(_GRANULARITIES)}")
        granularity = args[1] if len(args) == 2 else None
        if granularity and args[0] != "int8":
            raise RecipeError(f"quantize:{args[0]} takes no granularity (static int8 only)")
        return cls(args[0], granularity)

    @property
    def token(self) -> str:
        return f"quantize:{self.mode}" + (f":{self.granularity}" if self.granularity else "")

    @property
    def choice(self) -> ExportChoice:
        if self.mode == "fp32":
            return ExportChoice("fp32")
        if self.mode == "dynamic":
            return ExportChoice("int8", "dynamic")
        return ExportChoice("int8", self.granularity or "static")

    def apply(self, state: ModelState, data: StepData) -> ModelState:
        return state.replace(export=self.choice)
