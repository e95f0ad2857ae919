"""The JSON-able architecture spec that builds (and later rebuilds) a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ATTENTION_HEADS",
    "CENTERINGS",
    "CONV_DILATIONS",
    "CONV_KERNEL",
    "FAMILIES",
    "FORECASTING_FAMILIES",
    "ISOLATION_SAMPLES",
    "TREE_DEPTH",
    "TREE_ESTIMATORS",
    "TREE_FAMILIES",
    "ArchitectureSpec",
    "SpecError",
]

FAMILIES = ("autoencoder", "forecaster", "linear", "conv", "attention", "trees", "isolation_forest")
FORECASTING_FAMILIES = ("forecaster", "linear", "conv", "attention", "trees")
"""The families that predict a window's last row from the rows before it (the rest reconstruct,
or, for ``isolation_forest``, isolate)."""
TREE_FAMILIES = ("trees", "isolation_forest")
"""The families built by scikit-learn (not torch): exported to ONNX only, never quantized."""
CENTERINGS = ("window", "train")
# Hidden-layer activations of the MLP families (forecaster, autoencoder); relu is the default.
ACTIVATIONS = ("relu", "gelu", "tanh")
MLP_FAMILIES = ("forecaster", "autoencoder")
CONV_KERNEL = 3
CONV_DILATIONS = (1, 2, 4, 8)
ATTENTION_HEADS = 4
TREE_ESTIMATORS = 100
TREE_DEPTH = 8
ISOLATION_SAMPLES = 256


class SpecError(ValueError):
    """An architecture spec is malformed."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything needed to build a model's graph (not its weights).

    ``family`` is one of:

    - ``autoencoder``: an MLP reconstructs the normalised window; score = mean reconstruction
      error. ``hidden`` lists the widths of its hidden layers; the last is the bottleneck and
      the decoder mirrors the encoder.
    - ``forecaster``: an MLP predicts the window's last row from the rows before it; score =
      forecast error. ``hidden`` lists the widths of its hidden layers.
    - ``linear``: one linear map (a linear autoregression; the training's weight decay is an L2
      penalty) predicts the last row from the normalised rows before it. ``hidden`` is empty.
    - ``conv``: causal dilated Conv1d blocks (a temporal convolutional network) over the rows
      before the last, then a linear head on the last time step predicts the last row.
      ``hidden`` lists the channel width of each block and ``dilations`` its dilation (one
      per block), ``kernel`` is every block's kernel size and ``residual`` adds each block's
      input to its output (through a 1x1 convolution where the widths differ). The head sees
      ``1 + (kernel - 1) * sum(dilations)`` rows back (its receptive field), at most the
      ``window - 1`` rows it is given.
    - ``attention``: a small self-attention encoder over the rows before the last: each row is
      projected to ``width`` channels plus a learned positional embedding, then one block per
      ``hidden`` entry (multi-head self-attention with ``heads`` heads, then a two-layer MLP of
      ``2 * width``, each with a residual connection and LayerNorm); a linear head on the last
      position predicts the last row. Every ``hidden`` entry is the same ``width``, divisible
      by ``heads``.
    - ``trees``: a random forest (scikit-learn ``RandomForestRegressor``) of ``n_estimators``
      trees of depth at most ``max_depth`` predicts the last row from the normalised rows before
      it, as the other forecasters do. ``hidden`` is empty.
    - ``isolation_forest``: scikit-learn's ``IsolationForest`` of ``n_estimators`` trees, each
      grown on ``max_samples`` windows, over the normalised window (all its rows, flattened);
      score = the forest's anomaly score ``s(x, n)`` of Liu et al. (2008), in (0, 1], higher =
      more anomalous (scikit-learn's ``-score_samples``). ``hidden`` is empty.

    The two tree families (:data:`TREE_FAMILIES`) are trained by scikit-learn and exported by
    skl2onnx, to ONNX only (fp32: onnxruntime's quantization leaves tree ensembles unchanged).

    The five forecasting families (:data:`FORECASTING_FAMILIES`) share one contract: same
    input rows, same centring, same score.

    ``centering`` says where the body's input is centred: ``window`` subtracts each window's
    own per-metric mean (the model sees the window's shape, and adds that mean back to its
    output), ``train`` the training mean. Both scale by the training standard deviation.
    Window centring makes the model translation-equivariant: after a level shift the error
    spikes while the window straddles the step, then returns to the noise level once the
    window holds only the new level — the new normal stops being an error. Centred on the
    training mean, a model trained on one level keeps forecasting that level after a shift,
    and its error stays high for as long as the shift lasts (docs/model-choice.md).
    Specs recorded without the field (older versions) were trained with ``train``.

    ``season`` (forecasting families only; 0 = none) adds seasonal context: besides the last ``window``
    rows, the body sees the ``2 * season_halfwidth + 1`` rows centred one season (``season``
    rows, e.g. one day) before the row it forecasts, centred on the same level. A daily
    pattern that skips a beat is then an error, and a recurring daily event is not. The
    model's input grows to :attr:`input_rows` rows (what the agent buffers); the body's only
    to ``window - 1 + 2 * season_halfwidth + 1`` values per metric.

    ``activation`` (the MLP families, forecaster and autoencoder, only): the activation after
    each hidden layer, ``relu`` (the default), ``gelu`` or ``tanh``.

    ``layers`` records where a compressed model (``edgefleet compress``, :mod:`trainer.compress`)
    departs from the shapes the other fields build: module path → ``(out, in)`` for a
    ``nn.Linear`` or ``nn.Conv1d`` resized by structured pruning (a convolution keeps its kernel,
    dilation and padding), or ``(out, rank, in)`` for a ``nn.Linear`` factorized into
    ``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``. The other fields keep the values
    the model was first built with (a conv block keeps its residual projection even when pruning
    made its widths equal), so the spec still rebuilds exactly the compressed graph. Empty for
    every trained model.
    """

    family: str
    window: int
    features: int
    hidden: tuple[int, ...]
    centering: str = "window"
    season: int = 0
    season_halfwidth: int = 8
    kernel: int = CONV_KERNEL
    dilations: tuple[int, ...] = ()
    residual: bool = True
    heads: int = ATTENTION_HEADS
    n_estimators: int = TREE_ESTIMATORS
    max_depth: int = TREE_DEPTH
    max_samples: int = ISOLATION_SAMPLES
    layers: tuple[tuple[str, tuple[int, ...]], ...] = ()
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.centering not in CENTERINGS:
            raise SpecError(f"unknown centering {self.centering!r}; known: {', '.join(CENTERINGS)}")
        if self.window < 2 or self.features < 1:
            raise SpecError("spec needs window >= 2 and features >= 1")
        if self.family == "linear" or self.family in TREE_FAMILIES:
            if self.hidden:
                raise SpecError(f"the {self.family} family has no hidden layers: hidden must be empty")
        elif not self.hidden or min(self.hidden) < 1:
            raise SpecError(f"the {self.family} family needs positive hidden widths")
        if self.family == "conv":
            if self.kernel < 1 or len(self.dilations) != len(self.hidden) or min(self.dilations) < 1:
                raise SpecError(
                    "the conv family needs kernel >= 1 and one positive dilation per hidden width "
                    f"(hidden {list(self.hidden)}, dilations {list(self.dilations)})"
                )
        elif self.dilations or self.kernel != CONV_KERNEL or not self.residual:
            raise SpecError(
                f"kernel, dilations and residual are conv parameters: the {self.family} family "
                "takes their defaults"
            )
        if self.family == "attention":
            width = self.hidden[0]
            if self.heads < 1 or len(set(self.hidden)) != 1 or width % self.heads:
                raise SpecError(
                    "the attention family needs one width for every block, divisible by heads >= 1 "
                    f"(hidden {list(self.hidden)}, heads {self.heads})"
                )
        elif self.heads != ATTENTION_HEADS:
            raise SpecError(f"heads is an attention parameter: the {self.family} family takes its default")
        self._check_tree_parameters()
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        if self.activation != "relu" and self.family not in MLP_FAMILIES:
            raise SpecError(f"activation is a parameter of the MLP families ({', '.join(MLP_FAMILIES)}): "
                            f"the {self.family} family takes relu")
        if self.layers and self.tree_ensemble:
            raise SpecError(f"layers are compressed torch layers: the {self.family} family has none")
        for path, shape in self.layers:
            if not path or len(shape) not in (2, 3) or min(shape) < 1:
                raise SpecError(
                    f"layers: {path!r} needs (out, in) or (out, rank, in) of positive sizes, got {list(shape)}"
                )
        if self.season:
            if self.family not in FORECASTING_FAMILIES:
                raise SpecError(
                    "seasonal context (season > 0) needs a forecasting family "
                    f"({', '.join(FORECASTING_FAMILIES)})"
                )
            if self.season_halfwidth < 0 or self.season - self.season_halfwidth < self.window:
                raise SpecError(
                    "season needs season_halfwidth >= 0 and season - season_halfwidth >= window "
                    "(a shorter season lies inside the window already)"
                )

    def _check_tree_parameters(self) -> None:
        own = {"trees": ("n_estimators", "max_depth"),
               "isolation_forest": ("n_estimators", "max_samples")}.get(self.family, ())
        defaults = {"n_estimators": TREE_ESTIMATORS, "max_depth": TREE_DEPTH, "max_samples": ISOLATION_SAMPLES}
        lowest = {"n_estimators": 1, "max_depth": 1, "max_samples": 2}
        for name, default in defaults.items():
            value = getattr(self, name)
            if name not in own and value != default:
                raise SpecError(f"{name} is a parameter of another family: the {self.family} family "
                                "takes its default")
            if value < lowest[name]:
                raise SpecError(f"the {self.family} family needs {name} >= {lowest[name]}, got {value}")

    @property
    def tree_ensemble(self) -> bool:
        """Whether scikit-learn builds the model (one of :data:`TREE_FAMILIES`)."""
        return self.family in TREE_FAMILIES

    @property
    def input_rows(self) -> int:
        """Rows of one model input: ``window``, or back to one season and its half-width."""
        return max(self.window, self.season + self.season_halfwidth + 1) if self.season else self.window

    @property
    def forecasts(self) -> bool:
        """Whether the model predicts the last row (one of :data:`FORECASTING_FAMILIES`)."""
        return self.family in FORECASTING_FAMILIES

    @property
    def receptive_field(self) -> int:
        """Rows the conv family's head sees back from the last row it is given (1 otherwise)."""
        return 1 + (self.kernel - 1) * sum(self.dilations) if self.family == "conv" else 1

    @property
    def score_kind(self) -> str:
        if self.family == "isolation_forest":
            return "isolation_score"
        return "forecast_mae" if self.forecasts else "reconstruction_mae"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["dilations"] = list(self.dilations)
        d["layers"] = {path: list(shape) for path, shape in self.layers}
        if not self.layers:  # as uncompressed models always recorded it
            del d["layers"]
        if not self.season:  # as older versions recorded it
            del d["season"], d["season_halfwidth"]
        if self.family != "conv":  # conv parameters only where they mean something
            del d["kernel"], d["dilations"], d["residual"]
        if self.family != "attention":
            del d["heads"]
        if self.family != "trees":  # tree parameters only in the families they shape
            del d["max_depth"]
        if self.family != "isolation_forest":
            del d["max_samples"]
        if not self.tree_ensemble:
            del d["n_estimators"]
        if self.activation == "relu":  # as specs recorded before the choice existed
            del d["activation"]
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
                kernel=int(obj.get("kernel", CONV_KERNEL)),
                dilations=tuple(int(d) for d in obj.get("dilations", ())),
                residual=_boolean(obj.get("residual", True)),
                heads=int(obj.get("heads", ATTENTION_HEADS)),
                n_estimators=int(obj.get("n_estimators", TREE_ESTIMATORS)),
                max_depth=int(obj.get("max_depth", TREE_DEPTH)),
                max_samples=int(obj.get("max_samples", ISOLATION_SAMPLES)),
                activation=str(obj.get("activation", "relu")),
                layers=tuple(
                    (str(path), tuple(int(n) for n in shape))
                    for path, shape in sorted(dict(obj.get("layers", {})).items())
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"bad architecture spec {obj!r}: {e}") from e


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"residual must be true or false, got {value!r}")
    return value
