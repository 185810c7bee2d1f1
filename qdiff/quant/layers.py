"""Quantized Conv1d/Conv2d/ConvTranspose2d/Linear: weight quantizer(s) + input-activation quantizer(s).

With shortcut splitting (``split > 0``) the input channels [0, split) and [split, C) — the up-path
feature and the skip feature of a UNet concatenation — get separate activation and weight quantizers.
The fake-quantized weight is cached and recomputed only when a quantizer changes, so sampling with a
quantized model costs about as much as FP sampling.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.quant.adaround import AdaRoundQuantizer
from qdiff.quant.config import quant_label
from qdiff.quant.quantizer import DynamicTokenQuantizer, UniformQuantizer, fake_quant_, needs_no_grad

#: Module classes that have a quantized wrapper: class -> functional forward(x, w, b, **kw).
LAYER_REGISTRY: dict[type, Callable] = {}


def register_layer(cls: type, fn: Callable) -> None:
    """Quantize modules of class ``cls`` with :class:`QuantLayer`, computing outputs with ``fn``."""
    LAYER_REGISTRY[cls] = fn


register_layer(nn.Linear, F.linear)
register_layer(nn.Conv1d, F.conv1d)
register_layer(nn.Conv2d, F.conv2d)
register_layer(nn.ConvTranspose2d, F.conv_transpose2d)


def _fwd_kwargs(m: nn.Module) -> dict:
    if isinstance(m, nn.Linear):
        return {}
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise NotImplementedError(f"{type(m).__name__} with padding_mode={m.padding_mode} is not supported")
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    if isinstance(m, nn.ConvTranspose2d):
        kw["output_padding"] = m.output_padding
    return kw


def smooth_input(x: torch.Tensor, smooth: torch.Tensor, linear: bool) -> torch.Tensor:
    """``x`` divided by per-input-channel smoothing factors (last axis of a Linear's input, axis 1 of a conv's)."""
    return x / (smooth if linear else smooth.view(-1, *([1] * (x.dim() - 2))))


def lowrank_branch(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, fn: Callable, kw: dict, linear: bool) -> torch.Tensor:
    """``x`` through a rank-r weight ``up @ down``: the layer's op with ``down`` (r outputs), then ``up``.

    A conv's ``up`` is a 1x1 projection over r channels, run as one batched matmul: with a 1x1 conv instead the
    digits UNet's branches took 1.04-2.2x as long, 1.37x summed over a forward (experiments/benchmarks/bench_lowrank.py)."""
    if linear:
        return F.linear(F.linear(x, down), up)
    h = fn(x, down, None, **kw)
    return torch.matmul(up, h.flatten(2)).view(h.shape[0], up.shape[0], *h.shape[2:])


def _hooked(m: nn.Module) -> bool:
    from torch.nn.modules import module as _mod

    return bool(m._forward_pre_hooks or m._forward_hooks or _mod._global_forward_pre_hooks or _mod._global_forward_hooks)


