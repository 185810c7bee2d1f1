"""Timestep-aware activation step sizes (``QuantConfig.act_time_groups``; TDQ, TFMQ-DM and ViDiT-Q's observation that
a diffusion model's activation ranges move with the timestep).

The calibration timesteps are cut into G contiguous groups of (about) equal count; every activation quantizer holds
one step size and zero point per group (initialised from that group's calibration inputs, then learned by LSQ per
group) and picks, per sample, the one of that sample's timestep. The timestep reaches the quantizers through
:func:`timesteps` — set by a hook on the quantized network for every call made the usual way (``eps``, samplers,
pipelines), and by reconstruction for the units it runs alone.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from qdiff.quant.quantizer import NotInitializedError, UniformQuantizer, fake_quant, search_range

_state = threading.local()


def current_timesteps() -> torch.Tensor | None:
    return getattr(_state, "t", None)


@contextmanager
def timesteps(t: torch.Tensor | None) -> Iterator[None]:
    """Within the ``with``, timestep-aware quantizers use ``t`` (one per sample, or one for the batch)."""
    before = current_timesteps()
    _state.t = None if t is None else torch.as_tensor(t).detach().reshape(-1)
    try:
        yield
    finally:
        _state.t = before


def group_edges(ts: np.ndarray, groups: int) -> torch.Tensor:
    """G - 1 boundaries cutting the sorted distinct calibration timesteps into G runs of (about) equal count."""
    u = np.unique(np.asarray(ts, dtype=np.float64))
    if len(u) < groups:
        from qdiff.errors import ConfigError

        raise ConfigError(f"quant.act_time_groups={groups} but the calibration set holds {len(u)} distinct timesteps")
    cuts = [len(u) * k // groups for k in range(1, groups)]
    return torch.tensor([(u[c - 1] + u[c]) / 2 for c in cuts], dtype=torch.float32)


class TimestepQuantizer(UniformQuantizer):
    """Per-tensor activation quantizer with one (scale, zero point) per timestep group; sample b uses its group's."""

    def __init__(self, bits: int, symmetric: bool, groups: int) -> None:
        super().__init__(bits, symmetric, None, learnable_scale=True, required=False)
        self.groups = int(groups)
        self.register_buffer("t_edges", torch.zeros(self.groups - 1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", time_groups={self.groups}"

    def group_of(self, n: int) -> torch.Tensor:
        t = current_timesteps()
        if t is None:
            raise RuntimeError("a timestep-aware activation quantizer ran without the timestep: call the quantized model "
                               "as model(x_t, t, ...) (qdiff's eps, samplers and pipelines do), or wrap the call in "
                               "qdiff.quant.timegroups.timesteps(t)")
        t = t.to(self.t_edges.device, torch.float32)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise RuntimeError(f"timestep-aware activation quantizer: a batch of {n} inputs but {t.numel()} timesteps")
        return torch.bucketize(t, self.t_edges, right=True)

    @torch.no_grad()
    def init_groups(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None], method: str, p: float) -> None:
        """Per group (sample, min, max) of its calibration inputs; a group without data takes the union's range."""
        seen = [q for q in parts if q is not None]
        if self.bits >= 16 or not seen:
            return
        union = (torch.cat([q[0] for q in seen]), torch.stack([q[1] for q in seen]).amin(), torch.stack([q[2] for q in seen]).amax())
        ss, zs = [], []
        for q in parts:
            x, lo, hi = q if q is not None else union
            s, z = search_range(x, self.bits, self.symmetric, None, method, p, lo, hi)
            ss.append(s.reshape(()))
            zs.append(z.reshape(()))
        self.set_params(torch.stack(ss), torch.stack(zs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if not self._ready:
            raise NotInitializedError("quantizer used before initialisation (call init_from or load a quantized state)")
        if self.scale.dim() == 0:  # initialised like a plain quantizer (one range for every timestep)
            return fake_quant(x, self.scale, self.zero_point, self.bits)
        g = self.group_of(x.shape[0])
        shape = (-1,) + (1,) * (x.dim() - 1)
        return fake_quant(x, self.scale[g].view(shape), self.zero_point[g].view(shape), self.bits)


def _timestep_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if len(args) > 1 and torch.is_tensor(args[1]) or len(args) > 1 and isinstance(args[1], (int, float)):
        return torch.as_tensor(args[1])
    for k in ("timestep", "t", "timesteps"):
        if k in kwargs and kwargs[k] is not None:
            return torch.as_tensor(kwargs[k])
    return None


def install_timestep_hook(model: nn.Module) -> None:
    """Make every call ``model(x_t, t, ...)`` (or ``timestep=``) expose t to the model's timestep-aware quantizers."""
    tokens: list = []

    def pre(_m, args, kwargs):
        cm = timesteps(_timestep_of(args, kwargs))
        cm.__enter__()
        tokens.append(cm)

    def post(_m, args, kwargs, out):
        if tokens:
            tokens.pop().__exit__(None, None, None)
        return out

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True, always_call=True)
    model._qdiff_timestep_hook = True


def set_group_edges(model: nn.Module, ts: np.ndarray) -> None:
    """Set every timestep-aware quantizer's group boundaries from the calibration timesteps ``ts``."""
    for m in model.modules():
        if isinstance(m, TimestepQuantizer):
            m.t_edges.copy_(group_edges(ts, m.groups).to(m.t_edges.device))
