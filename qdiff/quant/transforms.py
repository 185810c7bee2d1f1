"""Transforms applied to a wrapped model before its weight ranges are set: the peers' low-bit methods as options.

* **Channel balancing** (``QuantConfig.smooth``; SmoothQuant, Xiao et al. 2023; PTQ4DiT's salience balancing is the
  same migration with a different statistic): every smoothed layer divides input channel j by
  ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` and multiplies the weights of that channel by ``s_j``. In full
  precision the output is unchanged; quantized, activation outliers move into the (channel-wise quantized) weights.
  The divisor is stored with the layer (``QuantLayer.smooth``), exported with the artifact and applied by both
  deploy backends before the input is quantized.
* **Low-rank branch** (``QuantConfig.lowrank``; SVDQuant, Li et al. 2025): the top-r singular directions of the
  (smoothed) weight, ``W ~ up @ down`` with float16 factors, run in 16-bit precision on the unquantized input; only the residual
  ``W - up @ down`` is quantized (and reconstructed). A branch of full rank leaves nothing to quantize, so it
  reproduces the FP output exactly.

Both are exact transforms of the FP network; what they change is what quantization sees.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from qdiff.errors import DataError
from qdiff.quant.config import QuantConfig
from qdiff.quant.layers import QuantLayer

log = logging.getLogger("qdiff")

#: The low-rank branch's factors hold values of this dtype (stored so in the artifact); LOWRANK_MAX is its range.
LOWRANK_DTYPE, LOWRANK_MAX = torch.float16, 6.0e4
#: Smoothing factors are kept within [1/SMOOTH_CLAMP, SMOOTH_CLAMP] (channels that never fire keep 1).
SMOOTH_CLAMP = 1e4


def _channel_axis(layer: nn.Module) -> int:
    """Input-channel axis of an FP layer's input: last for a Linear, 1 for a conv."""
    return -1 if isinstance(layer, nn.Linear) else 1


@torch.no_grad()
def input_channel_absmax(model: nn.Module, names: list[str], calib, num_samples: int = 256, batch_size: int = 32,
                         seed: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """max |x_j| per input channel j of each named layer of the FP ``model``, over a seeded calibration subset."""
    from qdiff.models.base import eps

    rng = np.random.default_rng(seed)
    n = min(num_samples, len(calib))
    idx = np.sort(rng.choice(len(calib), size=n, replace=False))
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str, axis: int):
        def fn(_m, inp):
            x = inp[0].detach().float()
            dims = [d for d in range(x.dim()) if d != (axis % x.dim())]
            m = x.abs().amax(dim=dims)
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n, _channel_axis(model.get_submodule(n))))
               for n in names]
    try:
        for x, t, cond in calib.batches(batch_size, idx, device):
            eps(model, x, t, cond)
    finally:
        for h in handles:
            h.remove()
    for name, m in stats.items():
        if not bool(torch.isfinite(m).all()):
            raise DataError(f"smoothing: the input of {name} is not finite on the calibration data")
    return stats


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, in_axis: int, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_:j|^(1-alpha), 1 where a channel or its weights are all zero, clamped."""
    dims = [d for d in range(weight.dim()) if d != in_axis]
    w_max = weight.detach().abs().float().amax(dim=dims)
    a = act_absmax.float().to(w_max.device)
    s = a.pow(alpha) / w_max.pow(1 - alpha)
    s = torch.where((a > 0) & (w_max > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(1 / SMOOTH_CLAMP, SMOOTH_CLAMP)


@torch.no_grad()
def apply_smoothing(q: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float) -> int:
    """Set each smoothed layer's divisor and fold it into its weight; returns how many layers were smoothed."""
    done = 0
    for name, layer in q.named_modules():
        if not isinstance(layer, QuantLayer) or layer.smooth is None:
            continue
        if name not in act_absmax:  # never executed on the calibration data: left as is (divisor 1)
            continue
        s = smoothing_factors(act_absmax[name], layer.weight, layer.in_axis, alpha).to(layer.weight.dtype)
        layer.smooth.copy_(s)
        shape = [1] * layer.weight.dim()
        shape[layer.in_axis] = -1
        layer.weight.mul_(s.view(shape))
        layer.invalidate_cache()
        done += 1
    return done


@torch.no_grad()
def apply_lowrank(q: nn.Module) -> int:
    """Split each branch layer's weight into its top-r SVD part (FP branch) and the residual (quantized)."""
    from qdiff.errors import ConfigError

    done = 0
    for name, layer in q.named_modules():
        if not isinstance(layer, QuantLayer) or not layer.rank:
            continue
        w = layer.weight
        w2 = w.detach().reshape(w.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(w2, full_matrices=False)
        r = layer.rank
        root = s[:r].sqrt()  # sqrt(S) on each side keeps both factors' values within 16-bit range
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        if max(float(up.abs().max()), float(down.abs().max())) > LOWRANK_MAX:
            raise ConfigError(f"low-rank branch: {name}'s singular values are too large for a 16-bit branch")
        # the branch holds float16 values (what SVDQuant runs and what the artifact stores, exactly)
        layer.lr_up.copy_(up.to(LOWRANK_DTYPE).to(w.dtype))
        layer.lr_down.copy_(down.reshape(r, *w.shape[1:]).to(LOWRANK_DTYPE).to(w.dtype))
        # the residual against the branch as it is stored (its own rounding included), so FP output is unchanged
        stored = layer.lr_up.double() @ layer.lr_down.reshape(r, -1).double()
        w.copy_((w2 - stored).reshape(w.shape).to(w.dtype))
        layer.invalidate_cache()
        done += 1
    return done


def apply_transforms(model: nn.Module, q: nn.Module, cfg: QuantConfig, calib=None, num_samples: int = 256,
                     seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Apply ``cfg``'s transforms to the wrapped copy ``q`` of ``model`` (smoothing first, then the branch)."""
    from qdiff.errors import ConfigError

    report: dict = {}
    if cfg.smooth is not None:
        names = [n for n, m in q.named_modules() if isinstance(m, QuantLayer) and m.smooth is not None]
        if names and calib is None:
            raise ConfigError("quant.smooth needs calibration data (the per-channel input ranges)")
        stats = input_channel_absmax(model, names, calib, num_samples, seed=seed, device=device) if names else {}
        report["smoothed_layers"] = apply_smoothing(q, stats, cfg.smooth)
    if cfg.lowrank:
        report["lowrank_layers"] = apply_lowrank(q)
        report["lowrank_params"] = int(sum(m.lr_up.numel() + m.lr_down.numel() for m in q.modules()
                                           if isinstance(m, QuantLayer) and m.rank))
    if report:
        log.info("transforms %s: %s", "+".join(cfg.transforms), report)
    return report
