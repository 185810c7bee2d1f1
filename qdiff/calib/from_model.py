"""Calibration data for any noise predictor ``eps = model(x_t, t, **cond)`` and any diffusers scheduler.

The paper's timestep-aware set (T, c, n) without a :class:`~qdiff.models.base.DiffusionModel` or a Hydra
config: the caller gives the network, the scheduler instance it samples with, the shape of one sample and,
for conditional models, the per-trajectory conditioning tensors (and the unconditional branch for
classifier-free guidance). The result is a :class:`~qdiff.calib.data.CalibrationSet` like the CLI's, so
``qdiff.quantize`` and the output bias match (which replays its trajectories) take it as they are.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from qdiff.cache import Entry
from qdiff.calib.config import CalibConfig
from qdiff.calib.data import CalibrationSet, cached_collection, calibration_ident
from qdiff.errors import ConfigError
from qdiff.models.base import DiffusionModel, eps
from qdiff.sampling.config import FROM_CONFIG, SamplerConfig
from qdiff.sampling.samplers import build_scheduler, scheduler_config_of


class TensorConditioning:
    """Conditioning given as tensors: per key, one row per trajectory or one row shared by all of them."""

    def __init__(self, cond: dict | None, uncond: dict | None, n_traj: int, guidance: float) -> None:
        self.cond, self.uncond = _rows(cond, n_traj, "cond"), _rows(uncond, n_traj, "uncond")
        if self.uncond is not None and self.cond is None:
            raise ConfigError("calibration_data: uncond (the unconditional branch) needs cond too")
        if self.uncond is not None and set(self.uncond) != set(self.cond):
            raise ConfigError(f"calibration_data: cond and uncond must have the same keys, got {sorted(self.cond)} "
                              f"and {sorted(self.uncond)}")
        if self.uncond is not None and guidance == 1.0:
            raise ConfigError("calibration_data: uncond is only used with classifier-free guidance; give "
                              "guidance_scale != 1, or leave uncond out")
        if self.uncond is None and guidance != 1.0:
            raise ConfigError(f"calibration_data: guidance_scale={guidance} needs uncond, the unconditional branch "
                              "(e.g. the empty prompt's embeddings)")
        self.guidance = float(guidance)
        self.shared_uncond = self.uncond is not None and all(v.shape[0] == 1 for v in self.uncond.values())

    def batch(self, start: int, end: int, device) -> tuple[dict | None, dict | None]:
        def rows(d: dict | None) -> dict | None:
            if d is None:
                return None
            return {k: (v.expand(end - start, *v.shape[1:]) if v.shape[0] == 1 else v[start:end]).to(device)
                    for k, v in d.items()}

        return rows(self.cond), rows(self.uncond)

    def fingerprint(self) -> str | None:
        """A hash of the given tensors (part of the set's cache key)."""
        if self.cond is None:
            return None
        h = hashlib.sha256()
        for branch in (self.cond, self.uncond or {}):
            for k in sorted(branch):
                v = branch[k]
                h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _rows(d: dict | None, n_traj: int, what: str) -> dict | None:
    """``d`` checked: a dict of tensors with 1 or ``n_traj`` rows each (None or {} -> None)."""
    if not d:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"calibration_data: {what} must be a dict of tensors (the model's keyword arguments), "
                          f"got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] not in (1, n_traj):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ConfigError(f"calibration_data: {what}[{k!r}] must be a tensor with one row per trajectory "
                              f"({n_traj}) or one row for all, got {got}")
    return {k: v.detach() for k, v in d.items()}


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"calibration_data: {name} must be an integer, got {value!r}")
    return value


