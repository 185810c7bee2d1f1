"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

The rounding offset is a rectified sigmoid h(V) in [0, 1]; a regulariser sum(1 - |2h - 1|^b), with b
annealed from 20 to 2 after a warm-up, pushes every h to exactly 0 or 1. After optimisation the
quantizer is hardened (h -> 1[V >= 0]) and folded back into a plain uniform quantizer.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from qdiff.quant.quantizer import UniformQuantizer, group_view

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
        self.group_size = base.group_size
        self.register_buffer("scale", base.scale.detach().clone())
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        w = base.grouped(weight.detach())  # the rows the step sizes apply to (group-wise scales), else the weight
        rest = w / self.scale - torch.floor(w / self.scale)
        # h(V) == rest at start: the soft quantizer reproduces the FP weight inside the clipping range.
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True
        #: h(V) shared by the forward and the rounding loss of one optimisation step (see :meth:`step_h`).
        self._h_step: torch.Tensor | None = None
        self._floor_key: tuple | None = None
        self._floor: torch.Tensor | None = None

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    @contextmanager
    def step_h(self):
        """Compute h(V) once for one optimisation step (forward and rounding loss share it and its backward)."""
        self._h_step = self.h()
        try:
            yield
        finally:
            self._h_step = None

    def _current_h(self) -> torch.Tensor:
        return self._h_step if self._h_step is not None else self.h()

    def _floor_plus_zp(self, w: torch.Tensor) -> torch.Tensor:
        # floor(w / s) + z is constant while the rounding is learned (the weight is fixed): computed once per
        # weight state (its storage, shape and in-place version counter).
        key = (w.data_ptr(), tuple(w.shape), w._version, w.device, self.scale.data_ptr(), self.zero_point.data_ptr())
        if self._floor_key != key:
            with torch.no_grad():
                g = group_view(w, self.group_size) if self.group_size else w
                self._floor = torch.floor(g / self.scale) + self.zero_point
            self._floor_key = key
        return self._floor

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        offset = self._current_h() if self.soft else (self.alpha >= 0).to(w.dtype)
        q = torch.clamp(self._floor_plus_zp(w) + offset, 0, self.levels)  # on the grouped rows (group-wise scales)
        return ((q - self.zero_point) * self.scale).reshape(w.shape)

    def round_loss(self, b: float) -> torch.Tensor:
        return (1 - (2 * self._current_h() - 1).abs().pow(b)).sum()

    @torch.no_grad()
    def _decided(self) -> torch.Tensor:
        """Mask of the rounding variables already at exactly 0 or 1."""
        h = self.h()
        return (h == 0) | (h == 1)

    def all_hard(self) -> bool:
        """Whether every rounding variable is at exactly 0 or 1. Then the rectifier's clamp passes no gradient
        (reconstruction and rounding loss alike) and Adam's momentum only pushes V further out, so no later
        step can change the rounding: stopping here gives the same result as running to the end."""
        return bool(self._decided().all())

    def hard_fraction(self) -> float:
        """Share of rounding variables already at exactly 0 or 1."""
        return float(self._decided().float().mean())

    @torch.no_grad()
    def to_uniform(self) -> UniformQuantizer:
        """A uniform quantizer with the same scale/zero point (used after folding the hard rounding into the weight)."""
        q = UniformQuantizer(self.bits, self.symmetric, self.channel_axis, group_size=self.group_size)
        q.set_params(self.scale, self.zero_point)
        return q.to(self.scale.device)
