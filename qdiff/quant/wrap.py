"""Wrap a noise predictor's layers with quantized versions and initialise the quantizers explicitly.

Works on any ``nn.Module`` whose layers are in :data:`qdiff.quant.layers.LAYER_REGISTRY`; settings per
layer come from :class:`QuantConfig` (bits, first/last policy, overrides by name pattern). The
original model is never modified: ``wrap_model`` returns a copy.
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from qdiff.quant.config import OFF_BITS, QuantConfig
from qdiff.quant.layers import LAYER_REGISTRY, QuantLayer
from qdiff.quant.quantizer import UniformQuantizer


@dataclass
class LayerSpec:
    """Resolved settings of one quantized layer (also saved with a quantized model)."""

    name: str
    type: str
    weight_shape: list
    weight_bits: int
    act_bits: int
    split: int = 0
    #: Channel balancing of this layer's input (QuantConfig.smooth): a per-input-channel divisor is stored.
    smooth: bool = False
    #: Rank of this layer's full-precision low-rank branch (QuantConfig.lowrank); 0 = none.
    rank: int = 0
    #: Timestep groups of this layer's activation step sizes (QuantConfig.act_time_groups); 1 = one for all.
    time_groups: int = 1
    #: Input channels per weight step size (QuantConfig.weight_group_size) where this layer takes it; 0 = per channel.
    weight_group: int = 0
    #: Per-token dynamic step sizes of this layer's inputs (QuantConfig.act_dynamic).
    act_dynamic: bool = False


#: Modules whose linears compute the conditioning rather than the features: timestep / class / text embeddings and
#: the adaLN modulation of transformer blocks (diffusers' class names; matched on any ancestor of a layer).
CONDITIONING_MODULES = frozenset({
    "TimestepEmbedding", "LabelEmbedding", "CombinedTimestepLabelEmbeddings", "PixArtAlphaCombinedTimestepSizeEmbeddings",
    "PixArtAlphaTextProjection", "CombinedTimestepTextProjEmbeddings", "CombinedTimestepGuidanceTextProjEmbeddings",
    "AdaLayerNorm", "AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormSingle", "AdaLayerNormContinuous",
    "SD35AdaLayerNormZeroX", "TextImageProjection", "TextTimeEmbedding"})
#: Layers of the conditioning path by name: DiT's final adaLN modulation is a plain child of the model.
CONDITIONING_NAMES = ("proj_out_1",)


def conditioning_layers(model: nn.Module) -> set[str]:
    """Quantizable layers on the conditioning path (:data:`CONDITIONING_MODULES`, :data:`CONDITIONING_NAMES`)."""
    cond_prefixes = [n for n, m in model.named_modules() if n and type(m).__name__ in CONDITIONING_MODULES]
    out = set()
    for name, m in model.named_modules():
        if type(m) in LAYER_REGISTRY or isinstance(m, QuantLayer):
            if name in CONDITIONING_NAMES or any(name.startswith(p + ".") for p in cond_prefixes):
                out.add(name)
    return out


def resolve_layer_specs(model: nn.Module, cfg: QuantConfig, splits: dict[str, int], order: list[str] | None) -> list[LayerSpec]:
    """Per-layer bits after the conditioning-path and first/last policies and the overrides (later overrides win)."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in LAYER_REGISTRY]
    cond_layers = conditioning_layers(model) if cfg.cond_bits is not None else set()
    if order:
        rank = {n: i for i, n in enumerate(order)}
        executed = sorted((n for n, _ in layers if n in rank), key=rank.get)
    else:
        executed = [n for n, _ in layers]
    first_last = {executed[0], executed[-1]} if executed else set()
    specs = []
    for name, m in layers:
        wb = cfg.weight_bits if cfg.quantizes_weights else 32
        ab = cfg.act_bits if cfg.act_bits not in OFF_BITS else 32
        if name in cond_layers:
            wb = cfg.cond_bits if wb not in OFF_BITS else wb
            ab = cfg.cond_bits if ab not in OFF_BITS else ab
        if cfg.first_last_bits is not None and name in first_last:
            wb = cfg.first_last_bits if wb not in OFF_BITS else wb
            ab = cfg.first_last_bits if ab not in OFF_BITS else ab
        for o in cfg.overrides:
            if re.search(o.pattern, name):
                wb = o.weight_bits if o.weight_bits is not None else wb
                ab = o.act_bits if o.act_bits is not None else ab
                if o.act_quant is False:
                    ab = 32
                if o.weight_quant is False:
                    wb = 32
        split = splits.get(name, 0) if cfg.split else 0
        transformable = isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(m, "groups", 1) == 1
        smooth = cfg.smooth is not None and transformable and ab not in OFF_BITS
        fan_in = m.weight[0].numel()
        rank = min(cfg.lowrank, m.weight.shape[0], fan_in) if transformable and wb not in OFF_BITS else 0
        groups = cfg.act_time_groups if ab not in OFF_BITS else 1
        wgroup = weight_group(cfg.weight_group_size, m.weight.shape[1], split) if transformable and wb not in OFF_BITS else 0
        dynamic = bool(cfg.act_dynamic) and ab not in OFF_BITS
        specs.append(LayerSpec(name, type(m).__name__, list(m.weight.shape), wb, ab, split, smooth, rank, groups, wgroup,
                               dynamic))
    return specs


