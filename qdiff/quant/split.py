"""Find UNet shortcut concatenations from one traced forward pass (no class names, no source edits).

A ``TorchFunctionMode`` records every channel concatenation ``torch.cat([h, skip], dim=1)`` of two
feature maps and follows the result through ops that keep its channel layout: normalisations (module or
functional: ``group_norm``, ``layer_norm``, ...), activations, dropout, casts, and elementwise arithmetic with
anything that broadcasts onto it (``cat(...) + temb``, ``* scale``). Forward pre-hooks on the convolutions
then see which of them consume such a tensor; their split point is the channel count of the first part
(the up-path feature in diffusers and in the original DDIM/LDM code, which both write
``cat([h, hs.pop()], dim=1)``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qdiff.models.base import call

# Ops whose output keeps the channel layout of a same-shaped tensor argument (in-place variants included).
_CHANNEL_PRESERVING = {
    "group_norm", "batch_norm", "instance_norm", "layer_norm", "rms_norm",
    "silu", "relu", "gelu", "mish", "sigmoid", "tanh", "leaky_relu", "elu", "hardswish", "softplus",
    "dropout", "dropout2d", "contiguous", "clone", "to", "float", "half", "bfloat16", "type", "type_as",
    "detach", "__getitem__",
    # elementwise arithmetic: the tracked tensor may be either operand, the other broadcasts onto it
    "add", "sub", "mul", "div", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
    "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "addcmul", "clamp", "clip", "neg", "where",
}
_CONSUMERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _base(name: str) -> str:
    """An in-place op's name without its trailing underscore (``silu_`` -> ``silu``; dunders unchanged)."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


class _CatTracker(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (split, tensor kept alive)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name == "cat" and isinstance(out, torch.Tensor):
            tensors = args[0] if args else kwargs.get("tensors")
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and out.dim() >= 3
                    and dim in (1, 1 - out.dim()) and all(t.dim() == out.dim() for t in tensors)):
                self.tracked[id(out)] = (int(tensors[0].shape[1]), out)
        elif _base(name) in _CHANNEL_PRESERVING and isinstance(out, torch.Tensor) and out.dim() >= 3:
            for k, src in enumerate((*args, *kwargs.values())):
                if not (isinstance(src, torch.Tensor) and id(src) in self.tracked):
                    continue
                # the first argument may lose spatial extent (x[..., :h]); any other operand broadcasts onto out
                if (out.shape[:2] == src.shape[:2] and out.dim() == src.dim()) if k == 0 else out.shape == src.shape:
                    self.tracked[id(out)] = (self.tracked[id(src)][0], out)
                    break
        return out


@torch.no_grad()
def find_concat_splits(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> dict[str, int]:
    """``{conv module name: split channel}`` for every Conv whose input is a (normalised/activated) skip concat."""
    splits: dict[str, int] = {}
    hooks = []
    tracker = _CatTracker()

    def make_hook(name: str):
        def hook(_mod, inputs):
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor) and id(x) in tracker.tracked:
                splits[name] = tracker.tracked[id(x)][0]
        return hook

    for name, m in model.named_modules():
        if isinstance(m, _CONSUMERS) or getattr(m, "org_type", None) in ("Conv1d", "Conv2d", "ConvTranspose2d"):
            hooks.append(m.register_forward_pre_hook(make_hook(name)))
    try:
        with tracker:
            call(model, *example_inputs, example_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return splits


@torch.no_grad()
def execution_order(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
                    types: tuple = (nn.Module,)) -> list[str]:
    """Names of modules of ``types`` in the order their forward first runs."""
    order: list[str] = []
    seen: set[str] = set()
    hooks = []
    for name, m in model.named_modules():
        if name and isinstance(m, types):
            def hook(_m, _i, name=name):
                if name not in seen:
                    seen.add(name)
                    order.append(name)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        call(model, *example_inputs, example_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return order
