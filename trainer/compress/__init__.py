"""Compression recipes for registered models: ``edgefleet compress``.

A recipe (:func:`parse_recipe`) is a sequence of steps, one module each behind the
:class:`CompressionStep` contract: structured pruning, fine-tuning, low-rank factorization,
unstructured sparsity, distillation and quantization. :func:`compress` applies one to a
registered version, measures every step in the artifacts that ship and registers the result.
"""

from trainer.compress._base import (
    CompressError,
    CompressionStep,
    ExportChoice,
    ModelState,
    RecipeError,
    StepData,
)
from trainer.compress.measure import StepRow
from trainer.compress.recipe import STEPS, CompressionRecipe, parse_recipe
from trainer.compress.run import (
    CompressOutcome,
    CompressRequest,
    QualityGateError,
    compress,
    prepare,
)

__all__ = [
    "STEPS",
    "CompressError",
    "CompressOutcome",
    "CompressRequest",
    "CompressionRecipe",
    "CompressionStep",
    "ExportChoice",
    "ModelState",
    "QualityGateError",
    "RecipeError",
    "StepData",
    "StepRow",
    "compress",
    "parse_recipe",
    "prepare",
]
