"""Sampling with diffusers schedulers over any noise predictor (FP or quantized).

One denoising loop serves sampling, calibration-data collection and the per-step error analysis:
callers observe every model input through ``on_step``.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qdiff.models.base import DiffusionModel
from qdiff.sampling.config import SamplerConfig

#: on_step(step_index, t, x_in, cond, uncond): sees the model input of every step before it is used.
StepHook = Callable[[int, torch.Tensor, torch.Tensor, "dict | None", "dict | None"], None]


def build_scheduler(cfg: SamplerConfig, train_config: dict):
    """A fresh diffusers scheduler (they carry per-trajectory state, so one per batch)."""
    import diffusers

    cls, extra = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "ddpm": (diffusers.DDPMScheduler, {}),
        "plms": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        "dpm_solver": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    }[cfg.name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in {**train_config, **extra}.items() if k in accepted}
    sched = cls(**kwargs)
    sched.set_timesteps(cfg.steps)
    return sched


def guided_eps(
    model: DiffusionModel, unet: nn.Module, x_in: torch.Tensor, t: torch.Tensor,
    cond: dict | None, uncond: dict | None, guidance: float,
) -> torch.Tensor:
    """Noise prediction with classifier-free guidance when an unconditional branch is given."""
    if uncond is None or guidance == 1.0:
        return model.eps(unet, x_in, t, cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    e_u, e_c = model.eps(unet, torch.cat([x_in, x_in]), torch.cat([t, t]), both).chunk(2)
    return e_u + guidance * (e_c - e_u)


def step_kwargs(sched, cfg: SamplerConfig, generator: torch.Generator | None) -> dict:
    params = inspect.signature(sched.step).parameters
    kw: dict = {}
    if "eta" in params:
        kw["eta"] = cfg.eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


@torch.no_grad()
def denoise(
    model: DiffusionModel, unet: nn.Module, cfg: SamplerConfig, x_T: torch.Tensor,
    cond: dict | None = None, uncond: dict | None = None, generator: torch.Generator | None = None,
    on_step: StepHook | None = None, progress: tqdm | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T`` (unit Gaussian) and return the final sample (latents for LDMs)."""
    sched = build_scheduler(cfg, model.scheduler_config)
    x = x_T * sched.init_noise_sigma
    kw = step_kwargs(sched, cfg, generator)
    for i, t in enumerate(sched.timesteps):
        tt = t.to(x.device).expand(x.shape[0])
        x_in = sched.scale_model_input(x, t)
        if on_step is not None:
            on_step(i, tt, x_in, cond, uncond)
        eps = guided_eps(model, unet, x_in, tt, cond, uncond, model.guidance_scale)
        x = sched.step(eps, t, x, **kw).prev_sample
        if progress is not None:
            progress.update(1)
    return x


def initial_noise(model: DiffusionModel, n: int, seed: int) -> torch.Tensor:
    """x_T for ``n`` samples, drawn on the CPU so CPU and GPU runs start from the same noise."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((n, *model.sample_shape), generator=g)


def prompt_conditioning(model: DiffusionModel, prompts: Sequence[str], device) -> tuple[dict | None, dict | None]:
    """(cond, uncond) kwargs for a batch of prompts; (None, None) for unconditional models."""
    if not model.is_text_guided:
        return None, None
    c = model.encode_prompts(list(prompts)).to(device)
    u = model.encode_prompts([""] * len(prompts)).to(device)
    return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}


@torch.no_grad()
def generate(
    model: DiffusionModel, unet: nn.Module, cfg: SamplerConfig, n: int, seed: int,
    device: torch.device | str = "cpu", prompts: Sequence[str] | None = None, desc: str = "sampling",
    progress: bool = True, return_latents: bool = False,
) -> torch.Tensor:
    """``n`` images in [-1, 1] on the CPU ([n, C, H, W]); deterministic given ``seed`` and the batch size."""
    if model.is_text_guided and (prompts is None or len(prompts) < n):
        raise ValueError(f"{model.name} is text-guided: need {n} prompts, got {0 if prompts is None else len(prompts)}")
    noise = initial_noise(model, n, seed)
    out = []
    n_batches = (n + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(total=n_batches * cfg.steps, desc=desc, unit="step", disable=not progress, leave=False)
    for b in range(n_batches):
        sl = slice(b * cfg.batch_size, min(n, (b + 1) * cfg.batch_size))
        gen = torch.Generator("cpu").manual_seed(seed * 1_000_003 + b)
        cond, uncond = prompt_conditioning(model, prompts[sl] if prompts is not None else [], device)
        z = denoise(model, unet, cfg, noise[sl].to(device), cond, uncond, gen, progress=bar)
        out.append((z if return_latents else model.decode(z)).float().cpu())
    bar.close()
    return torch.cat(out)
