"""What gets reconstructed together: blocks (residual / transformer blocks) and single layers.

Blocks come from a registry of module classes (diffusers' ResnetBlock2D, Attention and its transformer blocks by
default: :data:`DIFFUSERS_BLOCKS`; ``register_block`` adds more) or from name patterns in the config, so any network works.
The top-most matching module wins; quantized layers outside every block are reconstructed one at a time.
Units are ordered by when they first run in a forward pass.
"""
from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from qdiff.quant.layers import QuantLayer

log = logging.getLogger("qdiff")

#: Module classes reconstructed as one block.
BLOCK_REGISTRY: set[type] = set()


def register_block(cls: type) -> type:
    """Reconstruct every module of class ``cls`` as one block (usable as a class decorator)."""
    BLOCK_REGISTRY.add(cls)
    return cls


#: diffusers' blocks, by module and class: UNets (ResnetBlock2D, Attention), DiT and PixArt (BasicTransformerBlock),
#: SD3 (JointTransformerBlock), FLUX (double- and single-stream blocks), Sana.
DIFFUSERS_BLOCKS = (
    ("diffusers.models.resnet", "ResnetBlock2D"),
    ("diffusers.models.attention_processor", "Attention"),
    ("diffusers.models.attention", "BasicTransformerBlock"),
    ("diffusers.models.attention", "JointTransformerBlock"),
    ("diffusers.models.transformers.transformer_flux", "FluxTransformerBlock"),
    ("diffusers.models.transformers.transformer_flux", "FluxSingleTransformerBlock"),
    ("diffusers.models.transformers.sana_transformer", "SanaTransformerBlock"),
)


def _register_diffusers_blocks() -> None:
    import importlib

    for module, name in DIFFUSERS_BLOCKS:
        try:
            register_block(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - another diffusers version
            continue


_register_diffusers_blocks()


@dataclass
class Unit:
    name: str           # module path in the model ("" never: the whole model is not a unit)
    kind: str           # "block" or "layer"
    module_type: str
    n_layers: int       # quantized layers inside


def find_units(qmodel: nn.Module, order: list[str], granularity: str = "block",
               block_patterns: list[str] | None = None) -> list[Unit]:
    """Reconstruction units of a wrapped model, in execution order (``order``: module names as executed)."""
    patterns = [re.compile(p) for p in (block_patterns or [])]
    modules = dict(qmodel.named_modules())
    layers = {n for n, m in modules.items() if isinstance(m, QuantLayer)}

    def is_block(name: str, m: nn.Module) -> bool:
        return bool(name) and (type(m) in BLOCK_REGISTRY or any(p.fullmatch(name) for p in patterns))

    units: list[Unit] = []
    covered: set[str] = set()
    if granularity == "block":
        for name, m in modules.items():  # named_modules is pre-order: ancestors come first
            if is_block(name, m) and not any(name.startswith(u.name + ".") for u in units):
                inner = [l for l in layers if l.startswith(name + ".")]
                if inner:
                    units.append(Unit(name, "block", type(m).__name__, len(inner)))
                    covered.update(inner)
    for name in sorted(layers - covered):
        units.append(Unit(name, "layer", modules[name].org_type, 1))
    rank = {n: i for i, n in enumerate(order)}
    missing = [u.name for u in units if u.name not in rank]
    units = [u for u in units if u.name in rank]
    units.sort(key=lambda u: rank[u.name])
    if missing:
        log.warning("not reconstructed (never executed on calibration data): %s", missing)
    if granularity == "block":
        _log_layer_fallback(units, len(layers))
    return units


def _log_layer_fallback(units: list[Unit], n_layers: int) -> None:
    """Say which layers fall back to layer-by-layer reconstruction, and how to make them blocks.

    A warning when most layers do (a network whose blocks qdiff does not know), else a note (the stem and the
    output layers of a diffusers UNet are single layers by design).
    """
    alone = [u.name for u in units if u.kind == "layer"]
    if not alone:
        return
    level = logging.WARNING if 2 * len(alone) > n_layers else logging.INFO
    shown = ", ".join(alone[:5]) + (", ..." if len(alone) > 5 else "")
    log.log(level, "%d of %d quantized layers are outside every registered block and are reconstructed one at a time "
            "(%d layer units: %s; %d block units); to reconstruct your blocks jointly, register their class with "
            "qdiff.recon.register_block(cls) or name them with ReconConfig(block_patterns=[regex])",
            len(alone), n_layers, len(alone), shown, len(units) - len(alone))


def unit_forward_ms(model, unit_names: list[str], x, t, cond, device, repeats: int = 3) -> tuple[dict, float]:
    """Median forward milliseconds of each unit (hooks around it) and of the whole model, at this batch (``repeats``
    timed passes after one warm-up)."""
    from qdiff.models.base import eps
    from qdiff.runtime import sync

    mods = {n: model.get_submodule(n) for n in unit_names}
    per: dict[str, list[float]] = {n: [] for n in unit_names}
    total: list[float] = []
    starts: dict[str, float] = {}

    def pre(name):
        def hook(*_):
            sync(device)
            starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(*_):
            sync(device)
            per[name].append(1e3 * (time.perf_counter() - starts[name]))
        return hook

    with torch.no_grad():
        eps(model, x, t, cond)  # warm-up
        handles = [h for n, m in mods.items() for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
        for _ in range(repeats):
            eps(model, x, t, cond)
        for h in handles:
            h.remove()
        for _ in range(repeats):  # whole model without hooks (their syncs cost time)
            sync(device)
            t0 = time.perf_counter()
            eps(model, x, t, cond)
            sync(device)
            total.append(1e3 * (time.perf_counter() - t0))
    return {n: statistics.median(v) for n, v in per.items() if v}, statistics.median(total)
