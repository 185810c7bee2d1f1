"""Explicit initialisation of activation quantizers from calibration data.

One pass over a seeded subset of the calibration set with all activation quantizers switched off;
forward pre-hooks on each quantizer record the running min/max and a bounded random subsample of the
values it sees. Ranges are then set by min-max or by the Lp grid search on the subsample (spanning the
true min/max), so memory stays bounded however large the model or the set.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qdiff.errors import DataError
from qdiff.finite import first_bad_row, kind
from qdiff.models.base import eps
from qdiff.quant.wrap import act_quantizers, activations_fp


class _Stats:
    def __init__(self, per_batch: int, gen: torch.Generator) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.per_batch = per_batch
        self.gen = gen

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        mn, mx = x.amin(), x.amax()
        self.min = mn if self.min is None else torch.minimum(self.min, mn)
        self.max = mx if self.max is None else torch.maximum(self.max, mx)
        flat = x.flatten()
        k = min(self.per_batch, flat.numel())
        idx = torch.randint(0, flat.numel(), (k,), generator=self.gen).to(flat.device)
        self.samples.append(flat[idx].cpu())


@torch.no_grad()
def init_act_quantizers(model: nn.Module, calib, method: str, p: float = 2.4,
                        num_samples: int = 256, batch_size: int = 32, seed: int = 0, max_values: int = 65536,
                        device: torch.device | str = "cpu", progress: bool = True) -> dict[str, tuple[float, float]]:
    """Set every activation quantizer's range from ``num_samples`` calibration inputs; returns the ranges."""
    qs = act_quantizers(model, calibrated=True)
    if not qs:
        return {}
    rng = np.random.default_rng(seed)
    n = min(num_samples, len(calib))
    idx = np.sort(rng.choice(len(calib), size=n, replace=False))
    n_batches = (n + batch_size - 1) // batch_size
    gen = torch.Generator().manual_seed(seed)
    from qdiff.quant.timegroups import TimestepQuantizer, set_group_edges

    set_group_edges(model, calib.timesteps())
    grouped = {name: q.groups for name, q in qs if isinstance(q, TimestepQuantizer)}
    stats = {name: _Stats(max(1, max_values // n_batches), gen) for name, _ in qs}
    group_stats = {name: [_Stats(max(1, max_values // n_batches), gen) for _ in range(g)] for name, g in grouped.items()}

    def update(q, name: str, x: torch.Tensor) -> None:
        stats[name].update(x)
        if name in group_stats:
            g = q.group_of(x.shape[0])
            for k in g.unique().tolist():
                group_stats[name][k].update(x[g == k])

    hooks = [q.register_forward_pre_hook(lambda m, inp, name=name: update(m, name, inp[0])) for name, q in qs]
    try:
        with activations_fp(model):
            for x, t, cond in tqdm(calib.batches(batch_size, idx, device), total=n_batches, desc="activation ranges",
                                   disable=not progress, leave=False):
                eps(model, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    ranges = {}
    for name, q in qs:
        s = stats[name]
        if s.min is None:  # never executed (e.g. an unused branch): left uninitialised, i.e. off, rather than guessed
            continue
        if not (torch.isfinite(s.min) and torch.isfinite(s.max)):
            what = kind(torch.stack([s.min, s.max]))
            raise DataError(f"activation ranges: the input of {name.rsplit('.', 2)[0]} ({name}) reaches {what} on the "
                            "calibration data (weights quantized, activations FP): the model breaks there, so no range "
                            "can be set")
        sample = torch.cat(s.samples).to(q.scale.device)
        if name in group_stats:
            q.init_groups([None if gs.min is None else (torch.cat(gs.samples).to(sample.device), gs.min.to(sample.device),
                                                        gs.max.to(sample.device)) for gs in group_stats[name]], method, p)
        else:
            q.init_from(sample, method, p, x_min=s.min.to(sample.device), x_max=s.max.to(sample.device))
        if first_bad_row(q.scale.detach().reshape(-1)) is not None or not bool((q.scale > 0).all()):
            raise DataError(f"activation ranges: the step size of {name} came out {q.scale.detach().reshape(-1)[:1].tolist()} "
                            f"from the range [{float(s.min):.4g}, {float(s.max):.4g}]")
        ranges[name] = (float(s.min), float(s.max))
    return ranges
