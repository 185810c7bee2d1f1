"""``model.arch`` overrides: a paper model's configs with the user's keys applied, checked before anything is built.

Plain keys go to the denoiser (UNet or transformer), ``vae_*`` keys to the first stage, ``text_*`` keys to the text
encoder (sd14: ``CLIPTextConfig`` fields; pixart_sigma: ``T5Config`` fields), and ``num_heads`` sets the fixed head
count of the original LDM-8 UNet.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

from qdiff.models.base import ModelConfigError
from qdiff.models.paper.specs import get_spec


@dataclass
class Arch:
    """Resolved configs of one model: the defaults of its :class:`PaperModel` with ``model.arch`` applied."""

    unet: dict
    first_stage: dict | None
    text: dict | None
    num_heads: int | None


def plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain lists/dicts, so diffusers configs serialise cleanly."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return value


def _init_keys(cls: type) -> set[str]:
    """The keyword arguments ``cls`` accepts: the ``model.arch`` keys that can reach it."""
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")}


def diffusers_class(name: str) -> type:
    """A diffusers model class by name; imported lazily because diffusers is slow to import."""
    import diffusers

    return getattr(diffusers, name)


def resolve_arch(name: str, arch: dict | None = None) -> Arch:
    """Apply ``model.arch`` overrides to model ``name``'s configs; unknown keys or inconsistent sizes fail here.

    Checking before anything is built turns a deep diffusers/torch error into one line naming the key.
    """
    spec = get_spec(name)
    unet = copy.deepcopy(spec.unet)
    first = copy.deepcopy(spec.first_stage) if spec.first_stage is not None else None
    text = copy.deepcopy(spec.text) if spec.text is not None else None
    num_heads = spec.num_heads
    unet_keys = _init_keys(diffusers_class(spec.unet_class))
    first_keys = _init_keys(diffusers_class(spec.first_stage_class)) if spec.first_stage_class else set()
    text_keys = set(_text_config_keys(spec.text_kind)) if text is not None else set()
    transformer = not spec.unet_class.startswith("UNet")

    for key, value in (plain(arch) or {}).items():
        value = plain(value)
        if key == "num_heads" and spec.num_heads is not None:
            num_heads = value
        elif key.startswith("vae_") and first is not None and key[4:] in first_keys:
            first[key[4:]] = value
        elif key.startswith("text_") and text is not None and key[5:] in text_keys:
            text[key[5:]] = value
        elif key in unet_keys:
            unet[key] = value
        else:
            text_cfg = "T5Config" if spec.text_kind == "t5" else "CLIPTextConfig"
            hint = [f"<{spec.unet_class} kwarg>" if transformer else "<UNet kwarg>"] \
                + (["vae_<first-stage kwarg>"] if first is not None else []) \
                + ([f"text_<{text_cfg} field>"] if text is not None else []) + (["num_heads"] if spec.num_heads else [])
            raise ModelConfigError(f"{name}: unknown model.arch key '{key}'; accepted: {', '.join(hint)}")

    if first is not None:
        _check_levels(name, "vae_", first)
    if transformer:
        _check_transformer(name, unet, text)
        return Arch(unet=unet, first_stage=first, text=text, num_heads=num_heads)
    _check_levels(name, "", unet)
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


def _check_transformer(name: str, net: dict, text: dict | None) -> None:
    """A DiT/PixArt config whose patches tile the latent and whose caption path fits the text encoder."""
    if net["sample_size"] % net["patch_size"]:
        raise ModelConfigError(f"{name}: model.arch sample_size {net['sample_size']} is not divisible by patch_size {net['patch_size']}")
    inner = net["num_attention_heads"] * net["attention_head_dim"]
    if net.get("cross_attention_dim") is not None and net["cross_attention_dim"] != inner:
        raise ModelConfigError(  # PixArt projects the caption to the block width before cross-attention
            f"{name}: model.arch cross_attention_dim ({net['cross_attention_dim']}) must equal num_attention_heads x "
            f"attention_head_dim ({inner})")
    if text is not None and net.get("caption_channels") != text["d_model"]:
        raise ModelConfigError(f"{name}: model.arch caption_channels ({net.get('caption_channels')}) must equal text_d_model ({text['d_model']})")


def _text_config_keys(kind: str) -> list[str]:
    """The ``text_*`` keys ``model.arch`` accepts: the fields of ``CLIPTextConfig`` (clip) or ``T5Config`` (t5)."""
    if kind == "t5":
        from transformers import T5Config

        return list(T5Config().to_dict())
    return _clip_text_config_keys()


def _clip_text_config_keys() -> list[str]:
    """The fields of ``CLIPTextConfig``: the ``text_*`` keys ``model.arch`` accepts."""
    from transformers import CLIPTextConfig

    return list(CLIPTextConfig().to_dict())