def calibration_data(model: nn.Module, scheduler, sample_shape: Sequence[int], T: int | None = 100, c: int = 5,
                     n: int = 64, cond: dict | None = None, uncond: dict | None = None, guidance_scale: float = 1.0,
                     seed: int = 1234, cache_dir: str | Path | None = None, device: torch.device | str | None = None,
                     *, mode: str = "uniform", eta: float = 0.0, batch_size: int = 256, cache: bool = True,
                     progress: bool = True) -> CalibrationSet:
    """The paper's timestep-aware calibration set (T, c, n) for any noise predictor ``model(x_t, t, **cond)``.

    Runs the FP sampler (``scheduler``: any diffusers scheduler instance, e.g. a pipeline's own) for ``T`` steps
    from ``n`` seeded noises of ``sample_shape`` (one sample, e.g. (C, H, W)) and keeps the model inputs of
    every ``c``-th step: N = n * floor(T / c) inputs. ``mode="t0"``/``"tmax"`` keep all N from the last/first
    step instead (the paper's Table 1 baselines).

    ``cond``: the model's keyword arguments per trajectory (tensors with ``n`` rows, or one row for all), e.g.
    ``{"encoder_hidden_states": prompt_embeddings}``. ``uncond`` with ``guidance_scale != 1``: the unconditional
    branch of classifier-free guidance (stored too, so every entry is used twice).

    The set is written under ``cache_dir`` and reused by a later call with the same model weights and settings
    (``cache=False``: collected again); with ``cache_dir=None`` it lives in a temporary folder removed with the
    returned set. ``eta``: DDIM's stochasticity; ``batch_size``: trajectories sampled together.
    """
    if T is None:
        raise ConfigError("calibration_data: T is not set; it is the FP sampler's steps the data comes from "
                          "(the paper: the sampler's own steps, e.g. T=100 for DDIM-100)")
    shape = tuple(sample_shape) if isinstance(sample_shape, (tuple, list, torch.Size)) else None
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError(f"calibration_data: sample_shape must be the shape of one sample, e.g. (C, H, W), got "
                          f"{sample_shape!r}")
    calib = CalibConfig(mode=mode, T=_int("T", T), c=_int("c", c), n=_int("n", n), seed=_int("seed", seed),
                        batch_size=_int("batch_size", batch_size), cache=cache).checked()
    sampler = SamplerConfig(name=FROM_CONFIG, steps=calib.T, eta=eta, batch_size=calib.batch_size)
    conditioning = TensorConditioning(cond, uncond, calib.n_trajectories, guidance_scale)
    params = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (params.device if params is not None else torch.device("cpu"))
    cls = type(model)
    dm = DiffusionModel(name=f"{cls.__module__}.{cls.__qualname__}", unet=model,
                        scheduler_config=scheduler_config_of(scheduler), sample_shape=shape)
    _check_call(model, sampler, dm.scheduler_config, shape, conditioning, device)
    ident = {**calibration_ident(dm, sampler, calib, None), "guidance": conditioning.guidance,
             "sample_shape": list(shape), "cond": conditioning.fingerprint(), "batch_size": calib.batch_size}
    tmp = tempfile.TemporaryDirectory(prefix="qdiff-calib-") if cache_dir is None else None
    entry = Entry(tmp.name if tmp is not None else cache_dir, "calib", ident)
    calib_set, _ = cached_collection(entry, dm, sampler, calib, conditioning, device, progress)
    calib_set.tmpdir = tmp  # keeps a temporary folder alive exactly as long as the set
    return calib_set


@torch.no_grad()
def _check_call(model: nn.Module, sampler: SamplerConfig, scheduler_config: dict, shape: tuple,
                conditioning: TensorConditioning, device) -> None:
    """One forward at the first timestep, so that a wrong shape or key fails in one line before any sampling."""
    cond, _ = conditioning.batch(0, 1, device)
    t = build_scheduler(sampler, scheduler_config).timesteps[:1].to(device)
    try:
        eps(model, torch.zeros((1, *shape), device=device), t, cond)
    except Exception as e:  # noqa: BLE001 - any failure here means the inputs do not fit the model
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"calibration_data: model(x_t, t, **cond) fails on one input of shape {(1, *shape)} with "
                          f"cond keys {sorted(cond or {})} ({type(e).__name__}: {msg})") from None
