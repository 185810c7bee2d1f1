"""Convert between original checkpoints and diffusers modules.

The paper's LSUN models exist only as original latent-diffusion checkpoints (``model.diffusion_model.*``,
``first_stage_model.*``), and the paper's CIFAR-10 model as the DDIM repository's converted DDPM checkpoint.
The rest of qdiff only knows diffusers modules, so these tensors are renamed (and, for the attention layers,
reshaped) into the diffusers layout. The mapping comes from :mod:`qdiff.models.ldm_plan`, which walks the
*diffusers* module tree, so one plan serves both directions and any width-reduced variant of the same block
structure; the original layouts (``"ldm"``, ``"ddpm"``, ``"taming"``) are described there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from qdiff.models.base import ModelConfigError, WeightsNotFoundError
from qdiff.models.ldm_plan import Entry, build_plan, is_autoencoder

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

#: Suffixes that torch.load / safetensors can read (original checkpoints, not diffusers folders).
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def _defaults(model: nn.Module, layout: str | None, prefix: str | None) -> tuple[str, str]:
    """The layout and key prefix a caller left out: a full LDM checkpoint's, for the first stage or the UNet."""
    if is_autoencoder(model):
        return layout or "taming", FIRST_STAGE_PREFIX if prefix is None else prefix
    layout = layout or "ldm"
    if layout not in ("ldm", "ddpm"):
        raise ModelConfigError(f"ldm_convert: UNet layout must be 'ldm' or 'ddpm', got '{layout}'")
    return layout, (UNET_PREFIX if layout == "ldm" else "") if prefix is None else prefix


def _orig_shape(entry: Entry, shapes: Mapping[str, tuple]) -> tuple:
    """The original tensor's shape: linear weights stored as 1x1 convs, q/k/v fused into one ``qkv``."""
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
    plan = build_plan(model, layout)
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
    plan = build_plan(model, layout)
    needed = {prefix + e.orig: e for e in plan.entries}
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise _fail("missing", missing, model)
    ignored = ("loss.",) if is_autoencoder(model) else ()  # standalone first-stage checkpoints carry their GAN loss
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
