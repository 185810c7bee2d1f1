"""Loaders for the paper's four models: DDIM CIFAR-10, LDM-4 LSUN-Bedroom, LDM-8 LSUN-Church, Stable Diffusion v1.4;
and for two transformers its successors benchmark: DiT-XL/2 256 (class-conditional ImageNet) and PixArt-Σ XL/2 1024
(T5 text-to-image), from diffusers folders or hub ids (their original checkpoints: diffusers' conversion scripts).

Every architecture is written out as a diffusers config (taken from the official configs), so the same code
builds a random-init smoke-test model, converts an original checkpoint, or checks a downloaded diffusers
folder. Sources: a diffusers hub id, a local diffusers folder, or an original checkpoint file (.ckpt/.pt via
``torch.load(weights_only=True)``, or .safetensors). ``model.arch`` overrides the config for width-reduced
variants: plain keys go to the denoiser (UNet or transformer), ``vae_*`` keys to the first stage, ``text_*`` keys to
the text encoder (sd14: CLIPTextConfig fields; pixart_sigma: T5Config fields), and ``num_heads`` sets the fixed head
count of the original LDM-8 UNet.

Modules, one job each: :mod:`.specs` (the models as data), :mod:`.arch` (``model.arch`` overrides and checks),
:mod:`.build` (random-init modules), :mod:`.text` (tokenizers, text encoder, prompt encoder), :mod:`.sources`
(which weights, checked before any work), :mod:`.loading` (checkpoints to a registered ``DiffusionModel``).
Hub access lives in :mod:`qdiff.models.hub`.
"""
from __future__ import annotations

from qdiff.models.paper.arch import Arch, resolve_arch
from qdiff.models.paper.build import build_first_stage, build_unet, n_params, set_num_heads
from qdiff.models.paper.loading import load_paper_model
from qdiff.models.paper.sources import check_source
from qdiff.models.paper.specs import (
    CLIP_TOKENIZER_HUB_ID, DDIM_CIFAR10_EMA_URL, DDPM_CIFAR10_SCHEDULE, DDPM_CIFAR10_UNET, DIT_CONVERT_SCRIPT,
    DIT_SCHEDULE, DIT_VAE, DIT_XL2_256_HUB_ID, DIT_XL2_256_TRANSFORMER, LDM_BEDROOM_SCHEDULE, LDM_BEDROOM_UNET,
    LDM_BEDROOM_VQ, LDM_CHURCH_KL, LDM_CHURCH_SCHEDULE, LDM_CHURCH_UNET, LSUN_BEDROOMS_URL, LSUN_CHURCHES_URL,
    PAPER_MODELS, PIXART_SIGMA_CONVERT_SCRIPT, PIXART_SIGMA_HUB_ID, PIXART_SIGMA_SCHEDULE, PIXART_SIGMA_TEXT,
    PIXART_SIGMA_TRANSFORMER, SD14_HUB_ID, SD14_SCHEDULE, SD14_TEXT, SD14_UNET, SD14_VAE, SDXL_VAE, PaperModel,
)
from qdiff.models.paper.text import build_text_encoder, char_tokenizer

__all__ = [
    "PAPER_MODELS", "PaperModel", "Arch", "resolve_arch", "build_unet", "build_first_stage", "set_num_heads",
    "build_text_encoder", "char_tokenizer", "load_paper_model", "check_source", "n_params",
    "DDPM_CIFAR10_UNET", "LDM_BEDROOM_UNET", "LDM_BEDROOM_VQ", "LDM_CHURCH_UNET", "LDM_CHURCH_KL",
    "SD14_UNET", "SD14_VAE", "SD14_TEXT", "DIT_XL2_256_TRANSFORMER", "DIT_VAE", "PIXART_SIGMA_TRANSFORMER", "SDXL_VAE",
    "PIXART_SIGMA_TEXT",
    "DDPM_CIFAR10_SCHEDULE", "LDM_BEDROOM_SCHEDULE", "LDM_CHURCH_SCHEDULE", "SD14_SCHEDULE", "DIT_SCHEDULE",
    "PIXART_SIGMA_SCHEDULE",
    "LSUN_BEDROOMS_URL", "LSUN_CHURCHES_URL", "DDIM_CIFAR10_EMA_URL", "SD14_HUB_ID", "CLIP_TOKENIZER_HUB_ID",
    "DIT_XL2_256_HUB_ID", "PIXART_SIGMA_HUB_ID", "DIT_CONVERT_SCRIPT", "PIXART_SIGMA_CONVERT_SCRIPT",
]
