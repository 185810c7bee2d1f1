"""Typed quantization settings (the ``quant/`` config group)."""
from __future__ import annotations

from dataclasses import dataclass, field

from qdiff.errors import ConfigError, config_from_dict
from qdiff.resolvers import register_resolvers

register_resolvers()  # quant/ files use qdiff_for (run.py registers it too, before Hydra composes)

METHODS = ("fp", "linear", "qdiff")
OFF_BITS = (16, 32)
SCALE_METHODS = ("minmax", "mse")


def transform_tags(smooth: float | None, lowrank: int | None, act_time_groups: int | None, act_bits: int,
                   weight_group_size: int | None = 0, act_dynamic: bool | None = False, weight_bits: int = 4) -> list[str]:
    """Short tags of the methods added to the paper's (``QuantConfig.transforms``; the report reads a job's config
    with it): e.g. ['smooth0.5', 'lr8', 'tg4', 'wg32', 'dyn']; empty for the paper's method."""
    out = [f"smooth{float(smooth):g}"] if smooth is not None else []
    if lowrank:
        out.append(f"lr{int(lowrank)}")
    if act_time_groups and int(act_time_groups) > 1 and act_bits not in OFF_BITS:
        out.append(f"tg{int(act_time_groups)}")
    if weight_group_size and weight_bits not in OFF_BITS:
        out.append(f"wg{int(weight_group_size)}")
    if act_dynamic and act_bits not in OFF_BITS:
        out.append("dyn")
    return out


def quant_label(weight_bits: int, act_bits: int) -> str:
    """Paper-style bit label, e.g. W4A8 (full precision: W32A32)."""
    return f"W{weight_bits}A{act_bits}"


