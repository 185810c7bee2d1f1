"""Sampling with diffusers schedulers over any noise predictor (FP or quantized).

One denoising loop, :class:`Trajectory`, serves sampling, calibration-data collection, the output bias
match's probe and the per-step error analysis: callers iterate over its steps and see every model input
and noise estimate, or stop early.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qdiff.errors import ConfigError, DataError
from qdiff.finite import first_bad_row, kind
from qdiff.models.base import DiffusionModel, eps
from qdiff.sampling.config import FROM_CONFIG, SamplerConfig


def build_scheduler(cfg: SamplerConfig, train_config: dict):
    """A fresh diffusers scheduler (they carry per-trajectory state, so one per batch)."""
    import diffusers

    if cfg.name == FROM_CONFIG:
        sched = scheduler_class(train_config).from_config(train_config)
        sched.set_timesteps(cfg.steps)
        return sched
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


def scheduler_class(config: dict) -> type:
    """The diffusers scheduler class a scheduler config names (``_class_name``), checked."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ConfigError(f"scheduler config names {name!r}, which is not a diffusers scheduler class "
                          "(give a scheduler instance or its config with _class_name)")
    return cls


def scheduler_config_of(scheduler) -> dict:
    """A diffusers scheduler (instance or config dict) as a JSON config that names its class (``_class_name``).

    Private bookkeeping keys (``_diffusers_version``, ``_use_default_values``) are dropped: they do not change
    the schedule, so they must not change cache keys either.
    """
    import json

    import diffusers

    if isinstance(scheduler, diffusers.SchedulerMixin):
        config = {**dict(scheduler.config), "_class_name": type(scheduler).__name__}
    elif isinstance(scheduler, dict):
        config = dict(scheduler)
    else:
        raise ConfigError(f"scheduler must be a diffusers scheduler (e.g. diffusers.DDIMScheduler()) or its config "
                          f"with _class_name, got {type(scheduler).__name__}")
    scheduler_class(config)
    config = {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}
    return json.loads(json.dumps(config, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def guided_eps(unet: nn.Module, x_in: torch.Tensor, t: torch.Tensor, cond: dict | None, uncond: dict | None,
               guidance: float) -> torch.Tensor:
    """Noise prediction with classifier-free guidance when an unconditional branch is given."""
    if uncond is None or guidance == 1.0:
        return noise_part(eps(unet, x_in, t, cond), x_in)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    e_u, e_c = noise_part(eps(unet, torch.cat([x_in, x_in]), torch.cat([t, t]), both), x_in).chunk(2)
    return e_u + guidance * (e_c - e_u)


def noise_part(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The noise estimate of a model that also predicts its variance (DiT-XL/2, PixArt: 2C output channels, the
    first C are eps), as their pipelines take it; other models' output as it is."""
    c = x.shape[1]
    return e[:, :c] if e.dim() == x.dim() and e.shape[1] == 2 * c else e


def step_kwargs(sched, cfg: SamplerConfig, generator: torch.Generator | None) -> dict:
    params = inspect.signature(sched.step).parameters
    kw: dict = {}
    if "eta" in params:
        kw["eta"] = cfg.eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


@dataclass
class Step:
    """One denoising step as the model saw it."""

    index: int            # 0 = the first (pure-noise) step
    t: torch.Tensor       # [B] timesteps
    x: torch.Tensor       # the sample before this step
    x_in: torch.Tensor    # the model input (the scheduler's scaling of x)
    eps: torch.Tensor     # the (guided) noise estimate


class Trajectory:
    """The reverse process from ``x_T`` as an iterator of :class:`Step`; ``x`` is the current sample.

    ``scheduler_config``: the model's training noise schedule (a diffusers scheduler config); ``guidance``:
    classifier-free guidance strength, used when an unconditional branch ``uncond`` is given.

    Iterating to the end leaves the final sample (latents for LDMs) in ``x``; a caller may stop early.
    """

    def __init__(self, scheduler_config: dict, guidance: float, unet: nn.Module, cfg: SamplerConfig, x_T: torch.Tensor,
                 cond: dict | None = None, uncond: dict | None = None, generator: torch.Generator | None = None) -> None:
        self.sched = build_scheduler(cfg, scheduler_config)
        self.unet, self.cond, self.uncond, self.guidance = unet, cond, uncond, guidance
        self.x = x_T * self.sched.init_noise_sigma
        self.kw = step_kwargs(self.sched, cfg, generator)

    def __len__(self) -> int:
        return len(self.sched.timesteps)

    def __iter__(self) -> Iterator[Step]:
        for i, t in enumerate(self.sched.timesteps):
            tt = t.to(self.x.device).expand(self.x.shape[0])
            x_in = self.sched.scale_model_input(self.x, t)
            e = guided_eps(self.unet, x_in, tt, self.cond, self.uncond, self.guidance)
            yield Step(i, tt, self.x, x_in, e)
            self.x = self.sched.step(e, t, self.x, **self.kw).prev_sample


@torch.no_grad()
def denoise(model: DiffusionModel, unet: nn.Module, cfg: SamplerConfig, x_T: torch.Tensor, cond: dict | None = None,
            uncond: dict | None = None, generator: torch.Generator | None = None, progress: tqdm | None = None) -> torch.Tensor:
    """Run the whole reverse process from ``x_T`` (unit Gaussian) and return the final sample."""
    traj = Trajectory(model.scheduler_config, model.guidance_scale, unet, cfg, x_T, cond, uncond, generator)
    for _ in traj:
        if progress is not None:
            progress.update(1)
    return traj.x


def initial_noise(sample_shape: Sequence[int], n: int, seed: int) -> torch.Tensor:
    """x_T for ``n`` samples of ``sample_shape`` (C, H, W), drawn on the CPU so CPU and GPU runs start from the same noise."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((n, *sample_shape), generator=g)


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The generator of a stochastic sampler's noise for batch number ``batch`` of a seeded run."""
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + batch)


def prompt_conditioning(model: DiffusionModel, prompts: Sequence, device) -> tuple[dict | None, dict | None]:
    """(cond, uncond) kwargs for a batch of prompts (text models: the empty prompt is the unconditional branch) or
    class labels (class-conditional models: the null class is); (None, None) for unconditional models.

    A text model's ``encode_prompts`` gives a tensor (``{"encoder_hidden_states": t}``) or a dict of tensors used as
    it is for both branches (PixArt-Σ: hidden states and attention mask; :meth:`DiffusionModel.text_conditioning`)."""
    if model.is_class_conditional:
        labels = torch.as_tensor([int(p) for p in prompts], dtype=torch.long, device=device)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, model.num_classes)}
    if not model.is_text_guided:
        return None, None
    return model.text_conditioning(list(prompts), device), model.text_conditioning([""] * len(prompts), device)


