"""Loaders for the paper's four models: DDIM CIFAR-10, LDM-4 LSUN-Bedroom, LDM-8 LSUN-Church, Stable Diffusion v1.4.

Every architecture is written out here as a diffusers config (taken from the official configs), so the same
code builds a random-init smoke-test model, converts an original checkpoint, or checks a downloaded diffusers
folder. Sources: a diffusers hub id, a local diffusers folder, or an original checkpoint file (.ckpt/.pt via
``torch.load(weights_only=True)``, or .safetensors). ``model.arch`` overrides the config for width-reduced
variants: plain keys go to the UNet, ``vae_*`` keys to the first stage, ``text_*`` keys to the CLIP text
encoder (sd14), and ``num_heads`` sets the fixed head count of the original LDM-8 UNet.
"""
from __future__ import annotations

import copy
import inspect
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from qdiff.models import register_model
from qdiff.models.base import DiffusionModel, ModelConfigError, WeightsNotFoundError
from qdiff.models.config import ModelConfig
from qdiff.models.ldm_convert import (
    CHECKPOINT_SUFFIXES, FIRST_STAGE_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX,
    detect_unet_layout, load_checkpoint, original_to_diffusers, use_ema_weights,
)

# --- architectures ---------------------------------------------------------------------------------------------

#: DDPM CIFAR-10 UNet (Ho et al. 2020), as in google/ddpm-cifar10-32: 35,746,307 parameters.
DDPM_CIFAR10_UNET: dict = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6, norm_num_groups=32,
)

#: latent-diffusion configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml: model_channels 224, channel_mult
#: [1,2,3,4], attention at downsampling factors 2,4,8, num_head_channels 32. 274,056,163 parameters.
LDM_BEDROOM_UNET: dict = dict(
    sample_size=64, in_channels=3, out_channels=3,
    block_out_channels=[224, 448, 672, 896], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=32, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
#: VQ-f4 first stage (embed_dim 3, n_embed 8192, ch 128, ch_mult [1,2,4]).
LDM_BEDROOM_VQ: dict = dict(
    in_channels=3, out_channels=3, sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[128, 256, 512], layers_per_block=2, latent_channels=3,
    num_vq_embeddings=8192, vq_embed_dim=3, norm_num_groups=32,
)

#: latent-diffusion configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml: model_channels 192, channel_mult
#: [1,2,2,4,4], attention at factors 1,2,4,8, num_heads 8, use_scale_shift_norm, resblock_updown.
#: 294,966,916 parameters.
LDM_CHURCH_UNET: dict = dict(
    sample_size=32, in_channels=4, out_channels=4,
    block_out_channels=[192, 384, 384, 768, 768], layers_per_block=2,
    down_block_types=["AttnDownBlock2D"] * 4 + ["DownBlock2D"],
    up_block_types=["ResnetUpsampleBlock2D"] + ["AttnUpBlock2D"] * 4,
    attention_head_dim=None, resnet_time_scale_shift="scale_shift", downsample_type="resnet",
    upsample_type="resnet", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    attn_norm_num_groups=32,  # diffusers drops the middle attention's GroupNorm under scale_shift unless set
)
#: KL-f8 first stage (embed_dim 4, ch 128, ch_mult [1,2,4,4]).
LDM_CHURCH_KL: dict = dict(
    in_channels=3, out_channels=3, sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
)

#: CompVis/stable-diffusion-v1-4 unet/config.json: 859,520,964 parameters.
SD14_UNET: dict = dict(
    sample_size=64, in_channels=4, out_channels=4,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
)
SD14_VAE: dict = dict(LDM_CHURCH_KL, sample_size=512)
#: CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14), what SD v1 conditions on.
SD14_TEXT: dict = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)

# --- training noise schedules (diffusers scheduler configs) ----------------------------------------------------
# latent-diffusion's "linear" schedule is linspace(sqrt(start), sqrt(end))**2, i.e. diffusers "scaled_linear".
# set_alpha_to_one/steps_offset reproduce the original DDIM samplers: the DDIM repo (CIFAR) steps to alpha=1 at
# the end; latent-diffusion/CompVis use timesteps 1, 1+c, ... and alphas_cumprod[0] as the final alpha.

