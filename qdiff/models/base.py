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
    return unwrap_output(call(unet, x, t, cond))


def call(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> Any:
    """``net(x_t, t, **cond)``, by keyword where the network names its timestep ``timestep`` but not second: diffusers'
    transformers take ``(hidden_states, encoder_hidden_states, ..., timestep)`` (PixArt, SD3, FLUX, Sana)."""
    names = _xt_keywords(type(net))
    if names is None:
        return net(x, t, **(cond or {}))
    return net(**{names[0]: x, names[1]: t}, **(cond or {}))


_KEYWORDS: dict[type, tuple[str, str] | None] = {}


def _xt_keywords(cls: type) -> tuple[str, str] | None:
    if cls not in _KEYWORDS:
        import inspect

        try:
            params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
        except (TypeError, ValueError):
            params = []
        _KEYWORDS[cls] = (params[0], "timestep") if len(params) > 1 and "timestep" in params[2:] else None
    return _KEYWORDS[cls]


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
    #: Prompt encoder for text-guided models (stays full precision): list[str] -> [B, L, D] (the
    #: ``encoder_hidden_states``), or a dict of such per-prompt tensors when the denoiser takes more than the hidden
    #: states (PixArt-Σ: ``encoder_hidden_states`` and T5's ``encoder_attention_mask``). :meth:`text_conditioning`
    #: turns either into the denoiser's keyword arguments.
    encode_prompts: Callable[[list[str]], torch.Tensor | dict[str, torch.Tensor]] | None = None
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
    #: Class-conditional models (DiT): classes 0..num_classes-1 as ``class_labels``; the null class ``num_classes``
    #: is classifier-free guidance's unconditional branch (used when ``guidance_scale != 1``).
    num_classes: int | None = None

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def is_text_guided(self) -> bool:
        return self.encode_prompts is not None

    @property
    def is_class_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def is_conditional(self) -> bool:
        """Text prompts or class labels condition it (a run draws one per sample: :func:`qdiff.spec.run_prompts`)."""
        return self.is_text_guided or self.is_class_conditional

    def text_conditioning(self, prompts: list[str], device: torch.device | str | None = None) -> dict:
        """The denoiser's keyword arguments for ``prompts``: ``{"encoder_hidden_states": ...}`` when
        ``encode_prompts`` gives a tensor, its dict as it is otherwise (on ``device`` when given)."""
        encoded = self.encode_prompts(list(prompts))
        cond = dict(encoded) if isinstance(encoded, dict) else {"encoder_hidden_states": encoded}
        return {k: v.to(device) for k, v in cond.items()} if device is not None else cond

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