def weight_group(group_size: int, in_channels: int, split: int) -> int:
    """The group size a layer with ``in_channels`` inputs (split at ``split``) takes: ``group_size`` when every part's
    input channels are a multiple of it and more than it, else 0 (one step size per output channel)."""
    parts = [split, in_channels - split] if split else [in_channels]
    ok = group_size and all(p % group_size == 0 and p > group_size for p in parts)
    return int(group_size) if ok else 0


def wrap_model(model: nn.Module, cfg: QuantConfig, specs: list[LayerSpec]) -> nn.Module:
    """A copy of ``model`` with every layer in ``specs`` replaced by a :class:`QuantLayer`."""
    q = copy.deepcopy(model)
    by_name = dict(q.named_modules())
    for s in specs:
        org = by_name.get(s.name)
        if org is None or type(org).__name__ != s.type or list(org.weight.shape) != list(s.weight_shape):
            found = "missing" if org is None else f"{type(org).__name__}{tuple(org.weight.shape)}"
            raise ValueError(f"layer '{s.name}' does not match the model (expected {s.type}{tuple(s.weight_shape)}, found {found})")
        layer = QuantLayer(org, s.weight_bits, s.act_bits, cfg.weight_symmetric, cfg.act_symmetric, s.split, s.smooth, s.rank,
                           s.time_groups, s.weight_group, s.act_dynamic)
        q.set_submodule(s.name, layer.to(org.weight.device))
    if any(s.time_groups > 1 for s in specs):
        from qdiff.quant.timegroups import install_timestep_hook

        install_timestep_hook(q)
    if cfg.attn_bits is not None:
        from qdiff.quant.attention import install_attention_quant

        install_attention_quant(q, cfg.attn_bits, cfg.act_symmetric)
    q.eval().requires_grad_(False)
    return q


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def act_quantizers(model: nn.Module, calibrated: bool = False) -> list[tuple[str, UniformQuantizer]]:
    """Every activation quantizer (layer inputs and attention matmuls) that will quantize; ``calibrated=True``: only
    those with a step size set from data (not the per-token dynamic ones, which compute theirs at run time)."""
    if calibrated:
        return [(n, q) for n, q in act_quantizers(model) if not q.dynamic]
    out = []
    for n, m in model.named_modules():
        if isinstance(m, QuantLayer):
            out += [(f"{n}.aq.{i}", q) for i, q in enumerate(m.aq) if q.bits < 16]
        elif type(m).__name__ == "AttnMatmulQuantizers":
            out += [(f"{n}.{k}", getattr(m, k)) for k in ("q", "k", "v") if getattr(m, k).bits < 16]
    return out


@torch.no_grad()
def init_weight_quantizers(model: nn.Module, method: str, p: float = 2.4) -> None:
    """Channel-wise scale/zero point of every weight quantizer (min-max or Lp grid search). Data-free."""
    for _, layer in quant_layers(model):
        for q, w in zip(layer.wq, layer.weight_parts()):
            if isinstance(q, UniformQuantizer):
                q.init_from(w, method, p)
        layer.invalidate_cache()


@contextmanager
def activations_fp(model: nn.Module) -> Iterator[None]:
    """Within the ``with``, every activation quantizer of ``model`` passes its input through (weights stay
    quantized): calibration statistics and AdaRound see FP activations. Each quantizer's switch is restored."""
    qs = [q for _, q in act_quantizers(model)]
    before = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield
    finally:
        for q, e in zip(qs, before):
            q.enabled = e
