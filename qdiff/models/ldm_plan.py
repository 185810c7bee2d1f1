"""The key mapping between diffusers modules and original checkpoints, derived by walking the diffusers module tree.

A :class:`Plan` lists, for every tensor of a diffusers model, the original tensor that holds it and how it is
reshaped; one plan serves both directions (see :mod:`qdiff.models.ldm_convert`) and any width-reduced variant
of the same block structure.

Layouts of the original side:

- ``"ldm"``: ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (LDM and Stable Diffusion v1 UNets):
  ``input_blocks/middle_block/output_blocks``, ResBlock ``in_layers/emb_layers/out_layers/skip_connection``,
  AttentionBlock ``norm/qkv/proj_out`` (``qkv`` a 1x1 conv1d with the legacy head-interleaved order),
  SpatialTransformer (same parameter names as diffusers), ``Downsample.op``, ``Upsample.conv``, ``time_embed``.
- ``"ddpm"``: the DDPM/DDIM pixel-space UNet (``temb.dense``, ``down.i.block.j``, ``mid.block_1`` ...).
- ``"taming"``: the VQ/KL autoencoders of latent-diffusion (``encoder.down.i.block.j``, ``decoder.up.i``,
  ``quant_conv``, ``post_quant_conv``, ``quantize.embedding``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import nn

from qdiff.models.base import ModelConfigError

_RESNET_NAMES = {
    "ldm": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "taming": {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
               "conv2": "conv2", "conv_shortcut": "nin_shortcut"},
}
_RESNET_NAMES["ddpm"] = _RESNET_NAMES["taming"]
_ATTN_NAMES_TAMING = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class Entry:
    """One original tensor and the diffusers tensor(s) it holds."""

    orig: str
    diff: tuple[str, ...]
    #: copy | conv1d (linear weight stored as [o, i, 1]) | conv2d ([o, i, 1, 1]) | qkv (3 linears fused per head)
    kind: str = "copy"
    heads: int = 1


class Plan:
    """Builds the entry list while walking a diffusers module; checks every diffusers key is covered once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.entries: list[Entry] = []
        self._covered: set[str] = set()

    def _keys_under(self, dprefix: str) -> list[str]:
        return [k for k in self.shapes if k.startswith(dprefix + ".")]

    def add(self, entry: Entry) -> None:
        for k in entry.diff:
            if k not in self.shapes:
                raise ModelConfigError(f"ldm_convert: internal plan names '{k}', which {type(self.model).__name__} lacks")
            self._covered.add(k)
        self.entries.append(entry)

    def rename(self, dprefix: str, oprefix: str, names: Mapping[str, str] | None = None, weight_kind: str = "copy") -> None:
        """Map every tensor under ``dprefix`` to ``oprefix``, renaming first path parts by ``names``."""
        for key in self._keys_under(dprefix):
            suffix = key[len(dprefix) + 1:]
            if names is not None:
                for dname, oname in names.items():
                    if suffix.startswith(dname + "."):
                        suffix = oname + suffix[len(dname):]
                        break
                else:
                    raise ModelConfigError(f"ldm_convert: no original name for diffusers key '{key}'")
            kind = weight_kind if key.endswith(".weight") and len(self.shapes[key]) == 2 else "copy"
            self.add(Entry(f"{oprefix}.{suffix}", (key,), kind))

    def resnet(self, dprefix: str, oprefix: str, layout: str) -> None:
        self.rename(dprefix, oprefix, _RESNET_NAMES[layout])

    def attention(self, module: nn.Module, dprefix: str, oprefix: str, layout: str) -> None:
        from diffusers.models.attention_processor import Attention

        if not isinstance(module, Attention):  # Transformer2DModel: identical parameter names
            self.rename(dprefix, oprefix)
            return
        if layout != "ldm":
            self.rename(dprefix, oprefix, _ATTN_NAMES_TAMING, weight_kind="conv2d")
            return
        self.rename(f"{dprefix}.group_norm", f"{oprefix}.norm")
        for p in ("weight", "bias"):
            self.add(Entry(f"{oprefix}.qkv.{p}", tuple(f"{dprefix}.to_{c}.{p}" for c in "qkv"), "qkv", module.heads))
        self.rename(f"{dprefix}.to_out.0", f"{oprefix}.proj_out", weight_kind="conv1d")

    def check_complete(self) -> None:
        missing = [k for k in self.shapes if k not in self._covered]
        if missing:
            raise ModelConfigError(
                f"ldm_convert: {type(self.model).__name__} has a block the converter does not know: '{missing[0]}'"
                + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            )


def _samplers(block: nn.Module, name: str) -> list[nn.Module]:
    return list(getattr(block, name, None) or [])


