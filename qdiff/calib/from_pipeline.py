"""Calibration data from a diffusers pipeline's own sampling loop (the paper's T, c, n), for any denoiser.

A transformer pipeline prepares its denoiser's inputs in its own way: DiT passes class labels and the null class
1000, PixArt-Σ T5 embeddings with their attention mask, SD3 two CLIPs' hidden states and pooled projections,
FLUX 2x2-packed latents, position ids, a guidance embedding and timesteps divided by 1000, each with its own
scheduler settings. Rather than re-implementing any of that, :func:`pipeline_calibration` runs the pipeline itself
(its encoders, its scheduler, its guidance) and records what it passes to the denoiser at every c-th of T steps
(Algorithm 1), with a forward pre-hook. Tensors with the batch in their first dimension are stored per row (both
guidance branches included); everything else the denoiser received (FLUX's position ids, PixArt's
``added_cond_kwargs``) once. The set replays its trajectories through the pipeline (:meth:`final_latents`), so the
output bias match works on it like on a set collected by :func:`qdiff.calibration_data`.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qdiff.calib.data import TensorCalibration
from qdiff.errors import ConfigError

#: Call arguments a denoiser receives that do not change what it computes.
IGNORED = ("return_dict",)


class PipelineCalibration(TensorCalibration):
    """Denoiser inputs recorded from a pipeline: per-row tensors (``x``, ``t``, ``cond``) plus ``constants`` (the
    arguments that are the same for every row), passed with every batch."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, cond: dict, constants: dict, step: np.ndarray, meta: dict,
                 replay=None) -> None:
        super().__init__(x, t, cond)
        self.constants, self.step, self.meta, self._replay = constants, step, meta, replay

    def get(self, idx: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
        x, t, cond = super().get(idx, device)
        return x, t, {**cond, **{k: _to(v, device) for k, v in self.constants.items()}}

    def final_latents(self, net: nn.Module, n: int) -> torch.Tensor:
        """Final latents of the first ``n`` calibration trajectories, sampled again by the pipeline with ``net`` as its
        denoiser (same calls, seeds and steps): the output bias match's probe."""
        if self._replay is None:
            raise ConfigError("this pipeline calibration set cannot replay its trajectories (its pipeline is gone)")
        return self._replay(net, n)


def _to(v: Any, device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, (tuple, list)):
        return type(v)(_to(u, device) for u in v)
    if isinstance(v, dict):
        return {k: _to(u, device) for k, u in v.items()}
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class _Recorder:
    """Forward pre-hook on the denoiser + a wrapper of the scheduler's ``step`` (which counts the sampling steps, so
    a pipeline calling its denoiser twice per step, e.g. FLUX's true CFG, keeps both calls under one step)."""

    def __init__(self, net: nn.Module, kept: set[int]) -> None:
        params = [p for p in inspect.signature(type(net).forward).parameters if p != "self"]
        self.sig = inspect.signature(type(net).forward)
        self.x_name = params[0]
        self.t_name = "timestep" if "timestep" in params else params[1]
        self.kept, self.step = kept, 0
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.constants: dict[str, Any] = {}
        self.steps: list[int] = []
        self.last: torch.Tensor | None = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.step not in self.kept:
            return
        bound = dict(self.sig.bind_partial(module, *args, **kwargs).arguments)
        bound.pop("self", None)
        x, t = bound.pop(self.x_name), bound.pop(self.t_name)
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(b) if t.numel() == 1 else t.reshape(b)
        self.rows["__x"].append(x.detach().float().cpu())
        self.rows["__t"].append(t.detach().cpu())
        self.steps += [self.step] * b
        for k, v in bound.items():
            if k in IGNORED or v is None:
                continue
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b and k not in self.constants:
                self.rows[k].append(v.detach().cpu())
            elif k in self.rows:
                raise ConfigError(f"pipeline calibration: the denoiser's {k!r} has {b} rows in one call and not in another")
            elif k not in self.constants:
                self.constants[k] = _to(v.detach() if isinstance(v, torch.Tensor) else v, "cpu")
            elif not _same(self.constants[k], _to(v, "cpu")):
                raise ConfigError(f"pipeline calibration: the denoiser's {k!r} changes between calls without a batch "
                                  "dimension; qdiff cannot store it per row")

    @contextmanager
    def counting(self, scheduler) -> Iterator[None]:
        step = scheduler.step

        def counted(*args, **kwargs):
            out = step(*args, **kwargs)
            self.step += 1
            self.last = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            return out

        scheduler.step = counted
        try:
            yield
        finally:
            del scheduler.step  # back to the class's method


def run_pipeline(pipe: Any, name: str, net: nn.Module, calls: list[dict], T: int, seed: int, device,
                 recorder: _Recorder | None = None, progress: bool = False) -> torch.Tensor:
    """Run ``pipe`` with ``net`` as its denoiser ``name`` over ``calls`` (one generator seed per call); returns the
    final latents (the last scheduler step's output) of every trajectory."""
    own = getattr(pipe, name)
    rec = recorder or _Recorder(net, set())
    hook = net.register_forward_pre_hook(rec.hook, with_kwargs=True) if recorder is not None else None
    setattr(pipe, name, net)
    finals = []
    try:
        with rec.counting(pipe.scheduler):
            for j, call in enumerate(tqdm(calls, desc="pipeline calibration", disable=not progress, leave=False)):
                rec.step, rec.last = 0, None
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + j)
                with torch.no_grad():
                    pipe(**call, num_inference_steps=T, generator=gen, output_type="latent")
                if rec.last is None:
                    raise ConfigError(f"pipeline calibration: {type(pipe).__name__} never called its scheduler's step")
                finals.append(rec.last.detach().float().cpu())
    finally:
        setattr(pipe, name, own)
        if hook is not None:
            hook.remove()
    return torch.cat(finals)