class QuantLayer(nn.Module):
    """Drop-in replacement of a registered layer. Settings are per layer, resolved by the wrapper."""

    def __init__(self, org: nn.Module, weight_bits: int, act_bits: int, weight_symmetric: bool = False,
                 act_symmetric: bool = False, split: int = 0, smooth: bool = False, rank: int = 0,
                 time_groups: int = 1, weight_group: int = 0, act_dynamic: bool = False) -> None:
        super().__init__()
        self.org_type = type(org).__name__
        self.fn = LAYER_REGISTRY[type(org)]
        self.fwd_kwargs = _fwd_kwargs(org)
        self.weight = nn.Parameter(org.weight.detach().clone(), requires_grad=False)
        self.bias = None if org.bias is None else nn.Parameter(org.bias.detach().clone(), requires_grad=False)
        transposed = isinstance(org, nn.ConvTranspose2d)
        # Channel-wise along output channels; split along input channels.
        self.out_axis, self.in_axis = (1, 0) if transposed else (0, 1)
        in_ch = self.weight.shape[self.in_axis] * (1 if transposed else self.fwd_kwargs.get("groups", 1))
        if split and not (0 < split < in_ch) or split and self.fwd_kwargs.get("groups", 1) != 1:
            raise ValueError(f"bad split {split} for {self.org_type} with {in_ch} input channels")
        self.split = int(split)
        n = 2 if self.split else 1
        if weight_group and (transposed or self.fwd_kwargs.get("groups", 1) != 1):
            raise ValueError(f"group-wise weight scales: not for {self.org_type} with groups != 1 or transposed")
        self.weight_group = int(weight_group)
        self.wq = nn.ModuleList(UniformQuantizer(weight_bits, weight_symmetric, self.out_axis, group_size=self.weight_group)
                                for _ in range(n))
        if act_dynamic and act_bits < 16:
            self.aq = nn.ModuleList(DynamicTokenQuantizer(act_bits, act_symmetric, -1 if self.org_type == "Linear" else 1)
                                    for _ in range(n))
        elif time_groups > 1 and act_bits < 16:
            from qdiff.quant.timegroups import TimestepQuantizer

            self.aq = nn.ModuleList(TimestepQuantizer(act_bits, act_symmetric, time_groups) for _ in range(n))
        else:
            self.aq = nn.ModuleList(UniformQuantizer(act_bits, act_symmetric, None, learnable_scale=True, required=False)
                                    for _ in range(n))
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self._cache: tuple | None = None
        # Transforms (qdiff.quant.transforms): a per-input-channel divisor of the input, folded into the weight, and
        # a full-precision low-rank branch W ~ up @ down on the (divided) input; `weight` then holds the residual.
        if (smooth or rank) and (transposed or self.fwd_kwargs.get("groups", 1) != 1):
            raise ValueError(f"smoothing / low-rank branch: not for {self.org_type} with groups != 1 or transposed")
        if smooth:
            self.register_buffer("smooth", torch.ones(in_ch, dtype=self.weight.dtype, device=self.weight.device))
        else:
            self.smooth: torch.Tensor | None = None
        self.rank = int(rank)
        if self.rank:
            w = self.weight
            self.register_buffer("lr_down", torch.zeros(self.rank, *w.shape[1:], dtype=w.dtype, device=w.device))
            self.register_buffer("lr_up", torch.zeros(w.shape[0], self.rank, dtype=w.dtype, device=w.device))

    def extra_repr(self) -> str:
        extra = (", smooth" if self.smooth is not None else "") + (f", rank={self.rank}" if self.rank else "")
        extra += (f", weight_group={self.weight_group}" if self.weight_group else "")
        extra += (", act_dynamic" if self.aq[0].dynamic else "")
        return f"{self.org_type}, {quant_label(self.weight_bits, self.act_bits)}, split={self.split}{extra}"

    # --- weights --------------------------------------------------------------------------------
    def weight_parts(self) -> list[torch.Tensor]:
        if not self.split:
            return [self.weight]
        w = self.weight
        return [w.narrow(self.in_axis, 0, self.split), w.narrow(self.in_axis, self.split, w.shape[self.in_axis] - self.split)]

    @property
    def quantizes_weight(self) -> bool:
        return any(getattr(q, "active", True) for q in self.wq)

    def _compute_weight(self) -> torch.Tensor:
        parts = [q(w) for q, w in zip(self.wq, self.weight_parts())]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.in_axis)

    def _cache_key(self) -> tuple:
        return (tuple(getattr(q, "version", -1) for q in self.wq), tuple(bool(getattr(q, "active", True)) for q in self.wq),
                self.weight.device, self.weight.dtype, self.weight._version)

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantizes_weight:
            return self.weight
        if any(isinstance(q, AdaRoundQuantizer) for q in self.wq):  # rounding being learned: never cached
            return self._compute_weight()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._compute_weight())
        return self._cache[1]

    def invalidate_cache(self) -> None:
        self._cache = None

    # --- activations ----------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.aq[0](x)
        a, b = self.aq
        if not (_hooked(a) or _hooked(b)):  # fast paths skip the quantizer modules' calls, so only without hooks
            if not a.active and not b.active:
                return x
            if (a.active and b.active and not (a.dynamic or b.dynamic) and a.scale.dim() == 0 and b.scale.dim() == 0
                    and needs_no_grad(x, a.scale) and needs_no_grad(x, b.scale)):
                # Inference: both halves quantized straight into one output (no concatenation copy); same values.
                out = torch.empty_like(x)
                for q, sl in ((a, slice(None, self.split)), (b, slice(self.split, None))):
                    fake_quant_(torch.div(x[:, sl], q.scale, out=out[:, sl]), q.scale, q.zero_point, q.levels)
                return out
        return torch.cat([a(x[:, : self.split]), b(x[:, self.split :])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.org_type == "Linear"
        if self.smooth is not None:
            x = smooth_input(x, self.smooth, linear)
        y = self.fn(self.quantize_input(x), self.quantized_weight(), self.bias, **self.fwd_kwargs)
        return y + lowrank_branch(x, self.lr_down, self.lr_up, self.fn, self.fwd_kwargs, linear) if self.rank else y

    # --- AdaRound -------------------------------------------------------------------------------
    def start_adaround(self) -> list[AdaRoundQuantizer]:
        """Swap the (initialised) uniform weight quantizers for AdaRound ones; returns them."""
        new = []
        for i, w in enumerate(self.weight_parts()):
            q = self.wq[i]
            if isinstance(q, UniformQuantizer) and q.active:
                q = AdaRoundQuantizer(q, w)
                self.wq[i] = q
            if isinstance(q, AdaRoundQuantizer):
                new.append(q)
        self._cache = None
        return new

    @torch.no_grad()
    def finish_adaround(self) -> None:
        """Harden the learned rounding and fold it into the weight; back to uniform quantizers."""
        if not any(isinstance(q, AdaRoundQuantizer) for q in self.wq):
            return
        for q in self.wq:
            if isinstance(q, AdaRoundQuantizer):
                q.soft = False
        self.weight.data = self._compute_weight().detach()
        for i, q in enumerate(self.wq):
            if isinstance(q, AdaRoundQuantizer):
                self.wq[i] = q.to_uniform()
        self._cache = None

    # --- deployment ------------------------------------------------------------------------------
    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes (uint8 storage) of the quantized weight."""
        parts = [q.integer(w) if q.active else torch.zeros_like(w) for q, w in zip(self.wq, self.weight_parts())]
        codes = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.in_axis)
        return codes.to(torch.uint8)

    @torch.no_grad()
    def set_weight_from_codes(self, codes: torch.Tensor) -> None:
        """Dequantize stored codes into ``weight`` (quantizer scales must already be loaded)."""
        self.weight.data = torch.zeros_like(self.weight)
        parts = self.weight_parts()
        code_parts = [codes] if not self.split else [codes.narrow(self.in_axis, 0, self.split),
                                                     codes.narrow(self.in_axis, self.split, codes.shape[self.in_axis] - self.split)]
        for q, w, c in zip(self.wq, parts, code_parts):
            w.copy_(((q.grouped(c.to(w.dtype)) - q.zero_point) * q.scale).reshape(w.shape))
        self._cache = None
