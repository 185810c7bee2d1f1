"""Loading the paper models from an original checkpoint, a diffusers folder or hub id, or with random weights.

Original checkpoints (.ckpt/.pt via ``torch.load(weights_only=True)``, or .safetensors) of the UNet models are
converted into the diffusers modules of the resolved architecture; the transformers (DiT-XL/2, PixArt-Σ) load from
diffusers folders or hub ids only (their original checkpoints are refused in one line naming diffusers' conversion
script, :func:`~qdiff.models.paper.sources.source_kind`). Every paper model registers :func:`load_paper_model` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from qdiff.models import register_model
from qdiff.models.base import DiffusionModel, ModelConfigError
from qdiff.models.config import ModelConfig
from qdiff.models.hub import from_pretrained
from qdiff.models.ldm_convert import (
    FIRST_STAGE_PREFIX, UNET_PREFIX, detect_unet_layout, load_checkpoint, original_to_diffusers, use_ema_weights,
)
from qdiff.models.paper.arch import Arch, diffusers_class, plain, resolve_arch
from qdiff.models.paper.build import make_unet, n_params, set_num_heads
from qdiff.models.paper.sources import check_cfg, no_weights, source_kind
from qdiff.models.paper.specs import PAPER_MODELS, PaperModel, get_spec
from qdiff.models.paper.text import (
    build_text_encoder, char_tokenizer, original_tokenizer, prompt_encoder, t5_prompt_encoder,
    t5_char_tokenizer, text_encoder_from_checkpoint,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Parts:
    """The modules one source yields, before :func:`_assemble` turns them into a :class:`DiffusionModel`."""

    unet: nn.Module
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    latent_scale: float | None = None
    fmt: str = "random_init"
    ema: bool = False


def _materialize(build: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build on the meta device and adopt the converted tensors: no time spent on a random init."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def _load_original(spec: PaperModel, arch: Arch, path: str, cfg: ModelConfig) -> _Parts:
    """Convert the UNet, first stage and text encoder of an original checkpoint into diffusers modules."""
    # The tokenizer before the big read: a missing vocabulary fails in seconds.
    tokenizer = original_tokenizer(spec.name, path, cfg.local_files_only) if spec.text is not None else None
    sd = load_checkpoint(path)
    ema = False
    layout = detect_unet_layout(sd) if spec.first_stage is None else "ldm"
    unet_prefix = UNET_PREFIX if layout == "ldm" else ""
    if spec.use_ema:
        sd, ema = use_ema_weights(sd, UNET_PREFIX)
    if layout == "ldm" and not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ModelConfigError(f"{spec.name}: checkpoint '{path}' has no '{UNET_PREFIX}*' tensors; is it a {spec.name} checkpoint?")
    with torch.device("meta"):
        template = make_unet(spec, arch)
    unet = _materialize(lambda: make_unet(spec, arch), original_to_diffusers(sd, template, prefix=unet_prefix, layout=layout))
    parts = _Parts(unet=unet, fmt=f"original ({layout})", ema=ema)

    if spec.first_stage is not None:
        fs_cls = diffusers_class(spec.first_stage_class)
        if not any(k.startswith(FIRST_STAGE_PREFIX) for k in sd):
            raise ModelConfigError(f"{spec.name}: checkpoint '{path}' has no '{FIRST_STAGE_PREFIX}*' tensors (the autoencoder)")
        with torch.device("meta"):
            fs_template = fs_cls(**arch.first_stage)
        parts.vae = _materialize(lambda: fs_cls(**arch.first_stage), original_to_diffusers(sd, fs_template))
        if "scale_factor" in sd:
            parts.latent_scale = float(sd["scale_factor"])
        elif spec.name == "ldm_church":
            raise ModelConfigError(f"{spec.name}: checkpoint '{path}' has no 'scale_factor' (LDM-8 scales its latents by the value stored there)")

    if spec.text is not None:
        parts.text_encoder = text_encoder_from_checkpoint(spec.name, arch.text, sd, path)
        parts.tokenizer = tokenizer
    return parts


def _load_diffusers(spec: PaperModel, arch: Arch, source: str, cfg: ModelConfig) -> _Parts:
    """Each component from its subfolder of a diffusers folder or hub repo (cache first, see :mod:`qdiff.models.hub`)."""

    def load(component: str, loader: Callable[..., Any]) -> Any:
        subfolders = spec.subfolders.get(component, (component,))
        return from_pretrained(spec.name, source, subfolders, loader, cfg.local_files_only, spec.source_hint)

    kw = dict(low_cpu_mem_usage=False)
    unet = load("unet", lambda s, **a: diffusers_class(spec.unet_class).from_pretrained(s, **a, **kw))
    if arch.num_heads is not None:
        set_num_heads(unet, arch.num_heads)
    parts = _Parts(unet=unet, fmt="diffusers")
    if spec.first_stage_class is not None:
        fs_cls = diffusers_class(spec.first_stage_class)
        parts.vae = load("vae", lambda s, **a: fs_cls.from_pretrained(s, **a, **kw))
        scaling = getattr(parts.vae.config, "scaling_factor", None)
        parts.latent_scale = float(scaling) if scaling is not None and spec.name != "ldm_bedroom" else None
    if spec.text is not None and spec.text_kind == "t5":
        from transformers import AutoTokenizer, T5EncoderModel

        parts.text_encoder = load("text_encoder", T5EncoderModel.from_pretrained)
        parts.tokenizer = load("tokenizer", AutoTokenizer.from_pretrained)  # the hub's T5Tokenizer, or a saved fast one
    elif spec.text is not None:
        from transformers import CLIPTextModel, CLIPTokenizer

        parts.text_encoder = load("text_encoder", CLIPTextModel.from_pretrained)
        parts.tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained)
    return parts


def _random_init(spec: PaperModel, arch: Arch) -> _Parts:
    """Every component with random weights and a char tokenizer: smoke tests without any download."""
    parts = _Parts(unet=make_unet(spec, arch))
    if spec.first_stage_class is not None:
        parts.vae = diffusers_class(spec.first_stage_class)(**arch.first_stage)
    if spec.text is not None:
        parts.text_encoder = build_text_encoder(arch.text, spec.text_kind)
        parts.tokenizer = (t5_char_tokenizer(spec.text_max_length) if spec.text_kind == "t5"
                           else char_tokenizer(arch.text["max_position_embeddings"]))
    return parts


def load_paper_model(cfg: ModelConfig) -> DiffusionModel:
    """Build paper model ``cfg.name`` from ``cfg.source`` (or its default), or with random weights."""
    spec = get_spec(cfg.name)
    check_cfg(spec, cfg)
    arch = resolve_arch(spec.name, cfg.arch)
    source = cfg.source or spec.default_source
    if cfg.random_init:
        parts = _random_init(spec, arch)
        source = "random_init"
    elif source is None:
        raise no_weights(spec)
    else:
        kind, where = source_kind(spec.name, source)
        if kind != "original" and set(plain(cfg.arch) or {}) - {"num_heads"}:
            raise ModelConfigError(f"{spec.name}: model.arch overrides apply to random_init or original checkpoints; '{source}' carries its own config")
        parts = _load_original(spec, arch, where, cfg) if kind == "original" else _load_diffusers(spec, arch, where, cfg)

    return _assemble(spec, cfg, parts, source)


def _assemble(spec: PaperModel, cfg: ModelConfig, parts: _Parts, source: str) -> DiffusionModel:
    """Cast, freeze and describe the loaded parts (metadata, latent scale, prompt encoder, reference images)."""
    from qdiff.models.reference import load_reference_images

    unet = parts.unet.float().eval()
    dtype = _DTYPES[cfg.dtype]
    meta: dict = dict(source=source, format=parts.fmt, n_params_unet=n_params(unet), paper=dict(spec.paper))
    uc = unet.config
    sample_shape = (int(uc.in_channels), int(uc.sample_size), int(uc.sample_size))
    resolution = sample_shape[-1]
    latent_scale = 1.0
    encode = None
    text_encoder = None
    if parts.vae is not None:
        vae = parts.vae if dtype == torch.float32 else parts.vae.to(dtype)
        vae = vae.eval().requires_grad_(False)
        resolution *= 2 ** (len(vae.config.block_out_channels) - 1)
        latent_scale = parts.latent_scale if parts.latent_scale is not None else spec.latent_scale
        if hasattr(vae, "register_to_config"):
            vae.register_to_config(scaling_factor=latent_scale)  # kept by save_pretrained
        meta["n_params_first_stage"] = n_params(vae)
        parts.vae = vae
    if parts.text_encoder is not None:
        text_encoder = parts.text_encoder.to(dtype).eval().requires_grad_(False)
        meta["n_params_text_encoder"] = n_params(text_encoder)
        encode = (t5_prompt_encoder(parts.tokenizer, text_encoder, unet, spec.text_max_length) if spec.text_kind == "t5"
                  else prompt_encoder(parts.tokenizer, text_encoder, unet))
    if spec.use_ema and parts.fmt.startswith("original"):
        meta["ema"] = parts.ema
    meta["resolution"] = resolution
    # class-conditional (DiT): as many classes as the denoiser's label table has besides the null class
    num_classes = int(uc.num_embeds_ada_norm) if spec.num_classes is not None else None
    guided = spec.text is not None or num_classes is not None
    reference = cfg.reference
    return DiffusionModel(
        name=spec.name,
        unet=unet,
        scheduler_config=dict(spec.schedule),
        sample_shape=sample_shape,
        vae=parts.vae,
        latent_scale=latent_scale,
        encode_prompts=encode,
        guidance_scale=cfg.guidance_scale if guided else 1.0,
        eval_kind="inception",
        real_images=(lambda: load_reference_images(reference, resolution)) if reference else None,
        meta=meta,
        text_encoder=text_encoder,
        num_classes=num_classes,
    )


for _name in PAPER_MODELS:
    register_model(_name)(load_paper_model)