def pipeline_calibration(pipe: Any, name: str, calls: list[dict], T: int, c: int, seed: int = 1234,
                         device: torch.device | str = "cpu", progress: bool = True) -> PipelineCalibration:
    """The paper's timestep-aware set from ``pipe``'s own sampler: every call in ``calls`` (keyword arguments of
    ``pipe(...)``, one batch of trajectories each) runs T steps and the denoiser's inputs at the steps t = T..1 with
    t % c == 0 are kept. ``name``: the denoiser's attribute (``transformer`` or ``unet``)."""
    net = getattr(pipe, name)
    kept = {i for i in range(T) if (T - i) % c == 0}
    rec = _Recorder(net, kept)
    run_pipeline(pipe, name, net, calls, T, seed, device, recorder=rec, progress=progress)
    if not rec.rows:
        raise ConfigError(f"pipeline calibration: {type(pipe).__name__} never called its {name} at a kept step")
    x, t = torch.cat(rec.rows.pop("__x")), torch.cat(rec.rows.pop("__t"))
    cond = {k: torch.cat(v) for k, v in rec.rows.items()}
    n_traj = sum(len(_batch_of(call)) for call in calls)
    meta = {"pipeline": type(pipe).__name__, "denoiser": name, "T": T, "c": c, "n": n_traj, "seed": seed,
            "kept_steps": sorted(kept), "scheduler": type(pipe.scheduler).__name__, "rows_per_step": len(x) // len(kept),
            "constants": sorted(rec.constants)}

    def replay(other: nn.Module, n: int) -> torch.Tensor:
        per_call = [len(_batch_of(call)) for call in calls]
        used = int(np.searchsorted(np.cumsum(per_call), n)) + 1
        return run_pipeline(pipe, name, other, calls[:used], T, seed, device)[:n]

    return PipelineCalibration(x, t, cond, rec.constants, np.asarray(rec.steps), meta, replay)


def _batch_of(call: dict) -> list:
    """The trajectories a call samples: its prompts or class labels (one trajectory each)."""
    for key in ("prompt", "class_labels"):
        if call.get(key) is not None:
            v = call[key]
            return [v] if isinstance(v, (str, int)) else list(v)
    return [None] * int(call.get("batch_size", 1))
