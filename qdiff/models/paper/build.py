"""Random-init modules of the paper models, built from resolved :class:`~qdiff.models.paper.arch.Arch` configs."""
from __future__ import annotations

from torch import nn

from qdiff.models.base import ModelConfigError
from qdiff.models.paper.arch import Arch, diffusers_class, resolve_arch
from qdiff.models.paper.specs import PaperModel, get_spec


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


def make_unet(spec: PaperModel, arch: Arch) -> nn.Module:
    """The UNet of ``spec`` with the resolved ``arch``, its head count fixed where the original UNet fixes it."""
    unet = diffusers_class(spec.unet_class)(**arch.unet)
    if arch.num_heads is not None:
        set_num_heads(unet, arch.num_heads)
    return unet


def build_unet(name: str, arch: dict | None = None) -> nn.Module:
    """The (random-init) noise predictor of paper model ``name``; wrap in ``torch.device("meta")`` to only count."""
    return make_unet(get_spec(name), resolve_arch(name, arch))


def build_first_stage(name: str, arch: dict | None = None) -> nn.Module:
    """The (random-init) VQ/KL autoencoder of latent model ``name``."""
    spec = get_spec(name)
    if spec.first_stage_class is None:
        raise ModelConfigError(f"{name} is a pixel-space model without a first stage")
    return diffusers_class(spec.first_stage_class)(**resolve_arch(name, arch).first_stage)


def n_params(module: nn.Module) -> int:
    """Parameter count, as recorded in the run's metadata and checked against the papers' numbers."""
    return sum(p.numel() for p in module.parameters())