def _plan_unet_ldm(plan: Plan, unet: nn.Module) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    plan.rename("time_embedding.linear_1", "time_embed.0")
    plan.rename("time_embedding.linear_2", "time_embed.2")
    plan.rename("conv_in", "input_blocks.0.0")
    k = 1
    for i, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            plan.resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", "ldm")
            if attns:
                plan.attention(attns[j], f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", "ldm")
            k += 1
        for d in _samplers(block, "downsamplers"):
            if isinstance(d, ResnetBlock2D):  # resblock_updown=True
                plan.resnet(f"down_blocks.{i}.downsamplers.0", f"input_blocks.{k}.0", "ldm")
            else:
                plan.rename(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op")
            k += 1

    mid = unet.mid_block
    plan.resnet("mid_block.resnets.0", "middle_block.0", "ldm")
    idx = 1
    for j, attn in enumerate(mid.attentions):
        if attn is not None:
            plan.attention(attn, f"mid_block.attentions.{j}", f"middle_block.{idx}", "ldm")
            idx += 1
        plan.resnet(f"mid_block.resnets.{j + 1}", f"middle_block.{idx}", "ldm")
        idx += 1

    k = 0
    for i, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        n_res = len(block.resnets)
        for j in range(n_res):
            plan.resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", "ldm")
            n = 1
            if attns:
                plan.attention(attns[j], f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", "ldm")
                n = 2
            if j == n_res - 1:
                for u in _samplers(block, "upsamplers"):
                    if isinstance(u, ResnetBlock2D):
                        plan.resnet(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{k}.{n}", "ldm")
                    else:
                        plan.rename(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{n}.conv")
            k += 1
    plan.rename("conv_norm_out", "out.0")
    plan.rename("conv_out", "out.2")


def _plan_taming_tower(plan: Plan, tower: nn.Module, dprefix: str, oprefix: str, layout: str) -> None:
    """DDPM UNet levels and taming Encoder/Decoder share names: ``{down|up}.L.block.j``, ``attn.j``, ``mid.*``.

    ``up.L`` is indexed by resolution level (0 = full resolution) while diffusers' ``up_blocks`` run from the
    coarsest level, so up blocks are numbered in reverse.
    """
    dp = f"{dprefix}." if dprefix else ""
    op = f"{oprefix}." if oprefix else ""
    plan.rename(f"{dp}conv_in", f"{op}conv_in")

    def level(blocks_name: str, blocks: nn.ModuleList, orig_name: str, sampler: str, orig_sampler: str) -> None:
        n = len(blocks)
        for i, block in enumerate(blocks):
            lvl = n - 1 - i if blocks_name == "up_blocks" else i
            attns = getattr(block, "attentions", None)
            for j in range(len(block.resnets)):
                plan.resnet(f"{dp}{blocks_name}.{i}.resnets.{j}", f"{op}{orig_name}.{lvl}.block.{j}", layout)
                if attns:
                    plan.attention(attns[j], f"{dp}{blocks_name}.{i}.attentions.{j}", f"{op}{orig_name}.{lvl}.attn.{j}", layout)
            if _samplers(block, sampler):
                plan.rename(f"{dp}{blocks_name}.{i}.{sampler}.0.conv", f"{op}{orig_name}.{lvl}.{orig_sampler}.conv")

    def middle() -> None:
        mid = tower.mid_block
        if len(mid.resnets) != 2 or len(mid.attentions) != 1 or mid.attentions[0] is None:
            raise ModelConfigError("ldm_convert: the original layout needs a middle block of resnet, attention, resnet")
        plan.resnet(f"{dp}mid_block.resnets.0", f"{op}mid.block_1", layout)
        plan.attention(mid.attentions[0], f"{dp}mid_block.attentions.0", f"{op}mid.attn_1", layout)
        plan.resnet(f"{dp}mid_block.resnets.1", f"{op}mid.block_2", layout)

    if hasattr(tower, "time_embedding"):
        plan.rename(f"{dp}time_embedding.linear_1", f"{op}temb.dense.0")
        plan.rename(f"{dp}time_embedding.linear_2", f"{op}temb.dense.1")
    if hasattr(tower, "down_blocks"):
        level("down_blocks", tower.down_blocks, "down", "downsamplers", "downsample")
    middle()
    if hasattr(tower, "up_blocks"):
        level("up_blocks", tower.up_blocks, "up", "upsamplers", "upsample")
    plan.rename(f"{dp}conv_norm_out", f"{op}norm_out")
    plan.rename(f"{dp}conv_out", f"{op}conv_out")


def _plan_autoencoder(plan: Plan, vae: nn.Module) -> None:
    _plan_taming_tower(plan, vae.encoder, "encoder", "encoder", "taming")
    _plan_taming_tower(plan, vae.decoder, "decoder", "decoder", "taming")
    for name in ("quant_conv", "post_quant_conv", "quantize"):
        if getattr(vae, name, None) is not None:
            plan.rename(name, name)


def is_autoencoder(model: nn.Module) -> bool:
    """VQ/KL first stages (encoder + decoder) use the taming layout; everything else is a UNet."""
    return hasattr(model, "encoder") and hasattr(model, "decoder")


def build_plan(model: nn.Module, layout: str) -> Plan:
    """The complete plan of ``model`` in original ``layout``; fails on any block the converter does not know."""
    plan = Plan(model)
    if is_autoencoder(model):
        _plan_autoencoder(plan, model)
    elif layout == "ldm":
        _plan_unet_ldm(plan, model)
    else:
        _plan_taming_tower(plan, model, "", "", "ddpm")
    plan.check_complete()
    return plan


__all__ = ["Entry", "Plan", "build_plan", "is_autoencoder"]
