"""Convert between original checkpoints and diffusers modules.

The paper's LSUN models exist only as original latent-diffusion checkpoints (``model.diffusion_model.*``,
``first_stage_model.*``), and the paper's CIFAR-10 model as the DDIM repository's converted DDPM checkpoint.
The rest of qdiff only knows diffusers modules, so these tensors are renamed (and, for the attention layers,
reshaped) into the diffusers layout. The mapping is derived by walking the *diffusers* module tree, so one
plan serves both directions and any width-reduced variant of the same block structure.

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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from qdiff.models.base import ModelConfigError, WeightsNotFoundError

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

#: Suffixes that torch.load / safetensors can read (original checkpoints, not diffusers folders).
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")

_RESNET_NAMES = {
    "ldm": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "taming": {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
               "conv2": "conv2", "conv_shortcut": "nin_shortcut"},
}
_RESNET_NAMES["ddpm"] = _RESNET_NAMES["taming"]
_ATTN_NAMES_TAMING = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class _Entry:
    """One original tensor and the diffusers tensor(s) it holds."""

    orig: str
    diff: tuple[str, ...]
    #: copy | conv1d (linear weight stored as [o, i, 1]) | conv2d ([o, i, 1, 1]) | qkv (3 linears fused per head)
    kind: str = "copy"
    heads: int = 1


class _Plan:
    """Builds the entry list while walking a diffusers module; checks every diffusers key is covered once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.entries: list[_Entry] = []
        self._covered: set[str] = set()

    def _keys_under(self, dprefix: str) -> list[str]:
        return [k for k in self.shapes if k.startswith(dprefix + ".")]

    def add(self, entry: _Entry) -> None:
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
            self.add(_Entry(f"{oprefix}.{suffix}", (key,), kind))

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
            self.add(_Entry(f"{oprefix}.qkv.{p}", tuple(f"{dprefix}.to_{c}.{p}" for c in "qkv"), "qkv", module.heads))
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


def _plan_unet_ldm(plan: _Plan, unet: nn.Module) -> None:
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


def _plan_taming_tower(plan: _Plan, tower: nn.Module, dprefix: str, oprefix: str, layout: str) -> None:
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


def _plan_autoencoder(plan: _Plan, vae: nn.Module) -> None:
    _plan_taming_tower(plan, vae.encoder, "encoder", "encoder", "taming")
    _plan_taming_tower(plan, vae.decoder, "decoder", "decoder", "taming")
    for name in ("quant_conv", "post_quant_conv", "quantize"):
        if getattr(vae, name, None) is not None:
            plan.rename(name, name)


def _is_autoencoder(model: nn.Module) -> bool:
    return hasattr(model, "encoder") and hasattr(model, "decoder")


def _defaults(model: nn.Module, layout: str | None, prefix: str | None) -> tuple[str, str]:
    if _is_autoencoder(model):
        return layout or "taming", FIRST_STAGE_PREFIX if prefix is None else prefix
    layout = layout or "ldm"
    if layout not in ("ldm", "ddpm"):
        raise ModelConfigError(f"ldm_convert: UNet layout must be 'ldm' or 'ddpm', got '{layout}'")
    return layout, (UNET_PREFIX if layout == "ldm" else "") if prefix is None else prefix


def _build_plan(model: nn.Module, layout: str) -> _Plan:
    plan = _Plan(model)
    if _is_autoencoder(model):
        _plan_autoencoder(plan, model)
    elif layout == "ldm":
        _plan_unet_ldm(plan, model)
    else:
        _plan_taming_tower(plan, model, "", "", "ddpm")
    plan.check_complete()
    return plan


def _orig_shape(entry: _Entry, shapes: Mapping[str, tuple]) -> tuple:
    s = shapes[entry.diff[0]]
    if entry.kind == "conv1d":
        return (*s, 1)
    if entry.kind == "conv2d":
        return (*s, 1, 1)
    if entry.kind == "qkv":
        return (3 * s[0], *s[1:], 1) if len(s) == 2 else (3 * s[0],)
    return s


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _fail(kind: str, keys: list[str], model: nn.Module) -> ModelConfigError:
    more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
    return ModelConfigError(
        f"checkpoint does not match {type(model).__name__}: {kind} key '{keys[0]}'{more}; check model.arch or the checkpoint"
    )