def check_bits(value: int | None, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not (2 <= value <= 8 or value in OFF_BITS):
        raise ConfigError(f"{name} must be an integer in 2..8, or 16/32 for 'not quantized'; got {value!r}")


@dataclass
class LayerOverride:
    """Per-layer exception, matched by regex (``re.search``) on the module's qualified name."""

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    #: False keeps this layer's input activations in full precision.
    act_quant: bool | None = None
    #: False keeps this layer's weights in full precision.
    weight_quant: bool | None = None

    def __post_init__(self) -> None:
        import re

        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError(f"quant.overrides: bad pattern {self.pattern!r}: {e}") from None
        check_bits(self.weight_bits, "quant.overrides.weight_bits", allow_none=True)
        check_bits(self.act_bits, "quant.overrides.act_bits", allow_none=True)


@dataclass
class QuantConfig:
    #: fp (no quantization) | linear (channel-wise round-to-nearest baseline) | qdiff (the paper's method).
    method: str = "qdiff"
    #: Weight bits: 2..8, or 16/32 = weights stay FP.
    weight_bits: int = 4
    #: Activation bits (inputs of every Conv/Linear): 2..8, or 16/32 = activations stay FP.
    act_bits: int = 8
    #: Symmetric weight ranges (asymmetric by default, as in the paper's code).
    weight_symmetric: bool = False
    #: Symmetric activation ranges.
    act_symmetric: bool = False
    #: How ranges are initialised: minmax | mse (Lp-error grid search); None = minmax for linear, mse for qdiff.
    scale_method: str | None = None
    #: p of the Lp error used by the mse grid search.
    lp: float = 2.4
    #: Quantize attention matmul inputs (q, k, softmax, v) at these bits; None keeps them FP as in the paper.
    attn_bits: int | None = None
    #: Shortcut splitting: quantize the up-path and skip halves of concatenated inputs separately.
    split: bool = True
    #: Split points by layer name, {layer: channels of the first part}: added to the detected ones (and winning
    #: over them), for networks whose concatenations the detection cannot follow. Used when ``split`` is on.
    split_layers: dict = field(default_factory=dict)
    #: Bits of the first and last layer (weights and input activations); None = same as every other layer.
    first_last_bits: int | None = None
    #: Bits of the conditioning path (weights and input activations): the timestep/class/text embedding linears and
    #: the adaLN modulation linears of transformer blocks (:func:`qdiff.quant.wrap.conditioning_layers`). None = the
    #: same as every other layer (the paper quantizes every layer); 32 keeps them FP. Logged and recorded per run.
    cond_bits: int | None = None
    #: Per-layer exceptions by name pattern (e.g. the paper's DDIM CIFAR-10 residual convs at 8 bit, act FP).
    overrides: list = field(default_factory=list)
    #: Channel balancing (SmoothQuant, Xiao et al. 2023): each quantized layer's input channel j is divided by
    #: s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha) and its weights multiplied by it (FP output unchanged), moving
    #: activation outliers into the weights. None = off (the paper); a float in (0, 1] = alpha. Conv1d/Conv2d/Linear.
    smooth: float | None = None
    #: Low-rank branch (SVDQuant, Li et al. 2025): the top-``lowrank`` singular directions of each quantized
    #: weight (after smoothing) run in full precision on the unquantized input; only the residual is quantized.
    #: 0 = off (the paper). Capped per layer at min(out, fan-in). Conv1d/Conv2d/Linear with groups=1.
    lowrank: int = 0
    #: Timestep-aware activation step sizes (TDQ / TFMQ-DM / ViDiT-Q): the calibration timesteps cut into this many
    #: groups of equal count, one step size and zero point per group in every layer-input quantizer (attention
    #: matmuls keep one). 1 = one for all timesteps (the paper). The int8 backend cannot run them (per-sample scales).
    act_time_groups: int = 1
    #: Group-wise weight scales: one step size per output channel and group of this many input channels (of
    #: Linear/Conv1d/Conv2d layers whose input channels, per split part, are a multiple of it and more than it;
    #: the others keep one per output channel). 0 = one per output channel (the paper). The int8 backend cannot run them.
    weight_group_size: int = 0
    #: Per-token dynamic activation scales: every token (a Linear input's row, a conv input's pixel) of every
    #: layer input is quantized with its own min/max at run time; nothing is calibrated or learned for layer inputs
    #: (attention matmuls keep their static step size). False = one calibrated step size per tensor (the paper).
    #: The int8 backend cannot run them.
    act_dynamic: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown quant.method '{self.method}'; known: {', '.join(METHODS)}")
        check_bits(self.weight_bits, "quant.weight_bits")
        check_bits(self.act_bits, "quant.act_bits")
        check_bits(self.attn_bits, "quant.attn_bits", allow_none=True)
        check_bits(self.first_last_bits, "quant.first_last_bits", allow_none=True)
        check_bits(self.cond_bits, "quant.cond_bits", allow_none=True)
        # a quant/ file's method-dependent default (``qdiff_for``) gives None for the other methods: off
        self.lowrank = 0 if self.lowrank is None else self.lowrank
        self.act_time_groups = 1 if self.act_time_groups is None else self.act_time_groups
        self.act_dynamic = False if self.act_dynamic is None else self.act_dynamic
        if self.smooth is not None and (isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float))
                                        or not 0 < self.smooth <= 1):
            raise ConfigError(f"quant.smooth must be null (off) or the migration strength alpha in (0, 1], got {self.smooth!r}")
        if isinstance(self.lowrank, bool) or not isinstance(self.lowrank, int) or self.lowrank < 0:
            raise ConfigError(f"quant.lowrank must be a rank >= 0 (0 = off), got {self.lowrank!r}")
        if isinstance(self.act_time_groups, bool) or not isinstance(self.act_time_groups, int) or self.act_time_groups < 1:
            raise ConfigError(f"quant.act_time_groups must be an integer >= 1 (1 = off), got {self.act_time_groups!r}")
        self.weight_group_size = 0 if self.weight_group_size is None else self.weight_group_size
        if (isinstance(self.weight_group_size, bool) or not isinstance(self.weight_group_size, int)
                or self.weight_group_size < 0):
            raise ConfigError(f"quant.weight_group_size must be an integer >= 0 (0 = one scale per output channel), "
                              f"got {self.weight_group_size!r}")
        if not isinstance(self.act_dynamic, bool):
            raise ConfigError(f"quant.act_dynamic must be true or false, got {self.act_dynamic!r}")
        if self.act_dynamic and self.act_time_groups > 1:
            raise ConfigError("quant.act_dynamic=true computes every token's step size at run time; it does not combine "
                              f"with timestep groups of calibrated step sizes (quant.act_time_groups={self.act_time_groups})")
        if self.scale_method is not None and self.scale_method not in SCALE_METHODS:
            raise ConfigError(f"quant.scale_method must be one of {SCALE_METHODS} or null, got '{self.scale_method}'")
        if not self.lp > 0:
            raise ConfigError(f"quant.lp must be > 0, got {self.lp}")
        if self.method != "fp" and self.weight_bits in OFF_BITS and self.act_bits in OFF_BITS and self.attn_bits is None:
            self.method = "fp"  # nothing to quantize: a W32A32 grid point is the FP baseline
        if self.method == "fp":  # FP is W32A32 whatever bits the composed config carried
            self.weight_bits, self.act_bits, self.attn_bits, self.first_last_bits, self.cond_bits = 32, 32, None, None, None
            self.smooth, self.lowrank, self.act_time_groups = None, 0, 1
            self.weight_group_size, self.act_dynamic = 0, False
        if not isinstance(self.split_layers, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in self.split_layers.items()):
            raise ConfigError(f"quant.split_layers must map layer names to a positive channel count, got {self.split_layers!r}")
        self.split_layers = dict(self.split_layers)
        self.overrides = [
            o if isinstance(o, LayerOverride) else config_from_dict(LayerOverride, o, "quant.overrides")
            for o in self.overrides
        ]

    @property
    def enabled(self) -> bool:
        return self.quantizes_weights or self.quantizes_acts

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits not in OFF_BITS

    @property
    def quantizes_acts(self) -> bool:
        return self.act_bits not in OFF_BITS or self.attn_bits is not None

    @property
    def resolved_scale_method(self) -> str:
        return self.scale_method or ("minmax" if self.method == "linear" else "mse")

    @property
    def transforms(self) -> list[str]:
        """The methods added to the paper's, as short tags (empty for the paper's method): e.g. ['smooth0.5', 'lr16']."""
        return transform_tags(self.smooth, self.lowrank, self.act_time_groups, self.act_bits, self.weight_group_size,
                              self.act_dynamic, self.weight_bits)

    @property
    def label(self) -> str:
        """Paper-style bit label, e.g. W4A8 (FP: W32A32)."""
        return quant_label(self.weight_bits, self.act_bits)
