"""What the pipeline needs from a diffusion model. Only ``unet`` (the noise predictor) is quantized."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


from qdiff.errors import CheckpointError, ConfigError, QDiffError


class WeightsNotFoundError(QDiffError, RuntimeError):
    """A model's weights cannot be reached; the message says which and how to point at a local copy."""


class ModelConfigError(ConfigError):
    """Bad model settings (unknown name, bad architecture override, unreadable checkpoint, ...)."""


def eps(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """Noise prediction of ``unet`` (FP or quantized) at (x_t, t, cond): the one way every stage calls a model."""
    return unwrap_output(unet(x, t, **(cond or {})))


def unwrap_output(out: Any) -> torch.Tensor:
    """Tensor from a diffusers ``*Output`` (``.sample``), a tuple, or a plain tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"noise predictor returned {type(out).__name__}; expected a tensor, a tuple or a diffusers output")


@dataclass
class DiffusionModel:
    """A loaded diffusion model.

    The noise predictor is called as ``eps = unet(x_t, t, **cond)`` where ``cond`` is a dict of per-sample
    tensors (e.g. ``{"encoder_hidden_states": ...}``) or empty; this is the only contract the quantizer and
    the reconstruction engine rely on, so any ``nn.Module`` with that signature works.
    """

    name: str
    unet: nn.Module
    #: Training noise schedule as a diffusers scheduler config (betas, prediction type, clipping).
    scheduler_config: dict
    #: (C, H, W) of what the sampler denoises: pixels for pixel-space models, latents for LDMs.
    sample_shape: tuple[int, int, int]
    #: First-stage decoder for latent models (stays full precision); ``None`` for pixel-space models.
    vae: nn.Module | None = None
    #: Latents are divided by this before ``vae.decode`` (SD: 0.18215).
    latent_scale: float = 1.0
    #: Prompt encoder for text-guided models (stays full precision): list[str] -> [B, L, D].
    encode_prompts: Callable[[list[str]], torch.Tensor] | None = None
    #: Classifier-free guidance strength for text-guided models.
    guidance_scale: float = 1.0
    #: Which feature extractor evaluates this model: "digits" or "inception".
    eval_kind: str = "inception"
    #: Real images [N, C, H, W] in [-1, 1] for FID, or ``None`` when they must come from eval config.
    real_images: Callable[[], torch.Tensor] | None = None
    #: Free-form facts for metrics.json (source, parameter count, ...).
    meta: dict = field(default_factory=dict)
    #: Prompt encoder module behind ``encode_prompts`` (moved with the model; stays full precision).
    text_encoder: nn.Module | None = None

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def is_text_guided(self) -> bool:
        return self.encode_prompts is not None

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images in [-1, 1]."""
        if self.vae is None:
            return z.clamp(-1, 1)
        dtype = next(self.vae.parameters()).dtype
        return unwrap_output(self.vae.decode(z.to(dtype) / self.latent_scale)).float().clamp(-1, 1)

    def to(self, device: torch.device | str) -> "DiffusionModel":
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                m.to(device)
        return self


@torch.no_grad()
def fingerprint(module: nn.Module) -> str:
    """Cheap content hash of a module's tensors (names, shapes, sums, leading values) for cache keys."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach()
        if t.is_meta:
            h.update(f"{name}{tuple(t.shape)}meta".encode())
            continue
        f = t.double().flatten()
        h.update(f"{name}{tuple(t.shape)}{f.sum().item():.10e}{(f * f).sum().item():.10e}".encode())
        h.update(f[:16].cpu().numpy().tobytes())
    return h.hexdigest()[:16]
