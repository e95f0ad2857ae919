"""Which artifacts a model family can be exported to, and so which firmware profiles can run it.

The torch families export to every format and quantization a profile may name. The tree
families (:data:`~trainer.models.spec.TREE_FAMILIES`) export to ONNX fp32 only: skl2onnx
converts scikit-learn's forests to ONNX (``ai.onnx.ml`` tree-ensemble operators, which
onnxruntime runs), nothing converts them to TFLite without TensorFlow, and onnxruntime's
quantization leaves tree ensembles unchanged — an "int8" tree artifact would be the fp32 graph
under another name, so none is built. A profile that prefers int8 gets the fp32 artifact, and
says so in the registry (quantization ``fp32``); its agents pick it as they pick any variant
(:func:`shared.deployment.choose_variant`: the preferred format first).

Pure rules: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.profiles import FORMATS, QUANTIZATIONS, FirmwareProfile
from trainer.models.spec import TREE_FAMILIES

__all__ = ["TREE_EXPORTS", "TREE_EXPORT_REASON", "exportable", "profile_variant", "refusal"]

Variant = tuple[str, str]

TREE_EXPORTS: tuple[Variant, ...] = (("onnx", "fp32"),)
"""The only artifact of a tree family."""

TREE_EXPORT_REASON = (
    "ONNX fp32 only (skl2onnx; tree ensembles do not convert to TFLite without TensorFlow, and "
    "onnxruntime quantization leaves them unchanged)"
)
"""What a tree family exports to, and why (the end of a sentence)."""


def exportable(family: str) -> tuple[Variant, ...]:
    """Every ``(format, quantization)`` a model of ``family`` can be exported to."""
    if family in TREE_FAMILIES:
        return TREE_EXPORTS
    return tuple((f, q) for f in FORMATS for q in QUANTIZATIONS)


def profile_variant(family: str, profile: FirmwareProfile) -> Variant | None:
    """The artifact an agent of ``profile`` runs for a model of ``family``, or ``None`` when the
    profile allows none of its artifacts.

    Ranked as the agent ranks variants (:func:`shared.deployment.choose_variant`): the
    profile's preferred format and quantization, then its preferred format, then its preferred
    quantization, then the first by name.
    """
    allowed = [v for v in profile.variants() if v in exportable(family)]
    if not allowed:
        return None
    return min(allowed, key=lambda v: (v[0] != profile.preferred_format,
                                       v[1] != profile.preferred_quantization, v))


def refusal(families: Sequence[str], profiles: Sequence[FirmwareProfile]) -> str | None:
    """Why some of ``families`` cannot serve every profile of ``profiles`` (one line naming
    them and the first profile that allows none of their artifacts), or ``None``."""
    refused = [f for f in dict.fromkeys(families) if any(profile_variant(f, p) is None for p in profiles)]
    if not refused:
        return None
    # only the tree families export to fewer artifacts than a profile may allow
    assert all(f in TREE_FAMILIES for f in refused), refused
    p = next(p for p in profiles if profile_variant(refused[0], p) is None)
    allows = ", ".join(f"{f}/{q}" for f, q in p.variants())
    names = " and ".join(refused)
    what = f"the {names} family exports" if len(refused) == 1 else f"the {names} families export"
    return f"{what} to {TREE_EXPORT_REASON}, and profile {p.name} allows {allows} only"