DDPM_CIFAR10_SCHEDULE: dict = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
)
LDM_BEDROOM_SCHEDULE: dict = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
LDM_CHURCH_SCHEDULE: dict = dict(LDM_BEDROOM_SCHEDULE, beta_end=0.0155)
SD14_SCHEDULE: dict = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)

LSUN_BEDROOMS_URL = "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip"
LSUN_CHURCHES_URL = "https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip"
DDIM_CIFAR10_EMA_URL = "https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1"
SD14_HUB_ID = "CompVis/stable-diffusion-v1-4"
CLIP_TOKENIZER_HUB_ID = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class PaperModel:
    """What differs between the paper's models; the loader below is shared."""

    name: str
    unet_class: str
    unet: dict
    schedule: dict
    #: The paper's sampler and Table 5 calibration (T steps, interval c, n per step, N total).
    paper: dict
    default_source: str | None = None
    #: Where the official weights are, for error messages.
    weights_hint: str = ""
    #: Other accepted sources, appended to "(a diffusers folder...)" in the offline error.
    source_hint: str = ""
    first_stage_class: str | None = None
    first_stage: dict | None = None
    latent_scale: float = 1.0
    #: Fixed number of attention heads of the original UNet (LDM ``num_heads``), or None to use the config.
    num_heads: int | None = None
    text: dict | None = None
    #: Swap in latent-diffusion's ``model_ema.*`` weights from original checkpoints (what the paper samples).
    use_ema: bool = False
    #: Diffusers subfolders tried in order for each component ("" is the folder itself).
    subfolders: dict = field(default_factory=dict)


PAPER_MODELS: dict[str, PaperModel] = {
    "ddim_cifar10": PaperModel(
        name="ddim_cifar10", unet_class="UNet2DModel", unet=DDPM_CIFAR10_UNET, schedule=DDPM_CIFAR10_SCHEDULE,
        paper=dict(sampler="ddim", steps=100, eta=0.0, calib=dict(T=100, c=5, n=256, N=5120)),
        default_source="google/ddpm-cifar10-32",
        weights_hint=f"google/ddpm-cifar10-32 (diffusers) or the DDIM repo's ema_cifar10 model-790000.ckpt ({DDIM_CIFAR10_EMA_URL})",
        source_hint=f", or the DDIM repo's ema_cifar10 model-790000.ckpt from {DDIM_CIFAR10_EMA_URL}",
        subfolders={"unet": ("", "unet")},
    ),
    "ldm_bedroom": PaperModel(
        name="ldm_bedroom", unet_class="UNet2DModel", unet=LDM_BEDROOM_UNET, schedule=LDM_BEDROOM_SCHEDULE,
        paper=dict(sampler="ddim", steps=200, eta=1.0, calib=dict(T=200, c=10, n=256, N=5120)),
        weights_hint=f"{LSUN_BEDROOMS_URL} (unzip; model.ckpt)",
        source_hint=f", or the model.ckpt of {LSUN_BEDROOMS_URL}",
        first_stage_class="VQModel", first_stage=LDM_BEDROOM_VQ, use_ema=True,
        subfolders={"unet": ("unet",), "vae": ("vqvae", "vae")},
    ),
    "ldm_church": PaperModel(
        name="ldm_church", unet_class="UNet2DModel", unet=LDM_CHURCH_UNET, schedule=LDM_CHURCH_SCHEDULE,
        paper=dict(sampler="ddim", steps=500, eta=0.0, calib=dict(T=500, c=25, n=256, N=5120)),
        weights_hint=f"{LSUN_CHURCHES_URL} (unzip; model.ckpt)",
        source_hint=f", or the model.ckpt of {LSUN_CHURCHES_URL}",
        first_stage_class="AutoencoderKL", first_stage=LDM_CHURCH_KL, num_heads=8, use_ema=True,
        subfolders={"unet": ("unet",), "vae": ("vqvae", "vae")},
    ),
    "sd14": PaperModel(
        name="sd14", unet_class="UNet2DConditionModel", unet=SD14_UNET, schedule=SD14_SCHEDULE,
        paper=dict(sampler="plms", steps=50, eta=0.0, guidance_scale=7.5, calib=dict(T=50, c=2, n=256, N=6400)),
        default_source=SD14_HUB_ID, weights_hint=f"{SD14_HUB_ID} (diffusers)",
        first_stage_class="AutoencoderKL", first_stage=SD14_VAE, latent_scale=0.18215, text=SD14_TEXT,
        subfolders={"unet": ("unet",), "vae": ("vae",), "text_encoder": ("text_encoder",), "tokenizer": ("tokenizer",)},
    ),
}


