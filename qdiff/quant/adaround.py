"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

The rounding offset is a rectified sigmoid h(V) in [0, 1]; a regulariser sum(1 - |2h - 1|^b), with b
annealed from 20 to 2 after a warm-up, pushes every h to exactly 0 or 1. After optimisation the
quantizer is hardened (h -> 1[V >= 0]) and folded back into a plain uniform quantizer.
"""
from __future__ import annotations

import torch
from torch import nn

from qdiff.quant.quantizer import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantizer(nn.Module):
    """Weight quantizer with learnable rounding; scale and zero point are fixed from ``base``."""

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        if not base._ready:
            raise RuntimeError("AdaRound needs an initialised uniform quantizer (scale search first)")
        self.bits = base.bits
        self.symmetric = base.symmetric
        self.channel_axis = base.channel_axis
        self.register_buffer("scale", base.scale.detach().clone())
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        rest = weight.detach() / self.scale - torch.floor(weight.detach() / self.scale)
        # h(V) == rest at start: the soft quantizer reproduces the FP weight inside the clipping range.
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        offset = self.h() if self.soft else (self.alpha >= 0).to(w.dtype)
        q = torch.clamp(torch.floor(w / self.scale) + offset + self.zero_point, 0, self.levels)
        return (q - self.zero_point) * self.scale

    def round_loss(self, b: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(b)).sum()

    def hard_fraction(self) -> float:
        """Share of rounding variables already at exactly 0 or 1."""
        h = self.h().detach()
        return float(((h == 0) | (h == 1)).float().mean())

    @torch.no_grad()
    def to_uniform(self) -> UniformQuantizer:
        """A uniform quantizer with the same scale/zero point (used after folding the hard rounding into the weight)."""
        q = UniformQuantizer(self.bits, self.symmetric, self.channel_axis)
        q.set_params(self.scale, self.zero_point)
        return q.to(self.scale.device)