def diffusers_to_original(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, prefix: str | None = None, layout: str | None = None
) -> dict[str, torch.Tensor]:
    """Original-format tensors (keys with ``prefix``) from a diffusers ``state_dict`` of ``model``'s architecture.

    ``model`` only supplies the structure (it may live on the meta device); ``state_dict`` must hold exactly
    its keys with its shapes.
    """
    layout, prefix = _defaults(model, layout, prefix)
    plan = _build_plan(model, layout)
    missing = [k for k in plan.shapes if k not in state_dict]
    if missing:
        raise _fail("missing", missing, model)
    unexpected = [k for k in state_dict if k not in plan.shapes]
    if unexpected:
        raise _fail("unexpected", unexpected, model)
    for k, shape in plan.shapes.items():
        if tuple(state_dict[k].shape) != shape:
            raise ModelConfigError(
                f"state dict does not match {type(model).__name__}: '{k}' has shape {_fmt(state_dict[k].shape)}, expected {_fmt(shape)}"
            )
    out: dict[str, torch.Tensor] = {}
    for e in plan.entries:
        t = [state_dict[k] for k in e.diff]
        if e.kind == "copy":
            v = t[0]
        elif e.kind == "conv1d":
            v = t[0].unsqueeze(-1)
        elif e.kind == "conv2d":
            v = t[0][..., None, None]
        else:
            c = t[0].shape[0]
            per_head = torch.stack([x.reshape(e.heads, c // e.heads, *x.shape[1:]) for x in t], dim=1)
            v = per_head.reshape(3 * c, *t[0].shape[1:])
            if v.dim() == 2:
                v = v.unsqueeze(-1)
        out[prefix + e.orig] = v.clone()
    return out


def original_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, prefix: str | None = None, layout: str | None = None
) -> dict[str, torch.Tensor]:
    """Diffusers state dict for ``model`` from an original checkpoint's tensors.

    Only keys starting with ``prefix`` are read (a full LDM checkpoint can be passed as is). Every tensor the
    architecture needs must be there with the right shape, and nothing else may be under ``prefix``.
    """
    layout, prefix = _defaults(model, layout, prefix)
    plan = _build_plan(model, layout)
    needed = {prefix + e.orig: e for e in plan.entries}
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise _fail("missing", missing, model)
    ignored = ("loss.",) if _is_autoencoder(model) else ()  # standalone first-stage checkpoints carry their GAN loss
    unexpected = [
        k for k in state_dict
        if k.startswith(prefix) and k not in needed and not k[len(prefix):].startswith(ignored)
    ]
    if unexpected:
        raise _fail("unexpected", unexpected, model)

    out: dict[str, torch.Tensor] = {}
    for key, e in needed.items():
        v = state_dict[key]
        want = _orig_shape(e, plan.shapes)
        if tuple(v.shape) != want:
            raise ModelConfigError(
                f"checkpoint does not match {type(model).__name__}: '{key}' has shape {_fmt(v.shape)}, "
                f"the architecture needs {_fmt(want)}; check model.arch"
            )
        if e.kind == "qkv":
            c = want[0] // 3
            per_head = v.reshape(e.heads, 3, c // e.heads, *v.shape[1:])
            for n, k in enumerate(e.diff):
                out[k] = per_head[:, n].reshape(plan.shapes[k]).clone()
        else:
            out[e.diff[0]] = v.reshape(plan.shapes[e.diff[0]]).clone()
    return out


def detect_unet_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'ddpm' for the DDIM repository's CIFAR-10 checkpoint, else 'ldm'."""
    return "ddpm" if "temb.dense.0.weight" in state_dict else "ldm"


def use_ema_weights(state_dict: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> tuple[dict[str, torch.Tensor], bool]:
    """Swap in the ``model_ema.*`` copies of the UNet weights, as the paper samples with the EMA weights.

    latent-diffusion's LitEma stores ``model.diffusion_model.a.b`` as ``model_ema.diffusion_modelab``.
    Returns the new dict and whether EMA weights were found.
    """
    keys = [k for k in state_dict if k.startswith(prefix)]
    ema = {k: EMA_PREFIX + k.split(".", 1)[1].replace(".", "") for k in keys}
    present = [k for k in keys if ema[k] in state_dict]
    if not present:
        return dict(state_dict), False
    if len(present) != len(keys):
        absent = next(k for k in keys if ema[k] not in state_dict)
        raise ModelConfigError(f"checkpoint has EMA weights for only some UNet tensors (none for '{absent}')")
    out = dict(state_dict)
    for k in keys:
        out[k] = state_dict[ema[k]]
    return out, True


def original_checkpoint(
    unet: nn.Module, first_stage: nn.Module | None = None, scale_factor: float | None = None
) -> dict[str, torch.Tensor]:
    """A latent-diffusion style state dict (``model.diffusion_model.*``, ``first_stage_model.*``, ``scale_factor``)."""
    out = diffusers_to_original(unet.state_dict(), unet)
    if first_stage is not None:
        out.update(diffusers_to_original(first_stage.state_dict(), first_stage))
    if scale_factor is not None:
        out["scale_factor"] = torch.tensor(float(scale_factor))
    return out


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an original checkpoint file, without running pickled code (see :mod:`qdiff.io`)."""
    from qdiff.io import CheckpointError, load_state_dict_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file '{path}' does not exist")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelConfigError(f"checkpoint '{path}' has an unknown suffix; expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    try:
        return load_state_dict_file(path)
    except CheckpointError as e:
        raise ModelConfigError(str(e)) from None


__all__ = [
    "UNET_PREFIX", "FIRST_STAGE_PREFIX", "EMA_PREFIX", "TEXT_ENCODER_PREFIX", "CHECKPOINT_SUFFIXES",
    "original_to_diffusers", "diffusers_to_original", "detect_unet_layout", "use_ema_weights",
    "original_checkpoint", "load_checkpoint",
]