# --- architecture overrides ---------------------------------------------------------------------------------------

@dataclass
class Arch:
    """Resolved configs of one model: the defaults of its :class:`PaperModel` with ``model.arch`` applied."""

    unet: dict
    first_stage: dict | None
    text: dict | None
    num_heads: int | None


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain lists/dicts, so diffusers configs serialise cleanly."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return value


def _init_keys(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")}


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def resolve_arch(name: str, arch: dict | None = None) -> Arch:
    """Apply ``model.arch`` overrides to model ``name``'s configs; unknown keys or inconsistent sizes fail here.

    Checking before anything is built turns a deep diffusers/torch error into one line naming the key.
    """
    spec = _spec(name)
    unet = copy.deepcopy(spec.unet)
    first = copy.deepcopy(spec.first_stage) if spec.first_stage is not None else None
    text = copy.deepcopy(spec.text) if spec.text is not None else None
    num_heads = spec.num_heads
    unet_keys = _init_keys(_diffusers_class(spec.unet_class))
    first_keys = _init_keys(_diffusers_class(spec.first_stage_class)) if spec.first_stage_class else set()
    text_keys = set(_clip_text_config_keys()) if text is not None else set()

    for key, value in (_plain(arch) or {}).items():
        value = _plain(value)
        if key == "num_heads" and spec.num_heads is not None:
            num_heads = value
        elif key.startswith("vae_") and first is not None and key[4:] in first_keys:
            first[key[4:]] = value
        elif key.startswith("text_") and text is not None and key[5:] in text_keys:
            text[key[5:]] = value
        elif key in unet_keys:
            unet[key] = value
        else:
            hint = ["<UNet kwarg>"] + (["vae_<first-stage kwarg>"] if first is not None else []) \
                + (["text_<CLIPTextConfig field>"] if text is not None else []) + (["num_heads"] if spec.num_heads else [])
            raise ModelConfigError(f"{name}: unknown model.arch key '{key}'; accepted: {', '.join(hint)}")

    _check_levels(name, "", unet)
    if first is not None:
        _check_levels(name, "vae_", first)
    _check_widths(name, unet, num_heads)
    if text is not None:
        if text["hidden_size"] % text["num_attention_heads"]:
            raise ModelConfigError(f"{name}: model.arch text_hidden_size {text['hidden_size']} is not divisible by text_num_attention_heads {text['num_attention_heads']}")
        if unet.get("cross_attention_dim") != text["hidden_size"]:
            raise ModelConfigError(
                f"{name}: model.arch cross_attention_dim ({unet.get('cross_attention_dim')}) must equal text_hidden_size ({text['hidden_size']})"
            )
    return Arch(unet=unet, first_stage=first, text=text, num_heads=num_heads)


def _check_levels(name: str, prefix: str, cfg: dict) -> None:
    n = len(cfg["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if key in cfg and len(cfg[key]) != n:
            raise ModelConfigError(
                f"{name}: model.arch {prefix}block_out_channels has {n} levels but {prefix}{key} has {len(cfg[key])}; override both"
            )
    groups = cfg.get("norm_num_groups") or 32
    bad = [c for c in cfg["block_out_channels"] if c % groups]
    if bad:
        raise ModelConfigError(f"{name}: model.arch {prefix}block_out_channels {bad[0]} is not divisible by {prefix}norm_num_groups {groups}")


def _check_widths(name: str, unet: dict, num_heads: int | None) -> None:
    attn_channels = [c for c, t in zip(unet["block_out_channels"], unet["down_block_types"]) if "Attn" in t]
    attn_channels.append(unet["block_out_channels"][-1])  # middle block
    if num_heads is not None:
        bad = [c for c in attn_channels if c % num_heads]
        if bad:
            raise ModelConfigError(f"{name}: model.arch block_out_channels {bad[0]} is not divisible by num_heads {num_heads}")
    elif "cross_attention_dim" in unet:  # UNet2DConditionModel: attention_head_dim is the number of heads
        heads = unet.get("num_attention_heads") or unet.get("attention_head_dim")
        bad = [c for c in attn_channels if isinstance(heads, int) and c % heads]
        if bad:
            raise ModelConfigError(f"{name}: model.arch block_out_channels {bad[0]} is not divisible by {heads} attention heads")
    elif unet.get("attention_head_dim"):
        bad = [c for c in attn_channels if c % unet["attention_head_dim"]]
        if bad:
            raise ModelConfigError(f"{name}: model.arch block_out_channels {bad[0]} is not divisible by attention_head_dim {unet['attention_head_dim']}")


def _clip_text_config_keys() -> list[str]:
    from transformers import CLIPTextConfig

    return list(CLIPTextConfig().to_dict())


def _spec(name: str) -> PaperModel:
    if name not in PAPER_MODELS:
        raise ModelConfigError(f"unknown paper model '{name}'; known: {', '.join(PAPER_MODELS)}")
    return PAPER_MODELS[name]


# --- building --------------------------------------------------------------------------------------------------

def set_num_heads(unet: nn.Module, num_heads: int) -> None:
    """Give every self-attention layer ``num_heads`` heads (original LDM-8: 8 heads at every width).

    diffusers' UNet2DModel only knows a fixed head *width*; the head count changes the attention result, so a
    converted LDM-8 needs it set after construction.
    """
    from diffusers.models.attention_processor import Attention

    for mod_name, m in unet.named_modules():
        if isinstance(m, Attention):
            inner = m.to_q.out_features
            if inner % num_heads:
                raise ModelConfigError(f"attention '{mod_name}' has {inner} channels, not divisible by num_heads {num_heads}")
            m.heads = m.sliceable_head_dim = num_heads
            if m.scale_qk:
                m.scale = (inner // num_heads) ** -0.5


def _make_unet(spec: PaperModel, arch: Arch) -> nn.Module:
    unet = _diffusers_class(spec.unet_class)(**arch.unet)
    if arch.num_heads is not None:
        set_num_heads(unet, arch.num_heads)
    return unet


def build_unet(name: str, arch: dict | None = None) -> nn.Module:
    """The (random-init) noise predictor of paper model ``name``; wrap in ``torch.device("meta")`` to only count."""
    return _make_unet(_spec(name), resolve_arch(name, arch))


def build_first_stage(name: str, arch: dict | None = None) -> nn.Module:
    """The (random-init) VQ/KL autoencoder of latent model ``name``."""
    spec = _spec(name)
    if spec.first_stage_class is None:
        raise ModelConfigError(f"{name} is a pixel-space model without a first stage")
    return _diffusers_class(spec.first_stage_class)(**resolve_arch(name, arch).first_stage)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def char_tokenizer(max_length: int = 77) -> Any:
    """A CLIP-shaped, character-level tokenizer built in code, for random-init text encoders (no hub access).

    Lower-cased printable ASCII, ``<|startoftext|>`` ... ``<|endoftext|>``, padded with ``<|endoftext|>`` like
    SD's CLIPTokenizer, so the text path runs end to end on real captions without downloading a vocabulary.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for ch in (chr(i).lower() for i in range(32, 127)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", model_max_length=max_length,
    )


def _text_encoder(text_cfg: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(text_cfg)
    cfg.setdefault("bos_token_id", 0 if cfg["vocab_size"] < 49406 else 49406)
    cfg.setdefault("eos_token_id", 1 if cfg["vocab_size"] < 49406 else 49407)
    cfg.setdefault("pad_token_id", 1)
    return CLIPTextModel(CLIPTextConfig(**cfg))


# --- sources ---------------------------------------------------------------------------------------------------

def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub, so an offline machine fails in seconds instead of minutes of client retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the client try
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, ValueError)
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors += (HfHubHTTPError,)
    except ImportError:  # pragma: no cover
        pass
    return errors


def _not_found(name: str, source: str, hint: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"{name}: cannot load '{source}' (no network or not cached). Download it on a machine with access and set "
        f"model.source=/path/to/{source.rstrip('/').split('/')[-1]} (a diffusers folder{hint}), "
        "or use model.random_init=true for a smoke test."
    )


def _from_pretrained(name: str, source: str, subfolders: tuple[str, ...], load: Callable[..., Any],
                     cfg: ModelConfig, hint: str) -> Any:
    """``load(source, [subfolder=...,] local_files_only=...)``: cache/folder first, then one online attempt."""
    is_dir = Path(source).expanduser().is_dir()
    if is_dir:
        root = Path(source).expanduser()
        subfolders = tuple(s for s in subfolders if (root / s / "config.json").is_file()
                           or (root / s / "tokenizer_config.json").is_file() or (root / s / "vocab.json").is_file()) or subfolders
    errors = _load_errors()
    last: BaseException | None = None
    where = str(Path(source).expanduser()) if is_dir else source
    for sub in subfolders:
        try:
            with warnings.catch_warnings():  # diffusers passes a deprecated hub argument; not the user's concern
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
                return load(where, local_files_only=True, **({"subfolder": sub} if sub else {}))
        except errors as e:
            last = e
    if is_dir:
        first = str(last).strip().splitlines()[0] if last and str(last).strip() else "missing files"
        raise WeightsNotFoundError(f"{name}: cannot load '{source}' ({first[:200]})") from None
    if cfg.local_files_only or _hub_offline() or not _hub_reachable():
        raise _not_found(name, source, hint) from None
    for sub in subfolders:
        try:
            return load(source, local_files_only=False, **({"subfolder": sub} if sub else {}))
        except errors:
            pass
    raise _not_found(name, source, hint) from None


def _source_kind(name: str, source: str) -> tuple[str, str]:
    """('original', file) | ('diffusers', folder) | ('hub', id)."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix not in CHECKPOINT_SUFFIXES:
            raise ModelConfigError(f"{name}: model.source '{source}' is a file but not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        return "original", str(p)
    if p.is_dir():
        if any((p / f).exists() for f in ("model_index.json", "unet", "config.json", "vae", "vqvae")):
            return "diffusers", str(p)
        for f in ("model.safetensors", "model.ckpt"):
            if (p / f).is_file():
                return "original", str(p / f)
        raise ModelConfigError(f"{name}: folder '{source}' is neither a diffusers folder nor holds model.ckpt/model.safetensors")
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") != 1 or p.suffix in CHECKPOINT_SUFFIXES
    if looks_local:
        raise WeightsNotFoundError(f"{name}: model.source '{source}' does not exist")
    return "hub", source


# --- loading ---------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Parts:
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
    tokenizer = _original_tokenizer(spec, path, cfg) if spec.text is not None else None  # before the big read
    sd = load_checkpoint(path)
    ema = False
    layout = detect_unet_layout(sd) if spec.first_stage is None else "ldm"
    unet_prefix = UNET_PREFIX if layout == "ldm" else ""
    if spec.use_ema:
        sd, ema = use_ema_weights(sd, UNET_PREFIX)
    if layout == "ldm" and not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ModelConfigError(f"{spec.name}: checkpoint '{path}' has no '{UNET_PREFIX}*' tensors; is it a {spec.name} checkpoint?")
    with torch.device("meta"):
        template = _make_unet(spec, arch)
    unet = _materialize(lambda: _make_unet(spec, arch), original_to_diffusers(sd, template, prefix=unet_prefix, layout=layout))
    parts = _Parts(unet=unet, fmt=f"original ({layout})", ema=ema)

    if spec.first_stage is not None:
        fs_cls = _diffusers_class(spec.first_stage_class)
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
        parts.text_encoder = _text_encoder(arch.text)
        text_sd = {}
        for k, v in sd.items():
            if k.startswith(TEXT_ENCODER_PREFIX):
                k = k[len(TEXT_ENCODER_PREFIX):]
                text_sd[k[len("text_model."):] if k.startswith("text_model.") else k] = v
        text_sd.pop("embeddings.position_ids", None)
        expected = parts.text_encoder.state_dict()
        missing = [k for k in expected if k not in text_sd]
        if missing:
            raise ModelConfigError(f"{spec.name}: checkpoint '{path}' lacks text encoder tensor '{TEXT_ENCODER_PREFIX}text_model.{missing[0]}'")
        bad = [k for k in expected if tuple(text_sd[k].shape) != tuple(expected[k].shape)]
        if bad:
            raise ModelConfigError(f"{spec.name}: text encoder tensor '{bad[0]}' has shape {tuple(text_sd[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}")
        parts.text_encoder.load_state_dict({k: text_sd[k] for k in expected}, strict=True)
        parts.tokenizer = tokenizer
    return parts


def _original_tokenizer(spec: PaperModel, path: str, cfg: ModelConfig) -> Any:
    """Original SD checkpoints carry no vocabulary: use a ``tokenizer/`` folder beside the file, else CLIP's hub copy."""
    from transformers import AutoTokenizer, CLIPTokenizer

    beside = Path(path).parent / "tokenizer"
    if beside.is_dir():
        return _from_pretrained(spec.name, str(beside), ("",), AutoTokenizer.from_pretrained, cfg, hint="")
    return _from_pretrained(spec.name, CLIP_TOKENIZER_HUB_ID, ("",), CLIPTokenizer.from_pretrained, cfg,
                            hint=", or put CLIP's tokenizer/ folder next to the checkpoint")


def _load_diffusers(spec: PaperModel, arch: Arch, source: str, cfg: ModelConfig) -> _Parts:
    hint = spec.source_hint
    kw = dict(low_cpu_mem_usage=False)
    unet = _from_pretrained(spec.name, source, spec.subfolders.get("unet", ("unet",)),
                            lambda s, **a: _diffusers_class(spec.unet_class).from_pretrained(s, **a, **kw), cfg, hint)
    if arch.num_heads is not None:
        set_num_heads(unet, arch.num_heads)
    parts = _Parts(unet=unet, fmt="diffusers")
    if spec.first_stage_class is not None:
        fs_cls = _diffusers_class(spec.first_stage_class)
        parts.vae = _from_pretrained(spec.name, source, spec.subfolders.get("vae", ("vae",)),
                                     lambda s, **a: fs_cls.from_pretrained(s, **a, **kw), cfg, hint)
        scaling = getattr(parts.vae.config, "scaling_factor", None)
        parts.latent_scale = float(scaling) if scaling is not None and spec.name != "ldm_bedroom" else None
    if spec.text is not None:
        from transformers import CLIPTextModel, CLIPTokenizer

        parts.text_encoder = _from_pretrained(spec.name, source, spec.subfolders["text_encoder"], CLIPTextModel.from_pretrained, cfg, hint)
        parts.tokenizer = _from_pretrained(spec.name, source, spec.subfolders["tokenizer"], CLIPTokenizer.from_pretrained, cfg, hint)
    return parts


def _random_init(spec: PaperModel, arch: Arch) -> _Parts:
    parts = _Parts(unet=_make_unet(spec, arch))
    if spec.first_stage_class is not None:
        parts.vae = _diffusers_class(spec.first_stage_class)(**arch.first_stage)
    if spec.text is not None:
        parts.text_encoder = _text_encoder(arch.text)
        parts.tokenizer = char_tokenizer(arch.text["max_position_embeddings"])
    return parts


def _prompt_encoder(tokenizer: Any, text_encoder: nn.Module, unet: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)  # 77 for CLIP

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        """[B, 77, D] last hidden states of the CLIP text encoder, in the UNet's dtype and device.

        The text encoder follows the UNet's device because ``DiffusionModel.to`` moves only unet and vae.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt").input_ids
        ref = next(unet.parameters())
        if next(text_encoder.parameters()).device != ref.device:
            text_encoder.to(ref.device)
        with torch.no_grad():
            hidden = text_encoder(ids.to(ref.device))[0]
        return hidden.to(ref.dtype)

    # Exposed for export and inspection (DiffusionModel has no field for the text side).
    encode_prompts.text_encoder = text_encoder
    encode_prompts.tokenizer = tokenizer
    return encode_prompts


def _check_cfg(spec: PaperModel, cfg: ModelConfig) -> None:
    if cfg.name != spec.name:
        raise ModelConfigError(f"loader '{spec.name}' called with model.name='{cfg.name}'")
    if cfg.reference and not Path(cfg.reference).expanduser().exists():
        raise WeightsNotFoundError(f"{spec.name}: model.reference '{cfg.reference}' does not exist; point it at a folder of images or an .npz/.safetensors file")
    if spec.text is not None and cfg.prompts and not Path(cfg.prompts).expanduser().is_file():
        raise WeightsNotFoundError(f"{spec.name}: model.prompts '{cfg.prompts}' does not exist; point it at a COCO captions JSON, TSV or TXT file")


def _no_weights(spec: PaperModel) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"{spec.name}: no weights configured. Download {spec.weights_hint} and set model.source=/path/to/model.ckpt, "
        "or use model.random_init=true for a smoke test."
    )


def _hub_cached(source: str, subfolders: tuple[str, ...]) -> bool:
    """Whether the hub cache holds the config of one of ``subfolders`` of repo ``source`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for sub in subfolders:
        try:
            hit = try_to_load_from_cache(source, f"{sub}/config.json" if sub else "config.json")
        except ValueError:  # not a valid repo id
            return False
        if isinstance(hit, str):
            return True
    return False


def check_source(cfg: ModelConfig) -> None:
    """The cheap checks of :func:`load_paper_model`, run before any work: a missing local file, no configured
    weights, or a hub id that is neither cached nor reachable fails here in one line naming the weights."""
    spec = _spec(cfg.name)
    _check_cfg(spec, cfg)
    resolve_arch(spec.name, cfg.arch)
    if cfg.random_init:
        return
    source = cfg.source or spec.default_source
    if source is None:
        raise _no_weights(spec)
    kind, _ = _source_kind(spec.name, source)
    if kind == "hub" and not _hub_cached(source, spec.subfolders.get("unet", ("unet",))):
        if cfg.local_files_only or _hub_offline() or not _hub_reachable():
            raise _not_found(spec.name, source, spec.source_hint)


def load_paper_model(cfg: ModelConfig) -> DiffusionModel:
    """Build paper model ``cfg.name`` from ``cfg.source`` (or its default), or with random weights."""
    spec = _spec(cfg.name)
    _check_cfg(spec, cfg)
    arch = resolve_arch(spec.name, cfg.arch)
    source = cfg.source or spec.default_source
    if cfg.random_init:
        parts = _random_init(spec, arch)
        source = "random_init"
    elif source is None:
        raise _no_weights(spec)
    else:
        kind, where = _source_kind(spec.name, source)
        if kind != "original" and set(_plain(cfg.arch) or {}) - {"num_heads"}:
            raise ModelConfigError(f"{spec.name}: model.arch overrides apply to random_init or original checkpoints; '{source}' carries its own config")
        parts = _load_original(spec, arch, where, cfg) if kind == "original" else _load_diffusers(spec, arch, where, cfg)

    return _assemble(spec, cfg, parts, source)


def _assemble(spec: PaperModel, cfg: ModelConfig, parts: _Parts, source: str) -> DiffusionModel:
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
        encode = _prompt_encoder(parts.tokenizer, text_encoder, unet)
    if spec.use_ema and parts.fmt.startswith("original"):
        meta["ema"] = parts.ema
    meta["resolution"] = resolution
    reference = cfg.reference
    return DiffusionModel(
        name=spec.name,
        unet=unet,
        scheduler_config=dict(spec.schedule),
        sample_shape=sample_shape,
        vae=parts.vae,
        latent_scale=latent_scale,
        encode_prompts=encode,
        guidance_scale=cfg.guidance_scale if spec.text is not None else 1.0,
        eval_kind="inception",
        real_images=(lambda: load_reference_images(reference, resolution)) if reference else None,
        meta=meta,
        text_encoder=text_encoder,
    )


for _name in PAPER_MODELS:
    register_model(_name)(load_paper_model)


__all__ = [
    "PAPER_MODELS", "PaperModel", "Arch", "resolve_arch", "build_unet", "build_first_stage", "set_num_heads",
    "char_tokenizer", "load_paper_model", "check_source", "n_params",
    "DDPM_CIFAR10_UNET", "LDM_BEDROOM_UNET", "LDM_BEDROOM_VQ", "LDM_CHURCH_UNET", "LDM_CHURCH_KL",
    "SD14_UNET", "SD14_VAE", "SD14_TEXT",
]