@torch.no_grad()
def generate(
    model: DiffusionModel, unet: nn.Module, cfg: SamplerConfig, n: int, seed: int,
    device: torch.device | str = "cpu", prompts: Sequence[str] | None = None, desc: str = "sampling",
    progress: bool = True, return_latents: bool = False, noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` images in [-1, 1] on the CPU ([n, C, H, W]); deterministic given ``seed`` and the batch size.

    ``noise``: the x_T to start from (default: :func:`initial_noise` of ``seed``), e.g. the first rows of a
    larger run's noise, so that a figure compares models on the same starting points.
    """
    if model.is_conditional and (prompts is None or len(prompts) < n):
        raise ValueError(f"{model.name} is conditional: need {n} prompts or class labels, got "
                         f"{0 if prompts is None else len(prompts)}")
    noise = initial_noise(model.sample_shape, n, seed) if noise is None else noise[:n]
    n_batches = (n + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(total=n_batches * cfg.steps, desc=desc, unit="step", disable=not progress, leave=False)
    out = []
    for b in range(n_batches):
        z = generate_batch(model, unet, cfg, noise, b, seed, device, prompts, return_latents, bar)
        bad = first_bad_row(z)
        if bad is not None:  # scored, NaN would become a silent NaN FID
            raise DataError(f"{desc}: sample {b * cfg.batch_size + bad} (seed {seed}) ends {kind(z[bad])}: the model "
                            f"diverges when sampling from this noise ({cfg.name}, {cfg.steps} steps)")
        out.append(z)
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def generate_batch(model: DiffusionModel, unet: nn.Module, cfg: SamplerConfig, noise: torch.Tensor, b: int, seed: int,
                   device: torch.device | str = "cpu", prompts: Sequence[str] | None = None, return_latents: bool = False,
                   progress: tqdm | None = None) -> torch.Tensor:
    """Sampler batch number ``b`` of a run from ``noise`` (its rows b * batch_size ...), on the CPU."""
    sl = slice(b * cfg.batch_size, min(noise.shape[0], (b + 1) * cfg.batch_size))
    cond, uncond = prompt_conditioning(model, prompts[sl] if prompts is not None else [], device)
    z = denoise(model, unet, cfg, noise[sl].to(device), cond, uncond, batch_generator(seed, b), progress=progress)
    return (z if return_latents else model.decode(z)).float().cpu()
